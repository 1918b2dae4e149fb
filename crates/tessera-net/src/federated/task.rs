//! A federated task: what a client asks for ([`TaskRequest`]), its state,
//! and the loop that runs its rounds.
//!
//! Each round: wait until `min_clients` providers that fit the model are
//! connected (at most `wait_for_clients_s`), sample up to
//! `clients_per_round` of them (seeded by the task's seed and the round),
//! send each the global parameters and its recipe on a job stream, collect
//! their commitments until the round's deadline, then ask every committed
//! provider to reveal, check each update (see [`super`]), aggregate the
//! verified ones by the task's rule and take the strategy's step, evaluate
//! on the task's test data, and settle the round's hold: each verified
//! provider is paid its round price, the rest of the hold goes back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tessera_core::train::{ModelSpec, Recipe, Weights};
use tessera_core::NodeId;
use tessera_ledger::{Charge, Ledger};
use tessera_protocol::{JobKind, JobRequest, TrainDone, TrainRound};
use tessera_train::simulate::{round_seed, sample_clients};
use tessera_train::{
    outliers, Aggregation, CandleTrainer, ClientUpdate, Dataset, Initialize, Server, Strategy,
    Trainer as _,
};
use tokio_util::sync::CancellationToken;

use super::client::{MAX_EPOCHS, MAX_PARAMETERS};
use super::pool::{Trainer, Trainers};
use super::round::{commit_phase, opens, reveal_phase};

/// A client's training task, as `POST /v1/training/tasks` takes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// The model (`{"kind": "mlp", "inputs": 64, "hidden": 64, "classes": 10}`
    /// or `{"kind": "logistic", …}`).
    pub model: ModelSpec,
    /// The server's strategy (FedAvg by default).
    #[serde(default = "fed_avg")]
    pub strategy: Strategy,
    /// How updates are combined (the weighted mean by default; median,
    /// trimmed mean or Krum resist poisoning).
    #[serde(default = "weighted_mean")]
    pub aggregation: Aggregation,
    /// Rounds to run.
    pub rounds: u32,
    /// Providers sampled each round.
    #[serde(default = "ten")]
    pub clients_per_round: usize,
    /// Fewest providers a round runs with.
    #[serde(default = "two")]
    pub min_clients: usize,
    /// Each provider's local training.
    #[serde(default)]
    pub recipe: LocalRecipe,
    /// Seed of the initial model, the sampling and the shuffles.
    #[serde(default)]
    pub seed: u64,
    /// Most a provider may charge for one round (micro-credits); the
    /// escrow is rounds × clients per round × this.
    #[serde(default = "default_price")]
    pub max_price_per_round: u64,
    /// Seconds a sampled provider has to commit to its round's result.
    #[serde(default = "default_deadline")]
    pub round_deadline_s: f64,
    /// Seconds a round waits for `min_clients` providers before the task
    /// fails.
    #[serde(default = "default_wait")]
    pub wait_for_clients_s: f64,
    /// What to evaluate the model on after each round: `"digits"` (the
    /// held-out fifth of the 8×8 digits set) or `{"csv": "label,v1,…\n…"}`.
    #[serde(default)]
    pub test: Option<TestData>,
    /// SecAgg+: the gateway sees only the sum of each round's steps (then
    /// the aggregation is the weighted mean, and providers are verified by
    /// canary rounds).
    #[serde(default)]
    pub secagg: bool,
    /// SecAgg+'s threshold t (shares that rebuild a secret; by default
    /// half the neighbours and one).
    #[serde(default)]
    pub secagg_threshold: Option<usize>,
    /// SecAgg+ clips each value of a step to ±this before quantizing.
    #[serde(default = "default_secagg_clip")]
    pub secagg_clip: f32,
    /// SecAgg tasks: the share of rounds in which a provider also gets a
    /// canary round (every provider gets one before its first paid round).
    #[serde(default = "default_canary_rate")]
    pub canary_rate: f64,
    /// Data the task owner shipped to providers (node id → that provider's
    /// samples in `train.csv`'s format): the gateway re-executes a
    /// `reexecute_rate` share of those providers' rounds on it.
    #[serde(default)]
    pub audit_data: Option<BTreeMap<String, String>>,
    /// Share of a provider's rounds re-executed when its data was shipped.
    #[serde(default = "default_reexecute_rate")]
    pub reexecute_rate: f64,
    /// Differential privacy: `{"clip": C, "noise_multiplier": σ,
    /// "noise_at": "distributed" | "local", "delta": δ, "budget": ε}`.
    #[serde(default)]
    pub dp: Option<tessera_train::privacy::DpSettings>,
    /// An update further from the round's median than this many times the
    /// typical distance is an outlier: left out and not paid that round.
    /// Honest steps of the digits MLP reach 2.1 times (10 providers, IID
    /// and Dirichlet(0.5), 150 rounds); a step scaled ×10 is far beyond.
    #[serde(default = "default_outlier")]
    pub outlier_factor: f64,
    /// Largest L2 norm of one update's step.
    #[serde(default = "default_norm")]
    pub max_update_norm: f64,
}

