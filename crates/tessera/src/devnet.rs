//! `tessera devnet`: a whole network on loopback.
//!
//! One gateway and N providers, each a separate `tessera` process with its
//! own home folder under `$TESSERA_HOME/devnet/`, joined over real iroh
//! connections on 127.0.0.1. The devnet prints a banner with the API URL and
//! the provider process ids, writes `$TESSERA_HOME/endpoint.json`, and stops
//! every process it started on Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use crate::process::{run_until_stopped, wait_for_file, Children, EndpointFile};

#[derive(Args, Debug)]
pub struct DevnetArgs {
    /// Provider processes to start.
    #[arg(long, env = "TESSERA_PROVIDERS", default_value_t = 3)]
    pub providers: usize,
    /// Address of the gateway's HTTP API.
    #[arg(long, env = "TESSERA_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Model every provider serves (alias, sha256 or GGUF path).
    #[arg(long, env = "TESSERA_MODEL", default_value = tessera_models::DEFAULT_MODEL.alias)]
    pub model: String,
    /// CPU threads per provider (default: the physical cores shared out).
    #[arg(long, env = "TESSERA_THREADS")]
    pub threads: Option<usize>,
    /// Slots per provider.
    #[arg(long, env = "TESSERA_SLOTS", default_value_t = 4)]
    pub slots: usize,
    /// Do not audit the providers' answers (see `tessera gateway
    /// --no-audit`); audits are on by default.
    #[arg(long)]
    pub no_audit: bool,
    /// Providers keep answers' KV caches for an account's next request (see
    /// `tessera gateway --prefix-cache`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,
    /// Route requests to the provider keeping their prefix (see `tessera
    /// gateway --prefix-routing`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_routing: bool,
    #[command(flatten)]
    pub network: crate::network::NetworkArgs,
    #[command(flatten)]
    pub train: TrainDemoArgs,
    #[command(flatten)]
    pub diloco: crate::diloco::DilocoDemoArgs,
}

/// The training demo: federated learning on the digits set.
#[derive(Args, Debug)]
pub struct TrainDemoArgs {
    /// Train instead of serving: each provider holds one shard of the 8×8
    /// digits set and loads no model, and a federated task (an MLP
    /// 64-64-10) trains to completion; the dashboard shows it.
    #[arg(long)]
    pub train_demo: bool,
    /// --train-demo: split the data non-IID, by Dirichlet(ALPHA) label
    /// shares (IID by default).
    #[arg(long, value_name = "ALPHA")]
    pub non_iid: Option<f64>,
    /// --train-demo: SecAgg+ (the gateway sees only each round's sum).
    #[arg(long)]
    pub secagg: bool,
    /// --train-demo: fedavg, fedprox or fedavgm.
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    /// --train-demo: rounds.
    #[arg(long, default_value_t = 150)]
    pub rounds: u32,
    /// --train-demo: local epochs per round.
    #[arg(long, default_value_t = 2)]
    pub local_epochs: u32,
    /// --train-demo: end by printing one JSON line (accuracy,
    /// centralized_accuracy, rounds, bytes_per_client_round, …) and stop
    /// the devnet.
    #[arg(long)]
    pub json: bool,
    /// TEST BUILDS ONLY (feature `adversary`): this many providers SIGKILL
    /// themselves right after sharing their keys in their first SecAgg
    /// round.
    #[cfg(feature = "adversary")]
    #[arg(long, default_value_t = 0)]
    pub vanish: usize,
}

