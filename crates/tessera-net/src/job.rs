//! One client request as the gateway runs it, across providers if need be.
//!
//! A job is a sequence of *parts*, each on one provider. A provider that
//! fails before its first token is simply replaced; one that dies or fails
//! mid-answer is replaced too: the next part's prompt is the original
//! prompt followed by every token already sent, with the same seed, so each
//! token keeps its absolute position and seeded sampling continues exactly
//! as one provider would have. The client sees one uninterrupted stream.
//! The gateway keeps trying — every provider that is or becomes available,
//! each session once — until the failover deadline, not a fixed count, so a
//! network whose providers churn still finishes the answer.
//!
//! To make that seamless the gateway, not the provider, turns tokens into
//! text and watches for stop sequences: its [`TextStream`] spans every part,
//! so a stop sequence or a UTF-8 character split across a provider change
//! is still handled right. Usage is counted here for the same reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use iroh::endpoint::{RecvStream, SendStream};
use iroh::SecretKey;
use tessera_backend::{Dispatch, JobError, JobEvent, JobTicket, RoutePrefs, ServedModel};
use tessera_core::{
    FinishReason, GenerationRequest, NodeId, PartOutcome, PrefixCache, Price, Token, TokenEvent,
    Usage,
};
use tessera_engine::audit::AuditJob;
use tessera_engine::text::TextStream;
use tessera_protocol::{read_frame, write_frame, Frame, JobDone, JobKind, JobRequest, Receipt};
use tokio::sync::mpsc;

use crate::audit::{Audits, Origin};
use crate::directory::{Claim, Directory};
use crate::receipt;
use crate::router::Need;

/// Longest wait for a provider's first answer to a job.
const FIRST_FRAME: Duration = Duration::from_secs(120);
/// Parts one job may have in all (the first and its continuations).
const MAX_PARTS: usize = 8;
/// How long a job waits between looks for a free provider.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// One provider's stretch of a job.
struct Part {
    send: SendStream,
    recv: RecvStream,
    node: NodeId,
    session: u64,
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
    /// cancelled unless marked done or failed.
    outcome: PartOutcome,
    directory: Arc<Directory>,
    /// The provider's slot, released with the part.
    _claim: Claim,
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

/// How a job is run: everything but the request itself.
#[derive(Clone)]
pub struct JobSetup {
    /// Where providers are found.
    pub directory: Arc<Directory>,
    /// The gateway's key, to countersign providers' receipts.
    pub key: SecretKey,
    /// The model's auditor, when this gateway audits it.
    pub audits: Option<Arc<Audits>>,
    /// How long a job keeps looking for providers after the last one
    /// failed it.
    pub failover_deadline: Duration,
    /// Ask providers to keep each answer's KV cache for the account's next
    /// request (a chat's next turn).
    pub prefix_cache: bool,
    /// Route a request to the provider keeping the longest prefix of it.
    pub prefix_routing: bool,
}

/// A request being served by the network.
pub struct RoutedJob {
    setup: JobSetup,
    model: ServedModel,
    job_id: String,
    request: GenerationRequest,
    /// Every token sent to the client so far.
    generated: Vec<Token>,
    text: TextStream,
    /// Provider sessions that failed this job; never asked again.
    failed: Vec<u64>,
    parts: usize,
    route: RoutePrefs,
    ticket: JobTicket,
    origin: Origin,
    /// The account's prefix-cache key at this gateway (clients only).
    cache_key: Option<u64>,
}

impl RoutedJob {
    /// A job for `ticket`'s request of `model`.
    pub fn new(
        setup: JobSetup,
        model: ServedModel,
        request: GenerationRequest,
        route: RoutePrefs,
        ticket: JobTicket,
        origin: Origin,
    ) -> Self {
        let cache_key =
            (setup.prefix_cache && origin == Origin::Client && !ticket.account.is_empty())
                .then(|| crate::prefix::cache_key(&setup.key.to_bytes(), &ticket.account));
        RoutedJob {
            cache_key,
            setup,
            job_id: format!("{:016x}", tessera_core::unique_u64()),
            text: TextStream::new(request.stop.clone()),
            model,
            request,
            generated: Vec::new(),
            failed: Vec::new(),
            parts: 0,
            route,
            ticket,
            origin,
        }
    }

