//! One client request as the gateway runs it, across providers if need be.
//!
//! A job is a sequence of *parts*, each on one provider. Before the first
//! token a failing provider is simply replaced (at most [`MAX_TRIES`] tries
//! per part). After tokens have been streamed, a provider that dies or
//! fails mid-answer is replaced too: the next part's prompt is the original
//! prompt followed by every token already sent, with the same seed, so each
//! token keeps its absolute position and seeded sampling continues exactly
//! as one provider would have. The client sees one uninterrupted stream.
//!
//! To make that seamless the gateway, not the provider, turns tokens into
//! text and watches for stop sequences: its [`TextStream`] spans every part,
//! so a stop sequence or a UTF-8 character split across a provider change
//! is still handled right. Usage is counted here for the same reason.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use iroh::endpoint::{RecvStream, SendStream};
use iroh::SecretKey;
use tessera_api::{ApiError, Dispatch, JobTicket, RoutePrefs, ServedModel};
use tessera_engine::audit::AuditJob;
use tessera_engine::text::TextStream;
use tessera_engine::{
    EngineError, Event, FinishReason, GenerationRequest, Price, Token, TokenEvent, Usage,
};
use tessera_protocol::{read_frame, write_frame, Frame, JobDone, JobRequest, Receipt};
use tokio::sync::mpsc;

use crate::audit::Audits;
use crate::gateway::{Directory, Provider, MAX_TRIES};
use crate::node::node_id;
use crate::receipt;

/// Longest wait for a provider's first answer to a job.
const FIRST_FRAME: Duration = Duration::from_secs(120);
/// Parts one job may have in all (the first and its continuations).
const MAX_PARTS: usize = 8;
/// Longest a job waits for a free slot while every provider is busy.
const QUEUE_WAIT: Duration = Duration::from_secs(60);

