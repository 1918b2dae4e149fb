//! Tessera's inference engine, independent of any particular runtime.
//!
//! The crate draws the line between "a model that evaluates token batches"
//! and everything Tessera builds on top of it:
//!
//! - [`Model`] (thread-safe: tokenizer, chat template, vocabulary facts) and
//!   [`Engine`] (one evaluation context: `decode` a batch of tokens across
//!   many sequences, per-position logits and hidden states) are the traits a
//!   runtime implements. `tessera-llama` implements them with llama.cpp; the
//!   rest of the code never touches FFI.
//! - [`sampling`] is the seeded Gumbel-max rule of DESIGN.md §3, in plain
//!   Rust so that a verifier can replay it from its own logits.
//! - [`text`] turns token bytes into client text and applies stop sequences.
//! - [`Scheduler`] runs continuous batching on a dedicated thread: every
//!   active sequence advances by one token per `decode` call, and prompts of
//!   newly admitted requests ride along in the same batch.

pub mod audit;
pub mod commit;
pub mod sampling;
mod scheduler;
pub mod text;

use serde::{Deserialize, Serialize};

pub use scheduler::{Event, Scheduler, SchedulerConfig, SchedulerHandle, SubmitError, WrapUp};
use tessera_core::Token;

/// A sequence (slot) id inside one evaluation context.
pub type SeqId = i32;

/// Facts about a loaded model that the rest of Tessera needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Human-readable name from the GGUF metadata (`general.name`).
    pub name: String,
    /// Tokens in the vocabulary (width of a logit row).
    pub n_vocab: usize,
    /// Width of the final hidden state.
    pub n_embd: usize,
    /// Context length the model was trained with.
    pub n_ctx_train: usize,
    /// Every token the vocabulary marks as end of generation.
    pub eog_tokens: Vec<Token>,
}

/// One chat message, as the chat template consumes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: String,
}

/// One row of a batch: `token` at absolute position `pos` of sequence `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchEntry {
    /// The token.
    pub token: Token,
    /// Its absolute position in its sequence.
    pub pos: u32,
    /// The sequence (slot) it belongs to.
    pub seq: SeqId,
    /// Whether the caller wants this position's logits back.
    pub output: bool,
}

/// What went wrong inside the engine.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    /// The model file could not be loaded.
    #[error("the model could not be loaded: {0}")]
    Load(String),
    /// The prompt does not fit the context.
    #[error("the prompt has {prompt} tokens but the context holds {limit}")]
    ContextLength {
        /// Tokens of the prompt.
        prompt: usize,
        /// Tokens the context holds.
        limit: usize,
    },
    /// The chat template refused the messages.
    #[error("the chat template could not be applied: {0}")]
    Template(String),
    /// The text could not be tokenized.
    #[error("the text could not be tokenized: {0}")]
    Tokenize(String),
    /// llama.cpp failed to evaluate a batch.
    #[error("llama.cpp failed to evaluate a batch: {0}")]
    Decode(String),
    /// The engine is gone.
    #[error("the engine has shut down")]
    Closed,
}

/// The thread-safe half of a runtime: everything that needs only the weights'
/// vocabulary, so HTTP handlers can tokenize without waiting for the engine.
pub trait Model: Send + Sync + 'static {
    /// Facts about the model.
    fn info(&self) -> &ModelInfo;
    /// Render chat messages with the model's own template, ending with the
    /// opening of the assistant's turn.
    fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, EngineError>;
    /// Tokenize text; special-token text (such as `<|im_start|>`) is parsed.
    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<Token>, EngineError>;
    /// The bytes one token stands for (special tokens render as nothing).
    fn token_bytes(&self, token: Token) -> Vec<u8>;
    /// Whether `token` ends a generation.
    fn is_eog(&self, token: Token) -> bool {
        self.info().eog_tokens.contains(&token)
    }
}

/// Logits (and optionally hidden states) of the output rows of one batch.
#[derive(Default)]
pub struct BatchOutput {
    /// `rows × n_vocab` logits, one row per entry flagged `output`, in order.
    pub logits: Vec<f32>,
    /// `rows × n_embd` final hidden states, when the engine was asked for them.
    pub hidden: Vec<f32>,
}

/// One evaluation context: a KV cache shared by many sequences.
///
/// Not `Send`: an engine is built and used on the scheduler's own thread.
pub trait Engine {
    /// Evaluate a batch and fill `out` with the flagged rows' logits (and
    /// hidden states if `want_hidden`).
    fn decode(
        &mut self,
        batch: &[BatchEntry],
        want_hidden: bool,
        out: &mut BatchOutput,
    ) -> Result<(), EngineError>;
    /// Forget a sequence's KV cache so its slot can be reused.
    fn clear_sequence(&mut self, seq: SeqId);
    /// Keep only the first `keep` positions of a sequence's KV cache (a
    /// kept prefix reused by the next request); false if this engine cannot
    /// (then the caller clears the sequence and evaluates from scratch).
    fn truncate_sequence(&mut self, _seq: SeqId, _keep: usize) -> bool {
        false
    }
    /// Sequences this context can hold at once.
    fn max_sequences(&self) -> usize;
    /// Most tokens one `decode` call may carry.
    fn max_batch(&self) -> usize;
    /// Positions (prompt + output) one sequence may use.
    fn context_per_sequence(&self) -> usize;
    /// Whether `decode` can return hidden states (then the scheduler builds
    /// a [`commit::Proof`] of every generation).
    fn hidden_states(&self) -> bool {
        false
    }
}

/// Receives `(position, logits, hidden state)` for each evaluated position.
pub type PositionVisitor<'a> = dyn FnMut(usize, &[f32], &[f32]) + 'a;

/// Evaluate `tokens` as one fresh sequence and hand the logits and hidden
/// state of every position from `from` on to `visit(position, logits,
/// hidden)` (earlier positions only fill the cache: no output rows are
/// computed for them). This is the auditor's single prefill over prompt +
/// output; it reuses slot `seq`.
pub fn prefill_all(
    engine: &mut dyn Engine,
    seq: SeqId,
    tokens: &[Token],
    from: usize,
    visit: &mut PositionVisitor<'_>,
) -> Result<(), EngineError> {
    let limit = engine.context_per_sequence();
    if tokens.len() > limit {
        return Err(EngineError::ContextLength {
            prompt: tokens.len(),
            limit,
        });
    }
    engine.clear_sequence(seq);
    let mut out = BatchOutput::default();
    let chunk = engine.max_batch().max(1);
    let result = (|| {
        for (c, part) in tokens.chunks(chunk).enumerate() {
            let start = c * chunk;
            let batch: Vec<BatchEntry> = part
                .iter()
                .enumerate()
                .map(|(i, &token)| BatchEntry {
                    token,
                    pos: (start + i) as u32,
                    seq,
                    output: start + i >= from,
                })
                .collect();
            engine.decode(&batch, true, &mut out)?;
            let first = from.saturating_sub(start).min(part.len());
            let rows = part.len() - first;
            if rows == 0 {
                continue;
            }
            let n_vocab = out.logits.len() / rows;
            let n_embd = out.hidden.len() / rows;
            for r in 0..rows {
                visit(
                    start + first + r,
                    &out.logits[r * n_vocab..(r + 1) * n_vocab],
                    &out.hidden[r * n_embd..(r + 1) * n_embd],
                );
            }
        }
        Ok(())
    })();
    engine.clear_sequence(seq);
    result
}
