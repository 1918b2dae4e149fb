//! A DiLoCo task: what a model owner asks for ([`DilocoRequest`]), its
//! state, and the loop that runs its outer steps on the connected workers.
//!
//! Each outer step: wait for `min_workers` workers (at most
//! `wait_for_workers_s`); take up to `workers` of them in node-id order;
//! give each its shard (rotating with the step), seed and number of inner
//! steps (H for the fastest, fewer in proportion for slower ones, from the
//! speed each showed in earlier steps); send each the change from the
//! checkpoint it holds (or the whole checkpoint); collect commitments until
//! the step's deadline (a worker that dies or is late is dropped from this
//! average); ask for the reveals; check each opens its commitment and is
//! finite and of plausible size; take the outer step on the rest, weighted
//! by tokens; then audit a random `audit_rate` share of the (worker, step)
//! pairs in the background while the next step runs. A pair is paid (steps
//! × the worker's price) when it passed its checks and, if audited, its
//! audit; a caught worker is struck from the task, unpaid, and its
//! pseudo-gradient taken back out of the global model (the outer step is
//! linear in the averaged pseudo-gradient, so its effect on the parameters
//! and the momentum is subtracted exactly; what later steps learnt from the
//! tainted model stays).
//!
//! Steps settle (are paid) in order. With a [`Store`], a step is written
//! when it settles — the outer state right after it, with every removal of
//! a part at or before it applied — before the ledger makes its payment;
//! a restarted gateway runs the task on from there
//! ([`crate::federated::Coordinator::resume`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iroh::endpoint::{RecvStream, SendStream};
use tessera_core::train::InnerWork;
use tessera_core::NodeId;
use tessera_ledger::{Charge, Ledger};
use tessera_protocol::{
    read_blob, read_frame_sized, write_blob, write_frame, BlobKind, DilocoCommit, DilocoStep,
    Frame, JobKind, JobRequest,
};
use tessera_train::corpus::Corpus;
use tessera_train::diloco::{self, Int8, Opened, Outer, State};
use tessera_train::lm::{self, LmTrainer};
use tokio_util::sync::CancellationToken;

use super::pool::{Worker, Workers};
pub(crate) use super::store::{Payment as PaymentRecord, Saved};
use super::store::{Payment, Store};

use tessera_core::train::TaskStatus as Status;

pub use super::records::{
    AuditVerdict, DilocoRequest, OuterReport, Progress, Totals, WorkerReport,
};

/// A task and everything known about it.
pub(crate) struct DilocoTask {
    pub id: String,
    pub account: String,
    pub request: DilocoRequest,
    pub corpus: Arc<Corpus>,
    pub corpus_hash: String,
    pub created_ms: u64,
    pub abort: CancellationToken,
    pub stop: CancellationToken,
    pub state: Mutex<TaskState>,
}

/// What changes as the task runs.
pub(crate) struct TaskState {
    /// The exact parameters after the last outer step.
    pub parameters: Vec<f32>,
    /// Status, reports, money.
    pub progress: Progress,
}

impl DilocoTask {
    /// Whether it is waiting or running.
    pub fn live(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.progress.live())
    }

    /// What the dashboard shows: progress, losses, bytes, audits.
    pub fn overview(&self) -> serde_json::Value {
        let Ok(s) = self.state.lock() else {
            return serde_json::json!({ "id": self.id });
        };
        serde_json::json!({
            "id": self.id,
            "kind": "diloco",
            "status": s.progress.status,
            "model": self.request.model,
            "outer_steps": self.request.outer_steps,
            "outer_steps_done": s.progress.steps.len(),
            "totals": s.progress.totals,
            "struck": s.progress.struck.len(),
            "series": s.progress.steps.iter().map(|r| serde_json::json!({
                "outer_step": r.outer_step,
                "val_loss": r.val_loss,
                "train_loss": r.train_loss,
                "workers": r.workers.len(),
                "audits": r.workers.values().filter(|w| w.audit.is_some()).count(),
                "bytes": r.workers.values().map(|w| w.bytes_up + w.bytes_down).sum::<u64>(),
            })).collect::<Vec<_>>(),
        })
    }

    /// Its status as the API shows it; `history` with every outer step.
    pub fn status(&self, history: bool) -> serde_json::Value {
        let Ok(s) = self.state.lock() else {
            return serde_json::json!({ "id": self.id, "error": "state unavailable" });
        };
        let t = &s.progress.totals;
        let ratio = (t.bytes > 0).then(|| t.data_parallel_bytes as f64 / t.bytes as f64);
        let utilization = (t.worker_ms > 0).then(|| t.compute_ms as f64 / t.worker_ms as f64);
        let audit_cost = (t.train_steps > 0).then(|| t.audit_steps as f64 / t.train_steps as f64);
        let mut out = serde_json::json!({
            "id": self.id,
            "object": "training.task",
            "kind": "diloco",
            "created_ms": self.created_ms,
            "status": s.progress.status,
            "cancelling": self.stop.is_cancelled() && s.progress.live(),
            "error": s.progress.error,
            "model": self.request.model,
            "parameters": self.request.model.parameters(),
            "outer_steps": self.request.outer_steps,
            "outer_steps_done": s.progress.steps.len(),
            "outer_steps_settled": s.progress.settled,
            "resumed": s.progress.generation,
            "inner_steps": self.request.inner_steps,
            "workers": self.request.workers,
            "val_loss": s.progress.final_val_loss.or_else(|| s.progress.steps.iter().rev().find_map(|r| r.val_loss)),
            "train_loss": s.progress.steps.iter().rev().find_map(|r| r.train_loss),
            "totals": t,
            "bytes_ratio": ratio,
            "utilization": utilization,
            "audit_cost": audit_cost,
            "escrow": { "held": s.progress.escrow, "spent": s.progress.spent, "refunded": s.progress.refunded },
            "providers": s.progress.earnings.iter().map(|(node, (steps, earned))| {
                (node.clone(), serde_json::json!({ "steps_paid": steps, "earned": earned }))
            }).collect::<serde_json::Map<_, _>>(),
            "struck": s.progress.struck,
        });
        if history {
            out["history"] = serde_json::to_value(&s.progress.steps).unwrap_or_default();
        }
        out
    }
}

