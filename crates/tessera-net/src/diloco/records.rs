//! What a DiLoCo task is and what it shows: the request a model owner
//! sends ([`DilocoRequest`], checked field by field) and the records its
//! runner keeps — each outer step's workers and verdicts, and the totals.
//! The runner (`task`) fills them; the store writes them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_core::train::{InnerOptimizer, LmSpec, TaskStatus};
use tessera_train::diloco::{self, AuditReport, Divergence};

use super::worker::MAX_PARAMETERS;

/// A DiLoCo task as `POST /v1/training/tasks` takes it (`"kind":
/// "diloco"`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DilocoRequest {
    /// `"diloco"`.
    pub kind: String,
    /// The model.
    #[serde(default)]
    pub model: LmSpec,
    /// Outer steps to run.
    pub outer_steps: u32,
    /// Inner steps per outer step for the fastest worker (H).
    #[serde(default = "default_h")]
    pub inner_steps: u32,
    /// Warm-up: H starts at this many inner steps and doubles every outer
    /// step until it reaches `inner_steps` (none: H from the start).
    #[serde(default)]
    pub first_inner_steps: Option<u32>,
    /// Windows per inner step.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Most workers per outer step.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Fewest workers an outer step runs with.
    #[serde(default = "one")]
    pub min_workers: usize,
    /// The inner AdamW (its `total_steps` is outer_steps × inner_steps).
    #[serde(default)]
    pub optimizer: InnerOptimizer,
    /// Outer learning rate.
    #[serde(default = "default_outer_lr")]
    pub outer_lr: f32,
    /// Outer Nesterov momentum.
    #[serde(default = "default_momentum")]
    pub outer_momentum: f32,
    /// Seed of the initial model and every worker's windows.
    #[serde(default)]
    pub seed: u64,
    /// Most a worker may charge per inner step (micro-credits); the escrow
    /// is outer_steps × workers × inner_steps × this.
    #[serde(default = "default_price")]
    pub max_price_per_step: u64,
    /// Share of (worker, outer step) pairs re-executed.
    #[serde(default = "default_audit_rate")]
    pub audit_rate: f64,
    /// Workers commit their state every this many inner steps.
    #[serde(default = "default_every")]
    pub checkpoint_every: u32,
    /// Seconds a worker has to commit after its step is sent.
    #[serde(default = "default_deadline")]
    pub step_deadline_s: f64,
    /// Seconds an outer step waits for `min_workers` before the task fails.
    #[serde(default = "default_wait")]
    pub wait_for_workers_s: f64,
    /// Validation windows the loss is measured on after each outer step.
    #[serde(default = "default_val")]
    pub val_windows: usize,
}

fn default_h() -> u32 {
    500
}
fn default_batch() -> usize {
    8
}
fn default_workers() -> usize {
    4
}
fn one() -> usize {
    1
}
fn default_outer_lr() -> f32 {
    0.85
}
fn default_momentum() -> f32 {
    0.5
}
fn default_price() -> u64 {
    10
}
fn default_audit_rate() -> f64 {
    0.08
}
fn default_every() -> u32 {
    50
}
fn default_deadline() -> f64 {
    1800.0
}
fn default_wait() -> f64 {
    600.0
}
fn default_val() -> usize {
    256
}