/// A task's data, checked and loaded.
pub struct Checked {
    /// What it is evaluated on.
    pub test: Option<Dataset>,
    /// The data shipped to providers, for re-execution.
    pub audit: HashMap<NodeId, Arc<Dataset>>,
}

/// Each provider's local training in a round.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRecipe {
    /// Passes over its data.
    pub epochs: u32,
    /// Samples per step.
    pub batch_size: usize,
    /// SGD step size.
    pub learning_rate: f32,
}

impl Default for LocalRecipe {
    fn default() -> Self {
        LocalRecipe {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.1,
        }
    }
}

/// Test data of a task.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TestData {
    /// A data set the gateway has: `"digits"`.
    Named(String),
    /// Samples in `train.csv`'s format.
    Csv {
        /// The lines.
        csv: String,
    },
}

fn fed_avg() -> Strategy {
    Strategy::FedAvg
}
fn weighted_mean() -> Aggregation {
    Aggregation::WeightedMean
}
fn ten() -> usize {
    10
}
fn two() -> usize {
    2
}
fn default_price() -> u64 {
    10_000
}
fn default_deadline() -> f64 {
    120.0
}
fn default_wait() -> f64 {
    600.0
}
fn default_secagg_clip() -> f32 {
    4.0
}
fn default_canary_rate() -> f64 {
    0.1
}
fn default_reexecute_rate() -> f64 {
    0.2
}
fn default_outlier() -> f64 {
    4.0
}
fn default_norm() -> f64 {
    100.0
}