impl DilocoTask {
    /// A task as its file left it (its parameters the exact ones of the
    /// last settled step), with its start for the runner.
    pub(crate) fn restore(
        saved: Saved,
        outer: Outer,
        corpus: Arc<Corpus>,
        abort: CancellationToken,
    ) -> (DilocoTask, Start) {
        let start = Start {
            applied: saved.applied,
            from: saved.progress.settled + 1,
            speeds: saved
                .speeds
                .iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, *v)))
                .collect(),
            struck: saved
                .progress
                .struck
                .keys()
                .filter_map(|k| k.parse().ok())
                .collect(),
            outer,
        };
        let task = DilocoTask {
            id: saved.id,
            account: saved.account,
            corpus,
            corpus_hash: saved.corpus,
            created_ms: saved.created_ms,
            abort,
            stop: CancellationToken::new(),
            state: Mutex::new(TaskState {
                parameters: start.outer.exact.clone(),
                progress: saved.progress,
            }),
            request: saved.request,
        };
        (task, start)
    }

    /// The task as its file holds it before its runner starts again (after
    /// a restart took new holds).
    pub(crate) fn saved_now(&self, start: &Start) -> Option<Saved> {
        saved(self, None, start.applied, &start.speeds, None)
    }
}

/// A worker that committed, waiting for the reveal.
struct Committed {
    worker: Worker,
    work: InnerWork,
    send: SendStream,
    recv: RecvStream,
    commit: DilocoCommit,
    bytes_up: u64,
    bytes_down: u64,
    /// Milliseconds from the step sent to the commitment received, on the
    /// gateway's clock (a worker's own `compute_ms` is only a claim).
    elapsed_ms: u64,
}

/// An accepted pseudo-gradient.
struct Accepted {
    c: Committed,
    update: Vec<f32>,
}

/// What the runner keeps of an outer step whose audits are pending: the
/// averaged pseudo-gradient and its tokens, so a caught worker's part can
/// be taken back out.
struct Pending {
    average: Vec<f32>,
    tokens: u64,
    /// Which outer-optimizer step it was (steps without an update do not
    /// count).
    applied: u32,
}

/// A caught worker's part of step `step`, to take back out.
struct Removal {
    step: u32,
    update: Vec<f32>,
    tokens: u64,
}

/// Where a task's runner starts: from scratch, or where a restarted
/// gateway's file left it.
pub(crate) struct Start {
    pub outer: Outer,
    /// Outer-optimizer steps applied so far.
    pub applied: u32,
    /// The first outer step to run.
    pub from: u32,
    pub speeds: HashMap<NodeId, f64>,
    pub struck: HashSet<NodeId>,
}

impl Start {
    /// A new task: the initial model, step 1.
    pub fn fresh(req: &DilocoRequest) -> Start {
        Start {
            outer: Outer::new(
                lm::init(&req.model, req.seed),
                req.outer_lr,
                req.outer_momentum,
            ),
            applied: 0,
            from: 1,
            speeds: HashMap::new(),
            struck: HashSet::new(),
        }
    }
}

/// The outer optimizer and what audits may still take out of it, shared
/// by the runner (which steps it) and the settlements (which take caught
/// parts out and write the task when a step settles).
struct Coord {
    outer: Outer,
    applied: u32,
    /// Averages of steps not yet settled.
    pending: HashMap<u32, Pending>,
    /// With a store: the outer state after each step not yet settled, every
    /// removal of a part at or before it applied.
    snapshots: BTreeMap<u32, Snapshot>,
    /// Inner steps per second each worker showed.
    speeds: HashMap<NodeId, f64>,
}

/// The outer state and totals right after one outer step.
struct Snapshot {
    outer: Outer,
    applied: u32,
    totals: Totals,
}

impl Coord {
    /// Take a caught worker's part of step `r.step` back out of that step's
    /// average, and its effect out of the parameters and momentum — now
    /// and in every snapshot taken since. False when that step's average
    /// is gone (settled).
    fn remove(&mut self, r: &Removal) -> bool {
        let Some(p) = self.pending.get_mut(&r.step) else {
            return false;
        };
        let rest = p.tokens.saturating_sub(r.tokens);
        let without: Vec<f32> = if rest == 0 {
            vec![0.0; p.average.len()]
        } else {
            p.average
                .iter()
                .zip(&r.update)
                .map(|(a, u)| (a * p.tokens as f32 - u * r.tokens as f32) / rest as f32)
                .collect()
        };
        let e: Vec<f32> = p.average.iter().zip(&without).map(|(a, b)| a - b).collect();
        let at = p.applied;
        p.average = without;
        p.tokens = rest;
        self.outer.take_back(&e, self.applied.saturating_sub(at));
        for s in self.snapshots.values_mut() {
            if s.applied >= at {
                s.outer.take_back(&e, s.applied - at);
            }
        }
        true
    }
}

/// Steps settle in order: each waits for the one before.
struct StepOrder {
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
    done: tokio::sync::oneshot::Sender<()>,
}

fn set_status(task: &DilocoTask, status: Status) {
    if let Ok(mut s) = task.state.lock() {
        s.progress.status = status;
    }
}

