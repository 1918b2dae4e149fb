//! The states jobs, audits and providers go through.

use serde::{Deserialize, Serialize};

/// Where an answer (or one provider's part of it) stands with the auditor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditStatus {
    /// Chosen for an audit that has not finished.
    Pending,
    /// The auditor reproduced it.
    Passed,
    /// The auditor caught it: refunded, its provider struck.
    Failed,
    /// Not audited (not chosen, or no auditor).
    NotAudited,
    /// The part ended without a valid proof (none, malformed, cut off,
    /// an error or a protocol violation): its provider is not paid for it,
    /// and its tokens were checked by seeded sampling alone (or not at
    /// all, without an auditor). An answer with such a part is never
    /// reported `passed`.
    Unverified,
}

impl AuditStatus {
    /// The word clients and the ledger see (`pending`, `passed`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditStatus::Pending => "pending",
            AuditStatus::Passed => "passed",
            AuditStatus::Failed => "failed",
            AuditStatus::NotAudited => "not_audited",
            AuditStatus::Unverified => "unverified",
        }
    }

    /// The status of an answer from its parts': as good as its worst part
    /// (failed, else pending, else unverified, else passed if any part
    /// passed).
    pub fn overall(parts: impl IntoIterator<Item = AuditStatus>) -> AuditStatus {
        use AuditStatus::*;
        let mut out = NotAudited;
        for p in parts {
            out = match (out, p) {
                (Failed, _) | (_, Failed) => Failed,
                (Pending, _) | (_, Pending) => Pending,
                (Unverified, _) | (_, Unverified) => Unverified,
                (Passed, _) | (_, Passed) => Passed,
                _ => NotAudited,
            };
        }
        out
    }
}

impl std::fmt::Display for AuditStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one provider's part of a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartOutcome {
    /// It finished (end of generation, length or a stop sequence).
    Done,
    /// The provider failed it (error, reset, silence, garbage).
    Failed,
    /// The client went away first.
    Cancelled,
}

impl PartOutcome {
    /// The word metrics and the dashboard use.
    pub fn as_str(self) -> &'static str {
        match self {
            PartOutcome::Done => "done",
            PartOutcome::Failed => "failed",
            PartOutcome::Cancelled => "cancelled",
        }
    }
}

/// A provider as a gateway sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderState {
    /// Connected, heartbeats recent, a slot free.
    Online,
    /// Every slot taken.
    Busy,
    /// Heartbeats late.
    Stale,
    /// Missed canaries in a row: not routed to until it answers one.
    Unroutable,
    /// Caught cheating: never routed to again.
    Quarantined,
    /// Not connected.
    Offline,
}

impl ProviderState {
    /// The word `/api/status` and the dashboard show.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderState::Online => "online",
            ProviderState::Busy => "busy",
            ProviderState::Stale => "stale",
            ProviderState::Unroutable => "unroutable",
            ProviderState::Quarantined => "quarantined",
            ProviderState::Offline => "offline",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AuditStatus::*;

    #[test]
    fn an_answer_is_as_good_as_its_worst_part() {
        assert_eq!(AuditStatus::overall([]), NotAudited);
        assert_eq!(AuditStatus::overall([NotAudited, Passed]), Passed);
        assert_eq!(AuditStatus::overall([Passed, Pending]), Pending);
        assert_eq!(AuditStatus::overall([Pending, Failed, Passed]), Failed);
        assert_eq!(AuditStatus::overall([Passed, Unverified]), Unverified);
        assert_eq!(AuditStatus::overall([Unverified, Pending]), Pending);
        assert_eq!(
            serde_json::to_string(&NotAudited).unwrap(),
            "\"not_audited\""
        );
    }
}
