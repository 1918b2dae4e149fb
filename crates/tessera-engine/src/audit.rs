//! The auditor: re-check one finished job with a single prefill.
//!
//! A provider's [`Proof`] claims, for every generated token, the
//! log-probability it saw and (per chunk) a commitment to the final hidden
//! states that produced it. The auditor evaluates prompt + output once with
//! its own copy of the model file ([`prefill_all`]) and checks, at every
//! generated position:
//!
//! 1. **seeded sampling**: the token is the one the sampling rule picks from
//!    the auditor's logits with the job's seed — or, where the auditor's own
//!    margin between its pick and the provider's token is within
//!    [`Thresholds::margin`], a tolerated disagreement (rounding between a
//!    decode step and a prefill can flip a near tie);
//! 2. **logprobs**: the claimed log-probability is the auditor's, within
//!    [`Thresholds::logprob`];
//! 3. **commitments**: each chunk's commitment agrees with the auditor's
//!    hidden states ([`check_chunk`]);
//! 4. **usage and stop**: the claimed usage is the number of tokens, an
//!    answer that says it stopped ended with an end-of-generation token or a
//!    stop sequence the gateway saw, one that says it hit its length did.
//!
//! The result is [`Evidence`]: every figure the verdict was drawn from, and
//! the reasons for a failure. Thresholds come from calibration on honest
//! answers (BENCHMARKS.md and `calibration/`).

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;
use std::thread;
use tokio::sync::oneshot;

use tessera_core::proof::CHUNK;
use tessera_core::{FinishReason, SamplingParams, Token};

use crate::commit::check_chunk;
use crate::sampling::{self, score};
use crate::{prefill_all, Engine, EngineError, Model, SeqId};
pub use tessera_core::audit::{AuditJob, ChunkCheck, Evidence};

/// Where honest turns into failed; see the calibration in BENCHMARKS.md.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Thresholds {
    /// A token that is not the rule's pick is tolerated when the pick beats
    /// it by at most this much, in logit units (score gap × temperature).
    pub margin: f64,
    /// Largest score gap (logit units) a disagreement beyond the margin may
    /// have: honest arithmetic moves a logit a little, not a lot, so a
    /// token the rule's pick beats by more was chosen, not rounded into.
    /// Set to `logprob_lone`: the one slip in a provider's arithmetic that
    /// the logprob check tolerates may decide that position's token too.
    pub max_gap: f64,
    /// How far a top-p (or, ×10 relative, min-p) filter's edge may be off
    /// before a token beyond it counts as a mismatch.
    pub filter_slack: f32,
    /// How far (logit units) any one logit of the provider's may be from
    /// the auditor's when deciding which tokens a top-k, top-p or min-p
    /// filter let through: a token the filters may have cut on the
    /// provider's side does not count against its pick ([`FilterEdges`]).
    pub edge_logit: f32,
    /// Most tolerated disagreements, as a share of the tokens, but never
    /// fewer than `min_tolerated` (short answers: even greedy decoding meets
    /// a near-tie in ~3% of tokens, so 2 of 4 happens to honest providers).
    /// Honest answers across builds: median 3.6%, p99 10%, at most 16%.
    pub max_tolerated: f64,
    /// See `max_tolerated`.
    pub min_tolerated: usize,
    /// Most disagreements beyond the margin (and beyond what the filters'
    /// edges explain), as a share of the tokens; one is always allowed: a
    /// batched decode's arithmetic slips at one position now and then (none
    /// in the 1,250 honest answers the thresholds were set on, two in the
    /// 1,000 of the disjoint set), and that slip may decide a token.
    pub max_mismatches: f64,
    /// Largest difference between a claimed and a recomputed logprob at all
    /// but one position, and the largest mean difference over an answer.
    pub logprob: f32,
    /// Largest difference at the one position left: an honest batched
    /// decode now and then computes one position's logits ~3 off (and may
    /// pick a token there the rule would not; see `max_gap`).
    pub logprob_lone: f32,
    /// See `logprob`.
    pub logprob_mean: f32,
    /// Least share of a chunk's top entries agreeing in sign and exponent
    /// (2 may always disagree: a 1-token last chunk compares only 4).
    pub min_exponent_share: f64,
    /// Largest mean mantissa difference (of 128 steps) over a chunk.
    pub max_mantissa_mean: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            margin: 1.0,
            max_gap: 4.0,
            filter_slack: 0.02,
            edge_logit: 0.25,
            max_tolerated: 0.2,
            min_tolerated: 3,
            max_mismatches: 0.0,
            logprob: 2.0,
            logprob_lone: 4.0,
            logprob_mean: 0.25,
            min_exponent_share: 0.75,
            max_mantissa_mean: 6.0,
        }
    }
}

