//! Continuous batching over one [`Engine`] on a dedicated thread.
//!
//! Requests arrive on a channel and wait for a free sequence slot. Each step
//! builds one batch: a single token for every sequence that is decoding, then
//! as many prompt tokens of newly admitted sequences as fit in the batch.
//! One `decode` call evaluates it all, every sequence that got logits samples
//! its next token, and tokens stream back on the request's own channel. A
//! request whose receiver is dropped (the client went away) is removed and
//! its slot freed at the next step; one whose [`WrapUp`] is called ends at
//! the next step as if it had stopped there, with its proof and `Done`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use tessera_core::{FinishReason, GenerationRequest, Proof, Token, TokenEvent, Usage};
use tokio::sync::mpsc;

use crate::commit::ProofBuilder;
use crate::sampling;
use crate::text::TextStream;
use crate::{BatchEntry, BatchOutput, Engine, EngineError, Model, SeqId};

/// What the scheduler sends back for one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// One generated token.
    Token(TokenEvent),
    /// The generation ended; `text` is held-back text released at the end.
    Done {
        /// Why it ended.
        finish_reason: FinishReason,
        /// Its tokens.
        usage: Usage,
        /// Text released at the end.
        text: String,
    },
    /// It failed.
    Error(EngineError),
    /// Every generated token (a final end-of-generation one included) and
    /// the proof an auditor checks them by; sent just before `Done` when
    /// the engine has hidden states (providers), never otherwise.
    Proof {
        /// Every generated token.
        tokens: Vec<Token>,
        /// Their logprobs and commitments.
        proof: Proof,
    },
}

/// Knobs of the scheduler itself (the engine's sizes come from the engine).
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Requests allowed to wait for a slot before new ones are refused.
    pub max_waiting: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { max_waiting: 1024 }
    }
}

struct Job {
    request: GenerationRequest,
    events: mpsc::UnboundedSender<Event>,
    wrap_up: Arc<AtomicBool>,
}

/// Ends one request early but properly: at the scheduler's next step it
/// stops as if a stop sequence had ended it (finish reason `stop`), and
/// sends the proof of the tokens generated so far and `Done`. A provider
/// uses it when the gateway cancels a job, so the work done is still paid.
#[derive(Clone, Debug, Default)]
pub struct WrapUp(Arc<AtomicBool>);

