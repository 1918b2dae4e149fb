//! `tessera devnet --diloco-demo`: worker processes on loopback training
//! the small language model on the `fortunes` text by DiLoCo, optionally
//! some at half speed, one killed and one joining mid-run, a cheater.
//! (`tessera train diloco` is in [`crate::training`].)

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

/// `tessera devnet --diloco-demo`'s settings.
#[derive(Args, Debug)]
pub struct DilocoDemoArgs {
    /// Run a DiLoCo task on the providers (each offering compute, no
    /// model loaded) and print its outer steps.
    #[arg(long)]
    pub diloco_demo: bool,
    /// DiLoCo demo: this many workers run at half speed (they get fewer
    /// inner steps, so nobody waits for them).
    #[arg(long, default_value_t = 0)]
    pub slow_workers: usize,
    /// DiLoCo demo: SIGKILL one worker a third of the way through and start
    /// a new one two thirds of the way through.
    #[arg(long)]
    pub churn: bool,
    /// DiLoCo demo: SIGKILL the gateway halfway through and start it
    /// again (same home, same ports): the task resumes from its last
    /// settled outer step, the workers redial.
    #[arg(long)]
    pub restart_gateway: bool,
    /// DiLoCo demo: the task as `tessera train diloco` takes it.
    #[command(flatten)]
    pub task: DilocoDemoTask,
    /// DiLoCo demo, test builds: one more worker that cheats this way.
    #[cfg(feature = "adversary")]
    #[arg(long)]
    pub diloco_cheat: Option<String>,
}

/// The demo task's settings.
#[derive(Args, Debug, Clone)]
pub struct DilocoDemoTask {
    /// DiLoCo demo: outer steps.
    #[arg(long, default_value_t = 16)]
    pub outer_steps: u32,
    /// DiLoCo demo: inner steps per outer step (H).
    #[arg(long, default_value_t = 400)]
    pub inner_steps: u32,
    /// DiLoCo demo: warm-up — H starts here and doubles each outer step.
    #[arg(long)]
    pub first_inner_steps: Option<u32>,
    /// DiLoCo demo: peak inner learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub inner_lr: f32,
    /// DiLoCo demo: outer learning rate.
    #[arg(long, default_value_t = 0.85)]
    pub outer_lr: f32,
    /// DiLoCo demo: outer Nesterov momentum.
    #[arg(long, default_value_t = 0.5)]
    pub outer_momentum: f32,
    /// DiLoCo demo: windows per inner step per worker.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// DiLoCo demo: share of (worker, outer step) pairs audited.
    #[arg(long, default_value_t = 0.08)]
    pub audit_rate: f64,
    /// DiLoCo demo: workers commit their state every this many steps.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u32,
    /// DiLoCo demo: model width (the smallest runs in the tests).
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// DiLoCo demo: tokens of context.
    #[arg(long, default_value_t = 32)]
    pub context: usize,
    /// DiLoCo demo: transformer blocks.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
}

fn worker_command(exe: &Path, ticket: &str, home: &Path, network: &str, slowdown: f64) -> Command {
    let mut c = Command::new(exe);
    c.args([
        "provider",
        "--gateway",
        ticket,
        "--bind",
        "127.0.0.1:0",
        "--train-only",
        "--compute",
    ])
    .args(["--compute-slowdown", &slowdown.to_string()])
    .args(["--network", network])
    .env("TESSERA_HOME", home)
    .stdout(Stdio::null());
    c
}

/// Per worker: the inner steps of its parts that went into an average
/// (paid or not), over the task's history.
fn averaged_steps(history: &[Value]) -> serde_json::Map<String, Value> {
    let mut out = std::collections::BTreeMap::<String, u64>::new();
    for step in history {
        for (node, w) in step["workers"].as_object().into_iter().flatten() {
            *out.entry(node.clone()).or_default() += w["steps"].as_u64().unwrap_or(0);
        }
    }
    out.into_iter().map(|(k, v)| (k, json!(v))).collect()
}

/// How the devnet starts its gateway again (`--restart-gateway`): its home,
/// and its command given the HTTP address to listen on.
pub(crate) struct GatewayRestart<'a> {
    pub home: &'a Path,
    pub command: &'a dyn Fn(&str) -> Command,
}