impl TaskRequest {
    /// The task checked, with its test and audit data loaded; the message
    /// names what is wrong.
    pub fn validate(&self) -> Result<Checked, String> {
        let spec = self.model;
        let hidden_ok = match spec {
            ModelSpec::Mlp { hidden, .. } => hidden >= 1,
            ModelSpec::Logistic { .. } => true,
        };
        if spec.inputs() == 0 || spec.classes() < 2 || !hidden_ok {
            return Err("model: inputs and hidden must be at least 1, classes at least 2".into());
        }
        if spec.parameters() > MAX_PARAMETERS {
            return Err(format!(
                "model: {} parameters; at most {MAX_PARAMETERS} are trained over the network",
                spec.parameters()
            ));
        }
        if self.rounds == 0 || self.rounds > 10_000 {
            return Err("rounds: 1 to 10000".into());
        }
        if self.clients_per_round == 0 || self.clients_per_round > 1_000 {
            return Err("clients_per_round: 1 to 1000".into());
        }
        if self.min_clients == 0 || self.min_clients > self.clients_per_round {
            return Err("min_clients: 1 to clients_per_round".into());
        }
        let r = &self.recipe;
        if r.epochs == 0 || r.epochs > MAX_EPOCHS {
            return Err(format!("recipe.epochs: 1 to {MAX_EPOCHS}"));
        }
        if r.batch_size == 0 || r.batch_size > 65_536 {
            return Err("recipe.batch_size: 1 to 65536".into());
        }
        if !(r.learning_rate.is_finite() && r.learning_rate > 0.0 && r.learning_rate <= 10.0) {
            return Err("recipe.learning_rate: above 0, at most 10".into());
        }
        let finite = |v: f32| v.is_finite() && v >= 0.0;
        let strategy_ok = match self.strategy {
            Strategy::FedAvg => true,
            Strategy::FedProx { mu } => finite(mu) && mu <= 100.0,
            Strategy::FedAvgM {
                server_lr,
                momentum,
            } => finite(server_lr) && finite(momentum) && momentum < 1.0,
            Strategy::FedAdam {
                server_lr,
                beta1,
                beta2,
                tau,
            } => {
                finite(server_lr)
                    && finite(beta1)
                    && finite(beta2)
                    && beta1 < 1.0
                    && beta2 < 1.0
                    && tau.is_finite()
                    && tau > 0.0
            }
        };
        if !strategy_ok {
            return Err(
                "strategy: rates must be finite and non-negative, β below 1, τ above 0".into(),
            );
        }
        match self.aggregation {
            Aggregation::TrimmedMean { trim } if !(0.0..0.5).contains(&trim) => {
                return Err("aggregation.trim: 0 to below 0.5".into())
            }
            Aggregation::Krum { byzantine } if self.min_clients < 2 * byzantine + 3 => {
                return Err(format!(
                    "aggregation: Krum tolerating {byzantine} needs min_clients of at least {}",
                    2 * byzantine + 3
                ))
            }
            _ => {}
        }
        if self.secagg {
            if self.aggregation != Aggregation::WeightedMean {
                return Err(
                    "aggregation: with secagg only the weighted mean (robust rules need \
                            to see each update)"
                        .into(),
                );
            }
            if self.min_clients < 3 {
                return Err("min_clients: at least 3 with secagg".into());
            }
            if !(self.secagg_clip.is_finite() && self.secagg_clip > 0.0) {
                return Err("secagg_clip: above 0".into());
            }
            if !(0.0..=1.0).contains(&self.canary_rate) {
                return Err("canary_rate: 0 to 1".into());
            }
        }
        if let Some(dp) = &self.dp {
            let ok = dp.clip.is_finite()
                && dp.clip > 0.0
                && dp.noise_multiplier.is_finite()
                && dp.noise_multiplier > 0.0
                && dp.delta > 0.0
                && dp.delta < 1.0
                && dp.budget.is_none_or(|b| b.is_finite() && b > 0.0);
            if !ok {
                return Err(
                    "dp: clip and noise_multiplier above 0, delta in (0, 1), budget \
                            above 0"
                        .into(),
                );
            }
        }
        let secs_ok = |s: f64| s.is_finite() && (1.0..=86_400.0).contains(&s);
        if !secs_ok(self.round_deadline_s) || !secs_ok(self.wait_for_clients_s) {
            return Err("round_deadline_s and wait_for_clients_s: 1 to 86400".into());
        }
        if !(self.outlier_factor.is_finite() && self.outlier_factor >= 1.0) {
            return Err("outlier_factor: at least 1".into());
        }
        if !(self.max_update_norm.is_finite() && self.max_update_norm > 0.0) {
            return Err("max_update_norm: above 0".into());
        }
        self.clients_per_round
            .checked_mul(self.rounds as usize)
            .and_then(|n| (n as u64).checked_mul(self.max_price_per_round))
            .ok_or("max_price_per_round: the escrow overflows")?;
        let test = match &self.test {
            None => None,
            Some(TestData::Named(name)) if name == "digits" => Some(
                tessera_train::data::digits_split()
                    .map_err(|e| e.to_string())?
                    .1,
            ),
            Some(TestData::Named(name)) => {
                return Err(format!(
                    "test: no data set named {name:?} here (\"digits\")"
                ))
            }
            Some(TestData::Csv { csv }) => Some(
                tessera_train::data::parse_csv(csv, spec.classes())
                    .map_err(|e| format!("test.csv: {e}"))?,
            ),
        };
        if let Some(t) = &test {
            if t.features != spec.inputs() {
                return Err(format!(
                    "test: {} values a sample for a model of {} inputs",
                    t.features,
                    spec.inputs()
                ));
            }
        }
        let mut audit = HashMap::new();
        if let Some(shipped) = &self.audit_data {
            if self.secagg || self.dp.is_some() {
                return Err("audit_data: re-execution needs each update as trained, \
                            without secagg and dp"
                    .into());
            }
            if !(0.0..=1.0).contains(&self.reexecute_rate) {
                return Err("reexecute_rate: 0 to 1".into());
            }
            for (node, csv) in shipped {
                let id: NodeId = node
                    .parse()
                    .map_err(|_| format!("audit_data: {node:?} is not a node id"))?;
                let data = tessera_train::data::parse_csv(csv, spec.classes())
                    .map_err(|e| format!("audit_data[{node}]: {e}"))?;
                if data.features != spec.inputs() {
                    return Err(format!(
                        "audit_data[{node}]: {} values a sample for a model of {} inputs",
                        data.features,
                        spec.inputs()
                    ));
                }
                audit.insert(id, Arc::new(data));
            }
        }
        Ok(Checked { test, audit })
    }

    /// The providers of `round`: a seeded sample of `eligible`, each with
    /// its number among them (in node-id order). The number seeds its
    /// shuffles, as `simulate::federate` seeds its clients', so a run over
    /// the network can be replayed in one process.
    fn sample(&self, eligible: &[Trainer], round: u32) -> Vec<(usize, Trainer)> {
        let n = eligible.len();
        sample_clients(self.seed, round, n, self.clients_per_round.min(n))
            .into_iter()
            .map(|i| (i, eligible[i].clone()))
            .collect()
    }

    /// The local recipe of provider number `i` in `round`.
    fn recipe(&self, round: u32, i: usize) -> Recipe {
        Recipe {
            epochs: self.recipe.epochs,
            batch_size: self.recipe.batch_size,
            learning_rate: self.recipe.learning_rate,
            proximal: self.strategy.proximal(),
            seed: round_seed(self.seed, round, i),
        }
    }

