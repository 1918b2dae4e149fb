//! Cheating providers, for tests only (the `adversary` feature; never in a
//! release build).
//!
//! [`CheatingRunner`] wraps an honest [`JobRunner`] and tampers with its
//! jobs the way a dishonest provider could: random tokens instead of the
//! model's (`Garbage`), commitments that do not match its hidden states
//! (`ForgedCommitments`), half an answer passed off as a natural stop
//! (`EarlyStop`), more tokens claimed than generated (`InflatedUsage`).
//! Protocol cheats try to be paid without a proof or beyond the request:
//! `NoProof` (ends without one), `Silent` (goes quiet after its first
//! token, holding the client), `BadToken` (a token id outside the
//! vocabulary, which would poison the next provider's prompt), `Overrun`
//! (more tokens than `max_tokens`) and `ResetAfterMax` (streams the whole
//! answer, then drops the stream instead of ending it with a proof).
//! `CanaryAware` has read the canary generator's source: it answers
//! prompts the generator could produce honestly and returns garbage to
//! everyone else (client traffic, audited at random, catches it).
//! `Stall` is not cheating but a wedged provider: while a file named
//! `stall` exists in its home it takes jobs and never answers them, while
//! its connection and heartbeats stay alive (what uptime canaries catch).
//! Serving another model file under the real one's hash (substituted,
//! requantized, skipped layers) needs no code here: the `tessera` binary's
//! `--misbehave-model` loads the altered file and announces the real hash.

use std::sync::Arc;

use tessera_core::{FinishReason, GenerationRequest, Token};
use tessera_engine::{Event, SubmitError, WrapUp};
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::provider::JobRunner;

/// How a cheating provider cheats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    /// Random tokens.
    Garbage,
    /// Honest tokens, commitments made up.
    ForgedCommitments,
    /// Stops early and claims it hit its length.
    EarlyStop,
    /// Claims more tokens than it generated.
    InflatedUsage,
    /// Jobs hang while a flag file exists (the connection stays alive).
    Stall,
    /// Ends its answers without a proof.
    NoProof,
    /// Silent after its first token, the stream left open.
    Silent,
    /// Its third token is an id outside the vocabulary.
    BadToken,
    /// Generates 16 tokens more than `max_tokens`.
    Overrun,
    /// Streams every token, then drops the stream without `JobDone`.
    ResetAfterMax,
    /// Honest on prompts the shipped canary generator could produce,
    /// garbage on everything else.
    CanaryAware,
    /// Fails every job with an error text of its own (a message meant for
    /// the gateway's clients: a phishing link).
    ErrorText,
}

/// What an `ErrorText` provider says in its errors.
pub const ERROR_TEXT: &str = "PROVIDER SAYS: your key leaked, re-enter it at http://phish.invalid";

impl std::str::FromStr for Misbehave {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "garbage" => Misbehave::Garbage,
            "forged-commitments" => Misbehave::ForgedCommitments,
            "early-stop" => Misbehave::EarlyStop,
            "inflated-usage" => Misbehave::InflatedUsage,
            "stall" => Misbehave::Stall,
            "no-proof" => Misbehave::NoProof,
            "silent" => Misbehave::Silent,
            "bad-token" => Misbehave::BadToken,
            "overrun" => Misbehave::Overrun,
            "reset-after-max" => Misbehave::ResetAfterMax,
            "canary-aware" => Misbehave::CanaryAware,
            "error-text" => Misbehave::ErrorText,
            other => return Err(format!("unknown misbehaviour '{other}'")),
        })
    }
}

/// Whether a prompt (token ids) looks like one of the gateway's canaries.
pub type PromptCheck = Arc<dyn Fn(&[Token]) -> bool + Send + Sync>;

/// An honest runner with one kind of cheating on top.
pub struct CheatingRunner {
    /// The honest runner underneath.
    pub inner: Arc<dyn JobRunner>,
    /// How it cheats.
    pub mode: Misbehave,
    /// Vocabulary size, for random tokens.
    pub n_vocab: usize,
    /// `Stall`: jobs hang while this file exists.
    pub stall_flag: std::path::PathBuf,
    /// `CanaryAware`: recognises the shipped canary generator's prompts.
    pub canary_check: Option<PromptCheck>,
}

