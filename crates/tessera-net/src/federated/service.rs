//! The gateway's training tasks behind the API's `Training` seam.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde_json::Value;
use tessera_backend::{Training, TrainingError};
use tessera_ledger::{Hold, Ledger, LedgerError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::diloco::task::{self as diloco_task, DilocoRequest, DilocoTask, TaskState};
use crate::diloco::Workers;
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
        let (corpus, corpus_hash) = self
            .corpus
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
            })?;
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
                status: Status::Waiting,
                error: None,
                parameters: tessera_train::lm::init(&request.model, request.seed),
                steps: Vec::new(),
                holds: holds.into_iter().map(Some).collect(),
                escrow: request.step_escrow() * u64::from(request.outer_steps),
                spent: 0,
                refunded: 0,
                totals: Default::default(),
                earnings: Default::default(),
                struck: Default::default(),
                final_val_loss: None,
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
        ));
        Ok(task.status(false))
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
                        s.steps.len(),
                        s.final_val_loss
                            .or_else(|| s.steps.last().and_then(|r| r.val_loss)),
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