/// `p` with its top-p and min-p filters moved by `slack` (looser when
/// positive) and top-k by one.
/// The filters a rounding difference could have turned `p`'s into: top-p
/// and min-p moved by `slack`, and top-k by an eighth of k (at least 1)
/// either way — several logits a hair apart around the k-th rank can
/// trade places in a prefill (the calibration on Q8_0 met an honest answer
/// whose top-40 set differed by more than one token).
fn edges(p: &SamplingParams, slack: f32) -> Vec<SamplingParams> {
    let mut out = vec![loosened(p, slack), loosened(p, -slack)];
    if p.top_k > 1 {
        let delta = (p.top_k / 8).max(1);
        let lo = p.top_k.saturating_sub(delta).max(1);
        for k in lo..=p.top_k.saturating_add(delta) {
            if k != p.top_k {
                out.push(SamplingParams {
                    top_k: k,
                    ..p.clone()
                });
            }
        }
    }
    out
}

fn loosened(p: &SamplingParams, slack: f32) -> SamplingParams {
    SamplingParams {
        top_p: if p.top_p < 1.0 {
            (p.top_p + slack).clamp(0.0, 1.0)
        } else {
            1.0
        },
        min_p: (p.min_p * (1.0 - slack * 10.0)).max(0.0),
        top_k: if p.top_k > 0 {
            p.top_k.saturating_add_signed(slack.signum() as i32).max(1)
        } else {
            0
        },
        ..p.clone()
    }
}

/// Which tokens a provider's filters may have let through or cut, if each
/// of its logits may differ from the auditor's by up to `delta`.
///
/// A token `u` may have been kept when, with every logit moved by at most
/// `delta` against it, it still ranks within top-k, keeps min-p's share of
/// the best token's probability and has less than top-p of the mass before
/// it; it may have been cut when, with every logit moved by `delta` for
/// it, one filter drops it. The provider's token is explained when it may
/// have been kept and every token whose score beats it by more than the
/// margin may have been cut.
struct FilterEdges {
    /// Logits in descending order.
    sorted: Vec<f32>,
    /// `prefix[i]`: the weight `exp((l - max) / T)` of the `i` best tokens.
    prefix: Vec<f64>,
    max: f32,
    two_delta: f32,
}

impl FilterEdges {
    fn new(logits: &[f32], p: &SamplingParams, delta: f32) -> FilterEdges {
        let mut sorted = logits.to_vec();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let max = sorted.first().copied().unwrap_or(0.0);
        let inv_t = 1.0 / f64::from(p.temperature.max(f32::MIN_POSITIVE));
        let mut prefix = Vec::with_capacity(sorted.len() + 1);
        let mut acc = 0.0f64;
        prefix.push(0.0);
        for &l in &sorted {
            acc += (f64::from(l - max) * inv_t).exp();
            prefix.push(acc);
        }
        FilterEdges {
            sorted,
            prefix,
            max,
            two_delta: 2.0 * delta.max(0.0),
        }
    }

    /// Tokens with a logit above `x`.
    fn above(&self, x: f32) -> usize {
        self.sorted.partition_point(|&l| l > x)
    }

    /// Tokens with a logit at or above `x`.
    fn at_or_above(&self, x: f32) -> usize {
        self.sorted.partition_point(|&l| l >= x)
    }

