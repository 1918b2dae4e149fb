//! Auditing providers' answers on the gateway: which parts to audit, their
//! verdicts, and what follows from them.
//!
//! When a provider's part of an answer ends, [`Audits::consider`] decides
//! whether to audit it. A part that ended verified (a proof of exactly what
//! it streamed, a matching receipt: [`PartEnd::Verified`]) is audited when
//! its provider is on probation (fewer than [`AuditPolicy::probation`]
//! passed audits, or no bond held yet), on watch after a failure, for every
//! canary, and otherwise at [`AuditPolicy::base_rate`]. A part that ended
//! early without a proof ([`PartEnd::Unverified`]) was not paid and is
//! always checked by seeded sampling alone; one that broke the protocol
//! ([`PartEnd::Violation`]) fails as it stands. Audits run on the auditor's
//! thread (its own engine, `tessera_engine::audit`) or on auditor processes
//! the operator named ([`crate::auditors`]), probation last.
//!
//! A verdict goes to the [`Directory`] (reputation, watch, quarantine; a
//! passed canary earns no credit) and to the ledger as steps of the job's
//! lifecycle, sequenced by the ledger's writer after the settlement: the
//! verdict on the receipts, for a failure a refund of the request, a slash
//! of `value / base_rate + slash_penalty` from the provider's account, and
//! at a confirmed second failure (quarantine) the forfeit of the rest. The
//! provider's standing is saved in the ledger, which every gateway on it
//! follows ([`follow_standings`]). Verdicts and their evidence are kept per
//! request (the API's response id) for `GET /v1/jobs/{id}`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{json, Value};
use tessera_backend::JobTicket;
use tessera_core::{AuditStatus, NodeId};
use tessera_engine::audit::{AuditJob, Evidence, Priority};
use tessera_ledger::Ledger;
use tessera_metrics::{AuditRecord, Metrics, Verdict};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auditors::AuditorPool;
use crate::directory::{Directory, Standing};

/// How often to audit, and what a failure costs.
#[derive(Clone, Debug)]
pub struct AuditPolicy {
    /// Share of a trusted provider's parts audited at random.
    pub base_rate: f64,
    /// Audits a new provider must pass before only `base_rate` of its parts
    /// are audited.
    pub probation: u32,
    /// Micro-credits a provider's account at the ledger must hold (its
    /// bond: earnings kept there, or an operator's top-up) before it
    /// leaves probation; until then every part of it is audited. 0: none.
    pub bond: u64,
    /// The fixed part of a slash (see [`AuditPolicy::slash`]).
    pub slash_penalty: u64,
}

/// 10 credits: see README ("What cheating costs") for the reasoning.
pub const DEFAULT_BOND: u64 = 10_000_000;
/// 1 credit.
pub const DEFAULT_SLASH_PENALTY: u64 = 1_000_000;

impl Default for AuditPolicy {
    fn default() -> Self {
        AuditPolicy {
            base_rate: 0.05,
            probation: 20,
            bond: DEFAULT_BOND,
            slash_penalty: DEFAULT_SLASH_PENALTY,
        }
    }
}

impl AuditPolicy {
    /// What a failed audit of a part worth `value` micro-credits takes from
    /// its provider's bond: `value / base_rate + slash_penalty`, so that a
    /// part cheated at the base rate loses more in expectation (`base_rate
    /// × slash > value`) than the whole part could have earned.
    pub fn slash(&self, value: u64) -> u64 {
        let scaled = value as f64 / self.base_rate.clamp(1e-6, 1.0);
        (scaled.ceil() as u64).saturating_add(self.slash_penalty)
    }
}

/// One provider's part of an answer, handed to [`Audits::consider`].
#[derive(Clone, Debug)]
pub struct PartRef {
    /// The part's job id.
    pub job: String,
    /// Who served it.
    pub provider: NodeId,
    /// What it is worth at its provider's price (prompt and tokens), in
    /// micro-credits: the basis of a slash.
    pub value: u64,
    /// How it ended.
    pub end: PartEnd,
}

/// Who a job is for: a client (billed, refunded when caught) or the
/// gateway itself (a canary: never billed, always audited). Kept on the
/// gateway's side of the job; never sent to the provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A client's request.
    Client,
    /// The gateway's own uptime and capacity probe.
    Canary,
}

