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
//!
//! Providers are strangers, so the gateway enforces the protocol on every
//! frame: token ids inside the vocabulary, no more tokens than the request's
//! `max_tokens` (nor than its context, which is what the client's hold
//! covers), at most [`MAX_FRAME_TOKENS`] per frame, and a deadline between
//! frames as well as before the first. A violation fails the part, and the
//! answer continues elsewhere; the offending tokens never reach the client.
//!
//! **Proof or nothing.** A part is paid only when it ends with a `JobDone`
//! whose proof is well formed and covers exactly the tokens streamed, and
//! whose signed receipt matches: only then does the gateway countersign it,
//! and the API bills parts with a countersigned receipt only. Every other
//! part (no proof, a malformed one, reset, error, silence, violation) earns
//! its provider nothing, its tokens cost the client nothing, and it is
//! always checked by seeded sampling alone; it is reported `unverified`,
//! and a failure there is a failed audit like any other.

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
use tessera_protocol::{
    read_frame, write_frame, Frame, FrameError, JobDone, JobKind, JobRequest, Receipt,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::{Audits, Origin, PartEnd, PartRef};
use crate::directory::{Claim, Directory};
use crate::receipt;
use crate::router::Need;

/// Longest wait for a provider's first answer to a job.
const FIRST_FRAME: Duration = Duration::from_secs(120);
/// The same for a provider on trial (it never finished a job here, see
/// `router::trial_term`): node keys are free, so one that says Hello and
/// lets jobs hang may hold a client's request this long at most before
/// the request fails over.
const TRIAL_FIRST_FRAME: Duration = Duration::from_secs(30);
/// Most tokens one `Tokens` frame may carry (providers send one or a few).
pub const MAX_FRAME_TOKENS: usize = 64;
/// How long a provider asked to wrap up (`Cancel`) has to send its proof.
const WRAP_UP_GRACE: Duration = Duration::from_secs(5);
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
    /// The gateway asked it to wrap up (`Cancel` sent).
    wrapping_up: bool,
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

    /// The provider's next frame within `deadline` (a shorter grace once
    /// it was asked to wrap up). When `wrap_up` fires meanwhile, `Cancel`
    /// is sent (once) and the same read goes on, so no frame is torn.
    async fn next_frame(
        &mut self,
        deadline: Duration,
        wrap_up: &CancellationToken,
    ) -> Result<Option<Frame>, FrameError> {
        let silent = |d: Duration| {
            FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the provider sent nothing for {} s", d.as_secs()),
            ))
        };
        if let Some(f) = self.first.take() {
            return Ok(Some(f));
        }
        let limit = if self.wrapping_up {
            deadline.min(WRAP_UP_GRACE)
        } else {
            deadline
        };
        let read = tokio::time::timeout(limit, read_frame(&mut self.recv));
        tokio::pin!(read);
        tokio::select! {
            f = &mut read => f.unwrap_or_else(|_| Err(silent(limit))),
            _ = wrap_up.cancelled(), if !self.wrapping_up => {
                self.wrapping_up = true;
                write_frame(&mut self.send, &Frame::Cancel).await?;
                // The provider now has the grace period to answer.
                match tokio::time::timeout(WRAP_UP_GRACE, &mut read).await {
                    Ok(Ok(frame)) => frame,
                    Ok(Err(_)) => Err(silent(limit)),
                    Err(_) => Err(silent(WRAP_UP_GRACE)),
                }
            }
        }
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
    /// Longest silence between two frames of a part once it has started.
    pub frame_deadline: Duration,
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
    /// The client went away: wrap the current part up (its proof still
    /// earns it its pay) and continue nowhere.
    wrap_up: CancellationToken,
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
            wrap_up: CancellationToken::new(),
        }
    }

    /// Start the job; resolves once a provider has answered.
    pub async fn dispatch(mut self) -> Result<Dispatch, JobError> {
        let part = self.start_part().await?;
        let self_wrap_up = self.wrap_up.clone();
        let provider = part.node.to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        let price = part.price;
        tokio::spawn(self.run(part, tx));
        Ok(Dispatch {
            events: rx,
            provider,
            price,
            receipts_required: true,
            wrap_up: Some(self_wrap_up),
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
        // A dearer provider was passed over because the hold could not be
        // raised to its price.
        let mut priced_out = false;
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
                if self.wrap_up.is_cancelled() {
                    return Err(JobError::Cancelled);
                }
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
                    None if priced_out => JobError::Unaffordable,
                    None => JobError::NoProvider,
                });
            };
            // The hold covers the route quoted before the job; a dearer
            // provider is taken only once the hold is raised to its price,
            // else the job keeps to providers the hold covers.
            if let Some(budget) = &self.ticket.budget {
                let covers = budget.covers();
                if !claim.price.within(&covers) && !budget.raise(covers.max(claim.price)).await {
                    drop(claim);
                    priced_out = true;
                    self.route.max_price = Some(covers);
                    continue;
                }
            }
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
            let frame = tokio::select! {
                f = part.next_frame(self.setup.frame_deadline, &self.wrap_up) => f,
                _ = events.closed() => {
                    part.cancel();
                    return;
                }
            };
            // Why the part failed, and whether that breaks the protocol
            // (a provable cheat, failed without an audit) or may be an
            // honest crash (checked by seeded sampling).
            let violation = match &frame {
                Ok(Some(Frame::Tokens { tokens })) => self.violation(&part, tokens),
                _ => None,
            };
            let (failure, violated) = match (frame, violation) {
                (_, Some(why)) => (format!("protocol violation: {why}"), true),
                (Ok(Some(Frame::Tokens { tokens })), None) => {
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
                            // No JobDone in time is not held against it
                            // (it may not have seen the same stop).
                            let done = receipt.ok().flatten();
                            let checked = done
                                .as_ref()
                                .map(|done| self.countersign(&part, done, &events));
                            let verified = matches!(checked, Some(Ok(())));
                            let violation = checked.and_then(Result::err);
                            self.audit(&part, done.as_ref().filter(|_| verified), true, violation);
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
                (Ok(Some(Frame::JobDone(done))), None) => {
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
                    let checked = self.countersign(&part, &done, &events);
                    let by_gateway = part.wrapping_up;
                    self.audit(
                        &part,
                        Some(&done).filter(|_| checked.is_ok()),
                        by_gateway,
                        checked.err(),
                    );
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
                (Ok(Some(Frame::JobError(e))), None) => (
                    format!(
                        "the provider failed the job ({})",
                        provider_said(&part.node, &e.message)
                    ),
                    false,
                ),
                (Ok(Some(_)), None) => (
                    "protocol violation: a frame that does not belong on a job stream".into(),
                    true,
                ),
                (Ok(None), None) => ("the provider closed the job stream".into(), false),
                (Err(FrameError::Io(e)), None) => (e.to_string(), false),
                (Err(e), None) => (format!("protocol violation: {e}"), true),
            };
            // The provider failed mid-answer: unpaid; its tokens so far are
            // checked, and the answer continues on another one.
            tracing::warn!(provider = %part.node.short(), error = %failure, tokens = self.generated.len(), "provider failed mid-answer");
            self.audit(&part, None, false, violated.then(|| failure.clone()));
            self.failed.push(part.session);
            part.outcome = PartOutcome::Failed;
            part.cancel();
            if self.wrap_up.is_cancelled() {
                // The client is gone: nobody to continue for.
                let _ = events.send(JobEvent::Error(JobError::Cancelled));
                return;
            }
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

    /// Why a `Tokens` frame breaks the protocol, if it does: too many
    /// tokens in one frame, an id outside the vocabulary, or more tokens
    /// than the request allows (its `max_tokens`, or the context the part
    /// was given).
    fn violation(&self, part: &Part, tokens: &[TokenEvent]) -> Option<String> {
        if tokens.len() > MAX_FRAME_TOKENS {
            return Some(format!(
                "{} tokens in one frame (at most {MAX_FRAME_TOKENS})",
                tokens.len()
            ));
        }
        let n_vocab = self.model.tokenizer.info().n_vocab;
        if let Some(t) = tokens
            .iter()
            .find(|t| usize::try_from(t.token).map_or(true, |id| id >= n_vocab))
        {
            return Some(format!(
                "token id {} outside the vocabulary of {n_vocab}",
                t.token
            ));
        }
        let after = self.generated.len() + tokens.len();
        if let Some(max) = self.request.max_tokens {
            if after > max as usize {
                return Some(format!("{after} tokens, over max_tokens {max}"));
            }
        }
        let room = part.context.saturating_sub(self.request.prompt.len());
        if part.context > 0 && after > room {
            return Some(format!(
                "{after} tokens, over the {room} the context leaves"
            ));
        }
        None
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

    /// Hand an ended part to the auditor. A part that ended verified
    /// (`done` is its `JobDone`, whose proof and receipt were accepted) is
    /// audited in full when the policy picks it; any other (`done` is
    /// `None`) is unverified: always checked by seeded sampling alone, which
    /// needs only the prompt, the seed and its tokens. `by_sequence`: this
    /// gateway ended it (a stop sequence it saw, or its client went away),
    /// so its end is not the provider's claim. `violation`: the part broke
    /// the protocol (a provable cheat): it fails without an audit.
    fn audit(
        &self,
        part: &Part,
        done: Option<&JobDone>,
        by_sequence: bool,
        violation: Option<String>,
    ) {
        let Some(audits) = &self.setup.audits else {
            return;
        };
        if part.tokens.is_empty() && violation.is_none() {
            return;
        }
        let before = self.generated.len().saturating_sub(part.tokens.len());
        let mut prompt = self.request.prompt.clone();
        prompt.extend_from_slice(&self.generated[..before]);
        let proof = done.and_then(|d| d.proof.as_ref());
        // A verified proof covers the tokens the client got (and at most a
        // final end-of-generation token more).
        let output = match proof {
            Some(jp) => jp.tokens.clone(),
            None => part.tokens.clone(),
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
        let end = match (violation, done) {
            (Some(why), _) => PartEnd::Violation(why),
            (None, Some(_)) => PartEnd::Verified,
            (None, None) => PartEnd::Unverified,
        };
        let value = part
            .price
            .cost(part.prompt_tokens, part.tokens.len() as u64);
        let part = PartRef {
            job: part.job_id.clone(),
            provider: part.node,
            value,
            end,
        };
        audits.consider(&self.ticket, self.origin, part, job);
    }

    /// Check the provider's proof and receipt for `part` against what this
    /// gateway saw and, if both match, countersign the receipt and pass it
    /// on for the bill. An error: the part is unpaid, and why is a
    /// protocol violation (an honest provider's `JobDone` always has a
    /// receipt and a proof of what it streamed).
    fn countersign(
        &self,
        part: &Part,
        done: &JobDone,
        events: &mpsc::UnboundedSender<JobEvent>,
    ) -> Result<(), String> {
        let unpaid = |why: &str| {
            tracing::warn!(provider = %part.node.short(), job = %part.job_id, "unverified part, not paid: {why}");
            Err(format!("protocol violation: {why}"))
        };
        let Some(signed) = &done.receipt else {
            return unpaid("no receipt");
        };
        // Usage may count one token more than was streamed (the final
        // end-of-generation token), never fewer, never more.
        let claimed = u64::from(done.usage.completion_tokens);
        let streamed = part.tokens.len() as u64;
        if claimed < streamed || claimed > streamed + 1 {
            return unpaid(&format!(
                "usage claims {claimed} tokens, {streamed} were streamed"
            ));
        }
        // The proof must be well formed and of exactly the tokens streamed
        // (plus the final end-of-generation token the usage counts).
        let Some(jp) = &done.proof else {
            return unpaid("no proof");
        };
        if !jp.proof.well_formed()
            || jp.proof.logprobs.len() != jp.tokens.len()
            || jp.tokens.len() as u64 != claimed
            || !jp.tokens.starts_with(&part.tokens)
        {
            return unpaid("the proof is malformed or not of the tokens streamed");
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
                Ok(())
            }
            Err(e) => unpaid(&format!("the receipt does not match: {e}")),
        }
    }
}

/// A provider's error text is a stranger's words: the gateway's operator
/// reads them in the log, and what may reach a client is only this fixed
/// line.
fn provider_said(node: &NodeId, message: &str) -> &'static str {
    let shown: String = message.chars().take(200).collect();
    tracing::warn!(provider = %node.short(), text = %shown.escape_debug(), "a provider's error");
    "its message is in the gateway's log"
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
    let wait = match directory.unproven(&claim.session.node) {
        true => TRIAL_FIRST_FRAME,
        false => FIRST_FRAME,
    };
    let first = tokio::time::timeout(wait, read_frame(&mut recv))
        .await
        .map_err(|_| anyhow!("no answer within {} s", wait.as_secs()))??
        .ok_or_else(|| anyhow!("the provider closed the job stream"))?;
    if let Frame::JobError(e) = &first {
        return Err(anyhow!(
            "the provider refused the job ({})",
            provider_said(&claim.session.node, &e.message)
        ));
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
        wrapping_up: false,
        directory,
        _claim: claim,
    })
}