impl DilocoRequest {
    /// Why the task cannot run, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.kind != "diloco" {
            return Err(format!("kind: \"diloco\", not {:?}", self.kind));
        }
        self.model.check().map_err(|e| format!("model: {e}"))?;
        if self.model.parameters() > MAX_PARAMETERS {
            return Err(format!(
                "model: {} parameters (at most {MAX_PARAMETERS})",
                self.model.parameters()
            ));
        }
        if self.model.vocab != 256 {
            return Err("model.vocab: 256 (the text is trained on as bytes)".into());
        }
        if self.outer_steps == 0 || self.outer_steps > 100_000 {
            return Err("outer_steps: 1 to 100000".into());
        }
        if self.inner_steps == 0 || self.inner_steps > super::worker::MAX_STEPS {
            return Err(format!("inner_steps: 1 to {}", super::worker::MAX_STEPS));
        }
        if self.batch == 0 || self.batch > 4096 {
            return Err("batch: 1 to 4096".into());
        }
        if self.workers == 0 || self.workers > 1000 {
            return Err("workers: 1 to 1000".into());
        }
        if self.min_workers == 0 || self.min_workers > self.workers {
            return Err("min_workers: 1 to workers".into());
        }
        let o = &self.optimizer;
        let ok = |v: f32| v.is_finite() && v >= 0.0;
        if !(ok(o.lr) && o.lr > 0.0 && o.lr <= 1.0) {
            return Err("optimizer.lr: above 0, at most 1".into());
        }
        if !(ok(o.beta1) && ok(o.beta2) && o.beta1 < 1.0 && o.beta2 < 1.0) {
            return Err("optimizer.beta1, beta2: 0 to below 1".into());
        }
        if !(ok(o.eps) && ok(o.weight_decay) && ok(o.min_lr_ratio) && o.min_lr_ratio <= 1.0) {
            return Err("optimizer.eps, weight_decay, min_lr_ratio: finite, not negative".into());
        }
        if !(ok(self.outer_lr) && self.outer_lr > 0.0 && self.outer_lr <= 10.0) {
            return Err("outer_lr: above 0, at most 10".into());
        }
        if !(ok(self.outer_momentum) && self.outer_momentum < 1.0) {
            return Err("outer_momentum: 0 to below 1".into());
        }
        if !(0.0..=1.0).contains(&self.audit_rate) {
            return Err("audit_rate: 0 to 1".into());
        }
        if self.first_inner_steps == Some(0) {
            return Err("first_inner_steps: at least 1".into());
        }
        if self.checkpoint_every == 0 {
            return Err("checkpoint_every: at least 1".into());
        }
        let secs_ok = |s: f64| s.is_finite() && (1.0..=86_400.0).contains(&s);
        if !secs_ok(self.step_deadline_s) || !secs_ok(self.wait_for_workers_s) {
            return Err("step_deadline_s and wait_for_workers_s: 1 to 86400".into());
        }
        if self.val_windows == 0 || self.val_windows > 100_000 {
            return Err("val_windows: 1 to 100000".into());
        }
        self.step_escrow()
            .checked_mul(u64::from(self.outer_steps))
            .ok_or("max_price_per_step: the escrow overflows")?;
        Ok(())
    }

    /// Micro-credits held for one outer step.
    pub fn step_escrow(&self) -> u64 {
        (self.workers as u64)
            .saturating_mul(u64::from(self.inner_steps))
            .saturating_mul(self.max_price_per_step)
    }

    /// The inner optimizer with its schedule's length set from the task.
    pub(crate) fn optimizer(&self) -> InnerOptimizer {
        InnerOptimizer {
            total_steps: diloco::inner_steps_before(
                self.inner_steps,
                self.first_inner_steps,
                self.outer_steps + 1,
            ),
            ..self.optimizer
        }
    }
}

/// One worker's part in an outer step, as the status shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Inner steps assigned.
    pub steps: u32,
    /// Tokens it trained on.
    pub tokens: u64,
    /// Its mean inner loss.
    pub train_loss: f64,
    /// Milliseconds it computed.
    pub compute_ms: u64,
    /// Bytes it fetched (checkpoint or change, the request).
    pub bytes_down: u64,
    /// Bytes it sent (commitment, pseudo-gradient).
    pub bytes_up: u64,
    /// Audited: the verdict (`null` while the audit runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditVerdict>,
    /// Paid (micro-credits), once settled.
    pub paid: Option<u64>,
}

