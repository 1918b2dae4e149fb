//! Activation commitments in the style of TOPLOC (arXiv 2501.16007).
//!
//! For each chunk of up to [`CHUNK`] generated tokens, the provider takes
//! the final hidden states that produced them (one row of `n_embd` values
//! per token), flattens them, and keeps the [`TOP_K`] entries of largest
//! magnitude. It commits to those (index, value) pairs with one polynomial
//! over GF([`P`]): the unique polynomial of degree < k through the points
//! (index mod P, bf16 bits of the value mod P). The commitment is its k
//! coefficients as `u16`: 256 bytes per 32 tokens. A last, shorter chunk
//! keeps k in proportion (4 entries per token), so commitments always take
//! 8 bytes per generated token.
//!
//! The auditor recomputes the hidden states with one prefill, takes its own
//! top-k of each chunk and evaluates the provider's polynomial at its own
//! indices. Where the provider kept the same index, the polynomial gives
//! back the provider's value there, which must agree with the auditor's in
//! sign and exponent and nearly in mantissa; at an index the provider did
//! not keep, it gives noise. Rounding differences between a decode step and
//! a prefill move a few top-k entries and a mantissa bit here and there; a
//! different model, quantization or skipped layers move far more.

pub use tessera_core::audit::ChunkCheck;
use tessera_core::proof::{entries_for, CHUNK, TOP_K};
use tessera_core::Proof;
/// The field's prime: the largest below 2^16.
pub const P: u32 = 65_497;

fn mul(a: u32, b: u32) -> u32 {
    ((u64::from(a) * u64::from(b)) % u64::from(P)) as u32
}

fn add(a: u32, b: u32) -> u32 {
    (a + b) % P
}

fn sub(a: u32, b: u32) -> u32 {
    (a + P - b) % P
}

fn pow(mut b: u32, mut e: u32) -> u32 {
    let mut r = 1;
    while e > 0 {
        if e & 1 == 1 {
            r = mul(r, b);
        }
        b = mul(b, b);
        e >>= 1;
    }
    r
}

fn inv(a: u32) -> u32 {
    pow(a, P - 2)
}

/// bf16 bits of `v`, rounded to nearest even.
pub fn bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// The `k` entries of largest magnitude of `values`, as (index mod P,
/// bf16 bits mod P), with distinct residues (a later entry whose index
/// collides with a kept one mod P is skipped).
fn top_entries(values: &[f32], k: usize) -> Vec<(u32, u32)> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let k0 = (k * 2).min(idx.len());
    let by_mag = |a: &u32, b: &u32| {
        values[*b as usize]
            .abs()
            .total_cmp(&values[*a as usize].abs())
            .then(a.cmp(b))
    };
    if k0 > 0 && k0 < idx.len() {
        idx.select_nth_unstable_by(k0 - 1, by_mag);
    }
    idx.truncate(k0);
    idx.sort_unstable_by(by_mag);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(k);
    for i in idx {
        let x = i % P;
        if seen.insert(x) {
            out.push((x, u32::from(bf16(values[i as usize])) % P));
            if out.len() == k {
                break;
            }
        }
    }
    out
}

/// Coefficients (lowest degree first) of the polynomial of degree < n
/// through the n points, whose x are distinct.
fn interpolate(points: &[(u32, u32)]) -> Vec<u32> {
    let n = points.len();
    // M(x) = prod (x - x_i), degree n.
    let mut m = vec![0u32; n + 1];
    m[0] = 1;
    for (deg, &(x, _)) in points.iter().enumerate() {
        for j in (0..=deg + 1).rev() {
            let shifted = if j > 0 { m[j - 1] } else { 0 };
            m[j] = sub(shifted, mul(x, m[j]));
        }
    }
    let mut coef = vec![0u32; n];
    let mut q = vec![0u32; n];
    for &(xi, yi) in points {
        // q = M / (x - xi) by synthetic division.
        q[n - 1] = m[n];
        for j in (1..n).rev() {
            q[j - 1] = add(m[j], mul(xi, q[j]));
        }
        let d = eval(&q, xi);
        let scale = mul(yi, inv(d));
        for j in 0..n {
            coef[j] = add(coef[j], mul(scale, q[j]));
        }
    }
    coef
}

fn eval(coef: &[u32], x: u32) -> u32 {
    coef.iter().rev().fold(0, |acc, &c| add(mul(acc, x), c))
}

/// The commitment of one chunk of `tokens` hidden-state rows (flattened).
pub fn commit_chunk(hidden: &[f32], tokens: usize) -> Vec<u16> {
    let k = entries_for(tokens);
    let points = top_entries(hidden, k);
    let mut coef: Vec<u16> = interpolate(&points).iter().map(|&c| c as u16).collect();
    coef.resize(k, 0);
    coef
}