pub fn run(home: &Path, args: DevnetArgs) -> anyhow::Result<()> {
    let model = crate::models::resolve_or_pull(home, &args.model)?;
    let exe = std::env::current_exe()?;
    let base = home.join("devnet");
    let threads = args
        .threads
        .unwrap_or_else(|| (tessera_llama::physical_cores() / args.providers.max(1)).max(1));
    let dir = |name: &str| -> anyhow::Result<PathBuf> {
        let d = base.join(name);
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        let _ = std::fs::remove_file(d.join("endpoint.json"));
        let _ = std::fs::remove_file(d.join("provider.json"));
        Ok(d)
    };
    let mut children = Children(Vec::new());

    let gw_home = dir("gateway")?;
    let operator = certify_gateway(&base, &gw_home, &args.network.name)?;
    // With --restart-gateway the gateway comes back on the same QUIC port
    // (the workers redial the address in their ticket).
    let bind = match args.diloco.restart_gateway {
        true => {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
            socket.local_addr()?.to_string()
        }
        false => "127.0.0.1:0".to_string(),
    };
    let gateway_command = |listen: &str| -> Command {
        let mut c = Command::new(&exe);
        c.args([
            "gateway",
            "--bind",
            &bind,
            "--listen",
            listen,
            "--demo-account",
            "--model",
        ])
        .arg(&model.path)
        .args(
            (args.no_audit || args.train.train_demo || args.diloco.diloco_demo)
                .then_some("--no-audit"),
        )
        .args(["--prefix-cache", &args.prefix_cache.to_string()])
        .args(["--prefix-routing", &args.prefix_routing.to_string()])
        .args(["--network", &args.network.name])
        .env("TESSERA_HOME", &gw_home)
        .stdout(Stdio::null());
        c
    };
    let gateway = gateway_command(&args.listen.to_string())
        .spawn()
        .context("cannot start the gateway")?;
    children.0.push(gateway);
    let gw = wait_for_file(
        &gw_home.join("endpoint.json"),
        &mut children.0[0],
        "the gateway",
    )?;
    let ticket = gw["ticket"]
        .as_str()
        .context("no ticket in the gateway's endpoint.json")?
        .to_string();
    let api_base = gw["api_base"].as_str().unwrap_or_default().to_string();
    let key = gw["api_key"].as_str().unwrap_or_default().to_string();

    if args.diloco.diloco_demo {
        return crate::diloco::demo(
            home,
            &base,
            args.providers,
            &args.network.name,
            &args.diloco,
            args.train.json,
            &gw,
            children,
            &crate::diloco::GatewayRestart {
                home: &gw_home,
                command: &gateway_command,
            },
        );
    }
    let mut providers = Vec::new();
    let shards = match args.train.train_demo {
        true => Some(demo_shards(args.providers, args.train.non_iid)?),
        false => None,
    };
    // Training: shard k goes to the provider whose node id is k-th in
    // order, the order the gateway numbers providers by, so that the demo
    // replays `tessera bench train`'s one-process federation bit for bit.
    let mut homes: Vec<PathBuf> = (0..args.providers)
        .map(|i| dir(&format!("provider-{i}")))
        .collect::<anyhow::Result<_>>()?;
    if shards.is_some() {
        let mut keyed = Vec::with_capacity(homes.len());
        for h in homes {
            let node =
                tessera_net::node::node_id(&tessera_net::node::load_or_create_key(&h)?.public());
            keyed.push((node, h));
        }
        keyed.sort_by_key(|(node, _)| *node);
        homes = keyed.into_iter().map(|(_, h)| h).collect();
    }
    for (i, p_home) in homes.into_iter().enumerate() {
        let mut command = Command::new(&exe);
        command.args(["provider", "--gateway", &ticket, "--bind", "127.0.0.1:0"]);
        match &shards {
            Some(shards) => {
                let data = p_home.join("train-data");
                tessera_train::data::write_dir(&shards[i], &data)?;
                command.args(["--train-only", "--train-data"]).arg(&data);
                #[cfg(feature = "adversary")]
                if i < args.train.vanish {
                    command.arg("--vanish-after-keys");
                }
            }
            None => {
                command
                    .arg("--model")
                    .arg(&model.path)
                    .args(["--threads", &threads.to_string()])
                    .args(["--slots", &args.slots.to_string()]);
            }
        }
        let child = command
            .args(["--network", &args.network.name])
            .env("TESSERA_HOME", &p_home)
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start a provider")?;
        children.0.push(child);
        let n = children.0.len() - 1;
        let info = wait_for_file(
            &p_home.join("provider.json"),
            &mut children.0[n],
            "a provider",
        )?;
        providers.push(json!({ "pid": info["pid"], "node": info["node"], "home": p_home }));
    }

    if args.train.train_demo {
        return train_demo(
            home, &args, &api_base, &key, &gw, &ticket, providers, children,
        );
    }
    // Wait until the gateway lists every provider.
    let health = format!("{}/health", api_base.trim_end_matches("/v1"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let joined = reqwest::blocking::get(&health)
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .and_then(|v| v["backend"]["providers"].as_array().map(Vec::len))
            .unwrap_or(0);
        if joined >= args.providers {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {joined} of {} providers joined the gateway within 60 s",
                args.providers
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every newcomer gets a canary at once (unless canaries are off): wait
    // for those, so the devnet is up with providers the router already
    // trusts to answer (a provider that never finished a job ranks like a
    // full one).
    let canaries_off = std::env::var("TESSERA_CANARY_INTERVAL")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(|v| v <= 0.0);
    if !canaries_off {
        let status = format!("{}/api/status", api_base.trim_end_matches("/v1"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let proven = reqwest::blocking::get(&status)
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .and_then(|v| {
                    v["providers"].as_array().map(|ps| {
                        ps.iter()
                            .filter(|p| p["jobs_done"].as_u64().is_some_and(|n| n > 0))
                            .count()
                    })
                })
                .unwrap_or(0);
            if proven >= args.providers || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let path = home.join("endpoint.json");
    let endpoint = json!({
        "api_base": api_base,
        "api_key": key,
        "operator_token": gw["operator_token"],
        "ticket": ticket,
        "gateway": { "pid": gw["pid"], "node": gw["node"], "home": gw_home },
        // `tessera account …` in this home works on the devnet's ledger.
        "ledger": gw["ledger"],
        "providers": providers,
    });
    crate::process::write_json(&path, &endpoint)?;
    let _endpoint_file = EndpointFile(path.clone());
    println!(
        "Tessera devnet is up: 1 gateway and {} providers on loopback ({})",
        args.providers, model.alias
    );
    println!("  API:       {api_base}");
    println!("  API key:   {key}  (demo account, 1000 credits)");
    println!(
        "  dashboard: {}/dashboard#token={}  (the operator's view; `tessera status` prints the same)",
        api_base.trim_end_matches("/v1"),
        gw["operator_token"].as_str().unwrap_or_default()
    );
    println!("  ticket:    {ticket}");
    println!(
        "  operator:  {operator}  (the devnet's network key: {}; certify more gateways with `tessera network certify` there)",
        base.join("network.key").display()
    );
    for (i, p) in providers.iter().enumerate() {
        println!(
            "  provider {i}: pid {} node {}",
            p["pid"],
            p["node"].as_str().unwrap_or_default()
        );
    }
    println!("  details:   {}", path.display());
    println!("Try:\n  curl {api_base}/chat/completions -H 'Content-Type: application/json' -H 'Authorization: Bearer {key}' \\\n    -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Say hello\"}}]}}'", model.alias);
    println!("Ctrl-C stops the devnet.");
    run_until_stopped(children)
}

/// The devnet is a network with its own operator (key in `base`), which
/// certifies the devnet's gateway so that providers serve it (see
/// `tessera_net::admission`). Returns the operator's key.
fn certify_gateway(base: &Path, gw_home: &Path, network: &str) -> anyhow::Result<String> {
    use tessera_net::admission::{load_or_create_operator_key, Certificate};
    use tessera_net::node::{load_or_create_key, node_id};
    let operator = load_or_create_operator_key(base)?;
    let gateway = node_id(&load_or_create_key(gw_home)?.public());
    let certificate = Certificate::issue(
        &operator,
        network,
        gateway,
        Duration::from_secs(30 * 86_400),
    );
    crate::process::write_private(&gw_home.join("gateway.cert"), &certificate)?;
    Ok(node_id(&operator.public()).to_string())
}

/// The digits set's training part, split over `providers` (IID, or
/// Dirichlet(α) label shares), seeded as the benchmark splits it.
fn demo_shards(
    providers: usize,
    alpha: Option<f64>,
) -> anyhow::Result<Vec<tessera_train::Dataset>> {
    use tessera_train::data::{digits_split, partition, Split};
    let (train, _) = digits_split()?;
    let split = match alpha {
        Some(a) if a.is_finite() && a > 0.0 => Split::Dirichlet(a),
        Some(a) => bail!("--non-iid {a}: α must be above 0"),
        None => Split::Iid,
    };
    let parts = partition(&train, providers.max(1), split, 7);
    Ok(parts.iter().map(|p| train.subset(p)).collect())
}

/// `devnet --train-demo`: one federated task over the providers, watched
/// to completion, compared with the same model trained centrally.
#[allow(clippy::too_many_arguments)]
fn train_demo(
    home: &Path,
    args: &DevnetArgs,
    api_base: &str,
    key: &str,
    gw: &Value,
    ticket: &str,
    providers: Vec<Value>,
    children: Children,
) -> anyhow::Result<()> {
    use tessera_train::{simulate, CandleTrainer, ModelSpec, Recipe};
    let t = &args.train;
    let n = args.providers.max(1);
    let strategy = match t.strategy.as_str() {
        "fedavg" => json!({"strategy": "fed_avg"}),
        "fedprox" => json!({"strategy": "fed_prox", "mu": 0.01}),
        "fedavgm" => json!({"strategy": "fed_avg_m", "server_lr": 1.0, "momentum": 0.5}),
        other => bail!("--strategy {other}: fedavg, fedprox or fedavgm"),
    };
    // Every provider takes part in every round; a round goes on with at
    // least 60% of them (SecAgg: at least 3).
    let min_clients = ((n * 3).div_ceil(5))
        .max(if t.secagg { 3 } else { 1 })
        .min(n);
    let task = json!({
        "model": {"kind": "mlp", "inputs": 64, "hidden": 64, "classes": 10},
        "strategy": strategy,
        "rounds": t.rounds,
        "clients_per_round": n,
        "min_clients": min_clients,
        "recipe": {"epochs": t.local_epochs, "batch_size": 32, "learning_rate": 0.1},
        "seed": 1,
        "secagg": t.secagg,
        "max_price_per_round": 1_000,
        "round_deadline_s": 60,
        "wait_for_clients_s": 120,
        "test": "digits",
    });
    // Every provider in before the first round.
    let status_url = format!("{}/api/status", api_base.trim_end_matches("/v1"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let joined = reqwest::blocking::get(&status_url)
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .and_then(|v| v["training"]["providers"].as_u64())
            .unwrap_or(0);
        if joined as usize >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {joined} of {n} training providers joined within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let path = home.join("endpoint.json");
    crate::process::write_json(
        &path,
        &json!({
            "api_base": api_base, "api_key": key, "operator_token": gw["operator_token"],
            "ticket": ticket,
            "gateway": { "pid": gw["pid"], "node": gw["node"] },
            "ledger": gw["ledger"], "providers": providers,
        }),
    )?;
    let _endpoint_file = EndpointFile(path);
    let started = Instant::now();
    let created = crate::training::create(api_base, key, &task)?;
    let id = created["id"].as_str().unwrap_or_default().to_string();
    if !t.json {
        println!(
            "Tessera devnet: {n} providers training an MLP on shards of the digits set ({}{})",
            match t.non_iid {
                Some(a) => format!("non-IID, Dirichlet α = {a}"),
                None => "IID".into(),
            },
            if t.secagg { ", SecAgg+" } else { "" }
        );
        println!(
            "  dashboard: {}/dashboard  task {id}",
            api_base.trim_end_matches("/v1")
        );
    }
    let done = crate::training::watch(api_base, key, &id, t.json)?;
    let seconds = started.elapsed().as_secs_f64();
    // The same model trained on all the data in one place, for as many
    // passes over it as the federation made.
    let spec = ModelSpec::Mlp {
        inputs: 64,
        hidden: 64,
        classes: 10,
    };
    let (train, test) = tessera_train::data::digits_split()?;
    let trainer = CandleTrainer::new(spec, 1)?;
    let recipe = Recipe {
        epochs: 1,
        batch_size: 32,
        learning_rate: 0.1,
        proximal: 0.0,
        seed: 0,
    };
    let passes = done["rounds_done"].as_u64().unwrap_or(0) as u32 * t.local_epochs.max(1);
    let central = simulate::centralized(&trainer, &train, &test, spec, &recipe, passes.max(1), 1)?;
    let history = done["history"].as_array().cloned().unwrap_or_default();
    let dropped: usize = history
        .iter()
        .map(|r| r["dropped"].as_object().map_or(0, |d| d.len()))
        .sum();
    let summary = json!({
        "task": id,
        "status": done["status"],
        "providers": n,
        "split": match t.non_iid { Some(a) => format!("dirichlet({a})"), None => "iid".into() },
        "secagg": t.secagg,
        "strategy": t.strategy,
        "rounds": done["rounds_done"],
        "local_epochs": t.local_epochs,
        "accuracy": done["accuracy"],
        "centralized_accuracy": central.accuracy,
        "bytes_per_client_round": done["bytes_per_client_round"],
        "seconds": seconds,
        "seconds_per_round": seconds / history.len().max(1) as f64,
        "rounds_completed": history.iter().filter(|r| r["aggregated"].as_u64().unwrap_or(0) > 0).count(),
        // Rounds to reach 95% on the held-out digits (null: never).
        "rounds_to_95": history.iter().find(|r| r["accuracy"].as_f64().unwrap_or(0.0) >= 0.95).map(|r| r["round"].clone()),
        "dropped": dropped,
        "escrow": done["escrow"],
    });
    if t.json {
        println!("{summary}");
        drop(children);
        return Ok(());
    }
    println!(
        "done: accuracy {:.2}% after {} rounds (centralized: {:.2}%), {} bytes per provider per round, {seconds:.1} s",
        done["accuracy"].as_f64().unwrap_or(0.0) * 100.0,
        done["rounds_done"],
        central.accuracy * 100.0,
        done["bytes_per_client_round"],
    );
    println!("`tessera train fetch {id}` saves the model; Ctrl-C stops the devnet.");
    run_until_stopped(children)
}