    /// When a round starting now must have its commitments (ms since the
    /// epoch).
    fn deadline_ms(&self) -> u64 {
        tessera_core::now_ms() + (self.round_deadline_s * 1000.0).round() as u64
    }

    /// Micro-credits held for one round.
    pub fn round_escrow(&self) -> u64 {
        self.clients_per_round as u64 * self.max_price_per_round
    }
}

/// Where a task is.
pub use tessera_core::train::TaskStatus as Status;

/// One round as the task's status shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RoundReport {
    /// Its number (from 1).
    pub round: u32,
    /// Providers sampled.
    pub sampled: usize,
    /// Providers whose update was verified and aggregated.
    pub aggregated: usize,
    /// Providers paid (node id → their round price, micro-credits).
    pub paid: BTreeMap<String, u64>,
    /// Providers whose update failed a check, and why.
    pub rejected: BTreeMap<String, String>,
    /// Providers that did not finish (error, deadline, gone), and why.
    pub dropped: BTreeMap<String, String>,
    /// Mean training loss the verified providers reported.
    pub train_loss: Option<f64>,
    /// Loss and accuracy of the new global model on the test data.
    pub loss: Option<f64>,
    /// See `loss`.
    pub accuracy: Option<f64>,
    /// Bytes on the wire per sampled provider (both directions, frames).
    pub bytes_per_client: u64,
    /// Seconds the round took.
    pub seconds: f64,
    /// Micro-credits paid for it.
    pub cost: u64,
    /// ε spent so far at the task's δ (tasks with differential privacy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// SecAgg: the threshold, and per provider how many shares of its
    /// self-mask seed and of its mask key the gateway held after the round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secagg: Option<serde_json::Value>,
}

/// A task and everything known about it.
pub(crate) struct Task {
    pub id: String,
    pub account: String,
    pub request: TaskRequest,
    pub test: Option<Arc<Dataset>>,
    /// Data shipped to providers, by node (re-execution).
    pub audit: HashMap<NodeId, Arc<Dataset>>,
    pub created_ms: u64,
    /// The gateway is stopping: abandon the round in flight.
    pub abort: CancellationToken,
    /// The owner cancelled: stop once the round in flight is done (its
    /// providers trained for it, so it is paid).
    pub stop: CancellationToken,
    pub state: Mutex<State>,
}

/// What changes as the task runs.
pub(crate) struct State {
    pub status: Status,
    pub error: Option<String>,
    pub parameters: Vec<f32>,
    pub rounds: Vec<RoundReport>,
    /// Each round's hold, until settled.
    pub holds: Vec<Option<String>>,
    pub escrow: u64,
    pub spent: u64,
    pub refunded: u64,
    /// Per provider: rounds paid, micro-credits earned.
    pub earnings: BTreeMap<String, (u32, u64)>,
}

impl Task {
    /// Whether it is waiting or running.
    pub fn live(&self) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| matches!(s.status, Status::Waiting | Status::Running))
    }

    /// What the dashboard shows of it: progress and each round's figures.
    pub fn overview(&self) -> serde_json::Value {
        let Ok(s) = self.state.lock() else {
            return serde_json::json!({ "id": self.id });
        };
        serde_json::json!({
            "id": self.id,
            "status": s.status,
            "model": self.request.model,
            "strategy": self.request.strategy,
            "secagg": self.request.secagg,
            "dp": self.request.dp.is_some(),
            "rounds": self.request.rounds,
            "rounds_done": s.rounds.len(),
            "series": s.rounds.iter().map(|r| serde_json::json!({
                "round": r.round,
                "loss": r.loss,
                "accuracy": r.accuracy,
                "train_loss": r.train_loss,
                "epsilon": r.epsilon,
                "aggregated": r.aggregated,
                "bytes_per_client": r.bytes_per_client,
            })).collect::<Vec<_>>(),
        })
    }

    /// Its status as the API shows it; `rounds` with every round's report.
    pub fn status(&self, rounds: bool) -> serde_json::Value {
        let Ok(s) = self.state.lock() else {
            return serde_json::json!({ "id": self.id, "error": "state unavailable" });
        };
        let last = s.rounds.last();
        let moved: u64 = s.rounds.iter().map(|r| r.bytes_per_client).sum();
        let mut out = serde_json::json!({
            "id": self.id,
            "object": "training.task",
            "created_ms": self.created_ms,
            "status": s.status,
            "cancelling": self.stop.is_cancelled() && matches!(s.status, Status::Waiting | Status::Running),
            "error": s.error,
            "model": self.request.model,
            "parameters": self.request.model.parameters(),
            "strategy": self.request.strategy,
            "aggregation": self.request.aggregation,
            "rounds": self.request.rounds,
            "rounds_done": s.rounds.len(),
            "clients_per_round": self.request.clients_per_round,
            "min_clients": self.request.min_clients,
            "loss": last.and_then(|r| r.loss),
            "accuracy": last.and_then(|r| r.accuracy),
            "bytes_per_client_round": (!s.rounds.is_empty()).then(|| moved / s.rounds.len() as u64),
            "escrow": { "held": s.escrow, "spent": s.spent, "refunded": s.refunded },
            "providers": s.earnings.iter().map(|(node, (rounds, earned))| {
                (node.clone(), serde_json::json!({ "rounds_paid": rounds, "earned": earned }))
            }).collect::<serde_json::Map<_, _>>(),
        });
        if rounds {
            out["history"] = serde_json::to_value(&s.rounds).unwrap_or_default();
        }
        out
    }
}