impl JobRunner for CheatingRunner {
    fn submit(
        &self,
        mut request: GenerationRequest,
    ) -> Result<(UnboundedReceiver<Event>, WrapUp), SubmitError> {
        if self.mode == Misbehave::Stall && self.stall_flag.exists() {
            let (tx, rx) = mpsc::unbounded_channel::<Event>();
            // Hold the job open, silent, until the gateway gives up on it.
            tokio::spawn(async move { tx.closed().await });
            return Ok((rx, WrapUp::default()));
        }
        if self.mode == Misbehave::ErrorText {
            let (tx, rx) = mpsc::unbounded_channel::<Event>();
            let _ = tx.send(Event::Error(tessera_engine::EngineError::Decode(
                ERROR_TEXT.into(),
            )));
            return Ok((rx, WrapUp::default()));
        }
        if self.mode == Misbehave::EarlyStop {
            let asked = request.max_tokens.unwrap_or(64);
            request.max_tokens = Some((asked / 2).max(1));
        }
        if self.mode == Misbehave::Overrun {
            request.max_tokens = request.max_tokens.map(|m| m + 16);
        }
        let looks_like_canary = self
            .canary_check
            .as_ref()
            .is_some_and(|check| check(&request.prompt));
        let (mut inner, wrap_up) = self.inner.submit(request)?;
        let (tx, rx) = mpsc::unbounded_channel();
        // A canary-aware cheater is honest exactly when it thinks a canary
        // is watching, and cheats like `Garbage` otherwise.
        let mode = match self.mode {
            Misbehave::CanaryAware if looks_like_canary => return Ok((inner, wrap_up)),
            Misbehave::CanaryAware => Misbehave::Garbage,
            other => other,
        };
        let n_vocab = self.n_vocab.max(1) as u64;
        tokio::spawn(async move {
            let mut state = getrandom::u64().unwrap_or(1) | 1;
            let mut random = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let mut sent: Vec<Token> = Vec::new();
            let mut streamed = 0usize;
            loop {
                let event = tokio::select! {
                    e = inner.recv() => e,
                    _ = tx.closed() => return,
                };
                let Some(mut event) = event else { return };
                match (&mut event, mode) {
                    (Event::Token(t), Misbehave::Garbage) => {
                        t.token = (random() % n_vocab) as Token;
                        sent.push(t.token);
                    }
                    (Event::Proof { tokens, .. }, Misbehave::Garbage) => {
                        // Consistent with what was streamed.
                        let n = sent.len().min(tokens.len());
                        tokens[..n].copy_from_slice(&sent[..n]);
                    }
                    (Event::Proof { proof, .. }, Misbehave::ForgedCommitments) => {
                        for b in &mut proof.commitments {
                            *b = random() as u8;
                        }
                    }
                    (Event::Done { finish_reason, .. }, Misbehave::EarlyStop) => {
                        *finish_reason = FinishReason::Stop;
                    }
                    (Event::Done { usage, .. }, Misbehave::InflatedUsage) => {
                        usage.completion_tokens += 5;
                    }
                    (Event::Proof { .. }, Misbehave::NoProof | Misbehave::ResetAfterMax) => {
                        continue;
                    }
                    // Dropping `tx` without `Done` drops the stream.
                    (Event::Done { .. }, Misbehave::ResetAfterMax) => return,
                    (Event::Token(_), Misbehave::Silent) if streamed >= 1 => {
                        tx.closed().await;
                        return;
                    }
                    (Event::Token(t), Misbehave::BadToken) if streamed == 2 => {
                        t.token = n_vocab as Token + 7;
                    }
                    _ => {}
                }
                if matches!(event, Event::Token(_)) {
                    streamed += 1;
                }
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        Ok((rx, wrap_up))
    }

    fn active(&self) -> usize {
        self.inner.active()
    }

    fn max_sequences(&self) -> usize {
        self.inner.max_sequences()
    }
    fn take_evicted(&self) -> Vec<String> {
        self.inner.take_evicted()
    }
    fn prefix_reuse(&self) -> (u64, u64) {
        self.inner.prefix_reuse()
    }
}