    /// Whether a token with logit `l` may have passed every filter.
    fn may_keep(&self, l: f32, p: &SamplingParams) -> bool {
        let d = self.two_delta;
        let t = f64::from(p.temperature.max(f32::MIN_POSITIVE));
        let spread = (f64::from(d) / t).exp();
        let total = self.prefix[self.sorted.len()];
        let k_ok = p.top_k == 0 || self.above(l + d) < p.top_k as usize;
        let min_p_ok = p.min_p <= 0.0 || f64::from(l + d - self.max) / t >= f64::from(p.min_p).ln();
        let top_p_ok =
            p.top_p >= 1.0 || self.prefix[self.above(l + d)] / spread < f64::from(p.top_p) * total;
        k_ok && min_p_ok && top_p_ok
    }

    /// Whether a token with logit `l` may have been cut by a filter.
    fn may_cut(&self, l: f32, p: &SamplingParams) -> bool {
        let d = self.two_delta;
        let t = f64::from(p.temperature.max(f32::MIN_POSITIVE));
        let spread = (f64::from(d) / t).exp();
        let total = self.prefix[self.sorted.len()];
        // The others at or above `l - d` (the token itself is one of them).
        let rivals = self.at_or_above(l - d).saturating_sub(1);
        let own = (f64::from(l - self.max) / t).exp();
        let k_cut = p.top_k > 0 && rivals >= p.top_k as usize;
        let min_p_cut = p.min_p > 0.0 && f64::from(l - d - self.max) / t < f64::from(p.min_p).ln();
        let top_p_cut = p.top_p < 1.0
            && (self.prefix[self.at_or_above(l - d)] - own) * spread >= f64::from(p.top_p) * total;
        k_cut || min_p_cut || top_p_cut
    }

    /// Whether `token` may be the rule's pick under filters that cut
    /// differently on the provider's side.
    fn explains(
        &self,
        logits: &[f32],
        p: &SamplingParams,
        pos: u32,
        token: Token,
        margin: f64,
    ) -> bool {
        let lt = logits[token as usize];
        if !self.may_keep(lt, p) {
            return false;
        }
        let bar = score(logits, p, pos, token) + margin;
        // The tokens that may have been kept are the best ones by logit (the
        // conditions only loosen as the logit grows); any of them that beats
        // the provider's token by more than the margin must be cuttable.
        let kept = self.sorted.partition_point(|&l| self.may_keep(l, p));
        let floor = self
            .sorted
            .get(kept.saturating_sub(1))
            .copied()
            .unwrap_or(f32::MIN);
        logits.iter().enumerate().all(|(v, &l)| {
            l < floor
                || v == token as usize
                || score(logits, p, pos, v as Token) <= bar
                || self.may_cut(l, p)
        })
    }
}