/// Compare one chunk's commitment with the auditor's own rows for it.
pub fn check_chunk(commitment: &[u16], hidden: &[f32]) -> ChunkCheck {
    let coef: Vec<u32> = commitment.iter().map(|&c| u32::from(c)).collect();
    let mut check = ChunkCheck::default();
    let mut sum = 0u64;
    for (x, own) in top_entries(hidden, coef.len()) {
        check.compared += 1;
        let claimed = eval(&coef, x);
        if claimed >> 7 == own >> 7 {
            check.exponent_matches += 1;
            let d = (claimed & 0x7F).abs_diff(own & 0x7F);
            sum += u64::from(d);
            check.mantissa_max = check.mantissa_max.max(d);
        }
    }
    if check.exponent_matches > 0 {
        check.mantissa_mean = sum as f64 / check.exponent_matches as f64;
    }
    check
}

/// Builds a [`Proof`] as tokens are generated.
#[derive(Default)]
pub struct ProofBuilder {
    rows: Vec<f32>,
    in_chunk: usize,
    proof: Proof,
}

impl ProofBuilder {
    /// An empty proof with the standard chunk and top-k sizes.
    pub fn new() -> Self {
        ProofBuilder {
            proof: Proof {
                chunk: CHUNK as u32,
                top_k: TOP_K as u32,
                ..Proof::default()
            },
            ..ProofBuilder::default()
        }
    }

    /// One more generated token: the hidden state that produced it and its
    /// log-probability.
    pub fn push(&mut self, hidden: &[f32], logprob: f32) {
        self.rows.extend_from_slice(hidden);
        self.in_chunk += 1;
        self.proof.logprobs.push(logprob);
        if self.in_chunk == CHUNK {
            self.seal();
        }
    }

    fn seal(&mut self) {
        if self.in_chunk == 0 {
            return;
        }
        for c in commit_chunk(&self.rows, self.in_chunk) {
            self.proof.commitments.extend_from_slice(&c.to_le_bytes());
        }
        self.rows.clear();
        self.in_chunk = 0;
    }

    /// The proof of everything pushed (the last chunk may be short).
    pub fn finish(mut self) -> Proof {
        self.seal();
        self.proof
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 8.0
            })
            .collect()
    }

    #[test]
    fn interpolation_passes_through_every_point() {
        let pts: Vec<(u32, u32)> = (0..128).map(|i| (i * 131 % P, (i * i + 7) % P)).collect();
        let c = interpolate(&pts);
        assert_eq!(c.len(), 128);
        for (x, y) in pts {
            assert_eq!(eval(&c, x), y);
        }
    }

    #[test]
    fn the_same_states_match_exactly_and_other_states_do_not() {
        let h = rows(1, 32 * 576);
        let c = commit_chunk(&h, 32);
        assert_eq!(c.len(), TOP_K);
        let same = check_chunk(&c, &h);
        assert_eq!(
            (same.compared, same.exponent_matches, same.mantissa_max),
            (128, 128, 0)
        );
        // Tiny perturbations (rounding): still agree.
        let near: Vec<f32> = h.iter().map(|v| v * (1.0 + 1e-4)).collect();
        let n = check_chunk(&c, &near);
        assert!(n.exponent_matches >= 120 && n.mantissa_mean < 1.0, "{n:?}");
        // Different states: the polynomial is noise at their indices.
        let other = check_chunk(&c, &rows(2, 32 * 576));
        assert!(other.exponent_matches < 10, "{other:?}");
    }

    #[test]
    fn proofs_chunk_tokens_and_survive_json() {
        let mut b = ProofBuilder::new();
        let h = rows(3, 70 * 64);
        for t in 0..70 {
            b.push(&h[t * 64..(t + 1) * 64], -0.5);
        }
        let p = b.finish();
        assert_eq!(p.chunks(), 3, "32 + 32 + 6 tokens");
        assert_eq!(p.commitments.len(), 70 * 8, "8 bytes per token");
        assert!(p.well_formed());
        let last = p.chunk_commitment(2).unwrap();
        assert_eq!(last.len(), 24);
        assert_eq!(check_chunk(&last, &h[64 * 64..]).exponent_matches, 24);
        assert_eq!(p.logprobs.len(), 70);
        let back: Proof = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        let first = p.chunk_commitment(0).unwrap();
        assert_eq!(check_chunk(&first, &h[..32 * 64]).exponent_matches, 128);
        assert!(p.chunk_commitment(3).is_none());
    }
}