/// Run the outer steps of `task` from `start`, then settle what is left
/// of its escrow. With a store, the task is written as each step settles
/// and when it ends (not when the gateway is shutting down: then it
/// resumes when the gateway starts again).
pub(crate) async fn run(
    task: Arc<DilocoTask>,
    workers: Arc<Workers>,
    ledger: Ledger,
    fee_bps: u64,
    start: Start,
    store: Option<Store>,
) {
    let req = task.request.clone();
    let n = req.model.parameters();
    let mut published = hex::encode(diloco::checkpoint_hash(&start.outer.published));
    // The change into the published checkpoint, from the one before.
    let mut change: Option<(String, Vec<u8>)> = None;
    let struck: Arc<Mutex<HashSet<NodeId>>> = Arc::new(Mutex::new(start.struck));
    let coord = Arc::new(Mutex::new(Coord {
        outer: start.outer,
        applied: start.applied,
        pending: HashMap::new(),
        snapshots: BTreeMap::new(),
        speeds: start.speeds,
    }));
    let mut order: Option<tokio::sync::oneshot::Receiver<()>> = None;
    let mut settlements = tokio::task::JoinSet::new();
    let mut evaluations = Vec::new();
    // Each worker's last part's resolution signal.
    let mut chains: HashMap<NodeId, tokio::sync::oneshot::Receiver<()>> = HashMap::new();
    let trainer = match LmTrainer::new(req.model, 1) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            finish(&task, &ledger, Err(e.to_string())).await;
            return;
        }
    };
    let outcome: Result<Status, String> = 'steps: {
        for t in start.from..=req.outer_steps {
            let wait_until = Instant::now() + Duration::from_secs_f64(req.wait_for_workers_s);
            let eligible = loop {
                let banned = struck.lock().map(|s| s.clone()).unwrap_or_default();
                let e: Vec<Worker> = workers
                    .eligible(&task.corpus_hash, req.max_price_per_step)
                    .into_iter()
                    .filter(|w| !banned.contains(&w.node))
                    .collect();
                if e.len() >= req.min_workers {
                    break e;
                }
                if Instant::now() > wait_until {
                    break 'steps Err(format!(
                        "outer step {t}: {} of the {} workers needed were connected within {} s",
                        e.len(),
                        req.min_workers,
                        req.wait_for_workers_s
                    ));
                }
                set_status(&task, Status::Waiting);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = task.abort.cancelled() => break 'steps Ok(Status::Cancelled),
                    _ = task.stop.cancelled() => break 'steps Ok(Status::Cancelled),
                }
            };
            if task.stop.is_cancelled() {
                break 'steps Ok(Status::Cancelled);
            }
            set_status(&task, Status::Running);
            let started = Instant::now();
            let chosen: Vec<Worker> = eligible.into_iter().take(req.workers).collect();
            let (global, speeds) = match coord.lock() {
                Ok(c) => (Arc::new(c.outer.published.clone()), c.speeds.clone()),
                Err(_) => break 'steps Err("the outer state is unavailable".into()),
            };
            let fastest = chosen
                .iter()
                .filter_map(|w| speeds.get(&w.node))
                .fold(0f64, |a, &b| a.max(b));
            let shards = task.corpus.shards(req.workers);
            let deadline_ms =
                tessera_core::now_ms() + (req.step_deadline_s * 1000.0).round() as u64;
            let h_t = diloco::inner_steps_at(req.inner_steps, req.first_inner_steps, t);
            let jobs = chosen.iter().enumerate().map(|(k, w)| {
                // Slower workers get fewer steps, so everyone finishes together.
                let steps = match speeds.get(&w.node) {
                    Some(s) if fastest > 0.0 => {
                        ((f64::from(h_t) * s / fastest).round() as u32).clamp(1, h_t)
                    }
                    _ => h_t,
                };
                let shard = &shards[diloco::shard_for(k, t, shards.len())];
                let work = InnerWork {
                    spec: req.model,
                    outer_step: t,
                    checkpoint: published.clone(),
                    shard: (shard.start as u64, shard.end as u64),
                    steps,
                    batch: req.batch,
                    seed: diloco::work_seed(req.seed, t, k),
                    first_step: diloco::inner_steps_before(
                        req.inner_steps,
                        req.first_inner_steps,
                        t,
                    ),
                    optimizer: req.optimizer(),
                    checkpoint_every: req.checkpoint_every,
                };
                let step = DilocoStep {
                    task: task.id.clone(),
                    corpus: task.corpus_hash.clone(),
                    work,
                    deadline_ms,
                    price_per_step: w.offer.price_per_step,
                };
                commit_phase(w.clone(), step, global.clone(), change.clone(), deadline_ms)
            });
            let results = tokio::select! {
                r = futures::future::join_all(jobs) => r,
                _ = task.abort.cancelled() => break 'steps Ok(Status::Cancelled),
            };
            let mut report = OuterReport {
                outer_step: t,
                workers: BTreeMap::new(),
                dropped: BTreeMap::new(),
                rejected: BTreeMap::new(),
                train_loss: None,
                val_loss: None,
                seconds: 0.0,
                cost: 0,
                removed: Vec::new(),
            };
            let mut committed = Vec::new();
            for r in results {
                match r {
                    Ok(c) => committed.push(c),
                    Err((w, why)) => {
                        report.dropped.insert(w.node.to_string(), why);
                    }
                }
            }
            // Reveal, check.
            let reveals =
                futures::future::join_all(committed.into_iter().map(|c| reveal_phase(c, n)));
            let mut accepted: Vec<Accepted> = Vec::new();
            for (c, result) in reveals.await {
                match result {
                    Ok(update) => accepted.push(Accepted { c, update }),
                    Err(why) => {
                        let node = c.worker.node;
                        tracing::warn!(task = %task.id, worker = %node.short(), %why, "DiLoCo result rejected");
                        report.rejected.insert(node.to_string(), why.clone());
                        if let Ok(mut s) = struck.lock() {
                            s.insert(node);
                        }
                        if let Ok(mut s) = task.state.lock() {
                            s.progress.struck.insert(node.to_string(), why);
                        }
                    }
                }
            }
            let before = published.clone();
            let published_params = match take_outer_step(&coord, t, &accepted, n) {
                Ok((params, Some((hash, q)))) => {
                    published = hash;
                    change = Some((before, q));
                    let tokens: u64 = accepted.iter().map(|a| a.c.commit.tokens).sum();
                    report.train_loss = Some(
                        accepted
                            .iter()
                            .map(|a| mean(&a.c.commit.losses) * a.c.commit.tokens as f64)
                            .sum::<f64>()
                            / tokens.max(1) as f64,
                    );
                    params
                }
                Ok((params, None)) => params,
                Err(e) => break 'steps Err(e),
            };
            // The validation loss is measured while the next step runs.
            let (tr, corpus, params, windows, tk) = (
                trainer.clone(),
                task.corpus.clone(),
                published_params.clone(),
                req.val_windows,
                task.clone(),
            );
            evaluations.push(tokio::spawn(async move {
                let loss = tokio::task::spawn_blocking(move || {
                    diloco::validation_loss(&tr, &corpus, &params, windows).ok()
                })
                .await
                .ok()
                .flatten();
                if let Ok(mut s) = tk.state.lock() {
                    if let Some(r) = s.progress.steps.iter_mut().find(|r| r.outer_step == t) {
                        r.val_loss = loss;
                    }
                }
            }));
            // Audits in the background; the step is paid after them.
            // A worker's time in this step: from the step's start to its
            // end (reveals, the outer step), computing or waiting.
            let step_ms = started.elapsed().as_millis() as u64;
            let mut audits = Vec::new();
            let mut rng = dice();
            if let Ok(mut s) = task.state.lock() {
                for a in &accepted {
                    s.progress.totals.train_steps += u64::from(a.c.work.steps);
                    s.progress.totals.tokens += a.c.commit.tokens;
                    s.progress.totals.bytes += a.c.bytes_up + a.c.bytes_down;
                    s.progress.totals.data_parallel_bytes +=
                        8 * n as u64 * u64::from(a.c.work.steps);
                    s.progress.totals.compute_ms += a.c.commit.compute_ms;
                    s.progress.totals.worker_ms += step_ms.max(a.c.commit.compute_ms);
                }
            }
            for a in accepted {
                let node = a.c.worker.node.to_string();
                let audited = rng.uniform() < req.audit_rate;
                report.workers.insert(
                    node.clone(),
                    WorkerReport {
                        steps: a.c.work.steps,
                        tokens: a.c.commit.tokens,
                        train_loss: mean(&a.c.commit.losses),
                        compute_ms: a.c.commit.compute_ms,
                        bytes_down: a.c.bytes_down,
                        bytes_up: a.c.bytes_up,
                        audit: audited.then_some(AuditVerdict {
                            pending: true,
                            passed: false,
                            report: None,
                            divergence: None,
                            error: None,
                        }),
                        paid: None,
                    },
                );
                let (done, next) = tokio::sync::oneshot::channel();
                let previous = chains.insert(a.c.worker.node, next);
                audits.push((a, audited, Chain { previous, done }));
            }
            report.seconds = started.elapsed().as_secs_f64();
            tracing::info!(task = %task.id, outer_step = t, workers = report.workers.len(), val_loss = ?report.val_loss, "DiLoCo outer step done");
            let totals = match task.state.lock() {
                Ok(mut s) => {
                    s.parameters = published_params.clone();
                    s.progress.steps.push(report);
                    s.progress.totals.clone()
                }
                Err(_) => Totals::default(),
            };
            if store.is_some() {
                if let Ok(mut c) = coord.lock() {
                    let snapshot = Snapshot {
                        outer: c.outer.clone(),
                        applied: c.applied,
                        totals,
                    };
                    c.snapshots.insert(t, snapshot);
                }
            }
            let (done, next) = tokio::sync::oneshot::channel();
            let step_order = StepOrder {
                previous: order.replace(next),
                done,
            };
            settlements.spawn(settle_step(
                Settling {
                    task: task.clone(),
                    ledger: ledger.clone(),
                    fee_bps,
                    trainer: trainer.clone(),
                    struck: struck.clone(),
                    coord: coord.clone(),
                    store: store.clone(),
                },
                t,
                audits,
                global.clone(),
                step_order,
            ));
            if task.stop.is_cancelled() || task.abort.is_cancelled() {
                break 'steps Ok(Status::Cancelled);
            }
        }
        Ok(Status::Completed)
    };
    for e in evaluations {
        let _ = e.await;
    }
    // Audits still running finish (and are paid or not) before the end;
    // their removals apply to the final model as they come.
    while let Some(done) = settlements.join_next().await {
        if let Err(e) = done {
            tracing::warn!(task = %task.id, error = %e, "a DiLoCo settlement stopped");
        }
    }
    // The model is the exact trajectory, every caught part taken out.
    let last = coord
        .lock()
        .map(|c| (c.outer.clone(), c.applied, c.speeds.clone()))
        .ok();
    let Some((outer, applied, speeds)) = last else {
        finish(&task, &ledger, Err("the outer state is unavailable".into())).await;
        return;
    };
    let exact = outer.exact.clone();
    let (tr, corpus, params, windows) = (
        trainer.clone(),
        task.corpus.clone(),
        exact.clone(),
        req.val_windows,
    );
    let final_loss = tokio::task::spawn_blocking(move || {
        diloco::validation_loss(&tr, &corpus, &params, windows).ok()
    })
    .await
    .ok()
    .flatten();
    if let Ok(mut s) = task.state.lock() {
        s.parameters = exact;
        s.progress.final_val_loss = final_loss;
    }
    // A gateway shutting down leaves the task as its last settled step
    // wrote it: it resumes when the gateway starts again.
    let interrupted = task.abort.is_cancelled()
        && !task.stop.is_cancelled()
        && matches!(outcome, Ok(Status::Cancelled));
    finish(&task, &ledger, outcome).await;
    if let (Some(store), false) = (&store, interrupted) {
        if let Some(saved) = saved(&task, None, applied, &speeds, None) {
            if let Err(e) = store.save(&saved, &outer) {
                tracing::warn!(task = %task.id, error = %e, "cannot write the DiLoCo task");
            }
        }
    }
}