/// Run every round of `task`, then settle what is left of its escrow.
pub(crate) async fn run(task: Arc<Task>, trainers: Arc<Trainers>, ledger: Ledger, fee_bps: u64) {
    let req = task.request.clone();
    let mut server = Server::new(req.strategy, req.model.init(req.seed));
    let mut struck: HashSet<NodeId> = HashSet::new();
    let mut canaried: HashSet<NodeId> = HashSet::new();
    let mut accountant = tessera_train::privacy::Accountant::default();
    let outcome = 'rounds: {
        for round in 1..=req.rounds {
            // Enough providers, or the task fails.
            let wait_until = Instant::now() + Duration::from_secs_f64(req.wait_for_clients_s);
            let eligible = loop {
                let e: Vec<Trainer> = trainers
                    .eligible(
                        req.model.inputs(),
                        req.model.classes(),
                        req.max_price_per_round,
                    )
                    .into_iter()
                    .filter(|t| !struck.contains(&t.node))
                    .collect();
                if e.len() >= req.min_clients {
                    break e;
                }
                if Instant::now() > wait_until {
                    break 'rounds Err(format!(
                        "round {round}: {} of the {} providers needed were connected within {} s",
                        e.len(),
                        req.min_clients,
                        req.wait_for_clients_s
                    ));
                }
                set_status(&task, Status::Waiting);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = task.abort.cancelled() => break 'rounds Ok(Status::Cancelled),
                    _ = task.stop.cancelled() => break 'rounds Ok(Status::Cancelled),
                }
            };
            if task.stop.is_cancelled() {
                break 'rounds Ok(Status::Cancelled);
            }
            set_status(&task, Status::Running);
            // Differential privacy: stop before a round that would spend
            // more than the budget.
            let q = req.clients_per_round.min(eligible.len()) as f64 / eligible.len() as f64;
            if let Some(dp) = &req.dp {
                let next = accountant.epsilon_after(q, dp.noise_multiplier, 1, dp.delta);
                if dp.budget.is_some_and(|b| next > b) {
                    if let Ok(mut s) = task.state.lock() {
                        s.error = Some(format!(
                            "stopped before round {round}: it would take ε to {next:.3}, past \
                             the budget of {}",
                            dp.budget.unwrap_or_default()
                        ));
                    }
                    break 'rounds Ok(Status::Completed);
                }
            }
            let report = tokio::select! {
                r = async {
                    if req.secagg {
                        run_secure_round(&task, &mut server, &eligible, round, &mut struck, &mut canaried).await
                    } else {
                        run_round(&task, &mut server, &eligible, round, &mut struck).await
                    }
                } => r,
                _ = task.abort.cancelled() => break 'rounds Ok(Status::Cancelled),
            };
            let mut report = report;
            if let Some(dp) = &req.dp {
                accountant.compose(q, dp.noise_multiplier, 1);
                report.epsilon = Some(accountant.epsilon(dp.delta).0);
            }
            let cost = settle_round(&task, &ledger, fee_bps, round, &report).await;
            match cost {
                Ok(c) => report.cost = c,
                Err(e) => {
                    record(&task, report, server.parameters());
                    break 'rounds Err(format!("round {round} could not be paid: {e}"));
                }
            }
            tracing::info!(
                task = %task.id, round, aggregated = report.aggregated,
                accuracy = ?report.accuracy, "training round done"
            );
            record(&task, report, server.parameters());
            if task.stop.is_cancelled() || task.abort.is_cancelled() {
                break 'rounds Ok(Status::Cancelled);
            }
        }
        Ok(Status::Completed)
    };
    // Release every hold not settled (rounds not run).
    let open: Vec<String> = task
        .state
        .lock()
        .map(|mut s| s.holds.iter_mut().filter_map(Option::take).collect())
        .unwrap_or_default();
    let mut refunded = 0;
    for hold in open {
        match ledger.settle(&hold, "", vec![], 0).await {
            Ok(_) => refunded += req.round_escrow(),
            Err(e) => tracing::warn!(task = %task.id, error = %e, "cannot release a round's hold"),
        }
    }
    if let Ok(mut s) = task.state.lock() {
        s.refunded += refunded;
        match outcome {
            Ok(status) => s.status = status,
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "training task failed");
                s.status = Status::Failed;
                s.error = Some(e);
            }
        }
    }
}