impl WrapUp {
    /// Stop the request at the next step.
    pub fn now(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Counters shared between the scheduler thread and its handles.
#[derive(Default)]
struct Load {
    active: AtomicUsize,
    waiting: AtomicUsize,
    /// Tags of prefix-cache entries evicted since they were last taken.
    evicted: std::sync::Mutex<Vec<String>>,
    /// Prompt tokens served from a kept prefix instead of evaluated, and
    /// prompt tokens in all (the cache's hit rate).
    reused_tokens: std::sync::atomic::AtomicU64,
    prompt_tokens: std::sync::atomic::AtomicU64,
}

/// A cheap, cloneable way to submit work to a running [`Scheduler`].
#[derive(Clone)]
pub struct SchedulerHandle {
    jobs: mpsc::UnboundedSender<Job>,
    model: Arc<dyn Model>,
    load: Arc<Load>,
    max_waiting: usize,
    max_sequences: usize,
    context_per_sequence: usize,
}

impl SchedulerHandle {
    /// The model this scheduler serves.
    pub fn model(&self) -> &Arc<dyn Model> {
        &self.model
    }

    /// Positions (prompt + output) one request may use.
    pub fn context_per_sequence(&self) -> usize {
        self.context_per_sequence
    }

    /// Sequences decoded together at most.
    pub fn max_sequences(&self) -> usize {
        self.max_sequences
    }

    /// Sequences being generated right now.
    pub fn active(&self) -> usize {
        self.load.active.load(Ordering::Relaxed)
    }

    /// Requests waiting for a free slot.
    pub fn waiting(&self) -> usize {
        self.load.waiting.load(Ordering::Relaxed)
    }

    /// Tags of the prefix-cache entries evicted since the last call.
    pub fn take_evicted(&self) -> Vec<String> {
        std::mem::take(&mut *self.load.evicted.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Prompt tokens reused from kept prefixes, and prompt tokens in all,
    /// since the start.
    pub fn prefix_reuse(&self) -> (u64, u64) {
        (
            self.load.reused_tokens.load(Ordering::Relaxed),
            self.load.prompt_tokens.load(Ordering::Relaxed),
        )
    }

    /// Queue a generation. The receiver yields `Token` events then exactly one
    /// `Done` or `Error`; dropping it cancels the job.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        self.submit_with_wrap_up(request).map(|(events, _)| events)
    }

    /// [`submit`](Self::submit), and a [`WrapUp`] that ends the request
    /// early with its proof and `Done`.
    pub fn submit_with_wrap_up(
        &self,
        request: GenerationRequest,
    ) -> Result<(mpsc::UnboundedReceiver<Event>, WrapUp), SubmitError> {
        let limit = self.context_per_sequence;
        if request.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if request.prompt.len() >= limit {
            return Err(SubmitError::Engine(EngineError::ContextLength {
                prompt: request.prompt.len(),
                limit,
            }));
        }
        if self.waiting() >= self.max_waiting {
            return Err(SubmitError::Busy);
        }
        let (events, rx) = mpsc::unbounded_channel();
        self.load.waiting.fetch_add(1, Ordering::Relaxed);
        let wrap_up = WrapUp::default();
        let job = Job {
            request,
            events,
            wrap_up: wrap_up.0.clone(),
        };
        self.jobs.send(job).map_err(|_| {
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
            SubmitError::Engine(EngineError::Closed)
        })?;
        Ok((rx, wrap_up))
    }
}

/// Why a request was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// Nothing to generate from.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The queue is full.
    #[error("too many requests are waiting for this engine")]
    Busy,
    /// The engine refused it.
    #[error(transparent)]
    Engine(EngineError),
}

/// The continuous-batching loop; owns the engine's thread.
pub struct Scheduler {
    thread: Option<thread::JoinHandle<()>>,
}

impl Scheduler {
    /// Start the scheduler thread. `make_engine` runs on that thread, since an
    /// engine context may not move between threads; its error is returned.
    pub fn spawn<F>(
        model: Arc<dyn Model>,
        config: SchedulerConfig,
        make_engine: F,
    ) -> Result<(Scheduler, SchedulerHandle), EngineError>
    where
        F: FnOnce() -> Result<Box<dyn Engine>, EngineError> + Send + 'static,
    {
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let load = Arc::new(Load::default());
        let thread_model = model.clone();
        let thread_load = load.clone();
        let thread = thread::Builder::new()
            .name("tessera-engine".into())
            .spawn(move || match make_engine() {
                Ok(engine) => {
                    let sizes = (engine.max_sequences(), engine.context_per_sequence());
                    let _ = ready_tx.send(Ok(sizes));
                    Loop::new(engine, thread_model, thread_load).run(jobs_rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| EngineError::Load(format!("cannot start the engine thread: {e}")))?;
        let (max_sequences, context_per_sequence) = ready_rx
            .recv()
            .map_err(|_| EngineError::Load("the engine thread died while loading".into()))??;
        let handle = SchedulerHandle {
            jobs: jobs_tx,
            model,
            load,
            max_waiting: config.max_waiting,
            max_sequences,
            context_per_sequence,
        };
        Ok((
            Scheduler {
                thread: Some(thread),
            },
            handle,
        ))
    }

    /// Wait for the thread to end; it ends once every handle is dropped and
    /// the work in flight is done.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request that holds a sequence slot.
struct Active {
    seq: SeqId,
    job: Job,
    /// Prompt followed by every generated token.
    tokens: Vec<Token>,
    /// How many of `tokens` are already in the KV cache.
    fed: usize,
    n_prompt: usize,
    /// Stop after this many tokens in all (prompt + output).
    end: usize,
    text: TextStream,
    /// Commitments and logprobs of the generated tokens (engines with
    /// hidden states only).
    proof: Option<ProofBuilder>,
}

impl Active {
    fn generated(&self) -> u32 {
        (self.tokens.len() - self.n_prompt) as u32
    }
    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.n_prompt as u32,
            completion_tokens: self.generated(),
        }
    }

    /// Send the proof (if any) and then `Done`.
    fn finish(&mut self, finish_reason: FinishReason, text: String) {
        if let Some(b) = self.proof.take() {
            let _ = self.job.events.send(Event::Proof {
                tokens: self.tokens[self.n_prompt..].to_vec(),
                proof: b.finish(),
            });
        }
        let usage = self.usage();
        let _ = self.job.events.send(Event::Done {
            finish_reason,
            usage,
            text,
        });
    }
}

/// A slot no request is using: empty, or keeping the KV cache of a
/// finished request for a later one of the same key that starts with the
/// same tokens.
struct FreeSlot {
    seq: SeqId,
    kept: Option<Kept>,
}

/// A finished request's KV cache, kept.
struct Kept {
    key: u64,
    tag: String,
    /// The tokens whose keys and values are in the cache, in order.
    tokens: Vec<Token>,
    /// When it was last used (the loop's clock): the least recent goes first.
    used: u64,
}

/// Tokens a kept prefix must share with a prompt to be worth keeping
/// instead of a fresh slot.
const MIN_REUSE: usize = 16;

struct Loop {
    engine: Box<dyn Engine>,
    model: Arc<dyn Model>,
    load: Arc<Load>,
    waiting: VecDeque<Job>,
    active: Vec<Active>,
    free: Vec<FreeSlot>,
    out: BatchOutput,
    /// Counts admissions, to order kept prefixes by recency.
    clock: u64,
}

impl Loop {
    fn new(engine: Box<dyn Engine>, model: Arc<dyn Model>, load: Arc<Load>) -> Self {
        let free = (0..engine.max_sequences() as SeqId)
            .rev()
            .map(|seq| FreeSlot { seq, kept: None })
            .collect();
        Self {
            engine,
            model,
            load,
            waiting: VecDeque::new(),
            active: Vec::new(),
            free,
            out: BatchOutput::default(),
            clock: 0,
        }
    }

    fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        let mut open = true;
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                if !open {
                    return;
                }
                match jobs.blocking_recv() {
                    Some(job) => self.waiting.push_back(job),
                    None => return,
                }
            }
            while open {
                match jobs.try_recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            self.drop_cancelled();
            self.admit();
            self.step();
            self.publish_load();
        }
    }

    fn publish_load(&self) {
        self.load.active.store(self.active.len(), Ordering::Relaxed);
        self.load
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
    }

    fn drop_cancelled(&mut self) {
        self.waiting.retain(|j| {
            let wrapped = j.wrap_up.load(Ordering::Relaxed);
            if wrapped {
                // Asked to end before it started: nothing generated.
                let _ = j.events.send(Event::Done {
                    finish_reason: FinishReason::Stop,
                    usage: Usage {
                        prompt_tokens: j.request.prompt.len() as u32,
                        completion_tokens: 0,
                    },
                    text: String::new(),
                });
            }
            !wrapped && !j.events.is_closed()
        });
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].job.events.is_closed() {
                let gone = self.active.swap_remove(i);
                tracing::debug!(seq = gone.seq, "client went away; slot freed");
                self.release(gone.seq);
            } else if self.active[i].job.wrap_up.load(Ordering::Relaxed) {
                let mut done = self.active.swap_remove(i);
                let text = done.text.finish();
                done.finish(FinishReason::Stop, text);
                self.retire(done);
            } else {
                i += 1;
            }
        }
    }