    /// Start the job; resolves once a provider has answered.
    pub async fn dispatch(mut self) -> Result<Dispatch, JobError> {
        let part = self.start_part().await?;
        let provider = part.node.to_string();
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

    /// Find a provider for the next part and wait for its first frame,
    /// trying every provider that is or becomes available until the
    /// failover deadline.
    async fn start_part(&mut self) -> Result<Part, JobError> {
        let mut request = self.continuation();
        let job_id = format!("{}.{}", self.job_id, self.parts);
        request.cache = self.cache_key.map(|key| PrefixCache {
            key,
            tag: job_id.clone(),
        });
        let chain = match self.cache_key {
            Some(_) => crate::prefix::chain(&request.prompt),
            None => Vec::new(),
        };
        let deadline = Instant::now() + self.setup.failover_deadline;
        let mut last_error: Option<String> = None;
        let mut tried = 0usize;
        loop {
            let need = Need {
                sha256: &self.model.sha256,
                tokens: request.prompt.len(),
                exclude: &self.failed,
                prefs: &self.route,
                probe: self.origin == Origin::Canary,
                prefix: self
                    .cache_key
                    .filter(|_| self.setup.prefix_routing)
                    .map(|k| (k, chain.as_slice())),
            };
            let Some(claim) = self.setup.directory.pick(&need) else {
                let waiting = last_error.is_some() || self.setup.directory.could_serve(&need);
                if waiting && Instant::now() < deadline {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
                return Err(match last_error {
                    Some(last) => JobError::FailoverExhausted {
                        tried,
                        deadline_s: self.setup.failover_deadline.as_secs(),
                        last,
                    },
                    None => JobError::NoProvider,
                });
            };
            tried += 1;
            let (node, session) = (claim.session.node, claim.session.id);
            match start(
                claim,
                self.setup.directory.clone(),
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
                    tracing::warn!(provider = %node.short(), error = %e, "provider failed before answering; trying another");
                    self.setup
                        .directory
                        .record_part(&node, PartOutcome::Failed, 0, None);
                    self.failed.push(session);
                    last_error = Some(e.to_string());
                }
            }
        }
    }

    fn usage(&self, extra: usize) -> Usage {
        Usage {
            prompt_tokens: self.request.prompt.len() as u32,
            completion_tokens: (self.generated.len() + extra) as u32,
        }
    }

    /// Stream the job to the client until it ends, the client leaves, or no
    /// provider is left to continue it.
    async fn run(mut self, mut part: Part, events: mpsc::UnboundedSender<JobEvent>) {
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
                            let done = receipt.ok().flatten();
                            if let Some(done) = &done {
                                self.countersign(&part, done, &events);
                            }
                            self.audit(&part, done.as_ref(), true);
                            part.outcome = PartOutcome::Done;
                            part.cancel();
                            let usage = self.usage(0);
                            let _ = events.send(JobEvent::Done {
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
                    self.audit(&part, Some(&done), false);
                    self.remember_prefix(&part);
                    part.outcome = PartOutcome::Done;
                    let usage = self.usage(extra);
                    let text = self.text.finish();
                    let _ = events.send(JobEvent::Done {
                        finish_reason: done.finish_reason,
                        usage,
                        text,
                    });
                    return;
                }
                Ok(Some(Frame::JobError(e))) => format!("job error: {}", e.message),
                Ok(Some(_)) => "a frame that does not belong on a job stream".to_string(),
                Ok(None) => "the provider closed the job stream".to_string(),
                Err(e) => e.to_string(),
            };
            // The provider failed mid-answer: its tokens so far are checked
            // by seeded sampling, and the answer continues on another one.
            tracing::warn!(provider = %part.node.short(), error = %failure, tokens = self.generated.len(), "provider failed mid-answer");
            self.audit(&part, None, false);
            self.failed.push(part.session);
            part.outcome = PartOutcome::Failed;
            part.cancel();
            if self
                .request
                .max_tokens
                .is_some_and(|m| self.generated.len() >= m as usize)
            {
                let usage = self.usage(0);
                let text = self.text.finish();
                let _ = events.send(JobEvent::Done {
                    finish_reason: FinishReason::Length,
                    usage,
                    text,
                });
                return;
            }
            if self.parts >= MAX_PARTS {
                let _ = events.send(JobEvent::Error(JobError::FailoverExhausted {
                    tried: self.parts,
                    deadline_s: self.setup.failover_deadline.as_secs(),
                    last: format!("{MAX_PARTS} providers failed this answer; last: {failure}"),
                }));
                return;
            }
            let next = tokio::select! {
                next = self.start_part() => next,
                _ = events.closed() => return,
            };
            match next {
                Ok(next) => {
                    tracing::info!(provider = %next.node.short(), tokens = self.generated.len(), "answer continues on another provider");
                    let _ = events.send(JobEvent::Provider {
                        node: next.node.to_string(),
                        price: next.price,
                    });
                    part = next;
                }
                Err(e) => {
                    let _ = events.send(JobEvent::Error(e));
                    return;
                }
            }
        }
    }