fn set_status(task: &Task, status: Status) {
    if let Ok(mut s) = task.state.lock() {
        s.status = status;
    }
}

fn record(task: &Task, report: RoundReport, parameters: &[f32]) {
    if let Ok(mut s) = task.state.lock() {
        s.spent += report.cost;
        s.refunded += task.request.round_escrow().saturating_sub(report.cost);
        for (node, price) in &report.paid {
            let e = s.earnings.entry(node.clone()).or_default();
            e.0 += 1;
            e.1 += price;
        }
        s.parameters = parameters.to_vec();
        s.rounds.push(report);
    }
}

/// Pay the round's verified providers from its hold; the rest goes back.
async fn settle_round(
    task: &Task,
    ledger: &Ledger,
    fee_bps: u64,
    round: u32,
    report: &RoundReport,
) -> Result<u64, String> {
    let hold = task
        .state
        .lock()
        .ok()
        .and_then(|mut s| s.holds.get_mut(round as usize - 1).and_then(Option::take))
        .ok_or("its hold is gone")?;
    // A round is billed as one unit at the provider's round price.
    let charges: Vec<Charge> = report
        .paid
        .iter()
        .map(|(node, price)| Charge {
            provider: node.clone(),
            model_sha256: format!("train:{}", task.id),
            prompt_tokens: 0,
            completion_tokens: 1,
            input_price: 0,
            output_price: *price,
            receipt: None,
        })
        .collect();
    let job = format!("{}-r{round}", task.id);
    ledger
        .settle(&hold, &job, charges, fee_bps)
        .await
        .map(|s| s.cost)
        .map_err(|e| e.to_string())
}