/// The task as its file holds it: settled through `snapshot`'s step (or,
/// with none, through every step reported: the task is over), with
/// `payment` (the step's, about to be made) counted as made.
fn saved(
    task: &DilocoTask,
    snapshot: Option<(u32, &Totals)>,
    applied: u32,
    speeds: &HashMap<NodeId, f64>,
    payment: Option<Payment>,
) -> Option<Saved> {
    let mut progress = task.state.lock().ok()?.progress.clone();
    let settled = snapshot.map_or(progress.steps.len() as u32, |(t, _)| t);
    progress.settled = settled;
    progress.steps.retain(|r| r.outer_step <= settled);
    if let Some((_, totals)) = snapshot {
        progress.status = Status::Running;
        progress.totals = totals.clone();
        audit_totals(
            &progress.steps,
            task.request.checkpoint_every,
            &mut progress.totals,
        );
    }
    let mut saved = Saved {
        id: task.id.clone(),
        account: task.account.clone(),
        request: task.request.clone(),
        corpus: task.corpus_hash.clone(),
        created_ms: task.created_ms,
        progress,
        applied,
        speeds: speeds.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        payment: None,
    };
    if let Some(p) = payment {
        let cost = record_payment(
            &mut saved.progress.steps,
            &mut saved.progress.earnings,
            p.step,
            &p.charges,
        );
        saved.progress.spent += cost;
        saved.progress.refunded += task.request.step_escrow().saturating_sub(cost);
        saved.payment = Some(p);
    }
    Some(saved)
}

