//! The gateway's training tasks behind the API's `Training` seam.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde_json::Value;
use tessera_backend::{Training, TrainingError};
use tessera_ledger::{Hold, Ledger, LedgerError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::diloco::task::{
    self as diloco_task, DilocoRequest, DilocoTask, Progress, Start, TaskState,
};
use crate::diloco::{Store, Workers};
use tessera_train::corpus::Corpus;

use super::pool::Trainers;
use super::task::{self, State, Status, Task, TaskRequest};

/// Most tasks one account may have running at once.
pub const MAX_TASKS_PER_ACCOUNT: usize = 8;

/// Runs federated tasks on the providers in [`Trainers`], paying them from
/// the task owners' escrow in the ledger.
pub struct Coordinator {
    trainers: Arc<Trainers>,
    ledger: Ledger,
    gateway: String,
    fee_bps: u64,
    tasks: Mutex<HashMap<String, Arc<Task>>>,
    workers: Arc<Workers>,
    diloco: Mutex<HashMap<String, Arc<DilocoTask>>>,
    /// Where DiLoCo tasks are written, to resume after a restart.
    store: Option<Store>,
    /// The text DiLoCo tasks train on (loaded on the first task).
    corpus: std::sync::OnceLock<Result<(Arc<Corpus>, String), String>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Coordinator {
    /// Tasks of this gateway (node id `gateway`, taking `fee_bps` of each
    /// payment), run on `tracker` and cancelled with `shutdown` (their
    /// unspent escrow released).
    pub fn new(
        trainers: Arc<Trainers>,
        ledger: Ledger,
        gateway: String,
        fee_bps: u64,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Coordinator {
        Coordinator {
            trainers,
            ledger,
            gateway,
            fee_bps,
            tasks: Mutex::default(),
            workers: Arc::default(),
            diloco: Mutex::default(),
            store: None,
            corpus: std::sync::OnceLock::new(),
            shutdown,
            tracker,
        }
    }

    /// DiLoCo tasks run on these workers (the gateway's).
    pub fn with_workers(mut self, workers: Arc<Workers>) -> Coordinator {
        self.workers = workers;
        self
    }

    /// DiLoCo tasks are written to `store` as their outer steps settle;
    /// [`Coordinator::resume`] runs them on from there after a restart.
    pub fn with_store(mut self, store: Store) -> Coordinator {
        self.store = Some(store);
        self
    }

    /// Providers connected now that offer DiLoCo compute.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    fn diloco_task(&self, account: &str, id: &str) -> Option<Arc<DilocoTask>> {
        self.diloco
            .lock()
            .ok()
            .and_then(|t| t.get(id).cloned())
            .filter(|t| t.account == account)
    }

    fn running(&self, account: &str) -> usize {
        let fl = self.tasks.lock().map_or(0, |t| {
            t.values()
                .filter(|t| t.account == account && t.live())
                .count()
        });
        let dl = self.diloco.lock().map_or(0, |t| {
            t.values()
                .filter(|t| t.account == account && t.live())
                .count()
        });
        fl + dl
    }

    /// Hold the escrow (one hold per unit, `count` of them at `each`),
    /// releasing what was held when one fails.
    async fn hold_all(
        &self,
        account: &str,
        id: &str,
        count: u32,
        each: u64,
    ) -> Result<Vec<String>, TrainingError> {
        let mut holds = Vec::with_capacity(count as usize);
        for k in 1..=count {
            let key = format!("{id}-r{k}");
            match self
                .ledger
                .hold(account, each, &self.gateway, Some(&key))
                .await
            {
                Ok(Hold::New(h)) => holds.push(h),
                Ok(Hold::Duplicate { .. }) => {
                    self.release(holds).await;
                    return Err(TrainingError::Unavailable(
                        "a task id was reused; try again".into(),
                    ));
                }
                Err(e) => {
                    self.release(holds).await;
                    return Err(ledger_error(e));
                }
            }
        }
        Ok(holds)
    }

    /// The text DiLoCo tasks train on, and its hash (read once).
    fn corpus(&self) -> Result<(Arc<Corpus>, String), TrainingError> {
        self.corpus
            .get_or_init(|| {
                Corpus::fortunes(
                    std::path::Path::new(tessera_train::corpus::FORTUNES_DIR),
                    tessera_train::corpus::VAL_SHARE,
                )
                .map(|c| {
                    let h = crate::diloco::worker::corpus_hash(&c);
                    (Arc::new(c), h)
                })
                .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| {
                TrainingError::Unavailable(format!("this gateway has no text to train on: {e}"))
            })
    }

    async fn create_diloco(&self, account: String, body: Value) -> Result<Value, TrainingError> {
        let request: DilocoRequest = serde_json::from_value(body)
            .map_err(|e| TrainingError::Invalid(format!("Invalid DiLoCo task: {e}.")))?;
        request
            .validate()
            .map_err(|e| TrainingError::Invalid(format!("Invalid DiLoCo task: {e}.")))?;
        let running = self.running(&account);
        if running >= MAX_TASKS_PER_ACCOUNT {
            return Err(TrainingError::Conflict(format!(
                "This account has {running} tasks running (at most {MAX_TASKS_PER_ACCOUNT}); \
                 wait for one to end or cancel one."
            )));
        }
        let (corpus, corpus_hash) = self.corpus()?;
        let id = format!(
            "diloco-{}",
            hex::encode(
                tessera_core::secret_bytes::<8>()
                    .map_err(|e| TrainingError::Unavailable(e.to_string()))?
            )
        );
        let holds = self
            .hold_all(&account, &id, request.outer_steps, request.step_escrow())
            .await?;
        let task = Arc::new(DilocoTask {
            id: id.clone(),
            account: account.clone(),
            corpus,
            corpus_hash,
            created_ms: tessera_core::now_ms(),
            abort: self.shutdown.child_token(),
            stop: CancellationToken::new(),
            state: Mutex::new(TaskState {
                parameters: tessera_train::lm::init(&request.model, request.seed),
                progress: Progress::new(
                    holds,
                    request.step_escrow() * u64::from(request.outer_steps),
                ),
            }),
            request,
        });
        if let Ok(mut t) = self.diloco.lock() {
            t.insert(id.clone(), task.clone());
        }
        tracing::info!(task = %id, account = %account, "DiLoCo task created");
        self.tracker.spawn(diloco_task::run(
            task.clone(),
            self.workers.clone(),
            self.ledger.clone(),
            self.fee_bps,
            Start::fresh(&task.request),
            self.store.clone(),
        ));
        Ok(task.status(false))
    }

    /// Load the DiLoCo tasks of the store: finished ones to show and
    /// serve, and run the ones that were live when the gateway stopped on
    /// from their last settled outer step. Call it once the ledger has
    /// released the holds this gateway left open
    /// (`LedgerAccounts::start`): each resumed task holds its remaining
    /// escrow again, and first makes its last step's payment if the ledger
    /// has no receipt of it. Returns how many tasks run again.
    pub async fn resume(&self) -> usize {
        let Some(store) = self.store.clone() else {
            return 0;
        };
        let mut resumed = 0;
        for (saved, outer) in store.load() {
            let known = self
                .diloco
                .lock()
                .map_or(true, |t| t.contains_key(&saved.id));
            if known {
                continue;
            }
            let corpus = match self.corpus() {
                Ok((c, hash)) if hash == saved.corpus => c,
                Ok(_) => {
                    tracing::warn!(task = %saved.id, "a DiLoCo task's text is not this gateway's; not loaded");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(task = %saved.id, error = ?e, "a DiLoCo task cannot be loaded");
                    continue;
                }
            };
            let live = saved.progress.live();
            let payment = saved.payment.clone();
            let stale: Vec<String> = saved.progress.holds.iter().flatten().cloned().collect();
            let (task, start) =
                DilocoTask::restore(saved, outer, corpus, self.shutdown.child_token());
            let task = Arc::new(task);
            if let Ok(mut t) = self.diloco.lock() {
                t.insert(task.id.clone(), task.clone());
            }
            if !live {
                continue;
            }
            match self.reopen(&task, payment, stale).await {
                Ok(()) => {
                    if let Some(saved) = task.saved_now(&start) {
                        if let Err(e) = store.save(&saved, &start.outer) {
                            tracing::warn!(task = %task.id, error = %e, "cannot write the DiLoCo task");
                        }
                    }
                    tracing::info!(task = %task.id, from = start.from, "DiLoCo task resumed");
                    resumed += 1;
                    self.tracker.spawn(diloco_task::run(
                        task.clone(),
                        self.workers.clone(),
                        self.ledger.clone(),
                        self.fee_bps,
                        start,
                        Some(store.clone()),
                    ));
                }
                Err(why) => {
                    tracing::warn!(task = %task.id, %why, "a DiLoCo task cannot resume");
                    if let Ok(mut s) = task.state.lock() {
                        s.progress.status = Status::Failed;
                        s.progress.error = Some(why);
                    }
                    if let Some(saved) = task.saved_now(&start) {
                        if let Err(e) = store.save(&saved, &start.outer) {
                            tracing::warn!(task = %task.id, error = %e, "cannot write the DiLoCo task");
                        }
                    }
                }
            }
        }
        resumed
    }

    /// Ready a resumed task's money: make its last step's payment if the
    /// ledger has no receipt of it, release the holds of the steps to run
    /// again (if the restart did not), and hold their escrow anew.
    async fn reopen(
        &self,
        task: &DilocoTask,
        payment: Option<crate::diloco::task::PaymentRecord>,
        stale: Vec<String>,
    ) -> Result<(), String> {
        let generation = task.state.lock().map_or(0, |s| s.progress.generation) + 1;
        if let Some(p) = payment {
            self.complete_payment(task, &p, generation).await?;
        }
        for hold in stale {
            match self.ledger.settle(&hold, "", vec![], 0).await {
                Ok(_) | Err(LedgerError::HoldClosed(_)) => {}
                Err(e) => return Err(format!("the ledger failed: {e}")),
            }
        }
        let r = &task.request;
        let settled = task.state.lock().map_or(0, |s| s.progress.settled);
        let remaining = r.outer_steps.saturating_sub(settled);
        let holds = self
            .hold_all(
                &task.account,
                &format!("{}-g{generation}", task.id),
                remaining,
                r.step_escrow(),
            )
            .await
            .map_err(|e| {
                format!("after a gateway restart the escrow of the {remaining} outer steps left cannot be held: {e:?}")
            })?;
        if let Ok(mut s) = task.state.lock() {
            let again = r.step_escrow() * u64::from(remaining);
            // What the stop released, and what is held again.
            s.progress.refunded += again;
            s.progress.escrow += again;
            s.progress.holds = (0..settled as usize)
                .map(|_| None)
                .chain(holds.into_iter().map(Some))
                .collect();
            s.progress.generation = generation;
            s.progress.status = Status::Waiting;
        }
        Ok(())
    }

    /// Make a settled step's payment the ledger has no receipt of (the
    /// gateway stopped between writing it and making it).
    async fn complete_payment(
        &self,
        task: &DilocoTask,
        p: &crate::diloco::task::PaymentRecord,
        generation: u32,
    ) -> Result<(), String> {
        let charges = diloco_task::charges(&task.id, &p.charges);
        if charges.is_empty() {
            let _ = self.ledger.settle(&p.hold, "", vec![], 0).await;
            return Ok(());
        }
        match self.ledger.hold_of_job(&p.job).await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(e) => return Err(format!("the ledger failed: {e}")),
        }
        // From its own hold when the restart left it open, else anew.
        match self
            .ledger
            .settle(&p.hold, &p.job, charges.clone(), self.fee_bps)
            .await
        {
            Ok(_) => return Ok(()),
            Err(LedgerError::HoldClosed(_)) => {}
            Err(e) => return Err(format!("the ledger failed: {e}")),
        }
        let cost: u64 = charges.iter().map(tessera_ledger::Charge::cost).sum();
        let key = format!("{}-g{generation}-pay{}", task.id, p.step);
        let hold = match self
            .ledger
            .hold(&task.account, cost, &self.gateway, Some(&key))
            .await
        {
            Ok(Hold::New(h)) => h,
            Ok(Hold::Duplicate { .. }) => {
                return Err(format!("outer step {}'s payment was held twice", p.step))
            }
            Err(e) => {
                return Err(format!(
                    "outer step {}'s payment ({cost} micro-credits owed to its workers) cannot be made: {e}",
                    p.step
                ))
            }
        };
        self.ledger
            .settle(&hold, &p.job, charges, self.fee_bps)
            .await
            .map(|_| ())
            .map_err(|e| format!("the ledger failed: {e}"))
    }

    /// Providers connected now that train.
    pub fn trainers(&self) -> usize {
        self.trainers.len()
    }

    /// Every task, newest first, as the dashboard shows it: progress and
    /// each round's loss and accuracy; no account, no money.
    pub fn overview(&self) -> Vec<Value> {
        let mut tasks: Vec<Arc<Task>> = self
            .tasks
            .lock()
            .map_or_else(|_| Vec::new(), |t| t.values().cloned().collect());
        tasks.sort_by_key(|t| std::cmp::Reverse(t.created_ms));
        let mut out: Vec<(u64, Value)> = tasks
            .iter()
            .take(20)
            .map(|t| (t.created_ms, t.overview()))
            .collect();
        if let Ok(d) = self.diloco.lock() {
            out.extend(d.values().map(|t| (t.created_ms, t.overview())));
        }
        out.sort_by_key(|(c, _)| std::cmp::Reverse(*c));
        out.into_iter().take(20).map(|(_, v)| v).collect()
    }

    fn task(&self, account: &str, id: &str) -> Result<Arc<Task>, TrainingError> {
        self.tasks
            .lock()
            .ok()
            .and_then(|t| t.get(id).cloned())
            .filter(|t| t.account == account)
            .ok_or_else(|| TrainingError::NotFound(id.to_string()))
    }

    /// Release holds taken for a task that could not start.
    async fn release(&self, holds: Vec<String>) {
        for h in holds {
            if let Err(e) = self.ledger.settle(&h, "", vec![], 0).await {
                tracing::warn!(error = %e, "cannot release a training hold");
            }
        }
    }
}

/// Stop a live task: the runner finishes the round or outer step in flight
/// (its providers trained for it, so they are paid), then releases the
/// unspent escrow; this waits up to 10 s for that (`cancelling` says it is
/// under way). A task already over is a conflict.
async fn stop_and_wait(
    stop: &CancellationToken,
    live: impl Fn() -> bool,
    id: &str,
) -> Result<(), TrainingError> {
    if !live() {
        return Err(TrainingError::Conflict(format!(
            "Task {id} is already over."
        )));
    }
    stop.cancel();
    for _ in 0..200 {
        if !live() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}

fn ledger_error(e: LedgerError) -> TrainingError {
    match e {
        LedgerError::Insufficient { .. } | LedgerError::SpendLimit { .. } => {
            TrainingError::Insufficient(format!(
                "The task's escrow cannot be held: {e}. Top up, or ask for fewer rounds, \
                 clients or a lower max_price_per_round."
            ))
        }
        other => TrainingError::Unavailable(format!("the ledger failed: {other}")),
    }
}

impl Training for Coordinator {
    fn create(&self, account: &str, body: Value) -> BoxFuture<'_, Result<Value, TrainingError>> {
        let account = account.to_string();
        Box::pin(async move {
            if body.get("kind").and_then(Value::as_str) == Some("diloco") {
                return self.create_diloco(account, body).await;
            }
            let request: TaskRequest = serde_json::from_value(body)
                .map_err(|e| TrainingError::Invalid(format!("Invalid training task: {e}.")))?;
            let checked = request
                .validate()
                .map_err(|e| TrainingError::Invalid(format!("Invalid training task: {e}.")))?;
            let running = self.running(&account);
            if running >= MAX_TASKS_PER_ACCOUNT {
                return Err(TrainingError::Conflict(format!(
                    "This account has {running} tasks running (at most {MAX_TASKS_PER_ACCOUNT}); \
                     wait for one to end or cancel one."
                )));
            }
            let id = format!(
                "train-{}",
                hex::encode(
                    tessera_core::secret_bytes::<8>()
                        .map_err(|e| TrainingError::Unavailable(e.to_string()))?
                )
            );
            // The escrow, held before the first round: one hold per round.
            let per_round = request.round_escrow();
            let holds = self
                .hold_all(&account, &id, request.rounds, per_round)
                .await?;
            let initial = tessera_train::Initialize::init(&request.model, request.seed);
            let task = Arc::new(Task {
                id: id.clone(),
                account: account.clone(),
                test: checked.test.map(Arc::new),
                audit: checked.audit,
                created_ms: tessera_core::now_ms(),
                abort: self.shutdown.child_token(),
                stop: CancellationToken::new(),
                state: Mutex::new(State {
                    status: Status::Waiting,
                    error: None,
                    parameters: initial,
                    rounds: Vec::new(),
                    holds: holds.into_iter().map(Some).collect(),
                    escrow: per_round * u64::from(request.rounds),
                    spent: 0,
                    refunded: 0,
                    earnings: Default::default(),
                }),
                request,
            });
            if let Ok(mut t) = self.tasks.lock() {
                t.insert(id.clone(), task.clone());
            }
            tracing::info!(task = %id, account = %account, "training task created");
            self.tracker.spawn(task::run(
                task.clone(),
                self.trainers.clone(),
                self.ledger.clone(),
                self.fee_bps,
            ));
            Ok(task.status(false))
        })
    }

    fn status(&self, account: &str, id: &str) -> Result<Value, TrainingError> {
        if let Some(t) = self.diloco_task(account, id) {
            return Ok(t.status(true));
        }
        Ok(self.task(account, id)?.status(true))
    }

    fn list(&self, account: &str) -> Vec<Value> {
        let tasks: Vec<Arc<Task>> = self.tasks.lock().map_or_else(
            |_| Vec::new(),
            |t| {
                t.values()
                    .filter(|t| t.account == account)
                    .cloned()
                    .collect()
            },
        );
        let mut out: Vec<(u64, Value)> = tasks
            .iter()
            .map(|t| (t.created_ms, t.status(false)))
            .collect();
        if let Ok(d) = self.diloco.lock() {
            out.extend(
                d.values()
                    .filter(|t| t.account == account)
                    .map(|t| (t.created_ms, t.status(false))),
            );
        }
        out.sort_by_key(|(c, _)| std::cmp::Reverse(*c));
        out.into_iter().map(|(_, v)| v).collect()
    }

    fn cancel(&self, account: &str, id: &str) -> BoxFuture<'_, Result<Value, TrainingError>> {
        let (account, id) = (account.to_string(), id.to_string());
        Box::pin(async move {
            if let Some(task) = self.diloco_task(&account, &id) {
                stop_and_wait(&task.stop, || task.live(), &id).await?;
                return Ok(task.status(false));
            }
            let task = self.task(&account, &id)?;
            stop_and_wait(&task.stop, || task.live(), &id).await?;
            Ok(task.status(false))
        })
    }

    fn model(&self, account: &str, id: &str) -> Result<Vec<u8>, TrainingError> {
        if let Some(task) = self.diloco_task(account, id) {
            let (params, steps, loss) = task
                .state
                .lock()
                .map(|s| {
                    (
                        s.parameters.clone(),
                        s.progress.steps.len(),
                        s.progress
                            .final_val_loss
                            .or_else(|| s.progress.steps.last().and_then(|r| r.val_loss)),
                    )
                })
                .map_err(|_| {
                    TrainingError::Unavailable("the task's state is unavailable".into())
                })?;
            let mut meta = vec![("task", id.to_string()), ("outer_steps", steps.to_string())];
            if let Some(l) = loss {
                meta.push(("val_loss", format!("{l:.4}")));
            }
            return tessera_train::export::safetensors_lm(&task.request.model, &params, &meta)
                .map_err(|e| TrainingError::Unavailable(e.to_string()));
        }
        let task = self.task(account, id)?;
        let (params, rounds, accuracy) = task
            .state
            .lock()
            .map(|s| {
                (
                    s.parameters.clone(),
                    s.rounds.len(),
                    s.rounds.last().and_then(|r| r.accuracy),
                )
            })
            .map_err(|_| TrainingError::Unavailable("the task's state is unavailable".into()))?;
        let mut meta = vec![("task", id.to_string()), ("rounds", rounds.to_string())];
        if let Some(a) = accuracy {
            meta.push(("accuracy", format!("{a:.4}")));
        }
        tessera_train::export::safetensors(&task.request.model, &params, &meta)
            .map_err(|e| TrainingError::Unavailable(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::diloco::task::{DilocoRequest, DilocoTask, PaymentRecord, Saved};
    use crate::federated::service::Coordinator;
    use tessera_ledger::{Hold, Ledger, Limits, MICRO};
    use tessera_train::corpus::Corpus;
    use tessera_train::diloco::Outer;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    /// The gateway stopped after writing a step's payment and before the
    /// ledger made it: the resumed task makes it once — from the step's
    /// hold if the restart left it open, else from a new hold — and not
    /// again when it finds the receipt.
    #[tokio::test]
    async fn a_written_payment_the_ledger_never_made_is_made_once_on_resume() {
        let dir = std::env::temp_dir().join(format!("tessera-pay-{}", tessera_core::unique_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        let ledger = Ledger::open_file(&dir.join("ledger.db")).await.unwrap();
        let (owner, _) = ledger
            .create_account("owner", MICRO, Limits::default())
            .await
            .unwrap();
        let coordinator = Coordinator::new(
            Arc::default(),
            ledger.clone(),
            "gw".into(),
            500,
            CancellationToken::new(),
            TaskTracker::new(),
        );
        let request: DilocoRequest = serde_json::from_value(serde_json::json!({
            "kind": "diloco", "outer_steps": 4, "inner_steps": 8,
            "model": {"vocab": 256, "context": 8, "width": 8, "layers": 1, "heads": 2},
        }))
        .unwrap();
        let n = request.model.parameters();
        let saved = Saved::for_test(&owner.id, request);
        let (task, _) = DilocoTask::restore(
            saved,
            Outer::new(vec![0.0; n], 0.7, 0.9),
            Arc::new(Corpus::from_text(&[b'a'; 4000], 0.1).unwrap()),
            CancellationToken::new(),
        );
        let worker = "provider:w".to_string();
        let balance = |id: String| {
            let ledger = ledger.clone();
            async move { ledger.account(&id).await.unwrap().map_or(0, |a| a.balance) }
        };
        let held = |key: &str| {
            let (ledger, key, owner) = (ledger.clone(), key.to_string(), owner.id.clone());
            async move {
                match ledger.hold(&owner, 100, "gw", Some(&key)).await.unwrap() {
                    Hold::New(h) => h,
                    other => panic!("{other:?}"),
                }
            }
        };
        // 1. The restart released the step's hold: paid from a new one.
        let hold = held("t-r1").await;
        ledger.release_open_holds("gw").await.unwrap();
        let p = PaymentRecord {
            step: 1,
            hold,
            job: "t-o1".into(),
            charges: vec![("w".into(), 8, 3)],
        };
        coordinator.complete_payment(&task, &p, 1).await.unwrap();
        assert_eq!(balance(worker.clone()).await, 24 - 1, "24 less the 5% fee");
        assert_eq!(balance(owner.id.clone()).await, MICRO as i64 - 24);
        // Again (a second restart): the receipt is there, nothing more.
        coordinator.complete_payment(&task, &p, 2).await.unwrap();
        assert_eq!(balance(worker.clone()).await, 23);
        // 2. The step's hold is still open: paid from it, the rest back.
        let hold = held("t-r2").await;
        let p = PaymentRecord {
            step: 2,
            hold,
            job: "t-o2".into(),
            charges: vec![("w".into(), 10, 3)],
        };
        coordinator.complete_payment(&task, &p, 1).await.unwrap();
        assert_eq!(balance(worker.clone()).await, 23 + 29);
        assert_eq!(balance(owner.id.clone()).await, MICRO as i64 - 54);
        let a = ledger.account(&owner.id).await.unwrap().unwrap();
        assert_eq!(a.held, 0);
        assert!(ledger.check().await.unwrap().ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
