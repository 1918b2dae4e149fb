//! What a generation job is and what it produces.

use serde::{Deserialize, Serialize};

/// A token id in the model's vocabulary.
pub type Token = i32;

/// How one request wants its tokens chosen (the rule itself is
/// `tessera_engine::sampling`: seeded Gumbel-max, replayable by an
/// auditor).
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

/// Most stop sequences one request may carry.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Longest stop sequence, in bytes: every sequence is matched against the
/// text after every token, so their length is a cost the client imposes on
/// the provider.
pub const MAX_STOP_BYTES: usize = 256;

/// One generation job, already templated and tokenized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    /// Prompt tokens.
    pub prompt: Vec<Token>,
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Most tokens to generate; `None` means until the context is full.
    pub max_tokens: Option<u32>,
    /// Text sequences that end the generation (not included in the output).
    pub stop: Vec<String>,
    /// Report this many alternatives per token (0 = only the chosen token's
    /// log-probability).
    pub top_logprobs: usize,
    /// Keep going past end-of-generation tokens (benchmarks use this to
    /// generate a fixed number of tokens).
    pub ignore_eos: bool,
    /// Keep this request's KV cache after it ends, to be reused by a later
    /// request of the same key that starts with the same tokens (a chat's
    /// next turn). `None`: no reuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PrefixCache>,
}

/// Whose prefix cache a request may use and how its own entry is named.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PrefixCache {
    /// Requests reuse only entries of the same key: one account at one
    /// gateway (an opaque hash, so a provider cannot tell who it is), so
    /// time to first token reveals nothing about other clients' prompts.
    pub key: u64,
    /// The name of the entry this request leaves behind (the job's id); an
    /// engine reports it when it evicts the entry.
    pub tag: String,
}

/// Why a generation ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
}

/// Token counts of one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// One generated token and the text it released.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    /// The token chosen.
    pub token: Token,
    /// Text safe to show now (may be empty while a stop sequence or a split
    /// UTF-8 character is pending).
    pub text: String,
    /// Log-probability of `token` under the model's raw distribution.
    pub logprob: f32,
    /// The most likely alternatives and their log-probabilities, when asked.
    pub top_logprobs: Vec<(Token, f32)>,
}