/// The audit figures of `totals` from the steps' verdicts.
fn audit_totals(steps: &[OuterReport], every: u32, totals: &mut Totals) {
    totals.audits = 0;
    totals.audits_passed = 0;
    totals.audits_failed = 0;
    totals.audit_steps = 0;
    for v in steps
        .iter()
        .flat_map(|r| r.workers.values())
        .filter_map(|w| w.audit.as_ref())
        .filter(|v| !v.pending)
    {
        totals.audits += 1;
        if v.passed {
            totals.audits_passed += 1;
        } else {
            totals.audits_failed += 1;
        }
        totals.audit_steps += audit_steps(v, every);
    }
}

/// Inner steps an audit re-executed (its bisection's segments included).
fn audit_steps(v: &AuditVerdict, every: u32) -> u64 {
    v.report.as_ref().map_or(0, |r| r.steps)
        + v.divergence
            .as_ref()
            .map_or(0, |d| u64::from(d.segments_reexecuted) * u64::from(every))
}

/// Mark step `t`'s workers paid (`charges`: node, steps, price per step;
/// the others 0) and add to their earnings; returns the step's cost.
fn record_payment(
    steps: &mut [OuterReport],
    earnings: &mut BTreeMap<String, (u64, u64)>,
    t: u32,
    charges: &[(String, u64, u64)],
) -> u64 {
    let mut cost = 0;
    for (node, n, price) in charges {
        let e = earnings.entry(node.clone()).or_default();
        e.0 += n;
        e.1 += n * price;
        cost += n * price;
    }
    if let Some(r) = steps.iter_mut().find(|r| r.outer_step == t) {
        r.cost = cost;
        for (node, n, price) in charges {
            if let Some(w) = r.workers.get_mut(node) {
                w.paid = Some(n * price);
            }
        }
        for w in r.workers.values_mut() {
            w.paid.get_or_insert(0);
        }
    }
    cost
}

/// The ledger's charges for a step's payment.
pub(crate) fn charges(task: &str, paid: &[(String, u64, u64)]) -> Vec<Charge> {
    paid.iter()
        .map(|(node, steps, price)| Charge {
            provider: node.clone(),
            model_sha256: format!("train:{task}"),
            prompt_tokens: 0,
            completion_tokens: *steps,
            input_price: 0,
            output_price: *price,
            receipt: None,
        })
        .collect()
}

/// Outer step `t` on the accepted pseudo-gradients, weighted by tokens
/// (their speeds noted). Returns the published parameters and, when there
/// was anything to average, the new checkpoint's hash and the int8 change
/// into it.
#[allow(clippy::type_complexity)]
fn take_outer_step(
    coord: &Mutex<Coord>,
    t: u32,
    accepted: &[Accepted],
    n: usize,
) -> Result<(Vec<f32>, Option<(String, Vec<u8>)>), String> {
    let mut c = coord
        .lock()
        .map_err(|_| "the outer state is unavailable".to_string())?;
    for a in accepted {
        // Speed from the gateway's clock: a worker claiming to be fast
        // would otherwise take H and leave the others one step each.
        let secs = a.c.elapsed_ms.max(1) as f64 / 1000.0;
        c.speeds
            .insert(a.c.worker.node, f64::from(a.c.work.steps) / secs);
    }
    let updates: Vec<(Vec<f32>, u64)> = accepted
        .iter()
        .map(|a| (a.update.clone(), a.c.commit.tokens))
        .collect();
    if updates.is_empty() {
        return Ok((c.outer.published.clone(), None));
    }
    let q = c
        .outer
        .step(&updates)
        .map_err(|e| format!("outer step {t}: {e}"))?;
    c.applied += 1;
    // What went into the average, for taking a part back out.
    let total: u64 = updates.iter().map(|(_, t)| t).sum();
    let mut average = vec![0f32; n];
    for (u, tk) in &updates {
        let w = *tk as f32 / total as f32;
        average.iter_mut().zip(u).for_each(|(a, x)| *a += w * x);
    }
    let applied = c.applied;
    c.pending.insert(
        t,
        Pending {
            average,
            tokens: total,
            applied,
        },
    );
    let hash = hex::encode(diloco::checkpoint_hash(&c.outer.published));
    Ok((c.outer.published.clone(), Some((hash, q.to_bytes()))))
}

fn mean(v: &[f32]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64
}

fn dice() -> tessera_train::Rng {
    let seed = tessera_core::secret_bytes::<8>().map_or(0, u64::from_le_bytes);
    tessera_train::Rng::new(seed)
}

