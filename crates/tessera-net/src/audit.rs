//! Auditing providers' answers on the gateway: which parts to audit, their
//! verdicts, and what follows from them.
//!
//! When a provider's part of an answer ends with a proof, [`Audits::consider`]
//! decides whether to audit it: every part of a provider on probation (fewer
//! than [`AuditPolicy::probation`] passed audits) and every part of one that
//! has failed an audit, else a share [`AuditPolicy::base_rate`] of them. An
//! audited part is `pending` until the auditor's thread (its own engine,
//! `tessera_engine::audit`) answers. A failure refunds the client's request
//! (through the hooks the gateway's owner installs, which void the
//! providers' earnings and the fee with it) and puts the provider on watch:
//! all its parts are audited until it passes `gateway::WATCH` in a row; a
//! failure before that confirms the first and quarantines it (the router no
//! longer uses it; its bond is forfeited). Isolated honest false positives
//! are thus forgiven, a cheater is not. Verdicts and their evidence are kept per request (the API's
//! response id), for `GET /v1/jobs/{id}`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{json, Value};
use tessera_engine::audit::{AuditJob, AuditorHandle, Evidence};
use tessera_metrics::{AuditRecord, Metrics, Verdict};

use crate::gateway::Directory;

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

/// What the gateway's owner does about verdicts (the ledger, in the
/// `tessera` binary).
pub trait AuditHooks: Send + Sync + 'static {
    /// A part of `request` served by `provider` got its verdict (`passed`,
    /// `failed`).
    fn verdict(&self, request: &str, provider: &str, status: &'static str);
    /// `request` failed its audit: refund it.
    fn failed(&self, request: &str);
    /// `provider` failed a second audit and is quarantined: forfeit its bond.
    fn quarantined(&self, provider: &str);
}

/// One part of an answer as audited.
#[derive(Clone, Debug, Serialize)]
pub struct PartAudit {
    pub job: String,
    pub provider: String,
    /// `pending`, `passed`, `failed` or `not_audited`.
    pub status: &'static str,
    /// Why it was not audited, or why the audit could not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

struct Request {
    account: String,
    parts: Vec<PartAudit>,
}

/// Requests whose verdicts are kept (the oldest are forgotten).
const KEPT: usize = 100_000;

/// The gateway's audits.
pub struct Audits {
    auditor: AuditorHandle,
    policy: AuditPolicy,
    requests: Mutex<(HashMap<String, Request>, VecDeque<String>)>,
    metrics: Option<Arc<Metrics>>,
    hooks: Option<Arc<dyn AuditHooks>>,
}

/// The overall status of a request's parts.
fn overall(parts: &[PartAudit]) -> &'static str {
    if parts.iter().any(|p| p.status == "failed") {
        "failed"
    } else if parts.iter().any(|p| p.status == "pending") {
        "pending"
    } else if parts.iter().any(|p| p.status == "passed") {
        "passed"
    } else {
        "not_audited"
    }
}

impl Audits {
    pub fn new(
        auditor: AuditorHandle,
        policy: AuditPolicy,
        metrics: Option<Arc<Metrics>>,
        hooks: Option<Arc<dyn AuditHooks>>,
    ) -> Arc<Audits> {
        Arc::new(Audits {
            auditor,
            policy,
            requests: Mutex::new((HashMap::new(), VecDeque::new())),
            metrics,
            hooks,
        })
    }