/// How a provider's part ended, as far as paying it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartEnd {
    /// With a proof of exactly the tokens streamed and a matching receipt:
    /// paid, and audited as the policy says.
    Verified,
    /// Early, without a valid proof (reset, error, silence): unpaid, always
    /// checked by seeded sampling alone, never `passed`.
    Unverified,
    /// It broke the protocol (why): a provable cheat, failed as it stands.
    Violation(String),
}

/// One part of an answer as audited.
#[derive(Clone, Debug, Serialize)]
pub struct PartAudit {
    /// The part's job id.
    pub job: String,
    /// Who served it.
    pub provider: NodeId,
    /// Its verdict so far.
    pub status: AuditStatus,
    /// Why it was not audited, or why the audit could not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The figures the verdict was drawn from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

struct Request {
    account: String,
    parts: Vec<PartAudit>,
}

/// Requests whose verdicts are kept (the oldest are forgotten).
const KEPT: usize = 100_000;

/// The gateway's audits of one model.
pub struct Audits {
    auditors: Arc<AuditorPool>,
    /// sha256 of the model whose answers these are.
    model: String,
    policy: AuditPolicy,
    directory: Arc<Directory>,
    requests: Mutex<(HashMap<String, Request>, VecDeque<String>)>,
    metrics: Option<Arc<Metrics>>,
    ledger: Option<Ledger>,
    /// Verdict tasks, ended on shutdown.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// What an [`Audits`] needs besides its auditor.
pub struct AuditSetup {
    /// How often to audit.
    pub policy: AuditPolicy,
    /// Where providers' standing is kept.
    pub directory: Arc<Directory>,
    /// Where verdicts are counted.
    pub metrics: Option<Arc<Metrics>>,
    /// Where refunds and forfeits are booked (none: verdicts only).
    pub ledger: Option<Ledger>,
    /// Stops verdict tasks.
    pub shutdown: CancellationToken,
    /// Tracks verdict tasks so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl Audits {
    /// Audits of model `sha256`'s answers by `auditors` under `setup`.
    pub fn new(auditors: Arc<AuditorPool>, sha256: &str, setup: AuditSetup) -> Arc<Audits> {
        Arc::new(Audits {
            auditors,
            model: sha256.to_string(),
            policy: setup.policy,
            directory: setup.directory,
            requests: Mutex::new((HashMap::new(), VecDeque::new())),
            metrics: setup.metrics,
            ledger: setup.ledger,
            tasks: setup.tasks,
            shutdown: setup.shutdown,
        })
    }