/// Send one worker its step and checkpoint, and wait for its commitment.
async fn commit_phase(
    worker: Worker,
    step: DilocoStep,
    global: Arc<Vec<f32>>,
    change: Option<(String, Vec<u8>)>,
    deadline_ms: u64,
) -> Result<Committed, (Worker, String)> {
    let left = Duration::from_millis(deadline_ms.saturating_sub(tessera_core::now_ms()));
    let conn = worker.conn.clone();
    let work = step.work.clone();
    let checkpoint = work.checkpoint.clone();
    let job = JobRequest {
        job_id: format!(
            "{}-o{}-{}",
            step.task,
            step.work.outer_step,
            worker.node.short()
        ),
        kind: JobKind::DilocoStep(Box::new(step)),
    };
    let sent = Instant::now();
    let attempt = async move {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut down = write_frame(&mut send, &Frame::JobRequest(job))
            .await
            .map_err(|e| e.to_string())? as u64;
        let mut up = 0u64;
        let have = match read_frame_sized(&mut recv).await {
            Ok(Some((Frame::Have { checkpoint }, got))) => {
                up += got as u64;
                checkpoint
            }
            Ok(Some((Frame::JobError(e), _))) => return Err(format!("refused: {}", e.message)),
            Ok(other) => {
                return Err(format!(
                    "sent {} instead of Have",
                    other.as_ref().map_or("nothing", |(f, _)| f.kind())
                ))
            }
            Err(e) => return Err(format!("garbage on the step's stream: {e}")),
        };
        // The change when the worker holds its base, else the checkpoint.
        let (kind, bytes) = match change {
            Some((base, bytes)) if have.as_deref() == Some(base.as_str()) => (
                BlobKind::Change {
                    base,
                    hash: checkpoint,
                },
                bytes,
            ),
            _ => (
                BlobKind::Checkpoint { hash: checkpoint },
                global.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        };
        down += write_frame(&mut send, &Frame::Blob(Box::new(kind)))
            .await
            .map_err(|e| e.to_string())? as u64;
        down += write_blob(&mut send, &bytes)
            .await
            .map_err(|e| e.to_string())? as u64;
        match read_frame_sized(&mut recv).await {
            Ok(Some((Frame::DilocoCommit(commit), got))) => {
                up += got as u64;
                Ok((send, recv, *commit, up, down))
            }
            Ok(Some((Frame::JobError(e), _))) => Err(format!("failed: {}", e.message)),
            Ok(other) => Err(format!(
                "sent {} instead of a commitment",
                other.as_ref().map_or("nothing", |(f, _)| f.kind())
            )),
            Err(e) => Err(format!("gone before committing: {e}")),
        }
    };
    match tokio::time::timeout(left, attempt).await {
        Ok(Ok((send, recv, mut commit, bytes_up, bytes_down))) => {
            let elapsed_ms = sent.elapsed().as_millis() as u64;
            // Nobody computes longer than the gateway waited for it.
            commit.compute_ms = commit.compute_ms.min(elapsed_ms);
            if commit.losses.len() != work.steps as usize
                || commit.tokens != u64::from(work.steps) * (work.batch * work.spec.context) as u64
            {
                return Err((worker, "a commitment to other work than assigned".into()));
            }
            Ok(Committed {
                worker,
                work,
                send,
                recv,
                commit,
                bytes_up,
                bytes_down,
                elapsed_ms,
            })
        }
        Ok(Err(why)) => Err((worker, why)),
        Err(_) => Err((worker, "no commitment by the step's deadline".into())),
    }
}

/// Ask for the reveal; check it opens the commitment and is plausible.
async fn reveal_phase(mut c: Committed, n: usize) -> (Committed, Result<Vec<f32>, String>) {
    let attempt = async {
        c.bytes_down += write_frame(&mut c.send, &Frame::Reveal)
            .await
            .map_err(|e| e.to_string())? as u64;
        let nonce = match read_frame_sized(&mut c.recv).await {
            Ok(Some((Frame::Blob(k), got))) => {
                c.bytes_up += got as u64;
                match *k {
                    BlobKind::PseudoGradient { nonce } => nonce,
                    _ => return Err("sent another blob than its pseudo-gradient".to_string()),
                }
            }
            Ok(other) => {
                return Err(format!(
                    "sent {} instead of its pseudo-gradient",
                    other.as_ref().map_or("nothing", |(f, _)| f.kind())
                ))
            }
            Err(e) => return Err(format!("garbage instead of its pseudo-gradient: {e}")),
        };
        let bytes = read_blob(&mut c.recv, 2 * n + 64)
            .await
            .map_err(|e| format!("its pseudo-gradient: {e}"))?;
        c.bytes_up += 6 + bytes.len() as u64;
        Ok((nonce, bytes))
    };
    let (nonce, bytes) = match tokio::time::timeout(Duration::from_secs(60), attempt).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return (c, Err(e)),
        Err(_) => return (c, Err("no reveal within 60 s".into())),
    };
    let check = || -> Result<Vec<f32>, String> {
        let nonce = hex::decode(&nonce)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or("a nonce that is not 32 bytes of hex")?;
        let root = hex::decode(&c.commit.root)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or("a root that is not 32 bytes of hex")?;
        let expected = diloco::commitment(
            c.work.outer_step,
            &nonce,
            &bytes,
            c.commit.tokens,
            &c.commit.losses,
            &root,
        );
        if hex::encode(expected) != c.commit.commitment {
            return Err("the revealed pseudo-gradient does not open its commitment".into());
        }
        if c.commit.losses.iter().any(|l| !l.is_finite() || *l < 0.0) {
            return Err("a loss that is not a finite, non-negative number".into());
        }
        let q = Int8::from_bytes(&bytes, n).map_err(|e| e.to_string())?;
        let update = q.dequantize();
        let norm = update
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        // An honest step of the inner AdamW moves each parameter at most
        // about lr per step.
        let bound = f64::from(c.work.optimizer.lr) * f64::from(c.work.steps) * (n as f64).sqrt();
        if !norm.is_finite() || norm > bound {
            return Err(format!(
                "a pseudo-gradient of norm {norm:.3}, beyond what {} steps can move",
                c.work.steps
            ));
        }
        Ok(update)
    };
    let r = check();
    (c, r)
}

/// A worker's place in the order its parts are resolved: the previous
/// part's signal (none for its first) and this part's.
pub(crate) struct Chain {
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
    done: tokio::sync::oneshot::Sender<()>,
}

