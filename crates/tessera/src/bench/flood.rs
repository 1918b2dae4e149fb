//! `tessera bench flood`: a gateway under a sybil flood, with honest
//! traffic through it (builds with the `testing` feature).
//!
//! Starts a real `tessera gateway` and one honest `tessera provider` (the
//! real model), measures the gateway's resident memory and the honest
//! requests' time to first token, then throws `tessera_net::flood` at it —
//! `--sybils` fresh node ids announced on gossip and `--connections` QUIC
//! connections from fresh keys (slowloris handshakes, silent ones, stalling
//! providers that say Hello and never answer, garbage) — and measures the
//! same while the flood holds. The flood runs in this process, so it shares
//! the machine's cores with the gateway and the provider; audits and
//! canaries are off on both sides of the comparison.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use super::gateway::usage_of;
use super::network::{start, stream};
use super::stats::percentile;
use crate::process::Children;

#[derive(Args)]
pub struct FloodBench {
    /// Model the gateway and the honest provider serve.
    #[arg(long, default_value = tessera_models::DEFAULT_MODEL.alias)]
    pub model: String,
    /// Fresh node ids announced on the gateway's gossip topic.
    #[arg(long, default_value_t = 10_000)]
    pub sybils: usize,
    /// Connections opened to the gateway, each from a fresh node id.
    #[arg(long, default_value_t = 1_000)]
    pub connections: usize,
    /// Honest streamed requests per phase (one at a time).
    #[arg(long, default_value_t = 30)]
    pub requests: usize,
    /// CPU threads of the honest provider.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

fn health(base: &str) -> Option<Value> {
    reqwest::blocking::get(format!("{}/health", base.trim_end_matches("/v1")))
        .ok()?
        .json()
        .ok()
}

pub fn run(home: &Path, b: FloodBench) -> anyhow::Result<()> {
    let model = crate::models::resolve_or_pull(home, &b.model)?;
    let (gateway, api, endpoint) = start(
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--bind",
            "127.0.0.1:0",
            "--demo-account",
            "--no-audit",
            "--canary-interval",
            "0",
        ],
        &model.path,
    )?;
    let pid = gateway.child.0[0].id();
    let ticket: tessera_net::Ticket = endpoint["ticket"].as_str().context("no ticket")?.parse()?;
    let provider_home = tempfile::tempdir()?;
    let _provider = Children(vec![Command::new(std::env::current_exe()?)
        .args([
            "provider",
            "--gateway",
            &ticket.to_string(),
            "--bind",
            "127.0.0.1:0",
        ])
        .args([
            "--threads",
            &b.threads.to_string(),
            "--slots",
            "2",
            "--model",
        ])
        .arg(&model.path)
        .env("TESSERA_HOME", provider_home.path())
        .env("TESSERA_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the honest provider")?]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while health(&api.base)
        .and_then(|v| v["backend"]["providers"].as_array().map(Vec::len))
        .unwrap_or(0)
        < 1
    {
        if Instant::now() > deadline {
            bail!("the honest provider did not join");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "tessera bench flood: {} sybil ids on gossip + {} connections from fresh keys at one \
         gateway; {} honest streamed requests per phase to one real provider ({}, {} thread)",
        b.sybils, b.connections, b.requests, model.alias, b.threads
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let body = json!({"model": model.alias,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 16, "stream": true});
    let honest = |label: &str| -> (Vec<f64>, usize, u64) {
        let mut ttft = Vec::new();
        let mut failed = 0;
        let mut peak_rss = 0;
        for _ in 0..b.requests {
            match rt.block_on(stream(&client, &api.base, &api.key, &body)) {
                Ok((ms, _)) => ttft.push(ms),
                Err(e) => {
                    failed += 1;
                    eprintln!("  {label}: an honest request failed: {e}");
                }
            }
            peak_rss = peak_rss.max(usage_of(pid).map_or(0, |u| u.0));
        }
        (ttft, failed, peak_rss)
    };
    // Warm up, then the quiet phase.
    let _ = honest("warm-up");
    std::thread::sleep(Duration::from_secs(2));
    let idle_rss = usage_of(pid).context("cannot read the gateway's memory")?.0;
    let (quiet, quiet_failed, quiet_rss) = honest("quiet");
    // The flood, held while the second phase runs.
    let started = Instant::now();
    let sha = model.sha256.clone();
    let flood = rt.block_on(tessera_net::flood::start(
        &ticket,
        tessera_net::flood::FloodConfig {
            network: endpoint["network"]
                .as_str()
                .unwrap_or("tessera")
                .to_string(),
            sybils: b.sybils,
            role: tessera_net::discovery::Role::Provider,
            connections: b.connections,
            model_sha256: sha,
        },
    ))?;
    let flood_s = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let (during, during_failed, during_rss) = honest("flood");
    let view = health(&api.base).unwrap_or_default();
    let listed = view["backend"]["providers"].as_array().map_or(0, Vec::len);
    let discovered = view["backend"]["discovered"]["providers"]
        .as_array()
        .map_or(0, Vec::len);
    let open = flood.open();
    let opened = flood.opened();
    let announced = flood.announced;
    let held_rss = usage_of(pid).map_or(0, |u| u.0);
    rt.block_on(flood.close());
    let mib = |kib: u64| kib as f64 / 1024.0;
    let p50 = |v: &[f64]| percentile(v.to_vec(), 0.5);
    let p90 = |v: &[f64]| percentile(v.to_vec(), 0.9);
    println!();
    println!(
        "  flood sent                 {announced} announcements, {opened} connections in {flood_s:.1} s"
    );
    println!(
        "  gateway kept               {discovered} gossip records (bound {}), {listed} providers \
         listed (1 honest + stalling sybils), {open} flood connections still open",
        tessera_net::discovery::MAX_KNOWN
    );
    println!(
        "  gateway RSS                idle {:.0} MiB, quiet phase peak {:.0} MiB, flood phase peak \
         {:.0} MiB ({:.2}x idle), after the flood phase {:.0} MiB",
        mib(idle_rss),
        mib(quiet_rss),
        mib(during_rss.max(held_rss)),
        during_rss.max(held_rss) as f64 / idle_rss.max(1) as f64,
        mib(held_rss)
    );
    println!(
        "  honest TTFT                quiet p50 {:.1} ms p90 {:.1} ms; flood p50 {:.1} ms p90 {:.1} ms ({:.2}x)",
        p50(&quiet),
        p90(&quiet),
        p50(&during),
        p90(&during),
        p50(&during) / p50(&quiet).max(1e-9)
    );
    println!(
        "  honest requests failed     quiet {quiet_failed}, flood {during_failed} of {}",
        b.requests
    );
    Ok(())
}