    fn set(&self, request: &str, account: &str, part: PartAudit) {
        let mut guard = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *guard;
        if !map.contains_key(request) {
            if order.len() >= KEPT {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
            order.push_back(request.to_string());
        }
        let r = map.entry(request.to_string()).or_insert_with(|| Request {
            account: account.to_string(),
            parts: vec![],
        });
        match r.parts.iter_mut().find(|p| p.job == part.job) {
            Some(p) => *p = part,
            None => r.parts.push(part),
        }
    }

    /// A part of `ticket`'s request ended on `provider`: audit it or not.
    /// An unverified part (`verified` false: it ended without a valid
    /// proof, and was not paid) is always checked by seeded sampling alone
    /// and never counts as passed; a verified one is audited as the policy
    /// says. Returns at once; the verdict comes later.
    pub fn consider(
        self: &Arc<Self>,
        ticket: &JobTicket,
        origin: Origin,
        part: PartRef,
        mut job: AuditJob,
    ) {
        let PartRef {
            job: part_job,
            provider,
            value,
            end,
        } = part;
        let verified = end == PartEnd::Verified;
        if !verified {
            job.proof = None;
        }
        if let PartEnd::Violation(why) = end {
            // A provable cheat: failed as it stands, nothing to recompute.
            let part = PartAudit {
                job: part_job.clone(),
                provider,
                status: AuditStatus::Pending,
                note: Some("broke the protocol: not paid".into()),
                evidence: None,
            };
            self.set(&ticket.id, &ticket.account, part.clone());
            let evidence = Evidence {
                tokens: job.output.len(),
                failures: vec![why],
                ..Evidence::default()
            };
            let (audits, ticket) = (self.clone(), ticket.clone());
            self.tasks.spawn(async move {
                audits
                    .verdict(&ticket, origin, part, evidence, (false, value))
                    .await
            });
            return;
        }
        let odds = match origin {
            _ if !verified => 1.0,
            Origin::Canary => 1.0,
            Origin::Client => self.directory.audit_odds(
                &provider,
                self.policy.base_rate,
                self.policy.probation,
                self.policy.bond > 0 && self.ledger.is_some(),
            ),
        };
        let roll = tessera_core::secret_bytes::<8>()
            .map_or(0.0, |b| u64::from_le_bytes(b) as f64 / u64::MAX as f64);
        let mut part = PartAudit {
            job: part_job,
            provider,
            status: AuditStatus::NotAudited,
            note: None,
            evidence: None,
        };
        if roll >= odds {
            self.set(&ticket.id, &ticket.account, part);
            self.count(Verdict::NotAudited, None);
            return;
        }
        if !verified {
            part.note = Some("no valid proof: not paid, checked by seeded sampling alone".into());
        }
        part.status = AuditStatus::Pending;
        self.set(&ticket.id, &ticket.account, part.clone());
        // Probation waits behind everything else, so new providers (or a
        // flood of sybils) cannot starve the audits that keep trusted
        // providers honest.
        let needs_bond = self.policy.bond > 0 && self.ledger.is_some();
        let priority = match origin {
            Origin::Client
                if verified
                    && self.directory.on_probation(
                        &provider,
                        self.policy.probation,
                        needs_bond,
                    ) =>
            {
                Priority::Probation
            }
            _ => Priority::First,
        };
        let rx = self.auditors.submit(&self.model, job, priority);
        self.count_backlog();
        let audits = self.clone();
        let ticket = ticket.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let result = tokio::select! {
                r = rx => r,
                _ = shutdown.cancelled() => return,
            };
            match result {
                Ok(Ok(evidence)) => {
                    audits
                        .verdict(&ticket, origin, part, evidence, (verified, value))
                        .await
                }
                Ok(Err(e)) => {
                    part.status = AuditStatus::NotAudited;
                    part.note = Some(format!("the audit could not run: {e}"));
                    audits.set(&ticket.id, &ticket.account, part);
                    audits.count(Verdict::NotAudited, None);
                }
                Err(_) => {
                    part.status = AuditStatus::NotAudited;
                    part.note = Some("the auditor stopped".into());
                    audits.set(&ticket.id, &ticket.account, part);
                }
            }
        });
    }

    /// A finished audit: record it, and book what follows in the ledger.
    async fn verdict(
        &self,
        ticket: &JobTicket,
        origin: Origin,
        mut part: PartAudit,
        evidence: Evidence,
        (verified, value): (bool, u64),
    ) {
        self.count_backlog();
        let passed = evidence.passed();
        part.status = match (passed, verified) {
            (false, _) => AuditStatus::Failed,
            (true, true) => AuditStatus::Passed,
            (true, false) => AuditStatus::Unverified,
        };
        let reason = evidence.failures.first().cloned().unwrap_or_default();
        part.evidence = Some(evidence);
        let provider = part.provider;
        let status = part.status;
        self.set(&ticket.id, &ticket.account, part);
        if passed && !verified {
            // Its tokens are what the model samples, but nothing proves how
            // they were computed: no credit toward probation, nothing to
            // book (the part was not paid).
            self.count(Verdict::NotAudited, None);
            return;
        }
        let verdict = if passed {
            Verdict::Passed
        } else {
            Verdict::Failed
        };
        self.count(
            verdict,
            Some(AuditRecord {
                job: ticket.id.clone(),
                provider: provider.to_string(),
                verdict,
                at_ms: tessera_core::now_ms(),
                reason: reason.clone(),
            }),
        );
        // A passed canary proves nothing about clients' answers (a provider
        // that recognises canaries answers them honestly): only failures
        // count, never a pass toward probation or off watch.
        let standing = match (passed, origin) {
            (true, Origin::Canary) => Standing::Unchanged,
            _ => self.directory.record_audit(&provider, passed),
        };
        if !passed {
            tracing::warn!(provider = %provider.short(), job = %ticket.id, %reason, "audit failed");
        }
        let Some(ledger) = &self.ledger else {
            return;
        };
        // The standing outlives this gateway: every gateway on the ledger
        // (and this one after a restart) picks it up.
        if let Some(s) = self.directory.standing(&provider) {
            if let Err(e) = ledger.save_standing(&s).await {
                tracing::error!(provider = %provider.short(), error = %e, "could not save a provider's standing");
            }
        }
        // An unverified part was never billed: nothing to record or refund
        // (the answer's other parts were honest work). A canary is billed
        // like a client's request when the gateway pays canaries, and
        // refunded to the canary account the same way.
        if verified {
            match ledger
                .audit_verdict(&ticket.id, &provider.to_string(), status)
                .await
            {
                Ok(Some(refund)) => {
                    tracing::info!(job = %ticket.id, amount = refund.amount, "refunded after a failed audit")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(job = %ticket.id, error = %e, "could not book an audit verdict")
                }
            }
        }
        // Every failure is slashed (after the refund, which the ledger
        // orders first); a quarantine forfeits what is left.
        if !passed {
            let slash = self.policy.slash(value);
            match ledger.slash(&provider.to_string(), slash).await {
                Ok(s) => {
                    tracing::warn!(provider = %provider.short(), asked = slash, taken = s.amount, "slashed after a failed audit")
                }
                Err(e) => {
                    tracing::error!(provider = %provider.short(), error = %e, "could not slash a bond")
                }
            }
        }
        if standing == Standing::Quarantined {
            tracing::warn!(provider = %provider.short(), "second failed audit: provider quarantined, bond forfeited");
            match ledger.forfeit(&provider.to_string()).await {
                Ok(f) => {
                    tracing::warn!(provider = %provider.short(), amount = f.amount, "bond forfeited")
                }
                Err(e) => {
                    tracing::error!(provider = %provider.short(), error = %e, "could not forfeit a bond")
                }
            }
        }
        self.refresh_bond(ledger, &provider).await;
    }