/// What a step's settlement works with.
#[derive(Clone)]
struct Settling {
    task: Arc<DilocoTask>,
    ledger: Ledger,
    fee_bps: u64,
    trainer: Arc<LmTrainer>,
    struck: Arc<Mutex<HashSet<NodeId>>>,
    coord: Arc<Mutex<Coord>>,
    store: Option<Store>,
}

/// Resolve one worker's part of step `t`: `Some((node, steps, price))`
/// when it is to be paid.
async fn resolve(
    ctx: Settling,
    t: u32,
    a: Accepted,
    audited: bool,
    chain: Chain,
    global: Arc<Vec<f32>>,
) -> Option<(String, u64, u64)> {
    if let Some(previous) = chain.previous {
        // Sent, or dropped when that part resolved: either way it is done.
        let _ = previous.await;
    }
    let task = &ctx.task;
    let node = a.c.worker.node;
    let (steps, price) = (u64::from(a.c.work.steps), a.c.worker.offer.price_per_step);
    let removal = Removal {
        step: t,
        update: a.update.clone(),
        tokens: a.c.commit.tokens,
    };
    let take_out = |why: Option<String>| {
        if let Some(why) = why {
            tracing::warn!(task = %task.id, worker = %node.short(), %why, "DiLoCo worker caught");
            if let Ok(mut s) = ctx.struck.lock() {
                s.insert(node);
            }
            if let Ok(mut s) = task.state.lock() {
                s.progress.struck.entry(node.to_string()).or_insert(why);
            }
        }
        let removed = ctx.coord.lock().is_ok_and(|mut c| c.remove(&removal));
        if removed {
            if let Ok(mut s) = task.state.lock() {
                if let Some(rep) = s.progress.steps.iter_mut().find(|x| x.outer_step == t) {
                    rep.removed.push(node.to_string());
                }
            }
        }
    };
    let caught_before = ctx.struck.lock().is_ok_and(|s| s.contains(&node));
    if caught_before {
        // Caught in an earlier step's audit: this part is not paid either.
        let mut c = a.c;
        let _ = c.send.finish();
        take_out(None);
        drop(chain.done);
        return None;
    }
    if !audited {
        let mut c = a.c;
        let _ = c.send.finish();
        drop(chain.done);
        return Some((node.to_string(), steps, price));
    }
    let verdict = audit(a, global, ctx.trainer.clone(), task.corpus.clone()).await;
    let passed = verdict.passed;
    if let Ok(mut s) = task.state.lock() {
        s.progress.totals.audits += 1;
        s.progress.totals.audit_steps += audit_steps(&verdict, task.request.checkpoint_every);
        if passed {
            s.progress.totals.audits_passed += 1;
        } else {
            s.progress.totals.audits_failed += 1;
        }
        if let Some(w) = s
            .progress
            .steps
            .iter_mut()
            .find(|r| r.outer_step == t)
            .and_then(|r| r.workers.get_mut(&node.to_string()))
        {
            w.audit = Some(verdict.clone());
        }
    }
    let outcome = if passed {
        Some((node.to_string(), steps, price))
    } else {
        let why = verdict
            .divergence
            .as_ref()
            .map(|d| {
                format!(
                    "audit of outer step {t}: {} (inner steps {}..{})",
                    d.reason, d.from, d.to
                )
            })
            .or(verdict.error.clone())
            .unwrap_or_else(|| format!("audit of outer step {t} failed"));
        take_out(Some(why));
        None
    };
    drop(chain.done);
    outcome
}

/// Settle one outer step once each of its workers is resolved: a worker's
/// part waits for the resolution of its previous part (so a worker caught
/// in an audit of step t is not paid for, and has taken back out, every
/// later step it was already in), then its own audit when it was sampled.
/// Each verified worker is paid its steps × its price from the step's hold;
/// a caught one nothing, struck, its part taken out. Steps are paid in
/// order; with a store the task is written (this payment included) before
/// the ledger makes the payment.
async fn settle_step(
    ctx: Settling,
    t: u32,
    workers: Vec<(Accepted, bool, Chain)>,
    global: Arc<Vec<f32>>,
    order: StepOrder,
) {
    let resolved = futures::future::join_all(
        workers
            .into_iter()
            .map(|(a, audited, chain)| resolve(ctx.clone(), t, a, audited, chain, global.clone())),
    )
    .await;
    let paid: Vec<(String, u64, u64)> = resolved.into_iter().flatten().collect();
    if let Some(previous) = order.previous {
        let _ = previous.await;
    }
    let task = &ctx.task;
    // Every removal of this step or before is applied: its averages and
    // snapshots are no longer needed.
    let (snapshot, speeds) = match ctx.coord.lock() {
        Ok(mut c) => {
            let snapshot = c.snapshots.remove(&t);
            c.snapshots.retain(|k, _| *k > t);
            c.pending.retain(|k, _| *k > t);
            (snapshot, c.speeds.clone())
        }
        Err(_) => (None, HashMap::new()),
    };
    // Pay from the step's hold; the rest goes back.
    let hold = task.state.lock().ok().and_then(|mut s| {
        s.progress
            .holds
            .get_mut(t as usize - 1)
            .and_then(Option::take)
    });
    let job = format!("{}-o{t}", task.id);
    if let (Some(store), Some(snap)) = (&ctx.store, &snapshot) {
        let payment = hold.as_ref().map(|h| Payment {
            step: t,
            hold: h.clone(),
            job: job.clone(),
            charges: paid.clone(),
        });
        if let Some(saved) = saved(
            task,
            Some((t, &snap.totals)),
            snap.applied,
            &speeds,
            payment,
        ) {
            if let Err(e) = store.save(&saved, &snap.outer) {
                tracing::warn!(task = %task.id, outer_step = t, error = %e, "cannot write the DiLoCo task");
            }
        }
    }
    if let Some(hold) = hold {
        match ctx
            .ledger
            .settle(&hold, &job, charges(&task.id, &paid), ctx.fee_bps)
            .await
        {
            Ok(settled) => {
                if let Ok(mut s) = task.state.lock() {
                    let s = &mut *s;
                    let cost =
                        record_payment(&mut s.progress.steps, &mut s.progress.earnings, t, &paid);
                    debug_assert_eq!(cost, settled.cost);
                    s.progress.spent += settled.cost;
                    s.progress.refunded += task.request.step_escrow().saturating_sub(settled.cost);
                }
            }
            Err(e) => {
                tracing::warn!(task = %task.id, outer_step = t, error = %e, "cannot pay a DiLoCo step");
                if let Ok(mut s) = task.state.lock() {
                    s.progress.error = Some(format!("outer step {t} could not be paid: {e}"));
                }
            }
        }
    }
    if let Ok(mut s) = task.state.lock() {
        s.progress.settled = s.progress.settled.max(t);
    }
    drop(order.done);
}

