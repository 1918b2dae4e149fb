//! Auditing providers' answers on the gateway: which parts to audit, their
//! verdicts, and what follows from them.
//!
//! When a provider's part of an answer ends with a proof, [`Audits::consider`]
//! decides whether to audit it: every part of a provider on probation (fewer
//! than [`AuditPolicy::probation`] passed audits), every part of one on
//! watch after a failure, every canary, and otherwise a share
//! [`AuditPolicy::base_rate`] of them. An audited part is `pending` until
//! the auditor's thread (its own engine, `tessera_engine::audit`) answers.
//!
//! A verdict goes to the [`Directory`] (reputation, watch, quarantine) and,
//! for a client's request, to the ledger as one more step of the job's
//! lifecycle: the ledger's writer records it on the receipts and, for a
//! failure, refunds the request — after its settlement, however the two
//! race (the writer holds a verdict that arrives first until the
//! settlement is in). A confirmed second failure quarantines the provider
//! and forfeits its bond, after those refunds. Verdicts and their evidence
//! are kept per request (the API's response id) for `GET /v1/jobs/{id}`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{json, Value};
use tessera_backend::JobTicket;
use tessera_core::{AuditStatus, NodeId};
use tessera_engine::audit::{AuditJob, AuditorHandle, Evidence};
use tessera_ledger::Ledger;
use tessera_metrics::{AuditRecord, Metrics, Verdict};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::directory::{Directory, Standing};

/// How often to audit.
#[derive(Clone, Debug)]
pub struct AuditPolicy {
    /// Share of a trusted provider's parts audited at random.
    pub base_rate: f64,
    /// Audits a new provider must pass before only `base_rate` of its parts
    /// are audited.
    pub probation: u32,
}

impl Default for AuditPolicy {
    fn default() -> Self {
        AuditPolicy {
            base_rate: 0.05,
            probation: 20,
        }
    }
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
    auditor: AuditorHandle,
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
    /// Audits by `auditor` under `setup`.
    pub fn new(auditor: AuditorHandle, setup: AuditSetup) -> Arc<Audits> {
        Arc::new(Audits {
            auditor,
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
    /// A part without a proof is always checked (by seeded sampling alone);
    /// one with a proof as the policy says. Returns at once; the verdict
    /// comes later.
    pub fn consider(
        self: &Arc<Self>,
        ticket: &JobTicket,
        origin: Origin,
        part_job: &str,
        provider: NodeId,
        job: AuditJob,
    ) {
        let odds = match origin {
            _ if job.proof.is_none() => 1.0,
            Origin::Canary => 1.0,
            Origin::Client => {
                self.directory
                    .audit_odds(&provider, self.policy.base_rate, self.policy.probation)
            }
        };
        let roll = tessera_core::secret_bytes::<8>()
            .map_or(0.0, |b| u64::from_le_bytes(b) as f64 / u64::MAX as f64);
        let mut part = PartAudit {
            job: part_job.to_string(),
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
        if job.proof.is_none() {
            part.note = Some("no proof: checked by seeded sampling alone".into());
        }
        part.status = AuditStatus::Pending;
        self.set(&ticket.id, &ticket.account, part.clone());
        let rx = self.auditor.submit(job);
        let audits = self.clone();
        let ticket = ticket.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let result = tokio::select! {
                r = rx => r,
                _ = shutdown.cancelled() => return,
            };
            match result {
                Ok(Ok(evidence)) => audits.verdict(&ticket, origin, part, evidence).await,
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
    ) {
        let passed = evidence.passed();
        part.status = if passed {
            AuditStatus::Passed
        } else {
            AuditStatus::Failed
        };
        let reason = evidence.failures.first().cloned().unwrap_or_default();
        part.evidence = Some(evidence);
        let provider = part.provider;
        let status = part.status;
        self.set(&ticket.id, &ticket.account, part);
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
        let standing = self.directory.record_audit(&provider, passed);
        if !passed {
            tracing::warn!(provider = %provider.short(), job = %ticket.id, %reason, "audit failed");
        }
        let Some(ledger) = &self.ledger else {
            return;
        };
        // A canary was never billed: nothing to record or refund.
        if origin == Origin::Client {
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