    /// Whether `provider`'s account holds its bond now (it leaves
    /// probation only then).
    async fn refresh_bond(&self, ledger: &Ledger, provider: &NodeId) {
        if self.policy.bond == 0 {
            return;
        }
        match ledger.account(&format!("provider:{provider}")).await {
            Ok(account) => {
                let balance = account.map_or(0, |a| a.balance);
                let bonded = u64::try_from(balance).is_ok_and(|b| b >= self.policy.bond);
                self.directory.set_bonded(provider, bonded);
            }
            Err(e) => {
                tracing::warn!(provider = %provider.short(), error = %e, "could not read a provider's bond")
            }
        }
    }

    /// Show the auditor's backlog on `/metrics` and the operator's status.
    fn count_backlog(&self) {
        if let Some(m) = &self.metrics {
            m.set_audit_backlog(self.auditors.waiting());
        }
    }

    fn count(&self, verdict: Verdict, record: Option<AuditRecord>) {
        if let Some(m) = &self.metrics {
            m.audit(verdict, record);
        }
    }

    /// The request's audit status now (`None`: no part of it was seen).
    pub fn status(&self, request: &str) -> Option<AuditStatus> {
        let guard = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .0
            .get(request)
            .map(|r| AuditStatus::overall(r.parts.iter().map(|p| p.status)))
    }

    /// The request's verdict and evidence, for its owner only.
    pub fn report(&self, request: &str, account: &str) -> Option<Value> {
        let guard = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let r = guard.0.get(request).filter(|r| r.account == account)?;
        Some(json!({
            "id": request,
            "object": "tessera.job",
            "audit": AuditStatus::overall(r.parts.iter().map(|p| p.status)),
            "parts": r.parts,
        }))
    }
}

/// How often a gateway reads the standings other gateways saved.
const STANDINGS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Keep `directory` in step with the standings saved in `ledger` (by this
/// gateway before a restart, or by another gateway on the same database):
/// all of them at once at the start, then every change, until `shutdown`.
/// Resolves after the first read, so a restarted gateway never routes to a
/// provider it had quarantined.
pub async fn follow_standings(
    directory: Arc<Directory>,
    ledger: Ledger,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), tessera_ledger::LedgerError> {
    let mut since = 0;
    restore_all(&directory, ledger.standings_since(0).await?, &mut since);
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(STANDINGS_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
            match ledger.standings_since(since).await {
                Ok(rows) => restore_all(&directory, rows, &mut since),
                Err(e) => tracing::warn!(error = %e, "could not read providers' standings"),
            }
        }
    });
    Ok(())
}

/// Take `rows` into `directory`; `since` becomes the newest change seen.
fn restore_all(directory: &Directory, rows: Vec<tessera_ledger::Standing>, since: &mut u64) {
    for s in rows {
        *since = (*since).max(s.updated_ms);
        match s.provider.parse::<NodeId>() {
            Ok(node) => directory.restore(&node, &s),
            Err(_) => tracing::warn!(provider = %s.provider, "a standing of no valid node id"),
        }
    }
}