    fn release(&mut self, seq: SeqId) {
        self.engine.clear_sequence(seq);
        self.free.push(FreeSlot { seq, kept: None });
    }

    /// A request ended normally: keep its KV cache if it asked for that.
    fn retire(&mut self, done: Active) {
        match done.job.request.cache.clone() {
            Some(cache) if done.fed > 0 => {
                let mut tokens = done.tokens;
                tokens.truncate(done.fed);
                self.free.push(FreeSlot {
                    seq: done.seq,
                    kept: Some(Kept {
                        key: cache.key,
                        tag: cache.tag,
                        tokens,
                        used: self.clock,
                    }),
                });
            }
            _ => self.release(done.seq),
        }
    }

    fn evicted(&self, tag: String) {
        self.load
            .evicted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tag);
    }

    /// The slot for `job` and how many of its prompt tokens are already in
    /// that slot's cache: the kept prefix of the same key that shares the
    /// most tokens with the prompt (at least [`MIN_REUSE`]), else an empty
    /// slot, else the least recently used kept one (evicted).
    fn take_slot(&mut self, job: &Job) -> Option<(SeqId, usize)> {
        let prompt = &job.request.prompt;
        let mut best: Option<(usize, usize)> = None;
        if let Some(cache) = &job.request.cache {
            for (i, f) in self.free.iter().enumerate() {
                let Some(k) = f.kept.as_ref().filter(|k| k.key == cache.key) else {
                    continue;
                };
                let shared = k
                    .tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                if shared >= MIN_REUSE && best.is_none_or(|(_, s)| shared > s) {
                    best = Some((i, shared));
                }
            }
        }
        let (i, shared) = match best {
            Some(b) => b,
            None => {
                let i = self
                    .free
                    .iter()
                    .position(|f| f.kept.is_none())
                    .or_else(|| {
                        (0..self.free.len())
                            .min_by_key(|&i| self.free[i].kept.as_ref().map_or(0, |k| k.used))
                    })?;
                (i, 0)
            }
        };
        let slot = self.free.swap_remove(i);
        // At least the prompt's last token is evaluated: its logits pick the
        // first new token.
        let keep = shared.min(prompt.len().saturating_sub(1));
        let reused = keep > 0 && self.engine.truncate_sequence(slot.seq, keep);
        if let Some(kept) = slot.kept {
            // Reused or not, the entry is gone as it was: a reused one lives
            // on as the new request's entry when that one ends.
            self.evicted(kept.tag);
        }
        if !reused {
            self.engine.clear_sequence(slot.seq);
        }
        Some((slot.seq, if reused { keep } else { 0 }))
    }

    fn admit(&mut self) {
        // `SchedulerHandle::submit` already refused empty and over-long prompts.
        let limit = self.engine.context_per_sequence();
        while !self.free.is_empty() {
            let Some(mut job) = self.waiting.pop_front() else {
                break;
            };
            let Some((seq, fed)) = self.take_slot(&job) else {
                self.waiting.push_front(job);
                break;
            };
            self.clock += 1;
            self.load
                .reused_tokens
                .fetch_add(fed as u64, Ordering::Relaxed);
            self.load
                .prompt_tokens
                .fetch_add(job.request.prompt.len() as u64, Ordering::Relaxed);
            let tokens = std::mem::take(&mut job.request.prompt);
            let n_prompt = tokens.len();
            let max_new = job.request.max_tokens.map_or(usize::MAX, |m| m as usize);
            let end = n_prompt.saturating_add(max_new).min(limit);
            let text = TextStream::new(job.request.stop.clone());
            let proof = self.engine.hidden_states().then(ProofBuilder::new);
            self.active.push(Active {
                seq,
                job,
                tokens,
                fed,
                n_prompt,
                end,
                text,
                proof,
            });
        }
    }

    /// Build one batch, evaluate it, and sample for every sequence with logits.
    fn step(&mut self) {
        let budget = self.engine.max_batch();
        let mut batch: Vec<BatchEntry> = Vec::with_capacity(budget);
        // Rows of `out` belong to these indices of `active`, in order.
        let mut rows: Vec<usize> = Vec::new();
        // Decoding sequences first: one token each keeps every stream moving.
        let mut order: Vec<usize> = (0..self.active.len()).collect();
        order.sort_by_key(|&i| self.active[i].tokens.len() - self.active[i].fed);
        for i in order {
            let a = &mut self.active[i];
            let room = budget - batch.len();
            if room == 0 {
                break;
            }
            let todo = a.tokens.len() - a.fed;
            let take = todo.min(room);
            for k in 0..take {
                let pos = a.fed + k;
                let last = pos + 1 == a.tokens.len();
                batch.push(BatchEntry {
                    token: a.tokens[pos],
                    pos: pos as u32,
                    seq: a.seq,
                    output: last,
                });
                if last {
                    rows.push(i);
                }
            }
            a.fed += take;
        }
        if batch.is_empty() {
            return;
        }
        let want_hidden = self.engine.hidden_states();
        if let Err(e) = self.engine.decode(&batch, want_hidden, &mut self.out) {
            tracing::error!(error = %e, "decode failed; failing the sequences in the batch");
            self.fail_batch(&batch, e);
            return;
        }
        let n_vocab = self.model.info().n_vocab;
        let n_embd = if want_hidden {
            out_width(&self.out, rows.len())
        } else {
            0
        };
        let mut finished: Vec<usize> = Vec::new();
        let out = std::mem::take(&mut self.out);
        for (row, &i) in rows.iter().enumerate() {
            let logits = &out.logits[row * n_vocab..(row + 1) * n_vocab];
            let hidden = out
                .hidden
                .get(row * n_embd..(row + 1) * n_embd)
                .unwrap_or(&[]);
            if self.advance(i, logits, hidden) {
                finished.push(i);
            }
        }
        self.out = out;
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for i in finished {
            let done = self.active.swap_remove(i);
            self.retire(done);
        }
    }

    /// Sample the next token of `active[i]` and stream it; true when the
    /// sequence has finished (or its client is gone).
    fn advance(&mut self, i: usize, logits: &[f32], hidden: &[f32]) -> bool {
        let model = &self.model;
        let a = &mut self.active[i];
        let req = &a.job.request;
        let pos = a.tokens.len() as u32;
        let token = sampling::sample(logits, &req.sampling, pos);
        let (logprob, top) = sampling::logprobs(logits, token, req.top_logprobs);
        a.tokens.push(token);
        if let Some(b) = a.proof.as_mut() {
            b.push(hidden, logprob);
        }
        if model.is_eog(token) && !a.job.request.ignore_eos {
            let text = a.text.finish();
            a.finish(FinishReason::Stop, text);
            return true;
        }
        let pushed = a.text.push(&model.token_bytes(token));
        let event = TokenEvent {
            token,
            text: pushed.text,
            logprob,
            top_logprobs: top,
        };
        if a.job.events.send(Event::Token(event)).is_err() {
            return true;
        }
        let finish = if pushed.stopped {
            Some(FinishReason::Stop)
        } else if a.tokens.len() >= a.end {
            Some(FinishReason::Length)
        } else {
            None
        };
        match finish {
            Some(finish_reason) => {
                let text = if pushed.stopped {
                    String::new()
                } else {
                    a.text.finish()
                };
                a.finish(finish_reason, text);
                true
            }
            None => false,
        }
    }

    fn fail_batch(&mut self, batch: &[BatchEntry], error: EngineError) {
        let mut i = 0;
        while i < self.active.len() {
            let seq = self.active[i].seq;
            if batch.iter().any(|e| e.seq == seq) {
                let gone = self.active.swap_remove(i);
                let _ = gone.job.events.send(Event::Error(error.clone()));
                self.release(seq);
            } else {
                i += 1;
            }
        }
    }
}