/// An audit's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditVerdict {
    /// Whether the worker's part is verified: the re-execution matched,
    /// or (a worker whose arithmetic drifted) every committed segment
    /// follows from its own start.
    pub passed: bool,
    /// Still running.
    pub pending: bool,
    /// The re-execution's report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<AuditReport>,
    /// Where the bisection found the first divergent steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub divergence: Option<Divergence>,
    /// Why it could not be audited (the worker went away: not paid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One outer step as the status shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OuterReport {
    /// Its number (from 1).
    pub outer_step: u32,
    /// Workers whose pseudo-gradient went into the average, by node.
    pub workers: BTreeMap<String, WorkerReport>,
    /// Workers that did not finish (died, late, refused), and why.
    pub dropped: BTreeMap<String, String>,
    /// Workers whose result failed a check, and why.
    pub rejected: BTreeMap<String, String>,
    /// Mean inner loss of the averaged workers, by tokens.
    pub train_loss: Option<f64>,
    /// Validation loss of the new global model.
    pub val_loss: Option<f64>,
    /// Seconds the step took.
    pub seconds: f64,
    /// Micro-credits paid for it (after its audits).
    pub cost: u64,
    /// Its pseudo-gradients were taken back out (caught by audits).
    pub removed: Vec<String>,
}

/// Totals over the task.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Inner steps taken by averaged workers.
    pub train_steps: u64,
    /// Tokens they trained on.
    pub tokens: u64,
    /// Training traffic, both ways (frames and blobs).
    pub bytes: u64,
    /// What per-step synchronous data parallelism at fp32 would have
    /// moved for the same steps (2 × 4 bytes × parameters a step a worker).
    pub data_parallel_bytes: u64,
    /// Worker milliseconds spent computing, and in outer steps (from the
    /// step sent to the last commitment).
    pub compute_ms: u64,
    /// See `compute_ms`.
    pub worker_ms: u64,
    /// Inner steps re-executed by audits (bisections included).
    pub audit_steps: u64,
    /// Audits run, passed, failed.
    pub audits: u32,
    /// See `audits`.
    pub audits_passed: u32,
    /// See `audits`.
    pub audits_failed: u32,
}

/// A task's progress and money: what its status shows, and what its file
/// keeps (the runner's live state and the store's saved task each hold
/// one).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Progress {
    /// Waiting, running, or how it ended.
    pub status: TaskStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// Outer steps settled (paid or not, in order).
    pub settled: u32,
    /// Times the task was resumed after a gateway restart (each holds its
    /// escrow again under new keys).
    pub generation: u32,
    /// The outer steps' reports.
    pub steps: Vec<OuterReport>,
    /// The escrow holds of the steps not settled (released when the
    /// gateway stopped or restarted).
    pub holds: Vec<Option<String>>,
    /// Micro-credits held from the owner in all.
    pub escrow: u64,
    /// Of which paid to workers.
    pub spent: u64,
    /// Of which given back to the owner.
    pub refunded: u64,
    /// Totals over the task.
    pub totals: Totals,
    /// Per worker: steps paid, micro-credits earned.
    pub earnings: BTreeMap<String, (u64, u64)>,
    /// Workers struck, and why.
    pub struck: BTreeMap<String, String>,
    /// Validation loss of the final model (the exact outer trajectory).
    pub final_val_loss: Option<f64>,
}

impl Progress {
    /// A task not started: its escrow held under `holds`, one per outer
    /// step.
    pub fn new(holds: Vec<String>, escrow: u64) -> Progress {
        Progress {
            status: TaskStatus::Waiting,
            error: None,
            settled: 0,
            generation: 0,
            steps: Vec::new(),
            holds: holds.into_iter().map(Some).collect(),
            escrow,
            spent: 0,
            refunded: 0,
            totals: Totals::default(),
            earnings: BTreeMap::new(),
            struck: BTreeMap::new(),
            final_val_loss: None,
        }
    }

    /// Whether it is waiting or running (and so runs again when the
    /// gateway restarts).
    pub fn live(&self) -> bool {
        matches!(self.status, TaskStatus::Waiting | TaskStatus::Running)
    }
}