/// Audit `job` on `engine` (a context with hidden states, slot `seq`).
pub fn audit(
    engine: &mut dyn Engine,
    model: &dyn Model,
    seq: SeqId,
    job: &AuditJob,
    th: &Thresholds,
) -> Result<Evidence, EngineError> {
    let n = job.output.len();
    let mut ev = Evidence {
        tokens: n,
        worst_exponent_share: 1.0,
        ..Evidence::default()
    };
    let n_vocab = model.info().n_vocab;
    // What can be checked without the model.
    if job.finish_reason.is_some() && job.claimed_completion_tokens as usize != n {
        ev.failures.push(format!(
            "usage claims {} generated tokens, the answer has {n}",
            job.claimed_completion_tokens
        ));
    }
    if n == 0 || job.prompt.is_empty() {
        ev.failures
            .push("an empty prompt or no generated tokens".into());
        return Ok(ev);
    }
    if let Some(proof) = &job.proof {
        if proof.logprobs.len() != n || !proof.well_formed() {
            ev.failures.push(format!(
                "the proof does not fit the answer ({} logprobs and {} commitment bytes for {n} tokens)",
                proof.logprobs.len(),
                proof.commitments.len()
            ));
            return Ok(ev);
        }
    }
    if job.output.iter().any(|&t| t < 0 || t as usize >= n_vocab) {
        ev.failures.push("a token id outside the vocabulary".into());
        return Ok(ev);
    }
    let eog_at = job.output.iter().position(|&t| model.is_eog(t));
    if !job.ignore_eos && eog_at.is_some_and(|i| i + 1 < n) {
        ev.failures
            .push("the answer goes on after an end-of-generation token".into());
    }
    let ends_in_eog = eog_at == Some(n - 1);
    match job.finish_reason {
        Some(FinishReason::Stop) if !ends_in_eog && !job.stopped_by_sequence => ev.failures.push(
            "it says it stopped, without an end-of-generation token or a stop sequence".into(),
        ),
        Some(FinishReason::Length) => {
            let room = job.context.saturating_sub(job.prompt.len());
            let limit = job.max_tokens.map_or(room, |m| (m as usize).min(room));
            if n < limit {
                ev.failures.push(format!(
                    "it says it hit its length after {n} tokens; the limit was {limit}"
                ));
            }
        }
        _ => {}
    }
    // One prefill over prompt + output (the last token needs no evaluation).
    let start = job.prompt.len() - 1;
    let mut tokens = job.prompt.clone();
    tokens.extend_from_slice(&job.output[..n - 1]);
    let mut rows: Vec<f32> = Vec::new();
    let mut unpicked_end = false;
    let mut in_chunk = 0;
    let mut chunk_index = 0;
    let p = &job.sampling;
    prefill_all(engine, seq, &tokens, start, &mut |pos, logits, hidden| {
        let t = pos - start;
        let abs = (job.prompt.len() + t) as u32;
        let token = job.output[t];
        // 1. Seeded sampling, margin-aware.
        let pick = sampling::sample(logits, p, abs);
        if pick != token {
            // A filter's edge can move across a token when the
            // probabilities move a little: the pick under a slightly
            // looser or tighter filter is as plausible.
            let gap = score(logits, p, abs, pick) - score(logits, p, abs, token);
            let edge = gap > th.margin
                && p.temperature > 0.0
                && sampling::candidates(logits, p).is_some()
                && (edges(p, th.filter_slack)
                    .iter()
                    .any(|q| sampling::sample(logits, q, abs) == token)
                    || FilterEdges::new(logits, p, th.edge_logit)
                        .explains(logits, p, abs, token, th.margin));
            if !edge {
                ev.max_gap = ev.max_gap.max(gap);
            }
            if edge || gap <= th.margin {
                ev.tolerated += 1;
            } else {
                ev.sampling_mismatches += 1;
                ev.first_mismatch.get_or_insert(t);
                if t + 1 == n && model.is_eog(token) && !job.ignore_eos {
                    unpicked_end = true;
                }
            }
        }
        let Some(proof) = &job.proof else {
            return;
        };
        // 2. Logprobs.
        let (lp, _) = sampling::logprobs(logits, token, 0);
        let err = (lp - proof.logprobs[t]).abs();
        ev.logprob_mean_error += err / n as f32;
        let err = if err.is_nan() { f32::INFINITY } else { err };
        if err > ev.logprob_max_error {
            ev.logprob_second_error = ev.logprob_max_error;
            ev.logprob_max_error = err;
        } else {
            ev.logprob_second_error = ev.logprob_second_error.max(err);
        }
        // 3. Commitments, a chunk at a time.
        rows.extend_from_slice(hidden);
        in_chunk += 1;
        if in_chunk == CHUNK || t + 1 == n {
            let check = proof
                .chunk_commitment(chunk_index)
                .map(|c| check_chunk(&c, &rows))
                .unwrap_or_default();
            ev.chunks.push(check);
            rows.clear();
            in_chunk = 0;
            chunk_index += 1;
        }
    })?;
    let allowed = ((th.max_mismatches * n as f64) as usize).max(1);
    if ev.sampling_mismatches > allowed {
        ev.failures.push(format!(
            "{} of {n} tokens are not what seeded sampling picks from the model's logits (first at token {})",
            ev.sampling_mismatches,
            ev.first_mismatch.unwrap_or(0)
        ));
    }
    if ev.sampling_mismatches > 0 && ev.max_gap > th.max_gap {
        ev.failures.push(format!(
            "a token the sampling rule did not pick loses to the pick by {:.2} logits \
             (honest rounding stays within {:.1})",
            ev.max_gap, th.max_gap
        ));
    }
    if unpicked_end {
        ev.failures
            .push("it ends with an end-of-generation token the sampling rule did not pick".into());
    }
    let tolerable = (th.max_tolerated * n as f64).max(th.min_tolerated as f64);
    if ev.tolerated as f64 > tolerable {
        ev.failures.push(format!(
            "{} of {n} tokens are near-ties decided against the rule (at most {:.0}% or {} allowed)",
            ev.tolerated,
            th.max_tolerated * 100.0,
            th.min_tolerated
        ));
    }
    let mean_bad = ev.logprob_mean_error.is_nan() || ev.logprob_mean_error > th.logprob_mean;
    let lone_bad = ev.logprob_max_error > th.logprob_lone;
    if ev.logprob_second_error > th.logprob || lone_bad || mean_bad {
        ev.failures.push(format!(
            "claimed logprobs differ from the model's by up to {:.3} ({:.3} on average)",
            ev.logprob_max_error, ev.logprob_mean_error
        ));
    }
    for (i, c) in ev.chunks.iter().enumerate() {
        let share = c.exponent_matches as f64 / c.compared.max(1) as f64;
        ev.worst_exponent_share = ev.worst_exponent_share.min(share);
        ev.worst_mantissa_mean = ev.worst_mantissa_mean.max(c.mantissa_mean);
        // A short last chunk (4 entries for 1 token) may miss 2 of them.
        let missed = c.compared.saturating_sub(c.exponent_matches);
        let too_few = share < th.min_exponent_share && missed > 2;
        if too_few || c.mantissa_mean > th.max_mantissa_mean {
            ev.failures.push(format!(
                "the commitment of chunk {i} does not match the model's hidden states \
                 ({} of {} entries agree, mantissa gap {:.2})",
                c.exponent_matches, c.compared, c.mantissa_mean
            ));
        }
    }
    Ok(ev)
}