    /// Forward one token with the gateway's own text; true when a stop
    /// sequence ended the job.
    fn on_token(&mut self, mut t: TokenEvent, events: &mpsc::UnboundedSender<JobEvent>) -> bool {
        self.generated.push(t.token);
        let pushed = self.text.push(&self.model.tokenizer.token_bytes(t.token));
        t.text = pushed.text;
        let _ = events.send(JobEvent::Token(t));
        pushed.stopped
    }

    /// The provider of a part that ended normally keeps its prompt and the
    /// tokens it generated (all but the last, which it never evaluated) in
    /// its prefix cache.
    fn remember_prefix(&self, part: &Part) {
        let Some(key) = self.cache_key else {
            return;
        };
        let before = self.generated.len().saturating_sub(part.tokens.len());
        let mut tokens = self.request.prompt.clone();
        tokens.extend_from_slice(&self.generated[..before]);
        tokens.extend_from_slice(&part.tokens[..part.tokens.len().saturating_sub(1)]);
        self.setup
            .directory
            .remember_prefix(&part.node, &part.job_id, key, &tokens);
    }

    /// Hand an ended part to the auditor. A part that ended with a proof
    /// is audited in full when the policy picks it; one that ended without
    /// (`done` is `None`: cut off, or no `JobDone` in time; or a `JobDone`
    /// with no proof) is always checked by seeded sampling alone, which
    /// needs only the prompt, the seed and its tokens. `by_sequence`: this
    /// gateway saw a stop sequence end it.
    fn audit(&self, part: &Part, done: Option<&JobDone>, by_sequence: bool) {
        let Some(audits) = &self.setup.audits else {
            return;
        };
        if part.tokens.is_empty() {
            return;
        }
        let before = self.generated.len().saturating_sub(part.tokens.len());
        let mut prompt = self.request.prompt.clone();
        prompt.extend_from_slice(&self.generated[..before]);
        let proof = done.and_then(|d| d.proof.as_ref());
        // The proof must be of the tokens the client got (and at most a
        // final end-of-generation token more); if not, the streamed tokens
        // are audited against it and fail.
        let output = match proof {
            Some(jp)
                if jp.tokens.starts_with(&part.tokens)
                    && jp.tokens.len() <= part.tokens.len() + 1 =>
            {
                jp.tokens.clone()
            }
            _ => part.tokens.clone(),
        };
        let job = AuditJob {
            prompt,
            output,
            sampling: self.request.sampling.clone(),
            proof: proof.map(|p| p.proof.clone()),
            finish_reason: done.map(|d| d.finish_reason),
            stopped_by_sequence: by_sequence,
            max_tokens: self
                .request
                .max_tokens
                .map(|m| m.saturating_sub(before as u32)),
            context: part.context,
            ignore_eos: self.request.ignore_eos,
            claimed_completion_tokens: done.map_or(0, |d| d.usage.completion_tokens),
        };
        audits.consider(&self.ticket, self.origin, &part.job_id, part.node, job);
    }

