//! Seeded Gumbel-max sampling, the rule a verifier can replay.
//!
//! With temperature `T > 0`, the token chosen at absolute position `t` is
//! `argmax_i(logit_i / T + g(seed, t, i))` over the tokens that survive the
//! top-k, top-p and min-p filters, where `g` is Gumbel noise computed from a
//! counter-based hash of `(seed, t, i)`. With `T = 0` it is the plain argmax.
//! Nothing here keeps state between tokens, so an auditor holding its own
//! logits for position `t` picks the same token without replaying a stream of
//! random numbers.

use serde::{Deserialize, Serialize};

use crate::Token;

/// How one request wants its tokens chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` highest logits; 0 disables the filter.
    pub top_k: u32,
    /// Nucleus filter: keep the smallest set of tokens whose probability mass
    /// reaches `top_p`; 1.0 disables it.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the best one's;
    /// 0.0 disables it.
    pub min_p: f32,
    /// The seed of the Gumbel noise.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// SplitMix64's finaliser: a cheap, well-mixed 64-bit permutation.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The Gumbel noise for `token` at absolute position `pos` under `seed`.
///
/// `u = (hash >> 11 + 0.5) / 2^53` lies strictly inside (0, 1), so the noise
/// `-ln(-ln u)` is always finite (between about -3.6 and 36.7).
pub fn gumbel(seed: u64, pos: u32, token: Token) -> f64 {
    let h = mix64(mix64(mix64(seed) ^ u64::from(pos)) ^ (token as u32 as u64));
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(-u.ln()).ln()
}

/// The natural log of the softmax denominator, computed stably.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    max + sum.ln()
}

/// Index of the largest logit; ties go to the lowest token id.
pub fn argmax(logits: &[f32]) -> Token {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as Token
}

/// The tokens that survive the top-k, top-p and min-p filters, in descending
/// logit order. Returns `None` when no filter is active (every token stays).
pub fn candidates(logits: &[f32], p: &SamplingParams) -> Option<Vec<Token>> {
    let k_active = p.top_k > 0 && (p.top_k as usize) < logits.len();
    let p_active = p.top_p < 1.0;
    let min_p_active = p.min_p > 0.0;
    if !k_active && !p_active && !min_p_active {
        return None;
    }
    let mut ids: Vec<Token> = (0..logits.len() as Token).collect();
    let by_logit = |a: &Token, b: &Token| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k_active {
        let k = p.top_k as usize;
        ids.select_nth_unstable_by(k - 1, by_logit);
        ids.truncate(k);
    }
    ids.sort_unstable_by(by_logit);
    if p_active || min_p_active {
        let t = p.temperature.max(f32::MIN_POSITIVE);
        let max = logits[ids[0] as usize] / t;
        let weights: Vec<f64> = ids
            .iter()
            .map(|&i| f64::from(logits[i as usize] / t - max).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut keep = ids.len();
        if p_active {
            let mut mass = 0.0;
            for (n, w) in weights.iter().enumerate() {
                mass += w / total;
                if mass >= f64::from(p.top_p) {
                    keep = n + 1;
                    break;
                }
            }
        }
        if min_p_active {
            // weights[0] is 1.0: the best token's weight relative to itself.
            let floor = f64::from(p.min_p);
            let above = weights.iter().take_while(|&&w| w >= floor).count().max(1);
            keep = keep.min(above);
        }
        ids.truncate(keep.max(1));
    }
    Some(ids)
}

/// Pick the token for absolute position `pos` from that position's logits.
pub fn sample(logits: &[f32], p: &SamplingParams, pos: u32) -> Token {
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / f64::from(p.temperature);
    let score = |i: Token| f64::from(logits[i as usize]) * inv_t + gumbel(p.seed, pos, i);
    let pick = |ids: &mut dyn Iterator<Item = Token>| {
        let mut best: Option<(Token, f64)> = None;
        for i in ids {
            let s = score(i);
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((i, s));
            }
        }
        best.map_or(0, |(i, _)| i)
    };
    match candidates(logits, p) {
        Some(ids) => pick(&mut ids.into_iter()),
        None => pick(&mut (0..logits.len() as Token)),
    }
}

/// Log-probability of `token` and the `n` most likely alternatives, all under
/// the model's raw distribution (softmax of the logits at T = 1, before any
/// filter), which is what a verifier recomputes.
pub fn logprobs(logits: &[f32], token: Token, n: usize) -> (f32, Vec<(Token, f32)>) {
    let lse = log_sum_exp(logits);
    let chosen = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |l| l - lse);
    if n == 0 {
        return (chosen, Vec::new());
    }
    let mut ids: Vec<Token> = (0..logits.len() as Token).collect();
    let n = n.min(ids.len());
    let by_logit = |a: &Token, b: &Token| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    ids.select_nth_unstable_by(n - 1, by_logit);
    ids.truncate(n);
    ids.sort_unstable_by(by_logit);
    (
        chosen,
        ids.into_iter()
            .map(|i| (i, logits[i as usize] - lse))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy_logits() -> Vec<f32> {
        (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect()
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        assert_eq!(
            sample(&[1.0, 3.0, 3.0, 2.0], &SamplingParams::greedy(), 0),
            1
        );
    }

    #[test]
    fn same_seed_and_position_give_same_token_and_seeds_differ() {
        let logits = vec![0.0f32; 5000];
        let p = SamplingParams {
            seed: 42,
            ..SamplingParams::default()
        };
        let a: Vec<Token> = (0..64).map(|pos| sample(&logits, &p, pos)).collect();
        let b: Vec<Token> = (0..64).map(|pos| sample(&logits, &p, pos)).collect();
        assert_eq!(a, b);
        let q = SamplingParams { seed: 43, ..p };
        let c: Vec<Token> = (0..64).map(|pos| sample(&logits, &q, pos)).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn gumbel_max_follows_the_softmax_distribution() {
        // Two tokens with logits 0 and ln 3: token 1 should win ~75% of draws.
        let logits = [0.0f32, 3.0f32.ln()];
        let wins = (0..20_000u32)
            .filter(|&pos| sample(&logits, &SamplingParams::default(), pos) == 1)
            .count();
        let share = wins as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
    }

    #[test]
    fn top_k_restricts_to_the_k_best() {
        let logits = toy_logits();
        let p = SamplingParams {
            top_k: 3,
            temperature: 5.0,
            ..SamplingParams::default()
        };
        let best = candidates(&logits, &p).unwrap();
        assert_eq!(best.len(), 3);
        for pos in 0..200 {
            assert!(best.contains(&sample(&logits, &p, pos)));
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits = [10.0f32, 9.0, 0.0, -5.0];
        let p = SamplingParams {
            top_p: 0.5,
            ..SamplingParams::default()
        };
        assert_eq!(candidates(&logits, &p).unwrap(), vec![0]);
        let p = SamplingParams {
            min_p: 0.2,
            ..SamplingParams::default()
        };
        assert_eq!(candidates(&logits, &p).unwrap(), vec![0, 1]);
        assert_eq!(candidates(&logits, &SamplingParams::default()), None);
    }

    #[test]
    fn logprobs_are_normalised() {
        let logits = toy_logits();
        let (lp, top) = logprobs(&logits, 5, 4);
        assert!(lp < 0.0);
        assert_eq!(top.len(), 4);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        let total: f64 = logits
            .iter()
            .map(|&l| f64::from(l - log_sum_exp(&logits)).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-3);
    }
}