/// The proof of `output` after `prompt` built from one prefill, as a
/// provider that did not decode with the model could still build it (the
/// cheat the auditor must catch by seeded sampling alone: `tessera bench
/// audit`'s cheaper-model and runner-up modes use it).
pub fn prove(
    engine: &mut dyn Engine,
    seq: SeqId,
    prompt: &[Token],
    output: &[Token],
) -> Result<tessera_core::Proof, EngineError> {
    let mut builder = crate::commit::ProofBuilder::new();
    if prompt.is_empty() || output.is_empty() {
        return Ok(builder.finish());
    }
    let start = prompt.len() - 1;
    let mut tokens = prompt.to_vec();
    tokens.extend_from_slice(&output[..output.len() - 1]);
    prefill_all(engine, seq, &tokens, start, &mut |pos, logits, hidden| {
        let (lp, _) = sampling::logprobs(logits, output[pos - start], 0);
        builder.push(hidden, lp);
    })?;
    Ok(builder.finish())
}

struct Request {
    job: AuditJob,
    reply: oneshot::Sender<Result<Evidence, EngineError>>,
}

/// Which audits go first when the auditor has a backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Canaries, providers on watch, audits at the base rate, unverified
    /// parts: ahead of probation, which gets only one turn in
    /// [`PROBATION_TURN`].
    First,
    /// New providers' probation: as many as there are, behind the rest,
    /// so a flood of new (or sybil) providers cannot starve the others —
    /// but never starved itself: while both queues wait, every
    /// [`PROBATION_TURN`]th audit is a probation one.
    Probation,
}

/// While first-priority and probation audits both wait, one audit in this
/// many is a probation one. Strict priority let a steady stream of
/// first-priority audits (canaries alone, on a loaded auditor) keep a new
/// provider's client answers `pending` for ever; this bounds probation's
/// share to a quarter of the auditor and its wait to a few audits.
pub const PROBATION_TURN: u32 = 4;