    fn set(&self, request: &str, account: &str, part: PartAudit) {
        let Ok(mut guard) = self.requests.lock() else {
            return;
        };
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

    /// A part of request `request` (of `account`) ended: audit it or not.
    /// `job` is `Err(reason)` when the part cannot be audited (no proof).
    /// Returns at once; the verdict comes later.
    pub(crate) fn consider(
        self: &Arc<Self>,
        directory: &Arc<Directory>,
        request: &str,
        account: &str,
        part_job: &str,
        provider: &str,
        job: Result<AuditJob, String>,
    ) {
        let canary = account == crate::canary::CANARY_ACCOUNT;
        let odds = match canary {
            true => 1.0,
            false => directory.audit_odds(provider, &self.policy),
        };
        let roll = getrandom::u64().unwrap_or(0) as f64 / u64::MAX as f64;
        let chosen = roll < odds;
        let mut part = PartAudit {
            job: part_job.to_string(),
            provider: provider.to_string(),
            status: "not_audited",
            note: None,
            evidence: None,
        };
        let job = match job {
            Err(why) => {
                part.note = Some(why);
                self.set(request, account, part);
                self.count(Verdict::NotAudited, None);
                return;
            }
            Ok(_) if !chosen => {
                self.set(request, account, part);
                self.count(Verdict::NotAudited, None);
                return;
            }
            Ok(job) => job,
        };
        part.status = "pending";
        self.set(request, account, part.clone());
        let rx = self.auditor.submit(job);
        let audits = self.clone();
        let directory = directory.clone();
        let request = request.to_string();
        let account = account.to_string();
        tokio::spawn(async move {
            match rx.await {
                Ok(Ok(evidence)) => {
                    let passed = evidence.passed();
                    part.status = if passed { "passed" } else { "failed" };
                    let reason = evidence.failures.first().cloned().unwrap_or_default();
                    part.evidence = Some(evidence);
                    audits.set(&request, &account, part.clone());
                    let verdict = if passed {
                        Verdict::Passed
                    } else {
                        Verdict::Failed
                    };
                    audits.count(
                        verdict,
                        Some(AuditRecord {
                            job: request.clone(),
                            provider: part.provider.clone(),
                            verdict,
                            at_ms: crate::receipt::now_ms(),
                            reason: reason.clone(),
                        }),
                    );
                    let quarantined = directory.record_audit(&part.provider, passed);
                    let hooks = audits.hooks.as_ref();
                    if let (Some(h), false) = (hooks, canary) {
                        h.verdict(&request, &part.provider, part.status);
                    }
                    if !passed {
                        tracing::warn!(provider = %&part.provider[..12], job = %request, %reason, "audit failed; refunding the request");
                        // A canary was never billed: nothing to refund.
                        if let (Some(h), false) = (hooks, canary) {
                            h.failed(&request);
                        }
                    }
                    if quarantined {
                        tracing::warn!(provider = %&part.provider[..12], "second failed audit: provider quarantined, bond forfeited");
                        if let Some(h) = hooks {
                            h.quarantined(&part.provider);
                        }
                    }
                }
                Ok(Err(e)) => {
                    part.status = "not_audited";
                    part.note = Some(format!("the audit could not run: {e}"));
                    audits.set(&request, &account, part);
                    audits.count(Verdict::NotAudited, None);
                }
                Err(_) => {
                    part.status = "not_audited";
                    part.note = Some("the auditor stopped".into());
                    audits.set(&request, &account, part);
                }
            }
        });
    }

    fn count(&self, verdict: Verdict, record: Option<AuditRecord>) {
        if let Some(m) = &self.metrics {
            m.audit(verdict, record);
        }
    }

    /// The request's audit status now (`None`: no part of it was seen).
    pub fn status(&self, request: &str) -> Option<&'static str> {
        let guard = self.requests.lock().ok()?;
        guard.0.get(request).map(|r| overall(&r.parts))
    }

    /// The request's verdict and evidence, for its owner only.
    pub fn report(&self, request: &str, account: &str) -> Option<Value> {
        let guard = self.requests.lock().ok()?;
        let r = guard.0.get(request).filter(|r| r.account == account)?;
        Some(json!({
            "id": request,
            "object": "tessera.job",
            "audit": overall(&r.parts),
            "parts": r.parts,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(status: &'static str) -> PartAudit {
        PartAudit {
            job: "j.0".into(),
            provider: "p".into(),
            status,
            note: None,
            evidence: None,
        }
    }

    #[test]
    fn a_request_is_as_good_as_its_worst_part() {
        assert_eq!(overall(&[]), "not_audited");
        assert_eq!(overall(&[part("not_audited"), part("passed")]), "passed");
        assert_eq!(overall(&[part("passed"), part("pending")]), "pending");
        assert_eq!(overall(&[part("pending"), part("failed")]), "failed");
    }
}