/// Re-execute a worker's step; on a mismatch, bisect over its committed
/// states (it opens them on the same stream) to find the first divergent
/// segment.
async fn audit(
    a: Accepted,
    global: Arc<Vec<f32>>,
    trainer: Arc<LmTrainer>,
    corpus: Arc<Corpus>,
) -> AuditVerdict {
    let Accepted { c, update } = a;
    let Committed {
        work,
        commit,
        mut send,
        recv,
        ..
    } = c;
    let root = hex::decode(&commit.root)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .unwrap_or([0; 32]);
    let (w, g, tr, cp, claimed, losses) = (
        work.clone(),
        global.clone(),
        trainer.clone(),
        corpus.clone(),
        update.clone(),
        commit.losses.clone(),
    );
    let report = tokio::task::spawn_blocking(move || {
        diloco::audit(&tr, &cp.train, &w, &g, &claimed, &losses)
    })
    .await;
    let (report, honest) = match report {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let _ = send.finish();
            return AuditVerdict {
                pending: false,
                passed: false,
                report: None,
                divergence: None,
                error: Some(format!("re-execution failed: {e}")),
            };
        }
        Err(e) => {
            let _ = send.finish();
            return AuditVerdict {
                pending: false,
                passed: false,
                report: None,
                divergence: None,
                error: Some(format!("re-execution stopped: {e}")),
            };
        }
    };
    if report.passed {
        let _ = send.finish();
        return AuditVerdict {
            pending: false,
            passed: true,
            report: Some(report),
            divergence: None,
            error: None,
        };
    }
    // Bisection: the worker opens states on its stream.
    let n = work.spec.parameters();
    let handle = tokio::runtime::Handle::current();
    let stream = Arc::new(tokio::sync::Mutex::new((send, recv)));
    let s2 = stream.clone();
    let divergence = tokio::task::spawn_blocking(move || {
        let mut open = |index: usize| -> Option<Opened> {
            handle.block_on(async {
                let mut guard = s2.lock().await;
                let (send, recv) = &mut *guard;
                let ask = async {
                    write_frame(
                        send,
                        &Frame::OpenState {
                            index: index as u32,
                        },
                    )
                    .await
                    .ok()?;
                    let (losses, proof) = match read_frame_sized(recv).await.ok()?? {
                        (Frame::Blob(k), _) => match *k {
                            BlobKind::State {
                                index: i,
                                losses,
                                proof,
                            } if i as usize == index => (losses, proof),
                            _ => return None,
                        },
                        _ => return None,
                    };
                    let bytes = read_blob(recv, 12 * n + 64).await.ok()?;
                    let state = State::from_bytes(&bytes, n)?;
                    let proof = proof
                        .iter()
                        .map(|p| {
                            hex::decode(p)
                                .ok()
                                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        })
                        .collect::<Option<Vec<_>>>()?;
                    Some(Opened {
                        state,
                        losses,
                        proof,
                    })
                };
                tokio::time::timeout(Duration::from_secs(60), ask)
                    .await
                    .ok()
                    .flatten()
            })
        };
        let d = diloco::bisect(
            &trainer,
            &corpus.train,
            &work,
            &global,
            &root,
            &update,
            &honest,
            &mut open,
        )?;
        if d.proven {
            return Ok(Some(d));
        }
        // The worker's trace only drifted from the auditor's (or only its
        // losses differ): check every segment from its own states.
        diloco::check_segments(
            &trainer,
            &corpus.train,
            &work,
            &global,
            &root,
            &update,
            &mut open,
        )
    })
    .await;
    let mut guard = stream.lock().await;
    let _ = guard.0.finish();
    drop(guard);
    match divergence {
        Ok(Ok(d)) => AuditVerdict {
            pending: false,
            passed: d.is_none(),
            report: Some(report),
            divergence: d,
            error: None,
        },
        Ok(Err(e)) => AuditVerdict {
            pending: false,
            passed: false,
            report: Some(report),
            divergence: None,
            error: Some(format!("bisection failed: {e}")),
        },
        Err(e) => AuditVerdict {
            pending: false,
            passed: false,
            report: Some(report),
            divergence: None,
            error: Some(format!("bisection stopped: {e}")),
        },
    }
}

/// Release every hold not settled and set the final status.
async fn finish(task: &DilocoTask, ledger: &Ledger, outcome: Result<Status, String>) {
    let open: Vec<String> = task
        .state
        .lock()
        .map(|mut s| {
            s.progress
                .holds
                .iter_mut()
                .filter_map(Option::take)
                .collect()
        })
        .unwrap_or_default();
    let mut refunded = 0;
    for hold in open {
        match ledger.settle(&hold, "", vec![], 0).await {
            Ok(_) => refunded += task.request.step_escrow(),
            Err(e) => tracing::warn!(task = %task.id, error = %e, "cannot release a DiLoCo hold"),
        }
    }
    if let Ok(mut s) = task.state.lock() {
        s.progress.refunded += refunded;
        match outcome {
            Ok(status) => s.progress.status = status,
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "DiLoCo task failed");
                s.progress.status = Status::Failed;
                s.progress.error = Some(e);
            }
        }
    }
}