/// One round: sample, train, commit, reveal, verify, aggregate, evaluate.
async fn run_round(
    task: &Task,
    server: &mut Server,
    eligible: &[Trainer],
    round: u32,
    struck: &mut HashSet<NodeId>,
) -> RoundReport {
    let started = Instant::now();
    let req = &task.request;
    let chosen = req.sample(eligible, round);
    let deadline_ms = req.deadline_ms();
    let global = server.parameters().to_vec();
    let commits = futures::future::join_all(chosen.iter().map(|(i, t)| {
        let job = JobRequest {
            job_id: format!("{}-r{round}-{}", task.id, t.node.short()),
            kind: JobKind::TrainRound(Box::new(TrainRound {
                task: task.id.clone(),
                round,
                spec: req.model,
                global: Weights(global.clone()),
                recipe: req.recipe(round, *i),
                deadline_ms,
                price: t.offer.price,
                secagg: None,
                privacy: round_privacy(req, chosen.len()),
                canary: None,
            })),
        };
        commit_phase(t.clone(), job)
    }))
    .await;
    let mut dropped = BTreeMap::new();
    let mut committed = Vec::new();
    for c in commits {
        match c {
            Ok(c) => committed.push(c),
            Err((t, reason)) => {
                dropped.insert(t.node.to_string(), reason);
            }
        }
    }
    // Every commitment is in (or its deadline passed): reveal.
    let revealed = futures::future::join_all(committed.into_iter().map(reveal_phase)).await;
    let mut bytes: u64 = 0;
    let mut rejected = BTreeMap::new();
    let mut results: Vec<(Trainer, TrainDone)> = Vec::new();
    for (c, result) in revealed {
        bytes += c.bytes;
        let node = c.trainer.node.to_string();
        let done = match result {
            Ok(done) => done,
            Err(reason) => {
                dropped.insert(node, reason);
                continue;
            }
        };
        match opens(&c, round, &done) {
            Ok(()) => results.push((c.trainer, done)),
            Err(reason) => {
                struck.insert(c.trainer.node);
                rejected.insert(node, reason);
            }
        }
    }
    // With differential privacy every update weighs the same (the noise
    // is calibrated to a mean of equals).
    let updates: Vec<ClientUpdate> = results
        .iter()
        .map(|(_, d)| ClientUpdate {
            parameters: d.parameters.0.clone(),
            samples: if req.dp.is_some() {
                1
            } else {
                d.samples as usize
            },
        })
        .collect();
    let mut verified: Vec<usize> = Vec::new();
    for (i, (t, d)) in results.iter().enumerate() {
        // No direction test here: honest steps point up to 114° away from
        // the round's median near convergence (IID and non-IID, measured
        // over 150 rounds of the digits MLP), so direction cannot tell a
        // flipped step from an honest one; the outlier test below catches
        // steps far from the rest.
        match tessera_train::verify::plausible(
            &global,
            &d.parameters.0,
            d.loss,
            req.max_update_norm,
            None,
        ) {
            Ok(()) => verified.push(i),
            Err(reason) => {
                struck.insert(t.node);
                rejected.insert(t.node.to_string(), format!("implausible: {reason}"));
            }
        }
    }
    // Re-execution, where the task owner shipped the provider's data: a
    // share of those rounds is trained again here from the same
    // parameters, data, recipe and seed, and must agree within
    // `verify::TOLERANCE` (bit for bit on one build).
    if !task.audit.is_empty() {
        let mut dice = dice();
        let picks: Vec<usize> = verified
            .iter()
            .copied()
            .filter(|&i| task.audit.contains_key(&results[i].0.node))
            .filter(|_| dice.uniform() < req.reexecute_rate)
            .collect();
        let checks = futures::future::join_all(picks.iter().map(|&i| {
            let (t, d) = &results[i];
            let data = task.audit[&t.node].clone();
            let index = chosen
                .iter()
                .find(|(_, c)| c.node == t.node)
                .map_or(0, |(k, _)| *k);
            let recipe = req.recipe(round, index);
            let (global, claimed, spec) = (global.clone(), d.parameters.0.clone(), req.model);
            tokio::task::spawn_blocking(move || {
                let trainer = CandleTrainer::new(spec, 1)?;
                tessera_train::verify::reexecute(&trainer, &global, &data, &recipe, &claimed)
            })
        }))
        .await;
        for (&i, check) in picks.iter().zip(checks) {
            let node = results[i].0.node;
            let why = match check {
                Ok(Ok(r)) if r.passed => continue,
                Ok(Ok(r)) => format!(
                    "re-execution: its round differs from the gateway's by {:.3} (relative; \
                     tolerance {})",
                    r.relative_distance,
                    tessera_train::verify::TOLERANCE
                ),
                Ok(Err(e)) => format!("re-execution failed: {e}"),
                Err(e) => format!("re-execution stopped: {e}"),
            };
            struck.insert(node);
            rejected.insert(node.to_string(), why);
            verified.retain(|&v| v != i);
        }
    }
    // Outliers among the plausible: left out, not paid.
    let plausible: Vec<ClientUpdate> = verified.iter().map(|&i| updates[i].clone()).collect();
    let out: HashSet<usize> = outliers(&plausible, req.outlier_factor)
        .into_iter()
        .map(|k| verified[k])
        .collect();
    for &i in &out {
        rejected.insert(
            results[i].0.node.to_string(),
            "an outlier: far from the round's median update".into(),
        );
    }
    let kept: Vec<usize> = verified.into_iter().filter(|i| !out.contains(i)).collect();
    let kept_updates: Vec<ClientUpdate> = kept.iter().map(|&i| updates[i].clone()).collect();
    let aggregated = if kept_updates.len() >= req.min_clients {
        match server.apply(&kept_updates, req.aggregation) {
            Ok(()) => kept_updates.len(),
            Err(e) => {
                tracing::warn!(task = %task.id, round, error = %e, "round not aggregated");
                0
            }
        }
    } else {
        0
    };
    let train_loss = (!kept.is_empty())
        .then(|| kept.iter().map(|&i| results[i].1.loss).sum::<f64>() / kept.len() as f64);
    let eval = evaluate(task, server.parameters()).await;
    RoundReport {
        round,
        sampled: chosen.len(),
        aggregated,
        paid: kept
            .iter()
            .map(|&i| (results[i].0.node.to_string(), results[i].0.offer.price))
            .collect(),
        rejected,
        dropped,
        train_loss,
        loss: eval.map(|e| e.loss),
        accuracy: eval.map(|e| e.accuracy),
        bytes_per_client: bytes / chosen.len().max(1) as u64,
        seconds: started.elapsed().as_secs_f64(),
        cost: 0,
        epsilon: None,
        secagg: None,
    }
}

/// What each provider of a round of `clients` does for differential
/// privacy.
fn round_privacy(req: &TaskRequest, clients: usize) -> Option<tessera_protocol::RoundPrivacy> {
    req.dp.map(|dp| tessera_protocol::RoundPrivacy {
        clip: dp.clip,
        std: dp.client_std(clients),
    })
}

/// The model's loss and accuracy on the task's test data.
async fn evaluate(task: &Task, parameters: &[f32]) -> Option<tessera_train::Evaluation> {
    let test = task.test.clone()?;
    let (spec, params) = (task.request.model, parameters.to_vec());
    tokio::task::spawn_blocking(move || {
        CandleTrainer::new(spec, 1).and_then(|t| t.evaluate(&params, &test))
    })
    .await
    .ok()
    .and_then(Result::ok)
}