/// Releases a provider's slot when a part ends, however it ends.
struct Slot(Arc<Provider>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One provider's stretch of a job.
struct Part {
    send: SendStream,
    recv: RecvStream,
    node: String,
    session: String,
    /// The provider's first answer, read while choosing it.
    first: Option<Frame>,
    /// Tokens this part has streamed.
    streamed: usize,
    /// The provider's price for this model, and its context per request.
    price: Price,
    context: usize,
    /// This part's job id (the answer's id and the part's number).
    job_id: String,
    /// sha256 of the prompt this part was given, and its length.
    prompt_sha256: String,
    prompt_tokens: u64,
    /// Tokens this part produced.
    tokens: Vec<Token>,
    /// When its first and latest tokens arrived (for its delivered tok/s).
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    /// How it ended, recorded in the directory when it is dropped:
    /// `cancelled` unless marked `done` or `failed`.
    outcome: &'static str,
    directory: Arc<Directory>,
    _slot: Slot,
}

impl Drop for Part {
    fn drop(&mut self) {
        let n = self.tokens.len();
        let tok_s = match (self.first_token, self.last_token) {
            (Some(a), Some(b)) if n >= 4 && b > a => Some((n - 1) as f64 / (b - a).as_secs_f64()),
            _ => None,
        };
        self.directory
            .record_part(&self.node, self.outcome, n as u64, tok_s);
    }
}

impl Part {
    fn cancel(mut self) {
        let _ = self.send.reset(0u32.into());
        let _ = self.recv.stop(0u32.into());
    }
}

/// A request being served by the network.
pub struct RoutedJob {
    directory: Arc<Directory>,
    model: ServedModel,
    job_id: String,
    request: GenerationRequest,
    /// Every token sent to the client so far.
    generated: Vec<Token>,
    text: TextStream,
    /// Provider sessions that failed this job; never asked again.
    failed: Vec<String>,
    parts: usize,
    route: RoutePrefs,
    /// The gateway's key, to countersign providers' receipts.
    key: SecretKey,
    /// The model's auditor (if this gateway audits it) and whose request
    /// this is.
    audits: Option<Arc<Audits>>,
    ticket: JobTicket,
}

impl RoutedJob {
    pub fn new(
        directory: Arc<Directory>,
        model: ServedModel,
        request: GenerationRequest,
        route: RoutePrefs,
        key: SecretKey,
    ) -> Self {
        RoutedJob {
            key,
            directory,
            job_id: format!("{:016x}", getrandom::u64().unwrap_or_default()),
            text: TextStream::new(request.stop.clone()),
            model,
            request,
            generated: Vec::new(),
            failed: Vec::new(),
            parts: 0,
            route,
            audits: None,
            ticket: JobTicket {
                id: String::new(),
                account: String::new(),
            },
        }
    }

    /// Audit its parts with `audits`, filed under `ticket`.
    pub fn audited(mut self, audits: Option<Arc<Audits>>, ticket: JobTicket) -> Self {
        self.audits = audits;
        self.ticket = ticket;
        self
    }

    /// Start the job; resolves once a provider has answered.
    pub async fn dispatch(mut self) -> Result<Dispatch, ApiError> {
        let part = self.start_part().await?;
        let provider = part.node.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let price = part.price;
        tokio::spawn(self.run(part, tx));
        Ok(Dispatch {
            events: rx,
            provider,
            price,
        })
    }

    /// What the next part asks for: the prompt plus what was generated.
    fn continuation(&self) -> GenerationRequest {
        let mut g = self.request.clone();
        g.prompt.extend_from_slice(&self.generated);
        g.max_tokens = self
            .request
            .max_tokens
            .map(|m| m.saturating_sub(self.generated.len() as u32));
        g
    }

    /// Find a provider for the next part and wait for its first frame.
    async fn start_part(&mut self) -> Result<Part, ApiError> {
        let request = self.continuation();
        let mut tried: Vec<String> = self.failed.clone();
        let mut last_error = None;
        let queued = tokio::time::Instant::now();
        let mut attempts = 0;
        while attempts < MAX_TRIES {
            let Some(provider) = self.directory.pick(
                &self.model.sha256,
                request.prompt.len(),
                &tried,
                &self.route,
            ) else {
                // Every provider that could serve it is busy: wait for a slot.
                let busy = self.directory.could_serve(
                    &self.model.sha256,
                    request.prompt.len(),
                    &tried,
                    &self.route,
                );
                if busy && queued.elapsed() < QUEUE_WAIT {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                break;
            };
            attempts += 1;
            tried.push(provider.session.clone());
            let node = provider.node.clone();
            let session = provider.session.clone();
            let job_id = format!("{}.{}", self.job_id, self.parts);
            let directory = self.directory.clone();
            match start(
                provider,
                directory,
                &job_id,
                &self.model.sha256,
                request.clone(),
            )
            .await
            {
                Ok(part) => {
                    self.parts += 1;
                    return Ok(part);
                }
                Err(e) => {
                    tracing::warn!(provider = %&node[..12], error = %e, "provider failed before answering; trying another");
                    self.directory.record_part(&node, "failed", 0, None);
                    self.failed.push(session);
                    last_error = Some(e);
                }
            }
        }
        Err(ApiError::unavailable(match last_error {
            Some(e) => format!(
                "No provider could take the job ({} tried; last error: {e}).",
                tried.len()
            ),
            None => "No provider serving this model is available right now; retry shortly.".into(),
        }))
    }

    fn usage(&self, extra: usize) -> Usage {
        Usage {
            prompt_tokens: self.request.prompt.len() as u32,
            completion_tokens: (self.generated.len() + extra) as u32,
        }
    }

    /// Stream the job to the client until it ends, the client leaves, or no
    /// provider is left to continue it.
    async fn run(mut self, mut part: Part, events: mpsc::UnboundedSender<Event>) {
        loop {
            let frame = match part.first.take() {
                Some(f) => Ok(Some(f)),
                None => tokio::select! {
                    f = read_frame(&mut part.recv) => f,
                    _ = events.closed() => {
                        part.cancel();
                        return;
                    }
                },
            };
            let failure = match frame {
                Ok(Some(Frame::Tokens { tokens })) => {
                    let now = Instant::now();
                    part.first_token.get_or_insert(now);
                    part.last_token = Some(now);
                    for t in tokens {
                        part.streamed += 1;
                        part.tokens.push(t.token);
                        if self.on_token(t, &events) {
                            // A stop sequence: the provider stops at the same
                            // token; take its receipt if it comes promptly.
                            let receipt = tokio::time::timeout(Duration::from_secs(2), async {
                                loop {
                                    match read_frame(&mut part.recv).await {
                                        Ok(Some(Frame::JobDone(done))) => break Some(done),
                                        Ok(Some(Frame::Tokens { .. })) => continue,
                                        _ => break None,
                                    }
                                }
                            })
                            .await;
                            if let Ok(Some(done)) = receipt {
                                self.countersign(&part, &done, &events);
                                self.audit(&part, &done, true);
                            }
                            part.outcome = "done";
                            part.cancel();
                            let usage = self.usage(0);
                            let _ = events.send(Event::Done {
                                finish_reason: FinishReason::Stop,
                                usage,
                                text: String::new(),
                            });
                            return;
                        }
                    }
                    continue;
                }
                Ok(Some(Frame::JobDone(done))) => {
                    // The one token a provider generates but does not
                    // stream (the end-of-generation token that stopped it)
                    // still counts; a usage claiming more is not believed
                    // (the audit fails it), nor beyond max_tokens.
                    let room = self.request.max_tokens.map_or(usize::MAX, |m| {
                        (m as usize).saturating_sub(self.generated.len())
                    });
                    let extra = match done.finish_reason {
                        FinishReason::Stop => (done.usage.completion_tokens as usize)
                            .saturating_sub(part.streamed)
                            .min(1)
                            .min(room),
                        FinishReason::Length => 0,
                    };
                    self.countersign(&part, &done, &events);
                    self.audit(&part, &done, false);
                    part.outcome = "done";
                    let usage = self.usage(extra);
                    let text = self.text.finish();
                    let _ = events.send(Event::Done {
                        finish_reason: done.finish_reason,
                        usage,
                        text,
                    });
                    return;
                }
                Ok(Some(Frame::JobError(e))) => format!("job error: {}", e.message),
                Ok(Some(other)) => format!("unexpected frame {other:?}"),
                Ok(None) => "the provider closed the job stream".to_string(),
                Err(e) => e.to_string(),
            };
            // The provider failed mid-answer: continue on another one.
            tracing::warn!(provider = %&part.node[..12], error = %failure, tokens = self.generated.len(), "provider failed mid-answer");
            self.failed.push(part.session.clone());
            part.outcome = "failed";
            part.cancel();
            if self
                .request
                .max_tokens
                .is_some_and(|m| self.generated.len() >= m as usize)
            {
                let usage = self.usage(0);
                let text = self.text.finish();
                let _ = events.send(Event::Done {
                    finish_reason: FinishReason::Length,
                    usage,
                    text,
                });
                return;
            }
            if self.parts >= MAX_PARTS {
                let _ = events.send(Event::Error(EngineError::Decode(format!(
                    "gave up after {MAX_PARTS} providers failed this job"
                ))));
                return;
            }
            match self.start_part().await {
                Ok(next) => {
                    tracing::info!(provider = %&next.node[..12], tokens = self.generated.len(), "answer continues on another provider");
                    let _ = events.send(Event::Provider {
                        node: next.node.clone(),
                        price: next.price,
                    });
                    part = next;
                }
                Err(e) => {
                    let _ = events.send(Event::Error(EngineError::Decode(e.message)));
                    return;
                }
            }
        }
    }

    /// Forward one token with the gateway's own text; true when a stop
    /// sequence ended the job.
    fn on_token(&mut self, mut t: TokenEvent, events: &mpsc::UnboundedSender<Event>) -> bool {
        self.generated.push(t.token);
        let pushed = self.text.push(&self.model.tokenizer.token_bytes(t.token));
        t.text = pushed.text;
        let _ = events.send(Event::Token(t));
        pushed.stopped
    }

    /// Hand a finished part to the auditor (which decides whether to audit
    /// it). `by_sequence`: this gateway saw a stop sequence end it.
    fn audit(&self, part: &Part, done: &JobDone, by_sequence: bool) {
        let Some(audits) = &self.audits else {
            return;
        };
        let before = self.generated.len().saturating_sub(part.tokens.len());
        let job = match &done.proof {
            None => Err("the provider sent no proof".to_string()),
            Some(jp) => {
                // The proof must be of the tokens the client got (and at
                // most a final end-of-generation token more); if not, the
                // streamed tokens are audited against it and fail.
                let consistent =
                    jp.tokens.starts_with(&part.tokens) && jp.tokens.len() <= part.tokens.len() + 1;
                let mut prompt = self.request.prompt.clone();
                prompt.extend_from_slice(&self.generated[..before]);
                Ok(AuditJob {
                    prompt,
                    output: if consistent {
                        jp.tokens.clone()
                    } else {
                        part.tokens.clone()
                    },
                    sampling: self.request.sampling.clone(),
                    proof: jp.proof.clone(),
                    finish_reason: done.finish_reason,
                    stopped_by_sequence: by_sequence,
                    max_tokens: self
                        .request
                        .max_tokens
                        .map(|m| m.saturating_sub(before as u32)),
                    context: part.context,
                    ignore_eos: self.request.ignore_eos,
                    claimed_completion_tokens: done.usage.completion_tokens,
                })
            }
        };
        audits.consider(
            &self.directory,
            &self.ticket.id,
            &self.ticket.account,
            &part.job_id,
            &part.node,
            job,
        );
    }

    /// Check the provider's receipt for `part` against what this gateway
    /// saw and, if it matches, countersign it and pass it on for the bill.
    fn countersign(&self, part: &Part, done: &JobDone, events: &mpsc::UnboundedSender<Event>) {
        let Some(signed) = &done.receipt else {
            tracing::warn!(provider = %&part.node[..12], "job ended without a receipt");
            return;
        };
        // Usage may count one token more than was streamed (the final
        // end-of-generation token), never fewer, never more.
        let claimed = u64::from(done.usage.completion_tokens);
        let streamed = part.tokens.len() as u64;
        if claimed < streamed || claimed > streamed + 1 {
            tracing::warn!(provider = %&part.node[..12], claimed, streamed, "rejected a receipt: usage does not match the tokens streamed");
            return;
        }
        let expected = Receipt {
            job_id: part.job_id.clone(),
            gateway: node_id(&self.key.public()),
            provider: part.node.clone(),
            model_sha256: self.model.sha256.clone(),
            prompt_sha256: part.prompt_sha256.clone(),
            output_sha256: receipt::tokens_sha256(&part.tokens),
            prompt_tokens: part.prompt_tokens,
            completion_tokens: claimed,
            price: part.price,
            issued_ms: 0,
            proof_sha256: done
                .proof
                .as_ref()
                .map(|p| receipt::proof_sha256(&self.request.sampling, p)),
        };
        match receipt::accept(signed, &expected, &self.key) {
            Ok(countersigned) => {
                if let Ok(json) = serde_json::to_string(&countersigned) {
                    let _ = events.send(Event::Receipt(json));
                }
            }
            Err(e) => {
                tracing::warn!(provider = %&part.node[..12], error = %e, "rejected a receipt")
            }
        }
    }
}

/// Open a job stream on `provider`, send the request, wait for the answer.
async fn start(
    provider: Arc<Provider>,
    directory: Arc<Directory>,
    job_id: &str,
    sha256: &str,
    generation: GenerationRequest,
) -> anyhow::Result<Part> {
    provider.inflight.fetch_add(1, Ordering::Relaxed);
    let slot = Slot(provider.clone());
    let prompt_sha256 = receipt::tokens_sha256(&generation.prompt);
    let prompt_tokens = generation.prompt.len() as u64;
    let (mut send, mut recv) = provider
        .conn
        .open_bi()
        .await
        .map_err(|e| anyhow!("open stream: {e}"))?;
    let job = JobRequest {
        job_id: job_id.to_string(),
        model_sha256: sha256.to_string(),
        generation,
    };
    write_frame(&mut send, &Frame::JobRequest(job)).await?;
    let asked = std::time::Instant::now();
    let first = tokio::time::timeout(FIRST_FRAME, read_frame(&mut recv))
        .await
        .map_err(|_| anyhow!("no answer within {} s", FIRST_FRAME.as_secs()))??
        .ok_or_else(|| anyhow!("the provider closed the job stream"))?;
    if let Frame::JobError(e) = &first {
        return Err(anyhow!("the provider refused the job: {}", e.message));
    }
    let ms = asked.elapsed().as_secs_f64() * 1e3;
    if let Ok(mut l) = provider.latency_ms.lock() {
        *l = if *l > 0.0 { 0.8 * *l + 0.2 * ms } else { ms };
    }
    Ok(Part {
        send,
        recv,
        node: provider.node.clone(),
        session: provider.session.clone(),
        first: Some(first),
        streamed: 0,
        price: provider.price(sha256),
        context: provider.context(sha256),
        job_id: job_id.to_string(),
        prompt_sha256,
        prompt_tokens,
        tokens: Vec::new(),
        first_token: None,
        last_token: None,
        outcome: "cancelled",
        directory,
        _slot: slot,
    })
}
