//! A synthetic engine, for load-testing gateways only.
//!
//! It runs no model: each job "generates" the prompt's own tokens again, in
//! a loop, at a fixed pace per stream, so a handful of provider processes
//! can keep thousands of streams busy and the benchmark measures the
//! gateway (HTTP, routing, iroh streams, detokenization), not llama.cpp.
//! Providers running it say so in their hardware line, and `tessera bench
//! gateway` labels its figures as synthetic. Its answers are not the
//! model's, so it must never serve real clients.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tessera_core::{FinishReason, GenerationRequest, TokenEvent, Usage};
use tessera_engine::{Event, SubmitError, WrapUp};
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::provider::JobRunner;

/// Paced echo "generation" with a fixed number of slots.
pub struct SyntheticRunner {
    slots: usize,
    /// Time between two tokens of one stream.
    interval: Duration,
    active: Arc<AtomicUsize>,
}

impl SyntheticRunner {
    /// `tok_s`: tokens per second of each stream.
    pub fn new(slots: usize, tok_s: f64) -> Self {
        SyntheticRunner {
            slots: slots.max(1),
            interval: Duration::from_secs_f64(1.0 / tok_s.max(0.001)),
            active: Arc::default(),
        }
    }
}

/// Counts a job as active while it lives.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl JobRunner for SyntheticRunner {
    fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<(UnboundedReceiver<Event>, WrapUp), SubmitError> {
        if request.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if self.active.load(Ordering::Relaxed) >= self.slots {
            return Err(SubmitError::Busy);
        }
        self.active.fetch_add(1, Ordering::Relaxed);
        let active = Active(self.active.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let interval = self.interval;
        tokio::spawn(async move {
            let _active = active;
            let max = request.max_tokens.unwrap_or(256);
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            for i in 0..max as usize {
                tick.tick().await;
                let token = request.prompt[i % request.prompt.len()];
                let event = Event::Token(TokenEvent {
                    token,
                    text: String::new(),
                    logprob: 0.0,
                    top_logprobs: vec![],
                });
                if tx.send(event).is_err() {
                    return; // cancelled
                }
            }
            let _ = tx.send(Event::Done {
                finish_reason: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: request.prompt.len() as u32,
                    completion_tokens: max,
                },
                text: String::new(),
            });
        });
        // It has no proof to end with, so a cancel simply goes unanswered.
        Ok((rx, WrapUp::default()))
    }

    fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    fn max_sequences(&self) -> usize {
        self.slots
    }
}