/// One SecAgg+ round: canary rounds for the providers due one, then the
/// masked round over those that passed; the survivors that passed are
/// paid.
async fn run_secure_round(
    task: &Task,
    server: &mut Server,
    eligible: &[Trainer],
    round: u32,
    struck: &mut HashSet<NodeId>,
    canaried: &mut HashSet<NodeId>,
) -> RoundReport {
    let started = Instant::now();
    let req = &task.request;
    let picked = req.sample(eligible, round);
    let deadline_ms = req.deadline_ms();
    let global = server.parameters().to_vec();
    let recipe = |i: usize| req.recipe(round, i);
    // Canaries: before a provider's first masked round, then at random.
    let mut dice = dice();
    let due: Vec<&(usize, Trainer)> = picked
        .iter()
        .filter(|(_, t)| !canaried.contains(&t.node) || dice.uniform() < req.canary_rate)
        .collect();
    let verdicts = futures::future::join_all(due.iter().map(|(i, t)| {
        super::canary::check(
            t,
            format!("{}-r{round}-canary-{}", task.id, t.node.short()),
            round,
            req.model,
            &global,
            Recipe {
                seed: recipe(*i).seed ^ 0xC0FFEE,
                ..recipe(*i)
            },
            deadline_ms,
        )
    }))
    .await;
    let mut rejected = BTreeMap::new();
    let mut canary_bytes = 0;
    for ((_, t), (bytes, verdict)) in due.iter().zip(verdicts) {
        canary_bytes += bytes;
        match verdict {
            Ok(()) => {
                canaried.insert(t.node);
            }
            Err(why) => {
                struck.insert(t.node);
                rejected.insert(t.node.to_string(), why);
            }
        }
    }
    let chosen: Vec<(usize, Trainer)> = picked
        .into_iter()
        .filter(|(_, t)| !rejected.contains_key(&t.node.to_string()))
        .collect();
    let mut report = RoundReport {
        round,
        sampled: chosen.len() + rejected.len(),
        aggregated: 0,
        paid: BTreeMap::new(),
        rejected,
        dropped: BTreeMap::new(),
        train_loss: None,
        loss: None,
        accuracy: None,
        bytes_per_client: 0,
        seconds: 0.0,
        cost: 0,
        epsilon: None,
        secagg: None,
    };
    if chosen.len() < req.min_clients {
        report.seconds = started.elapsed().as_secs_f64();
        return report;
    }
    let trainers: Vec<Trainer> = chosen.iter().map(|(_, t)| t.clone()).collect();
    let settings = super::secure::Settings {
        task: task.id.clone(),
        round,
        spec: req.model,
        global: global.clone(),
        recipes: chosen.iter().map(|(i, _)| recipe(*i)).collect(),
        deadline_ms,
        threshold: req.secagg_threshold,
        clip: req.secagg_clip,
        privacy: round_privacy(req, chosen.len()),
    };
    let out = super::secure::round(settings, &trainers).await;
    report.dropped = out.dropped;
    report.train_loss = out.train_loss;
    // The canary rounds' bytes count too, shared over the round's providers.
    report.bytes_per_client = out.bytes_per_client + canary_bytes / report.sampled.max(1) as u64;
    report.secagg = Some(serde_json::json!({
        "threshold": out.threshold,
        "survivors": out.completed.len(),
        "shares_held": out.shares_held,
    }));
    match out.step {
        Ok(step) => {
            let next: Vec<f32> = global.iter().zip(&step).map(|(g, d)| g + d).collect();
            let update = ClientUpdate {
                parameters: next,
                samples: 1,
            };
            if let Err(e) = server.apply(&[update], Aggregation::WeightedMean) {
                tracing::warn!(task = %task.id, round, error = %e, "round not aggregated");
            } else {
                report.aggregated = out.completed.len();
            }
        }
        Err(e) => {
            tracing::warn!(task = %task.id, round, error = %e, "secure round not unmasked");
            report.dropped.insert("round".into(), e);
        }
    }
    // Paid: every survivor that sent its unmasking shares (its canary
    // passed), whether or not the round as a whole unmasked.
    report.paid = out
        .completed
        .iter()
        .map(|t| (t.node.to_string(), t.offer.price))
        .collect();
    let eval = evaluate(task, server.parameters()).await;
    report.loss = eval.map(|e| e.loss);
    report.accuracy = eval.map(|e| e.accuracy);
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// Unpredictable draws (which rounds are re-executed or canaried): seeded
/// from the OS's random source, so no provider can tell in advance.
fn dice() -> tessera_train::Rng {
    tessera_train::Rng::new(u64::from_le_bytes(
        tessera_core::secret_bytes::<8>().unwrap_or_default(),
    ))
}