impl GatewayRestart<'_> {
    /// SIGKILL the gateway (`children.0[0]`) and start it again on the
    /// same HTTP address; returns once it has written its endpoint.json.
    fn kill_and_restart(
        &self,
        children: &mut crate::process::Children,
        api_base: &str,
    ) -> anyhow::Result<()> {
        let listen = api_base
            .trim_start_matches("http://")
            .trim_end_matches("/v1")
            .to_string();
        let old = &mut children.0[0];
        let _ = old.kill();
        let _ = old.wait();
        let endpoint = self.home.join("endpoint.json");
        let _ = std::fs::remove_file(&endpoint);
        children.0[0] = (self.command)(&listen)
            .spawn()
            .context("cannot start the gateway again")?;
        crate::process::wait_for_file(&endpoint, &mut children.0[0], "the restarted gateway")?;
        Ok(())
    }
}

/// `devnet --diloco-demo`: providers already started by the devnet are
/// not used; this starts the workers, runs the task and reports.
#[allow(clippy::too_many_arguments)]
pub(crate) fn demo(
    home: &Path,
    base: &Path,
    workers: usize,
    network: &str,
    args: &DilocoDemoArgs,
    json_out: bool,
    gw: &Value,
    mut children: crate::process::Children,
    gateway: &GatewayRestart<'_>,
) -> anyhow::Result<()> {
    let api_base = gw["api_base"].as_str().unwrap_or_default();
    let key = gw["api_key"].as_str().unwrap_or_default();
    let ticket = gw["ticket"]
        .as_str()
        .context("no ticket in the gateway's endpoint.json")?;
    let exe = std::env::current_exe()?;
    let n = workers.max(1);
    let mut pids = Vec::new();
    let start = |i: usize,
                 slowdown: f64,
                 extra: &[String],
                 children: &mut crate::process::Children|
     -> anyhow::Result<u32> {
        let h = base.join(format!("worker-{i}"));
        std::fs::create_dir_all(&h)?;
        let _ = std::fs::remove_file(h.join("provider.json"));
        let child = worker_command(&exe, ticket, &h, network, slowdown)
            .args(extra)
            .spawn()
            .context("cannot start a worker")?;
        let pid = child.id();
        children.0.push(child);
        Ok(pid)
    };
    for i in 0..n {
        let slowdown = if i < args.slow_workers { 2.0 } else { 1.0 };
        pids.push(start(i, slowdown, &[], &mut children)?);
    }
    #[cfg(feature = "adversary")]
    let cheaters = match &args.diloco_cheat {
        Some(mode) => {
            start(
                n,
                1.0,
                &["--diloco-cheat".to_string(), mode.clone()],
                &mut children,
            )?;
            1
        }
        None => 0,
    };
    #[cfg(not(feature = "adversary"))]
    let cheaters = 0;
    let status_url = format!("{}/api/status", api_base.trim_end_matches("/v1"));
    let joined = |want: usize| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let got = reqwest::blocking::get(&status_url)
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .and_then(|v| v["training"]["workers"].as_u64())
                .unwrap_or(0) as usize;
            if got >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {got} of {want} workers joined within 120 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    joined(n + cheaters)?;
    // endpoint.json, as a devnet writes it (`tessera train …` in this home
    // finds the gateway through it).
    let mut providers = Vec::new();
    for i in 0..n + cheaters {
        let h = base.join(format!("worker-{i}"));
        let k = children.0.len() - (n + cheaters) + i;
        let info = crate::process::wait_for_file(
            &h.join("provider.json"),
            &mut children.0[k],
            "a worker",
        )?;
        providers.push(json!({ "pid": info["pid"], "node": info["node"], "home": h }));
    }
    let path = home.join("endpoint.json");
    crate::process::write_json(
        &path,
        &json!({
            "api_base": api_base, "api_key": key, "operator_token": gw["operator_token"],
            "ticket": ticket, "gateway": { "pid": gw["pid"], "node": gw["node"] },
            "ledger": gw["ledger"], "providers": providers,
        }),
    )?;
    let _endpoint_file = crate::process::EndpointFile(path);
    let t = &args.task;
    let task = json!({
        "kind": "diloco",
        "model": {"vocab": 256, "context": t.context, "width": t.width, "layers": t.layers, "heads": 4},
        "outer_steps": t.outer_steps,
        "inner_steps": t.inner_steps,
        "first_inner_steps": t.first_inner_steps,
        "batch": t.batch,
        "workers": n + cheaters,
        "min_workers": 1,
        "optimizer": {"lr": t.inner_lr, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.01,
                      "warmup": 100.min(u64::from(t.outer_steps) * u64::from(t.inner_steps) / 10).max(1),
                      "total_steps": 0, "min_lr_ratio": 0.1},
        "outer_lr": t.outer_lr,
        "outer_momentum": t.outer_momentum,
        "seed": 1,
        "max_price_per_step": 10,
        "audit_rate": t.audit_rate,
        "checkpoint_every": t.checkpoint_every,
        "step_deadline_s": 3600,
        "wait_for_workers_s": 120,
    });
    let started = Instant::now();
    let created = crate::training::create(api_base, key, &task)?;
    let id = created["id"].as_str().unwrap_or_default().to_string();
    if !json_out {
        println!(
            "Tessera devnet: {n} workers training a {}-layer, {}-wide transformer on the fortunes text by DiLoCo (H = {}){}",
            t.layers,
            t.width,
            t.inner_steps,
            if args.slow_workers > 0 { format!(", {} at half speed", args.slow_workers) } else { String::new() }
        );
        println!(
            "  dashboard: {}/dashboard  task {id}",
            api_base.trim_end_matches("/v1")
        );
    }
    // Follow it; with --churn, kill a worker after a third and start a new
    // one after two thirds.
    let (kill_at, join_at) = (
        u64::from(t.outer_steps) / 3,
        u64::from(t.outer_steps) * 2 / 3,
    );
    let (mut killed, mut added, mut shown) = (None, None, 0usize);
    let mut restarted: Option<Value> = None;
    let done = loop {
        let s = match crate::training::status(api_base, key, &id) {
            Ok(s) => s,
            // The restarted gateway may still be loading its tasks.
            Err(_) if restarted.is_some() => {
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
            Err(e) => return Err(e),
        };
        if !json_out {
            crate::training::print_diloco_steps(&s, shown);
        }
        shown = s["history"].as_array().map_or(0, Vec::len);
        let at = s["outer_steps_done"].as_u64().unwrap_or(0);
        if args.churn && killed.is_none() && at >= kill_at.max(1) {
            // The last worker started (not a slow one): SIGKILL, mid-step.
            let victim = pids[n - 1];
            let _ = Command::new("kill")
                .args(["-KILL", &victim.to_string()])
                .status();
            killed = Some(at);
            if !json_out {
                println!(
                    "  killed worker {} (pid {victim}) during outer step {}",
                    n - 1,
                    at + 1
                );
            }
        }
        if args.churn && added.is_none() && at >= join_at.max(2) {
            start(n + 1, 1.0, &[], &mut children)?;
            added = Some(at);
            if !json_out {
                println!("  a new worker joins after outer step {at}");
            }
        }
        let settled = s["outer_steps_settled"].as_u64().unwrap_or(0);
        if args.restart_gateway && restarted.is_none() && at >= u64::from(t.outer_steps) / 2 {
            let at_kill = json!({"done": at, "settled": settled});
            gateway.kill_and_restart(&mut children, api_base)?;
            if !json_out {
                println!(
                    "  gateway SIGKILLed after outer step {at} ({settled} settled) and started again"
                );
            }
            restarted = Some(at_kill);
            continue;
        }
        if !matches!(s["status"].as_str(), Some("waiting" | "running")) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let seconds = started.elapsed().as_secs_f64();
    let t2 = &done["totals"];
    let history = done["history"].as_array().cloned().unwrap_or_default();
    let summary_json = json!({
        "task": id,
        "status": done["status"],
        "workers": n,
        "slow_workers": args.slow_workers,
        "outer_steps": done["outer_steps_done"],
        "inner_steps": t.inner_steps,
        "parameters": done["parameters"],
        "val_loss": done["val_loss"],
        "val_curve": history.iter().map(|r| r["val_loss"].clone()).collect::<Vec<_>>(),
        "workers_per_step": history.iter().map(|r| r["workers"].as_object().map_or(0, |w| w.len())).collect::<Vec<_>>(),
        "averaged_steps": averaged_steps(&history),
        "tokens": t2["tokens"],
        "train_steps": t2["train_steps"],
        "bytes": t2["bytes"],
        "data_parallel_bytes": t2["data_parallel_bytes"],
        "bytes_ratio": done["bytes_ratio"],
        "utilization": done["utilization"],
        "audits": t2["audits"],
        "audits_passed": t2["audits_passed"],
        "audits_failed": t2["audits_failed"],
        "audit_cost": done["audit_cost"],
        "struck": done["struck"],
        "churn": args.churn.then(|| json!({"killed_after": killed, "joined_after": added})),
        "gateway_restart": restarted.map(|r| json!({"killed_at": r, "resumed": done["resumed"]})),
        "seconds": seconds,
        "escrow": done["escrow"],
        "providers": done["providers"],
    });
    if json_out {
        println!("{summary_json}");
        drop(children);
        return Ok(());
    }
    crate::training::diloco_summary(&done);
    println!(
        "{:.1} s; `tessera train fetch {id}` saves the model; Ctrl-C stops the devnet.",
        seconds
    );
    crate::process::run_until_stopped(children)
}