/// Width of the hidden-state rows in `out` (which holds `rows` of them).
fn out_width(out: &BatchOutput, rows: usize) -> usize {
    out.hidden.len().checked_div(rows).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    //! The scheduler against a tiny deterministic engine: these test the
    //! batching bookkeeping, not inference (the real model is tested in the
    //! `tessera` crate's end-to-end tests).
    use super::*;
    use crate::{ChatMessage, ModelInfo};
    use tessera_core::SamplingParams;

    /// Vocabulary of 8 tokens: token t renders as the letter `a + t`; token 7
    /// is end-of-generation. The "model" always predicts (last token + 1) % 8.
    struct Counting {
        info: ModelInfo,
    }

    impl Model for Counting {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn apply_chat_template(&self, m: &[ChatMessage]) -> Result<String, EngineError> {
            Ok(m.iter().map(|m| m.content.as_str()).collect())
        }
        fn tokenize(&self, text: &str, _: bool) -> Result<Vec<Token>, EngineError> {
            Ok(text.bytes().map(|b| Token::from(b - b'a') % 8).collect())
        }
        fn token_bytes(&self, t: Token) -> Vec<u8> {
            if t == 7 {
                vec![]
            } else {
                vec![b'a' + t as u8]
            }
        }
    }

    struct CountingEngine {
        /// Batch sizes seen, to check that sequences share decode calls.
        calls: Arc<std::sync::Mutex<Vec<usize>>>,
        slots: usize,
    }

    impl Engine for CountingEngine {
        fn decode(
            &mut self,
            b: &[BatchEntry],
            _: bool,
            out: &mut BatchOutput,
        ) -> Result<(), EngineError> {
            // A step takes time, as a real engine's does: requests submitted
            // together then meet in one batch, instead of the first finishing
            // before the next arrives (which made the batching test flaky).
            std::thread::sleep(std::time::Duration::from_millis(1));
            self.calls.lock().unwrap().push(b.len());
            out.logits.clear();
            for e in b.iter().filter(|e| e.output) {
                let mut row = vec![0.0f32; 8];
                row[((e.token + 1) % 8) as usize] = 10.0;
                out.logits.extend(row);
            }
            Ok(())
        }
        fn clear_sequence(&mut self, _: SeqId) {}
        fn truncate_sequence(&mut self, _: SeqId, _: usize) -> bool {
            true
        }
        fn max_sequences(&self) -> usize {
            self.slots
        }
        fn max_batch(&self) -> usize {
            4
        }
        fn context_per_sequence(&self) -> usize {
            64
        }
    }

    fn start(
        slots: usize,
    ) -> (
        Scheduler,
        SchedulerHandle,
        Arc<std::sync::Mutex<Vec<usize>>>,
    ) {
        let info = ModelInfo {
            name: "counting".into(),
            n_vocab: 8,
            n_embd: 1,
            n_ctx_train: 16,
            eog_tokens: vec![7],
        };
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = calls.clone();
        let (s, h) = Scheduler::spawn(
            Arc::new(Counting { info }),
            SchedulerConfig::default(),
            move || Ok(Box::new(CountingEngine { calls: c, slots }) as Box<dyn Engine>),
        )
        .unwrap();
        (s, h, calls)
    }

    fn request(prompt: &[Token], max_tokens: Option<u32>, stop: &[&str]) -> GenerationRequest {
        GenerationRequest {
            prompt: prompt.to_vec(),
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            top_logprobs: 0,
            ignore_eos: false,
            cache: None,
        }
    }

    fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> (String, Event) {
        let mut text = String::new();
        loop {
            match rx.blocking_recv().expect("a final event") {
                Event::Token(t) => text.push_str(&t.text),
                done @ Event::Done { .. } => {
                    if let Event::Done { text: tail, .. } = &done {
                        text.push_str(tail);
                    }
                    return (text, done);
                }
                e @ Event::Error(_) => return (text, e),
                Event::Proof { .. } => {}
            }
        }
    }

    #[test]
    fn generates_until_end_of_generation_with_usage() {
        let (_s, h, _) = start(2);
        let (text, done) = collect(h.submit(request(&[0, 1], None, &[])).unwrap());
        assert_eq!(text, "cdefg");
        assert_eq!(
            done,
            Event::Done {
                finish_reason: FinishReason::Stop,
                usage: Usage {
                    prompt_tokens: 2,
                    completion_tokens: 6
                },
                text: String::new()
            }
        );
    }

    #[test]
    fn max_tokens_and_stop_sequences_end_early() {
        let (_s, h, _) = start(2);
        let (text, done) = collect(h.submit(request(&[0], Some(3), &[])).unwrap());
        assert_eq!(text, "bcd");
        assert!(matches!(
            done,
            Event::Done {
                finish_reason: FinishReason::Length,
                ..
            }
        ));
        let (text, done) = collect(h.submit(request(&[0], None, &["de"])).unwrap());
        assert_eq!(text, "bc");
        assert!(matches!(
            done,
            Event::Done {
                finish_reason: FinishReason::Stop,
                ..
            }
        ));
    }

    #[test]
    fn concurrent_sequences_share_decode_calls_and_queue_beyond_slots() {
        let (_s, h, calls) = start(3);
        let rxs: Vec<_> = (0..5)
            .map(|_| h.submit(request(&[0], Some(5), &[])).unwrap())
            .collect();
        for rx in rxs {
            let (text, _) = collect(rx);
            assert_eq!(text, "bcdef");
        }
        let calls = calls.lock().unwrap();
        assert!(calls.iter().any(|&n| n >= 3), "batches seen: {calls:?}");
    }

    #[test]
    fn over_long_prompt_is_refused_and_context_end_is_length() {
        let (_s, h, _) = start(1);
        let err = h.submit(request(&[0; 64], None, &[])).unwrap_err();
        assert!(matches!(
            err,
            SubmitError::Engine(EngineError::ContextLength { .. })
        ));
        // 58 prompt tokens of 0 predict 1..; context 64 allows 6 new tokens.
        let (text, done) = collect(h.submit(request(&[6; 58], None, &[])).unwrap());
        assert_eq!(text, "");
        assert!(matches!(
            done,
            Event::Done {
                finish_reason: FinishReason::Stop,
                ..
            }
        ));
        let (text, done) = collect(h.submit(request(&[0; 58], Some(100), &[])).unwrap());
        assert_eq!(text, "bcdefg");
        assert!(matches!(
            done,
            Event::Done {
                finish_reason: FinishReason::Length,
                ..
            }
        ));
    }

    #[test]
    fn a_kept_prefix_is_reused_by_the_same_key_only_and_evictions_are_reported() {
        let (_s, h, calls) = start(2);
        let cached = |prompt: &[Token], key: u64, tag: &str| GenerationRequest {
            cache: Some(tessera_core::PrefixCache {
                key,
                tag: tag.into(),
            }),
            ..request(prompt, Some(3), &[])
        };
        let turn1: Vec<Token> = (0..20).map(|i| i % 7).collect();
        let (first, _) = collect(h.submit(cached(&turn1, 1, "t1")).unwrap());
        assert_eq!(h.prefix_reuse().0, 0);
        // The next turn starts with the first turn (prompt + answer).
        let mut turn2 = turn1.clone();
        turn2.extend([0, 1, 2, 5, 6]);
        let before = calls.lock().unwrap().iter().sum::<usize>();
        let (second, _) = collect(h.submit(cached(&turn2, 1, "t2")).unwrap());
        let evaluated = calls.lock().unwrap().iter().sum::<usize>() - before;
        let (reused, _) = h.prefix_reuse();
        assert!(reused >= 20, "reused {reused} tokens");
        assert!(
            evaluated < turn2.len(),
            "evaluated {evaluated} positions again"
        );
        // The counting model's answer depends only on the last token, so
        // reuse changed nothing the client sees.
        assert_eq!(
            second,
            collect(h.submit(request(&turn2, Some(3), &[])).unwrap()).0
        );
        assert!(!first.is_empty());
        // The consumed entry was reported.
        assert!(h.take_evicted().contains(&"t1".to_string()));
        // Another key never reuses it.
        let (reused_before, _) = h.prefix_reuse();
        collect(h.submit(cached(&turn2, 2, "x")).unwrap());
        assert_eq!(
            h.prefix_reuse().0,
            reused_before,
            "another key's prefix was used"
        );
        // Two slots, three kept entries: the least recent one is evicted.
        collect(h.submit(cached(&[3; 20], 3, "y")).unwrap());
        let evicted = h.take_evicted();
        assert!(!evicted.is_empty(), "no eviction reported");
    }

    #[test]
    fn dropped_receiver_frees_the_slot() {
        let (_s, h, _) = start(1);
        drop(h.submit(request(&[0], Some(10), &[])).unwrap());
        let (text, _) = collect(h.submit(request(&[1], Some(2), &[])).unwrap());
        assert_eq!(text, "cd");
    }
}
