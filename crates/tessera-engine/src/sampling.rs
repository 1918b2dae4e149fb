//! Seeded Gumbel-max sampling, the rule a verifier can replay.
//!
//! With temperature `T > 0`, the token chosen at absolute position `t` is
//! `argmax_i(logit_i / T + g(seed, t, i))` over the tokens that survive the
//! top-k, top-p and min-p filters, where `g` is Gumbel noise computed from a
//! counter-based hash of `(seed, t, i)`. With `T = 0` it is the plain argmax.
//! Nothing here keeps state between tokens, so an auditor holding its own
//! logits for position `t` picks the same token without replaying a stream of
//! random numbers.

use tessera_core::SamplingParams;
use tessera_core::Token;

/// SplitMix64's finaliser: a cheap, well-mixed 64-bit permutation.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-position key of the noise: one hash of (seed, position).
fn position_key(seed: u64, pos: u32) -> u64 {
    mix64(mix64(seed) ^ u64::from(pos))
}

/// The 53-bit integer `k` behind the uniform `u = (k + 0.5) / 2^53` of
/// `token` under `key`: SplitMix64's stream indexed by token id.
fn uniform_bits(key: u64, token: Token) -> u64 {
    mix64(key.wrapping_add((token as u32 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 11
}

const TWO_53: f64 = (1u64 << 53) as f64;

/// The Gumbel noise for `token` at absolute position `pos` under `seed`.
///
/// `u = (k + 0.5) / 2^53` lies strictly inside (0, 1), so the noise
/// `-ln(-ln u)` is always finite (between about -3.6 and 37.4).
pub fn gumbel(seed: u64, pos: u32, token: Token) -> f64 {
    gumbel_from_bits(uniform_bits(position_key(seed, pos), token))
}

fn gumbel_from_bits(k: u64) -> f64 {
    let u = (k as f64 + 0.5) / TWO_53;
    -(-u.ln()).ln()
}

/// `e^x` for f32, branch-free so loops over a vocabulary vectorise.
/// Relative error below 2e-7 for x in [-87, 88]; smaller x gives 0.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // x = n ln2 + r with |r| <= ln2 / 2; e^x = 2^n e^r. Rounding by adding
    // and subtracting 1.5 * 2^23 keeps the loop free of library calls.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    // The low mantissa bits of `t` hold n itself: integer-only, so SIMD-able.
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_452 + r * 0.001_388_949_8)))));
    let bits = (ni.wrapping_add(127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// Lanes of the reductions below: eight independent accumulators let the
/// compiler use SIMD registers (a single running sum or max cannot be).
const LANES: usize = 8;

/// Largest element (NEG_INFINITY for an empty slice).
fn max_of(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(tail, f32::max)
}

/// Sum in a fixed order (lane-wise, then the lanes, then the tail).
fn sum_of(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `w_i = exp((l_i - max) * inv_t)` into `out`; returns their sum.
fn weights(logits: &[f32], max: f32, inv_t: f32, out: &mut Vec<f32>) -> f32 {
    out.clear();
    out.resize(logits.len(), 0.0);
    for (w, &l) in out.iter_mut().zip(logits) {
        *w = fast_exp((l - max) * inv_t);
    }
    sum_of(out)
}

/// The natural log of the softmax denominator, computed stably.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = max_of(logits);
    if !max.is_finite() {
        return max;
    }
    let mut w = Vec::new();
    max + weights(logits, max, 1.0, &mut w).ln()
}

/// Index of the largest logit; ties go to the lowest token id.
pub fn argmax(logits: &[f32]) -> Token {
    let max = max_of(logits);
    logits.iter().position(|&l| l == max).unwrap_or(0) as Token
}

/// The `k` best tokens of the whole vocabulary in descending logit order
/// (ties: lower id first), in one pass that keeps only tokens above the
/// running k-th best.
fn top_k_all(logits: &[f32], k: usize) -> Vec<Token> {
    let k = k.min(logits.len());
    let mut buf: Vec<Token> = Vec::with_capacity(4 * k + 1);
    if k == 0 {
        return buf;
    }
    let mut threshold = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        // A token equal to the threshold ranks after it (larger id): skip.
        if l > threshold || buf.len() < k {
            buf.push(i as Token);
            if buf.len() >= 4 * k {
                top(logits, &mut buf, k);
                threshold = logits[buf[k - 1] as usize];
            }
        }
    }
    top(logits, &mut buf, k);
    buf
}

/// Order by logit, highest first; ties by lower token id.
fn by_logit(logits: &[f32]) -> impl Fn(&Token, &Token) -> std::cmp::Ordering + '_ {
    move |a, b| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    }
}