/// The auditor's two queues and whose turn it is.
#[derive(Default)]
struct Waiting {
    first: VecDeque<Request>,
    probation: VecDeque<Request>,
    /// First-priority audits taken in a row while probation ones waited.
    passed_over: u32,
}

impl Waiting {
    /// The next audit: first-priority, except probation's turn.
    fn pop(&mut self) -> Option<Request> {
        let turn = self.passed_over + 1 >= PROBATION_TURN;
        match (self.first.is_empty(), self.probation.is_empty()) {
            (_, true) => {
                self.passed_over = 0;
                self.first.pop_front()
            }
            (false, false) if !turn => {
                self.passed_over += 1;
                self.first.pop_front()
            }
            _ => {
                self.passed_over = 0;
                self.probation.pop_front()
            }
        }
    }
}

/// The auditor's queues, and the signal that one was added to.
#[derive(Default)]
struct Queues {
    state: std::sync::Mutex<Waiting>,
    ready: std::sync::Condvar,
}

/// The next request (see [`Waiting::pop`]); `None` once every handle is
/// gone and nothing is queued (`queues` is then the caller's only
/// reference).
fn next_request(queues: &Arc<Queues>) -> Option<Request> {
    let mut q = queues.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some(r) = q.pop() {
            return Some(r);
        }
        if Arc::strong_count(queues) == 1 {
            return None;
        }
        q = queues
            .ready
            .wait_timeout(q, std::time::Duration::from_millis(500))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// A cheap handle to the auditor's thread.
#[derive(Clone)]
pub struct AuditorHandle {
    queues: Arc<Queues>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

impl AuditorHandle {
    /// Queue an audit; the receiver gets its evidence.
    pub fn submit(&self, job: AuditJob) -> oneshot::Receiver<Result<Evidence, EngineError>> {
        self.submit_with(job, Priority::First)
    }

    /// Queue an audit at `priority`; the receiver gets its evidence.
    pub fn submit_with(
        &self,
        job: AuditJob,
        priority: Priority,
    ) -> oneshot::Receiver<Result<Evidence, EngineError>> {
        let (reply, rx) = oneshot::channel();
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut queues = self.queues.state.lock().unwrap_or_else(|p| p.into_inner());
        match priority {
            Priority::First => queues.first.push_back(Request { job, reply }),
            Priority::Probation => queues.probation.push_back(Request { job, reply }),
        }
        drop(queues);
        self.queues.ready.notify_one();
        rx
    }

    /// Audits queued or running.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Run audits one at a time on a thread that owns its own engine (an
/// engine context may not move between threads).
pub fn spawn_auditor<F>(
    model: Arc<dyn Model>,
    thresholds: Thresholds,
    make_engine: F,
) -> Result<AuditorHandle, EngineError>
where
    F: FnOnce() -> Result<Box<dyn Engine>, EngineError> + Send + 'static,
{
    let queues = Arc::new(Queues::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = waiting.clone();
    let theirs = queues.clone();
    thread::Builder::new()
        .name("tessera-auditor".into())
        .spawn(move || {
            let mut engine = match make_engine() {
                Ok(e) => {
                    let _ = ready_tx.send(Ok(()));
                    e
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while let Some(r) = next_request(&theirs) {
                let result = audit(engine.as_mut(), model.as_ref(), 0, &r.job, &thresholds);
                count.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                let _ = r.reply.send(result);
            }
        })
        .map_err(|e| EngineError::Load(format!("cannot start the auditor thread: {e}")))?;
    ready_rx
        .recv()
        .map_err(|_| EngineError::Load("the auditor thread died while loading".into()))??;
    Ok(AuditorHandle { queues, waiting })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: usize) -> AuditJob {
        AuditJob {
            prompt: vec![1],
            output: vec![2; n],
            sampling: SamplingParams::greedy(),
            proof: None,
            finish_reason: None,
            stopped_by_sequence: false,
            max_tokens: None,
            context: 64,
            ignore_eos: false,
            claimed_completion_tokens: 0,
        }
    }

    /// A token the filters may have cut on the provider's side (its logit a
    /// hair from the top-k edge) does not count against the provider's
    /// pick; one clearly inside the filter does.
    #[test]
    fn filter_edges_explain_only_what_rounding_can_move() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            seed: 5,
            ..SamplingParams::default()
        };
        // Ranks: 0 (5.0), 1 (4.0), 2 (3.0), 3 (2.9): token 2 and 3 are 0.1
        // apart around the top-3 edge.
        let mut logits = vec![-10.0f32; 16];
        logits[..4].copy_from_slice(&[5.0, 4.0, 3.0, 2.9]);
        let edges = FilterEdges::new(&logits, &p, 0.25);
        assert!(edges.may_keep(2.9, &p) && edges.may_cut(3.0, &p));
        assert!(!edges.may_cut(4.0, &p), "rank 1 is well inside the top 3");
        assert!(!edges.may_keep(-10.0, &p));
        // Whatever the noise, a token that could only have been picked by
        // cutting token 0 or 1 is not explained; with a huge margin, any
        // token the filter may keep is.
        assert!(!edges.explains(&logits, &p, 7, 3, -1e9));
        assert!(edges.explains(&logits, &p, 7, 3, 1e9));
        assert!(
            !edges.explains(&logits, &p, 7, 9, 1e9),
            "far outside the top 3"
        );
        // Within 0.1 of the edge, token 2 may have been cut: token 3 is
        // explained whenever only token 2 beats it by more than the margin.
        let beats = |t: Token| score(&logits, &p, 7, t);
        let margin = (beats(0).max(beats(1)) - beats(3)).max(0.0) + 1e-9;
        assert!(edges.explains(&logits, &p, 7, 3, margin));
    }

    /// A first-priority audit queued after waiting probation ones runs
    /// next; a stream of first-priority audits leaves probation one turn in
    /// PROBATION_TURN (it is never starved), and every audit runs once, each
    /// queue in its order.
    #[test]
    fn probation_waits_behind_the_rest_but_gets_its_turn() {
        let handle = AuditorHandle {
            queues: Arc::new(Queues::default()),
            waiting: Arc::default(),
        };
        for n in 1..=3 {
            drop(handle.submit_with(job(n), Priority::Probation));
        }
        drop(handle.submit_with(job(9), Priority::First));
        let next = |h: &AuditorHandle| next_request(&h.queues).unwrap().job.output.len();
        assert_eq!(next(&handle), 9, "first priority ahead of probation");
        assert_eq!(next(&handle), 1, "only probation left");
        // A steady stream of first-priority audits (10, 11, ...), two
        // queued for each one taken: probation still runs every
        // PROBATION_TURN-th audit.
        let mut order = vec![];
        let mut queued = 10;
        for _ in 0..2 * PROBATION_TURN {
            for _ in 0..2 {
                drop(handle.submit_with(job(queued), Priority::First));
                queued += 1;
            }
            order.push(next(&handle));
        }
        let turn = PROBATION_TURN as usize;
        let probation: Vec<usize> = order.iter().copied().filter(|&n| n < 9).collect();
        assert_eq!(probation, [2, 3], "{order:?}");
        assert_eq!(order[turn - 1], 2, "{order:?}");
        assert_eq!(order[2 * turn - 1], 3, "{order:?}");
        let first: Vec<usize> = order.iter().copied().filter(|&n| n >= 10).collect();
        assert!(first.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        // The rest drain, nothing lost; then no handle, nothing queued.
        let mut rest = 0;
        while !handle.queues.state.lock().unwrap().first.is_empty() {
            next(&handle);
            rest += 1;
        }
        assert_eq!(order.len() + rest + 2, (queued - 10) + 4);
        assert_eq!(handle.waiting(), queued - 10 + 4);
        let queues = handle.queues.clone();
        drop(handle);
        assert!(
            next_request(&queues).is_none(),
            "no handle left, nothing queued"
        );
    }
}
