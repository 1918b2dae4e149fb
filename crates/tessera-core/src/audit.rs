//! What an audit is given and what it finds, shared by the auditor (in
//! `tessera-engine`), the gateway's audit policy (in `tessera-net`) and the
//! protocol that carries audits to auditor processes (`tessera-protocol`).

use serde::{Deserialize, Serialize};

use crate::{FinishReason, Proof, SamplingParams, Token};

/// One finished job, as the gateway hands it to the auditor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditJob {
    /// The prompt the provider was given (a continued answer's part includes
    /// the tokens before it).
    pub prompt: Vec<Token>,
    /// Every token the provider says it generated, a final end-of-generation
    /// token included.
    pub output: Vec<Token>,
    /// The sampling settings and seed the answer claims.
    pub sampling: SamplingParams,
    /// Its logprobs and commitments; `None` for a part that ended without
    /// a proof (its provider died or sent none): then only seeded sampling
    /// is checked, which needs nothing but prompt, seed and tokens.
    pub proof: Option<Proof>,
    /// Why it says it ended; `None` for a part cut off before an end.
    pub finish_reason: Option<FinishReason>,
    /// The gateway itself saw a stop sequence end the answer.
    pub stopped_by_sequence: bool,
    /// The part's `max_tokens` (what was left of the request's).
    pub max_tokens: Option<u32>,
    /// The provider's context per request (prompt + output).
    pub context: usize,
    /// The request asked to generate past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Generated tokens the provider claimed in its usage.
    pub claimed_completion_tokens: u32,
}

/// What the auditor found.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Evidence {
    /// Tokens checked.
    pub tokens: usize,
    /// Tokens that are not the sampling rule's pick by more than the margin.
    pub sampling_mismatches: usize,
    /// Tokens that differ from the pick within the margin.
    pub tolerated: usize,
    /// The first mismatch beyond the margin.
    pub first_mismatch: Option<usize>,
    /// The largest score gap (logit units) between the rule's pick and the
    /// provider's token, where they differ.
    pub max_gap: f64,
    /// Largest difference between a claimed and a recomputed logprob.
    pub logprob_max_error: f32,
    /// The second largest (an honest provider's arithmetic slips at one
    /// position now and then; at two, rarely enough to call it a lie).
    #[serde(default)]
    pub logprob_second_error: f32,
    /// Their mean difference.
    pub logprob_mean_error: f32,
    /// Each chunk's commitment check.
    pub chunks: Vec<ChunkCheck>,
    /// The worst chunk's share of agreeing exponents and mean mantissa gap.
    pub worst_exponent_share: f64,
    /// See `worst_exponent_share`.
    pub worst_mantissa_mean: f64,
    /// Why it failed; empty when it passed.
    pub failures: Vec<String>,
}

impl Evidence {
    /// Whether nothing failed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// How one chunk's commitment compares with the auditor's hidden states.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkCheck {
    /// The auditor's top-k entries looked up in the provider's polynomial.
    pub compared: usize,
    /// Of those, how many agree in sign and exponent.
    pub exponent_matches: usize,
    /// Mean and largest absolute difference of the 7-bit mantissas where
    /// sign and exponent agree.
    pub mantissa_mean: f64,
    /// See `mantissa_mean`.
    pub mantissa_max: u32,
}