/// The `k` best tokens in descending logit order.
fn top(logits: &[f32], ids: &mut Vec<Token>, k: usize) {
    let k = k.min(ids.len());
    if k == 0 {
        ids.clear();
        return;
    }
    if k < ids.len() {
        ids.select_nth_unstable_by(k - 1, by_logit(logits));
        ids.truncate(k);
    }
    ids.sort_unstable_by(by_logit(logits));
}

/// The tokens that survive the top-k, top-p and min-p filters, in descending
/// logit order. Returns `None` when no filter is active (every token stays).
///
/// Probabilities are the softmax of `logits / T`. top-p keeps the shortest
/// prefix of the sorted tokens whose mass reaches `top_p`; min-p keeps tokens
/// whose probability is at least `min_p` times the best one's.
pub fn candidates(logits: &[f32], p: &SamplingParams) -> Option<Vec<Token>> {
    let k_active = p.top_k > 0 && (p.top_k as usize) < logits.len();
    let p_active = p.top_p < 1.0;
    let min_p_active = p.min_p > 0.0;
    if (!k_active && !p_active && !min_p_active) || logits.is_empty() {
        return None;
    }
    if !p_active && !min_p_active {
        return Some(top_k_all(logits, p.top_k as usize));
    }
    let inv_t = 1.0 / p.temperature.max(f32::MIN_POSITIVE);
    let max = max_of(logits);
    let mut w = Vec::new();
    let total = weights(logits, max, inv_t, &mut w);
    // w of the best token is 1, so min-p is a floor on w itself.
    let floor = if min_p_active { p.min_p } else { 0.0 };
    let limit = if k_active {
        p.top_k as usize
    } else {
        logits.len()
    };
    let above = |theta: f32| -> Vec<Token> {
        (0..logits.len() as Token)
            .filter(|&i| w[i as usize] >= theta.max(floor))
            .collect()
    };
    if !p_active {
        let mut ids = above(0.0);
        top(logits, &mut ids, limit);
        return Some(ids);
    }
    // The nucleus is usually a handful of tokens: rather than sort the whole
    // vocabulary, sort only the tokens above a weight threshold, lowering it
    // until those tokens hold `top_p` of the mass (then the sorted prefix is
    // the same as a full sort's). Tokens below the threshold all come later
    // in the order, so the prefix is exact.
    let target = f64::from(p.top_p) * f64::from(total);
    let mut theta = 1e-3f32;
    loop {
        let mut ids = above(theta);
        top(logits, &mut ids, limit);
        let mut mass = 0.0f64;
        for (n, &i) in ids.iter().enumerate() {
            mass += f64::from(w[i as usize]);
            if mass >= target {
                ids.truncate(n + 1);
                return Some(ids);
            }
        }
        if ids.len() >= limit || theta <= floor || theta == 0.0 {
            return Some(ids);
        }
        theta = if theta < 1e-30 { 0.0 } else { theta * 1e-3 };
    }
}

/// The rule's score of `token` at absolute position `pos`, in logit units
/// (`logit + T × gumbel`; the plain logit when greedy): the rule picks the
/// best-scoring candidate, and how far another token trails it tells an
/// auditor whether rounding could have swapped them.
pub fn score(logits: &[f32], p: &SamplingParams, pos: u32, token: Token) -> f64 {
    let l = f64::from(logits[token as usize]);
    if p.temperature <= 0.0 {
        return l;
    }
    l + f64::from(p.temperature) * gumbel(p.seed, pos, token)
}

/// Pick the token for absolute position `pos` from that position's logits:
/// `argmax_i(logit_i / T + gumbel(seed, pos, i))` over the candidates, or
/// the plain argmax when `T = 0`.
pub fn sample(logits: &[f32], p: &SamplingParams, pos: u32) -> Token {
    if p.temperature <= 0.0 || logits.is_empty() {
        return argmax(logits);
    }
    let key = position_key(p.seed, pos);
    let inv_t = 1.0 / f64::from(p.temperature);
    let score =
        |i: Token| f64::from(logits[i as usize]) * inv_t + gumbel_from_bits(uniform_bits(key, i));
    if let Some(ids) = candidates(logits, p) {
        let mut best = (ids[0], score(ids[0]));
        for &i in &ids[1..] {
            let s = score(i);
            if s > best.1 || (s == best.1 && i < best.0) {
                best = (i, s);
            }
        }
        return best.0;
    }
    sample_full(logits, inv_t, key, score)
}

/// Safety factor of the pre-filter in [`sample_full`]: the approximations in
/// it (fast exp, f32 rounding) err by under 1e-5 relative, so 1% is ample.
const SLACK: f32 = 1.01;

