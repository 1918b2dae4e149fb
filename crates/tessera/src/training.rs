//! `tessera train …`: federated training tasks at a gateway, through its
//! HTTP API (`/v1/training/tasks`), authenticated and billed like
//! inference: the task's escrow is held when it is created, each provider
//! paid per verified round, the rest refunded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where the gateway is and who is asking.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// The gateway's API, e.g. http://127.0.0.1:8080/v1; default: the
    /// api_base in the home folder's endpoint.json (a devnet's or a
    /// gateway's).
    #[arg(long, env = "TESSERA_API")]
    pub api: Option<String>,
    /// The API key; default: the one in endpoint.json.
    #[arg(long, env = "TESSERA_API_KEY")]
    pub key: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Create a federated task and watch it (or print its id with
    /// --detach).
    Create(CreateArgs),
    /// Create a DiLoCo task (one language model trained on workers'
    /// compute) and watch it (or print its id with --detach).
    Diloco(DilocoArgs),
    /// Follow a task: a progress bar, each round's loss, accuracy, bytes.
    Watch {
        /// The task's id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// A task's status as JSON (every round).
    Show {
        /// The task's id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// This account's tasks.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop a task; the unspent escrow is refunded.
    Cancel {
        /// The task's id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Save the task's model as safetensors.
    Fetch {
        /// The task's id.
        id: String,
        /// Where to write it (default: ID.safetensors).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// A task as the flags describe it (README, "Training").
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The whole task as JSON (a file, or - for stdin); flags below are
    /// ignored when given.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Model: mlp or logistic.
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// Values per sample.
    #[arg(long, default_value_t = 64)]
    pub inputs: usize,
    /// Hidden units (mlp).
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Classes.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// fedavg, fedprox, fedavgm or fedadam.
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    /// weighted-mean, median, trimmed-mean or krum.
    #[arg(long, default_value = "weighted-mean")]
    pub aggregation: String,
    /// Rounds.
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// Providers per round.
    #[arg(long, default_value_t = 10)]
    pub clients_per_round: usize,
    /// Fewest providers a round runs with.
    #[arg(long, default_value_t = 2)]
    pub min_clients: usize,
    /// Local epochs per round.
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    /// Local learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub learning_rate: f32,
    /// Most a provider may charge a round (micro-credits).
    #[arg(long, default_value_t = 10_000)]
    pub max_price_per_round: u64,
    /// Secure aggregation (SecAgg+): the gateway sees only each round's sum.
    #[arg(long)]
    pub secagg: bool,
    /// Differential privacy: the noise multiplier σ (with --dp-clip,
    /// --dp-budget).
    #[arg(long)]
    pub dp_noise: Option<f64>,
    /// Differential privacy: the L2 norm steps are clipped to.
    #[arg(long, default_value_t = 1.0)]
    pub dp_clip: f64,
    /// Differential privacy: stop before ε passes this (at δ = 1e-5).
    #[arg(long)]
    pub dp_budget: Option<f64>,
    /// Evaluate on this data set after each round ("digits").
    #[arg(long)]
    pub test: Option<String>,
    /// Seed of the model, the sampling and the shuffles.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the task's id and return instead of watching it.
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

impl CreateArgs {
    fn task(&self) -> anyhow::Result<Value> {
        if let Some(path) = &self.spec {
            return read_spec(path);
        }
        let model = match self.model.as_str() {
            "mlp" => {
                json!({"kind": "mlp", "inputs": self.inputs, "hidden": self.hidden, "classes": self.classes})
            }
            "logistic" => {
                json!({"kind": "logistic", "inputs": self.inputs, "classes": self.classes})
            }
            other => bail!("--model {other}: mlp or logistic"),
        };
        let strategy = match self.strategy.as_str() {
            "fedavg" => json!({"strategy": "fed_avg"}),
            "fedprox" => json!({"strategy": "fed_prox", "mu": 0.1}),
            "fedavgm" => json!({"strategy": "fed_avg_m", "server_lr": 1.0, "momentum": 0.9}),
            "fedadam" => {
                json!({"strategy": "fed_adam", "server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001})
            }
            other => bail!("--strategy {other}: fedavg, fedprox, fedavgm or fedadam"),
        };
        let aggregation = match self.aggregation.as_str() {
            "weighted-mean" => json!({"rule": "weighted_mean"}),
            "median" => json!({"rule": "median"}),
            "trimmed-mean" => json!({"rule": "trimmed_mean", "trim": 0.2}),
            "krum" => json!({"rule": "krum", "byzantine": 1}),
            other => bail!("--aggregation {other}: weighted-mean, median, trimmed-mean or krum"),
        };
        let mut task = json!({
            "model": model,
            "strategy": strategy,
            "aggregation": aggregation,
            "rounds": self.rounds,
            "clients_per_round": self.clients_per_round,
            "min_clients": self.min_clients,
            "recipe": {"epochs": self.epochs, "batch_size": 32, "learning_rate": self.learning_rate},
            "max_price_per_round": self.max_price_per_round,
            "secagg": self.secagg,
            "seed": self.seed,
        });
        if let Some(test) = &self.test {
            task["test"] = json!(test);
        }
        if let Some(sigma) = self.dp_noise {
            task["dp"] = json!({
                "clip": self.dp_clip, "noise_multiplier": sigma,
                "noise_at": if self.secagg { "distributed" } else { "local" },
                "delta": 1e-5, "budget": self.dp_budget,
            });
        }
        Ok(task)
    }
}

/// A task's JSON from a file, or from stdin for `-`.
fn read_spec(path: &Path) -> anyhow::Result<Value> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    serde_json::from_str(&text).context("the task is not JSON")
}

/// The API's base URL and key, from the flags or endpoint.json.
pub(crate) fn api(home: &Path, args: &ApiArgs) -> anyhow::Result<(String, String)> {
    let endpoint: Option<Value> = std::fs::read(home.join("endpoint.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let from_file = |field: &str| {
        endpoint
            .as_ref()
            .and_then(|e| e[field].as_str())
            .map(str::to_string)
    };
    let base = args
        .api
        .clone()
        .or_else(|| from_file("api_base"))
        .context("no gateway: pass --api (or run in the home of a devnet or gateway)")?;
    let base = base.trim_end_matches('/').to_string();
    let base = if base.ends_with("/v1") {
        base
    } else {
        format!("{base}/v1")
    };
    let key = args
        .key
        .clone()
        .or_else(|| from_file("api_key"))
        .context("no API key: pass --key")?;
    Ok((base, key))
}

/// The JSON of a call, or the API's error message.
fn call(request: reqwest::blocking::RequestBuilder) -> anyhow::Result<Value> {
    let response = request.send().context("the gateway cannot be reached")?;
    let status = response.status();
    let body: Value = response.json().unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "{status}: {}",
            body["error"]["message"].as_str().unwrap_or("no message")
        );
    }
    Ok(body)
}

pub(crate) fn create(base: &str, key: &str, task: &Value) -> anyhow::Result<Value> {
    call(
        reqwest::blocking::Client::new()
            .post(format!("{base}/training/tasks"))
            .bearer_auth(key)
            .json(task),
    )
}

pub(crate) fn status(base: &str, key: &str, id: &str) -> anyhow::Result<Value> {
    call(
        reqwest::blocking::Client::new()
            .get(format!("{base}/training/tasks/{id}"))
            .bearer_auth(key),
    )
}

/// Follow a task until it ends, printing each round (`quiet`: nothing).
pub(crate) fn watch(base: &str, key: &str, id: &str, quiet: bool) -> anyhow::Result<Value> {
    let mut shown = 0usize;
    loop {
        let s = status(base, key, id)?;
        if s["kind"] == "diloco" {
            if !quiet {
                print_diloco_steps(&s, shown);
            }
            shown = s["history"].as_array().map_or(0, Vec::len);
            match s["status"].as_str() {
                Some("waiting" | "running") => {
                    std::thread::sleep(Duration::from_millis(250));
                    continue;
                }
                _ => return Ok(s),
            }
        }
        let rounds = s["rounds"].as_u64().unwrap_or(0);
        let history = s["history"].as_array().cloned().unwrap_or_default();
        for r in history.iter().skip(shown) {
            if !quiet {
                let done = r["round"].as_u64().unwrap_or(0);
                let width = 30usize;
                let filled = (done as usize * width / rounds.max(1) as usize).min(width);
                let pct = |v: &Value| {
                    v.as_f64()
                        .map_or("-".into(), |a| format!("{:.1}%", a * 100.0))
                };
                println!(
                    "[{}{}] round {done}/{rounds}  providers {}  loss {}  accuracy {}  {} bytes/provider{}",
                    "#".repeat(filled),
                    ".".repeat(width - filled),
                    r["aggregated"],
                    r["loss"].as_f64().or(r["train_loss"].as_f64()).map_or("-".into(), |l| format!("{l:.4}")),
                    pct(&r["accuracy"]),
                    r["bytes_per_client"],
                    r["epsilon"].as_f64().map_or(String::new(), |e| format!("  ε {e:.2}")),
                );
            }
        }
        shown = history.len();
        match s["status"].as_str() {
            Some("waiting" | "running") => std::thread::sleep(Duration::from_millis(250)),
            _ => return Ok(s),
        }
    }
}

fn summary(s: &Value) {
    if s["kind"] == "diloco" {
        return diloco_summary(s);
    }
    println!(
        "task {}: {} after {} rounds; accuracy {}; escrow {} held, {} spent, {} refunded (micro-credits){}",
        s["id"].as_str().unwrap_or_default(),
        s["status"].as_str().unwrap_or_default(),
        s["rounds_done"],
        s["accuracy"].as_f64().map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
        s["escrow"]["held"],
        s["escrow"]["spent"],
        s["escrow"]["refunded"],
        s["error"].as_str().map_or(String::new(), |e| format!("; {e}")),
    );
}

pub fn run(home: &Path, command: TrainCommand) -> anyhow::Result<()> {
    match command {
        TrainCommand::Create(args) => {
            let (base, key) = api(home, &args.api)?;
            let task = args.task()?;
            let created = create(&base, &key, &task)?;
            let id = created["id"].as_str().unwrap_or_default().to_string();
            if args.detach {
                println!("{id}");
                return Ok(());
            }
            println!(
                "task {id}: {} micro-credits held in escrow",
                created["escrow"]["held"]
            );
            summary(&watch(&base, &key, &id, false)?);
        }
        TrainCommand::Diloco(args) => {
            let (base, key) = api(home, &args.api)?;
            let task = args.task()?;
            let created = create(&base, &key, &task)?;
            let id = created["id"].as_str().unwrap_or_default().to_string();
            if args.detach {
                println!("{id}");
                return Ok(());
            }
            println!(
                "task {id}: {} micro-credits held in escrow",
                created["escrow"]["held"]
            );
            summary(&watch(&base, &key, &id, false)?);
        }
        TrainCommand::Watch { id, api: a } => {
            let (base, key) = api(home, &a)?;
            summary(&watch(&base, &key, &id, false)?);
        }
        TrainCommand::Show { id, api: a } => {
            let (base, key) = api(home, &a)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&status(&base, &key, &id)?)?
            );
        }
        TrainCommand::List { api: a } => {
            let (base, key) = api(home, &a)?;
            let list = call(
                reqwest::blocking::Client::new()
                    .get(format!("{base}/training/tasks"))
                    .bearer_auth(&key),
            )?;
            for t in list["data"].as_array().into_iter().flatten() {
                summary(t);
            }
        }
        TrainCommand::Cancel { id, api: a } => {
            let (base, key) = api(home, &a)?;
            let s = call(
                reqwest::blocking::Client::new()
                    .post(format!("{base}/training/tasks/{id}/cancel"))
                    .bearer_auth(&key),
            )?;
            summary(&s);
        }
        TrainCommand::Fetch { id, out, api: a } => {
            let (base, key) = api(home, &a)?;
            let response = reqwest::blocking::Client::new()
                .get(format!("{base}/training/tasks/{id}/model"))
                .bearer_auth(&key)
                .send()
                .context("the gateway cannot be reached")?;
            if !response.status().is_success() {
                let status = response.status();
                let body: Value = response.json().unwrap_or(Value::Null);
                bail!(
                    "{status}: {}",
                    body["error"]["message"].as_str().unwrap_or("no message")
                );
            }
            let bytes = response.bytes()?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{id}.safetensors")));
            std::fs::write(&out, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{} bytes written to {}", bytes.len(), out.display());
        }
    }
    Ok(())
}

/// A DiLoCo task as the flags describe it (README, "DiLoCo").
#[derive(Args, Debug, Clone)]
pub struct DilocoArgs {
    /// The whole task as JSON (a file, or - for stdin); flags below are
    /// ignored when given.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Outer steps.
    #[arg(long, default_value_t = 16)]
    pub outer_steps: u32,
    /// Inner steps per outer step for the fastest worker (H).
    #[arg(long, default_value_t = 400)]
    pub inner_steps: u32,
    /// Warm-up: H starts at this many inner steps and doubles each outer
    /// step up to --inner-steps.
    #[arg(long)]
    pub first_inner_steps: Option<u32>,
    /// Windows per inner step, per worker.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Most workers per outer step.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Fewest workers an outer step runs with.
    #[arg(long, default_value_t = 1)]
    pub min_workers: usize,
    /// Tokens of context.
    #[arg(long, default_value_t = 32)]
    pub context: usize,
    /// Width of the model.
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Peak inner (AdamW) learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f32,
    /// Inner warm-up steps.
    #[arg(long, default_value_t = 100)]
    pub warmup: u64,
    /// Outer learning rate.
    #[arg(long, default_value_t = 0.85)]
    pub outer_lr: f32,
    /// Outer Nesterov momentum.
    #[arg(long, default_value_t = 0.5)]
    pub outer_momentum: f32,
    /// Most a worker may charge per inner step (micro-credits).
    #[arg(long, default_value_t = 10)]
    pub max_price_per_step: u64,
    /// Share of (worker, outer step) pairs re-executed.
    #[arg(long, default_value_t = 0.08)]
    pub audit_rate: f64,
    /// Workers commit their state every this many inner steps.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u32,
    /// Seed of the model and every worker's windows.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the task's id and return instead of watching it.
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

impl DilocoArgs {
    /// The task's JSON.
    pub fn task(&self) -> anyhow::Result<Value> {
        if let Some(path) = &self.spec {
            let mut v = read_spec(path)?;
            v["kind"] = json!("diloco");
            return Ok(v);
        }
        Ok(json!({
            "kind": "diloco",
            "model": {"vocab": 256, "context": self.context, "width": self.width, "layers": self.layers, "heads": self.heads},
            "outer_steps": self.outer_steps,
            "inner_steps": self.inner_steps,
            "first_inner_steps": self.first_inner_steps,
            "batch": self.batch,
            "workers": self.workers,
            "min_workers": self.min_workers,
            "optimizer": {"lr": self.lr, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.01,
                          "warmup": self.warmup, "total_steps": 0, "min_lr_ratio": 0.1},
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "seed": self.seed,
            "max_price_per_step": self.max_price_per_step,
            "audit_rate": self.audit_rate,
            "checkpoint_every": self.checkpoint_every,
        }))
    }
}

/// Print the outer steps in `history` after the first `shown`.
pub(crate) fn print_diloco_steps(s: &Value, shown: usize) {
    let total = s["outer_steps"].as_u64().unwrap_or(0);
    for r in s["history"].as_array().into_iter().flatten().skip(shown) {
        let done = r["outer_step"].as_u64().unwrap_or(0);
        let width = 30usize;
        let filled = (done as usize * width / total.max(1) as usize).min(width);
        let workers = r["workers"].as_object().map_or(0, |w| w.len());
        let bytes: u64 = r["workers"]
            .as_object()
            .into_iter()
            .flat_map(|w| w.values())
            .map(|w| w["bytes_up"].as_u64().unwrap_or(0) + w["bytes_down"].as_u64().unwrap_or(0))
            .sum();
        let audits = r["workers"]
            .as_object()
            .into_iter()
            .flat_map(|w| w.values())
            .filter(|w| !w["audit"].is_null())
            .count();
        let loss = |v: &Value| v.as_f64().map_or("-".into(), |l| format!("{l:.4}"));
        println!(
            "[{}{}] outer step {done}/{total}  workers {workers}  train loss {}  validation loss {}  {bytes} bytes  {audits} audited{}{}",
            "#".repeat(filled),
            ".".repeat(width - filled),
            loss(&r["train_loss"]),
            loss(&r["val_loss"]),
            r["dropped"].as_object().filter(|d| !d.is_empty()).map_or(String::new(), |d| format!("  {} dropped", d.len())),
            r["rejected"].as_object().filter(|d| !d.is_empty()).map_or(String::new(), |d| format!("  {} rejected", d.len())),
        );
    }
}

/// One line about a finished DiLoCo task.
pub(crate) fn diloco_summary(s: &Value) {
    let t = &s["totals"];
    println!(
        "task {}: {} after {} outer steps; validation loss {}; {} bytes moved ({}× less than per-step data parallelism); utilization {}; {} audits ({} failed, audit cost {}); {} struck; escrow {} held, {} spent, {} refunded (micro-credits){}",
        s["id"].as_str().unwrap_or_default(),
        s["status"].as_str().unwrap_or_default(),
        s["outer_steps_done"],
        s["val_loss"].as_f64().map_or("-".into(), |l| format!("{l:.4}")),
        t["bytes"],
        s["bytes_ratio"].as_f64().map_or("-".into(), |r| format!("{r:.0}")),
        s["utilization"].as_f64().map_or("-".into(), |u| format!("{:.1}%", u * 100.0)),
        t["audits"],
        t["audits_failed"],
        s["audit_cost"].as_f64().map_or("-".into(), |u| format!("{:.1}%", u * 100.0)),
        s["struck"].as_object().map_or(0, |m| m.len()),
        s["escrow"]["held"],
        s["escrow"]["spent"],
        s["escrow"]["refunded"],
        s["error"].as_str().map_or(String::new(), |e| format!("; {e}")),
    );
}
