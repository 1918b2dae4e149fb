//! `tessera bench gateway`: how many concurrent streams one gateway holds.
//!
//! Starts a real `tessera gateway` and N `tessera provider --synthetic`
//! processes (a SYNTHETIC engine that echoes prompt tokens at a fixed pace,
//! so llama.cpp is not the bottleneck), then opens all the streams at once
//! through the gateway's HTTP API and follows every one to its end. It
//! reports how many completed, how many were open at the same time, time to
//! first token, delivered tokens, and the gateway process's memory and CPU.
//! Load generator, gateway and providers share this machine's cores.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::network::{start, stream};
use super::stats::percentile;
use crate::process::Children;

#[derive(Args)]
pub struct GatewayBench {
    /// Model whose tokenizer the gateway uses (no weights are run).
    #[arg(long, default_value = tessera_models::DEFAULT_MODEL.alias)]
    pub model: String,
    /// Streams opened at once.
    #[arg(long, default_value_t = 2000)]
    pub streams: usize,
    /// Synthetic provider processes sharing them.
    #[arg(long, default_value_t = 4)]
    pub providers: usize,
    /// Tokens per stream.
    #[arg(long, default_value_t = 100)]
    pub tokens: usize,
    /// Pace of each stream (tokens/s).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
}

/// Resident memory (KiB) and CPU seconds so far of process `pid`.
pub(crate) fn usage_of(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field of the line, stime the 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((rss, ticks / 100.0))
}

pub fn run(home: &Path, b: GatewayBench) -> anyhow::Result<()> {
    let model = crate::models::resolve_or_pull(home, &b.model)?;
    let (gateway, api, endpoint) = start(
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--bind",
            "127.0.0.1:0",
            "--demo-account",
            // Synthetic providers send no proofs; the gateway's own load
            // is measured, not its auditor's.
            "--no-audit",
        ],
        &model.path,
    )?;
    let gateway_pid = gateway.child.0[0].id();
    let ticket = endpoint["ticket"]
        .as_str()
        .context("no ticket")?
        .to_string();
    let slots = b.streams.div_ceil(b.providers.max(1)) + 16;
    let homes: Vec<tempfile::TempDir> = (0..b.providers)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let mut providers = Children(vec![]);
    for h in &homes {
        providers.0.push(
            Command::new(std::env::current_exe()?)
                .args(["provider", "--gateway", &ticket, "--bind", "127.0.0.1:0"])
                .args(["--synthetic", &b.rate.to_string()])
                .args(["--slots", &slots.to_string(), "--model"])
                .arg(&model.path)
                .env("TESSERA_HOME", h.path())
                .env("TESSERA_LOG", "error")
                .stdout(Stdio::null())
                .spawn()
                .context("cannot start a synthetic provider")?,
        );
    }
    let health = format!("{}/health", api.base.trim_end_matches("/v1"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = reqwest::blocking::get(&health)
            .ok()
            .and_then(|r| r.json::<serde_json::Value>().ok())
            .and_then(|v| v["backend"]["providers"].as_array().map(Vec::len))
            .unwrap_or(0);
        if listed == b.providers {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {listed} of {} synthetic providers joined",
                b.providers
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "tessera bench gateway: {} streams of {} tokens at {} tok/s each through one gateway, \
         {} SYNTHETIC-engine providers (no model runs; tokenizer of {})",
        b.streams, b.tokens, b.rate, b.providers, model.alias
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let body = json!({"model": model.alias,
        "messages": [{"role": "user", "content": "Tell me about the sea and the ships upon it."}],
        "max_tokens": b.tokens, "ignore_eos": true, "stream": true});
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (before_rss, before_cpu) =
        usage_of(gateway_pid).context("cannot read the gateway's usage")?;
    let started = Instant::now();
    let (results, peak_rss) = rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(b.streams)
            .timeout(Duration::from_secs(600))
            .build()?;
        let sampler = {
            let in_flight = in_flight.clone();
            let peak = peak.clone();
            tokio::spawn(async move {
                let mut peak_rss = 0;
                loop {
                    peak.fetch_max(in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
                    if let Some((rss, _)) = usage_of(gateway_pid) {
                        peak_rss = peak_rss.max(rss);
                    }
                    if Arc::strong_count(&in_flight) == 1 {
                        return peak_rss;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..b.streams {
            let (client, base, key, body, in_flight) = (
                client.clone(),
                api.base.clone(),
                api.key.clone(),
                body.clone(),
                in_flight.clone(),
            );
            tasks.spawn(async move {
                in_flight.fetch_add(1, Ordering::Relaxed);
                let r = stream(&client, &base, &key, &body).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                r.map_err(|e| e.to_string())
            });
        }
        drop(in_flight);
        let mut results = Vec::new();
        while let Some(r) = tasks.join_next().await {
            results.push(r.map_err(|e| e.to_string()).and_then(|r| r));
        }
        anyhow::Ok((results, sampler.await.unwrap_or(0)))
    })?;
    let wall = started.elapsed().as_secs_f64();
    let (_, after_cpu) = usage_of(gateway_pid).unwrap_or((0, before_cpu));
    let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let ttft: Vec<f64> = ok.iter().map(|s| s.0).collect();
    let rates: Vec<f64> = ok.iter().map(|s| s.1).collect();
    let tokens = ok.len() * b.tokens;
    println!();
    println!("  streams completed          {} / {}", ok.len(), b.streams);
    if let Some(e) = failed.first() {
        println!("  first failure              {e}");
    }
    println!(
        "  most streams open at once  {}",
        peak.load(Ordering::Relaxed)
    );
    println!(
        "  time to first token        p50 {:.1} ms, p99 {:.1} ms",
        percentile(ttft.clone(), 0.5),
        percentile(ttft, 0.99)
    );
    println!(
        "  per-stream rate            p50 {:.2} tok/s, p1 {:.2} tok/s (paced at {})",
        percentile(rates.clone(), 0.5),
        percentile(rates, 0.01),
        b.rate
    );
    println!(
        "  delivered                  {tokens} tokens in {wall:.1} s = {:.0} tok/s",
        tokens as f64 / wall
    );
    println!(
        "  gateway process            peak RSS {:.0} MiB (idle {:.0} MiB), CPU {:.2} cores",
        peak_rss as f64 / 1024.0,
        before_rss as f64 / 1024.0,
        (after_cpu - before_cpu) / wall
    );
    drop(providers);
    drop(gateway);
    Ok(())
}