/// Gumbel-max over the whole vocabulary without two logarithms per token.
///
/// Token i beats the best score `s` only if `-ln u_i < exp(l_i/T - s)`, and
/// since `-ln u >= 1 - u`, only if `1 - u_i < exp(l_i/T - s)`. That test
/// needs one hash and one (approximate, vectorised) exp per token; the exact
/// score is computed only for the few tokens that pass, with a safety factor
/// far above the approximations' error, so the result is the exact rule's.
fn sample_full(logits: &[f32], inv_t: f64, key: u64, score: impl Fn(Token) -> f64) -> Token {
    let first = argmax(logits);
    let max = f64::from(logits[first as usize]) * inv_t;
    let mut best = (first, score(first));
    // threshold_i = exp(l_i/T - best) = w_i * exp(max - best), w_i <= 1.
    let mut scale = (max - best.1).exp() as f32 * SLACK;
    let inv_t32 = inv_t as f32;
    let max32 = logits[first as usize];
    const CHUNK: usize = 256;
    let mut w = [0.0f32; CHUNK];
    for (c, chunk) in logits.chunks(CHUNK).enumerate() {
        for (wi, &l) in w.iter_mut().zip(chunk) {
            *wi = fast_exp((l - max32) * inv_t32);
        }
        for (j, &wj) in w[..chunk.len()].iter().enumerate() {
            let i = (c * CHUNK + j) as Token;
            let bits = uniform_bits(key, i);
            let one_minus_u = ((TWO_53 - bits as i64 as f64 - 0.5) * (1.0 / TWO_53)) as f32;
            if one_minus_u < wj * scale && i != best.0 {
                let s = score(i);
                if s > best.1 || (s == best.1 && i < best.0) {
                    best = (i, s);
                    scale = (max - best.1).exp() as f32 * SLACK;
                }
            }
        }
    }
    best.0
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
    let ids = top_k_all(logits, n);
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

    /// The rule as DESIGN.md states it, computed the slow way.
    fn reference(logits: &[f32], p: &SamplingParams, pos: u32) -> Token {
        let ids: Vec<Token> =
            candidates(logits, p).unwrap_or_else(|| (0..logits.len() as Token).collect());
        let score = |i: Token| {
            f64::from(logits[i as usize]) / f64::from(p.temperature) + gumbel(p.seed, pos, i)
        };
        let mut best = ids[0];
        for &i in &ids {
            if score(i) > score(best) || (score(i) == score(best) && i < best) {
                best = i;
            }
        }
        best
    }

    #[test]
    fn fast_full_vocabulary_path_matches_the_definition() {
        let mut logits = toy_logits();
        logits.extend((0..40_000u64).map(|i| ((i * 104_729) % 3000) as f32 / 150.0 - 12.0));
        for (t, seed) in [(1.0f32, 1u64), (0.7, 2), (1.5, 3), (0.2, 4), (2.0, 5)] {
            let p = SamplingParams {
                temperature: t,
                seed,
                ..SamplingParams::default()
            };
            for pos in 0..300 {
                assert_eq!(
                    sample(&logits, &p, pos),
                    reference(&logits, &p, pos),
                    "T={t} pos={pos}"
                );
            }
        }
    }

    #[test]
    fn nucleus_matches_a_full_sort() {
        let logits = toy_logits();
        let p = SamplingParams {
            top_p: 0.9,
            temperature: 0.8,
            ..SamplingParams::default()
        };
        let got = candidates(&logits, &p).unwrap();
        let mut all: Vec<Token> = (0..logits.len() as Token).collect();
        all.sort_by(|a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        let w: Vec<f64> = all
            .iter()
            .map(|&i| (f64::from(logits[i as usize] - logits[all[0] as usize]) / 0.8).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut mass = 0.0;
        let n = w
            .iter()
            .position(|x| {
                mass += x / total;
                mass >= 0.9
            })
            .unwrap()
            + 1;
        assert_eq!(got, all[..n].to_vec());
        assert!(
            got.len() > 64,
            "the nucleus here is larger than the first guess"
        );
    }

    #[test]
    fn top_k_matches_a_full_sort_with_ties() {
        let logits: Vec<f32> = (0..5000).map(|i| ((i * 31) % 97) as f32).collect();
        let mut all: Vec<Token> = (0..logits.len() as Token).collect();
        all.sort_by(|a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        for k in [1, 3, 40, 100, 5000] {
            assert_eq!(top_k_all(&logits, k), all[..k].to_vec(), "k={k}");
        }
        assert_eq!(argmax(&logits), all[0]);
    }

    #[test]
    fn fast_exp_is_accurate() {
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let rel = (f64::from(fast_exp(x)) - f64::from(x).exp()).abs() / f64::from(x).exp();
            assert!(rel < 1e-6, "x={x} rel={rel}");
        }
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