    /// Check the provider's receipt for `part` against what this gateway
    /// saw and, if it matches, countersign it and pass it on for the bill.
    fn countersign(&self, part: &Part, done: &JobDone, events: &mpsc::UnboundedSender<JobEvent>) {
        let Some(signed) = &done.receipt else {
            tracing::warn!(provider = %part.node.short(), "job ended without a receipt");
            return;
        };
        // Usage may count one token more than was streamed (the final
        // end-of-generation token), never fewer, never more.
        let claimed = u64::from(done.usage.completion_tokens);
        let streamed = part.tokens.len() as u64;
        if claimed < streamed || claimed > streamed + 1 {
            tracing::warn!(provider = %part.node.short(), claimed, streamed, "rejected a receipt: usage does not match the tokens streamed");
            return;
        }
        let expected = Receipt {
            job_id: part.job_id.clone(),
            gateway: crate::node::node_id(&self.setup.key.public()),
            provider: part.node,
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
        match receipt::accept(signed, &expected, &self.setup.key) {
            Ok(countersigned) => {
                if let Ok(json) = serde_json::to_string(&countersigned) {
                    let _ = events.send(JobEvent::Receipt(json));
                }
            }
            Err(e) => {
                tracing::warn!(provider = %part.node.short(), error = %e, "rejected a receipt")
            }
        }
    }
}

/// Open a job stream on the claimed provider, send the request, wait for
/// the answer.
async fn start(
    claim: Claim,
    directory: Arc<Directory>,
    job_id: &str,
    sha256: &str,
    generation: GenerationRequest,
) -> anyhow::Result<Part> {
    let conn = claim
        .session
        .conn
        .clone()
        .ok_or_else(|| anyhow!("a simulated provider has no connection"))?;
    let prompt_sha256 = receipt::tokens_sha256(&generation.prompt);
    let prompt_tokens = generation.prompt.len() as u64;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| anyhow!("open stream: {e}"))?;
    let job = JobRequest {
        job_id: job_id.to_string(),
        kind: JobKind::Inference {
            model_sha256: sha256.to_string(),
            generation,
        },
    };
    write_frame(&mut send, &Frame::JobRequest(job)).await?;
    let asked = Instant::now();
    let first = tokio::time::timeout(FIRST_FRAME, read_frame(&mut recv))
        .await
        .map_err(|_| anyhow!("no answer within {} s", FIRST_FRAME.as_secs()))??
        .ok_or_else(|| anyhow!("the provider closed the job stream"))?;
    if let Frame::JobError(e) = &first {
        return Err(anyhow!("the provider refused the job: {}", e.message));
    }
    let node = claim.session.node;
    directory.observe_latency(&node, asked.elapsed().as_secs_f64() * 1e3);
    Ok(Part {
        send,
        recv,
        node,
        session: claim.session.id,
        first: Some(first),
        streamed: 0,
        price: claim.price,
        context: claim.context,
        job_id: job_id.to_string(),
        prompt_sha256,
        prompt_tokens,
        tokens: Vec::new(),
        first_token: None,
        last_token: None,
        outcome: PartOutcome::Cancelled,
        directory,
        _claim: claim,
    })
}
