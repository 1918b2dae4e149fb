//! `tessera bench network`: what the network hop costs.
//!
//! Starts `tessera serve` and a one-provider `tessera devnet` side by side
//! (separate processes, same model, same threads and slots, both building
//! an audit proof of every answer as providers do) and takes turns
//! sending them the same streamed requests through HTTP, so drift in the
//! machine's speed hits both alike. Then it times the router's decision
//! among 10,000 simulated providers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use super::stats::percentile;
use crate::process::Children;

#[derive(Args)]
pub struct NetworkBench {
    /// Model to serve (alias, sha256 or GGUF path).
    #[arg(long, default_value = tessera_models::DEFAULT_MODEL.alias)]
    pub model: String,
    /// Time-to-first-token samples per side.
    #[arg(long, default_value_t = 60)]
    pub samples: usize,
    /// Tokens per throughput stream.
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Throughput streams per side, one at a time.
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    /// Simulated providers for the router timing.
    #[arg(long, default_value_t = 10_000)]
    pub providers: usize,
    /// Only time the router (no servers started).
    #[arg(long)]
    pub router_only: bool,
}

/// A child process (stopped like the devnet's children when dropped) and
/// the home folder it ran in, removed after it. Field order matters: the
/// process stops before its folder goes.
pub(crate) struct Proc {
    pub(crate) child: Children,
    _home: tempfile::TempDir,
}

/// An API to call: its base URL and a key.
pub(crate) struct Api {
    pub(crate) base: String,
    pub(crate) key: String,
}

/// Start `tessera ARGS…` in a fresh home and wait for its endpoint.json;
/// returns the process and that file's `api_base` and contents.
pub(crate) fn start(args: &[&str], model: &Path) -> anyhow::Result<(Proc, Api, Value)> {
    let home = tempfile::tempdir()?;
    let child = Command::new(std::env::current_exe()?)
        .args(args)
        .arg("--model")
        .arg(model)
        .env("TESSERA_HOME", home.path())
        .env("TESSERA_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start tessera {}", args.join(" ")))?;
    let endpoint: PathBuf = home.path().join("endpoint.json");
    let mut proc = Proc {
        child: Children(vec![child]),
        _home: home,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = std::fs::read(&endpoint)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        {
            if let (Some(base), Some(key)) = (v["api_base"].as_str(), v["api_key"].as_str()) {
                let api = Api {
                    base: base.to_string(),
                    key: key.to_string(),
                };
                return Ok((proc, api, v));
            }
        }
        if let Ok(Some(status)) = proc.child.0[0].try_wait() {
            bail!("tessera {} exited: {status}", args.join(" "));
        }
        if Instant::now() > deadline {
            bail!("tessera {} did not start", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One streamed chat request: (ms to the first token — the first chunk with
/// content or a finish reason, not the role chunk — and tok/s after it).
pub(crate) async fn stream(
    client: &reqwest::Client,
    api: &str,
    key: &str,
    body: &Value,
) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let resp = client
        .post(format!("{api}/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await?
        .error_for_status()?;
    let mut first = None;
    let mut tokens = 0usize;
    super::sse::each_event(resp, |v| {
        let choice = &v["choices"][0];
        if choice["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
            || !choice["finish_reason"].is_null()
        {
            first.get_or_insert_with(Instant::now);
            tokens += 1;
        }
    })
    .await?;
    let first = first.context("no token in the stream")?;
    let rate = (tokens.saturating_sub(1)) as f64 / first.elapsed().as_secs_f64().max(1e-9);
    Ok(((first - start).as_secs_f64() * 1e3, rate))
}

pub fn run(home: &Path, b: NetworkBench) -> anyhow::Result<()> {
    if b.router_only {
        router(b.providers);
        return Ok(());
    }
    let model = crate::models::resolve_or_pull(home, &b.model)?;
    let (_serve, serve_api, _) = start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--slots",
            "4",
            "--proofs",
        ],
        &model.path,
    )?;
    let (_devnet, devnet_api, _) = start(
        &[
            "devnet",
            "--providers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--slots",
            "4",
            // `serve` has no auditor either: like with like.
            "--no-audit",
        ],
        &model.path,
    )?;
    println!("tessera bench network: {} — `tessera serve` vs a 1-provider devnet (gateway + iroh + provider)", model.alias);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();
    let ttft_body = json!({"model": model.alias, "messages": [{"role": "user", "content": "Say hello."}],
                           "max_tokens": 1, "temperature": 0, "stream": true});
    let long_body = json!({"model": model.alias, "messages": [{"role": "user", "content": "Write a long story."}],
                           "max_tokens": b.tokens, "ignore_eos": true, "temperature": 0, "stream": true});
    let (mut s_ttft, mut d_ttft, mut s_rate, mut d_rate) = (vec![], vec![], vec![], vec![]);
    rt.block_on(async {
        // Warm both paths (connections, caches) before measuring.
        for api in [&serve_api, &devnet_api] {
            for _ in 0..2 {
                stream(&client, &api.base, &api.key, &ttft_body).await?;
            }
        }
        let (s, d) = (&serve_api, &devnet_api);
        for _ in 0..b.samples {
            s_ttft.push(stream(&client, &s.base, &s.key, &ttft_body).await?.0);
            d_ttft.push(stream(&client, &d.base, &d.key, &ttft_body).await?.0);
        }
        for _ in 0..b.streams {
            s_rate.push(stream(&client, &s.base, &s.key, &long_body).await?.1);
            d_rate.push(stream(&client, &d.base, &d.key, &long_body).await?.1);
        }
        anyhow::Ok(())
    })?;
    println!();
    println!(
        "time to first token, {} samples each (ms)       p50      p90",
        b.samples
    );
    println!(
        "  tessera serve                            {:>8.2} {:>8.2}",
        percentile(s_ttft.clone(), 0.5),
        percentile(s_ttft.clone(), 0.9)
    );
    println!(
        "  devnet (gateway + iroh + provider)       {:>8.2} {:>8.2}",
        percentile(d_ttft.clone(), 0.5),
        percentile(d_ttft.clone(), 0.9)
    );
    println!(
        "  network adds p50                         {:>+8.2}",
        percentile(d_ttft, 0.5) - percentile(s_ttft, 0.5)
    );
    let (s, d) = (percentile(s_rate, 0.5), percentile(d_rate, 0.5));
    println!(
        "streaming, {} tokens, median of {} (tok/s)",
        b.tokens, b.streams
    );
    println!(
        "  tessera serve {s:.1}   devnet {d:.1}   ratio {:.3}",
        d / s
    );

    router(b.providers);
    Ok(())
}

/// Time the gateway's real pick — snapshot of the directory, filters,
/// ranking and claiming a slot — among `n` registered providers (simulated
/// sessions without connections), with varied loads, prices, throughput
/// and audit records.
pub(crate) fn router(n: usize) {
    use std::sync::Arc;
    use tessera_core::{NodeId, PartOutcome, Price};
    use tessera_net::directory::{Directory, Session};
    use tessera_net::router::Need;
    use tessera_protocol::ModelOffer;

    let directory = Arc::new(Directory::default());
    let sha = "ab".repeat(32);
    for i in 0..n {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
        bytes[31] = 1;
        let node = NodeId::from_bytes(bytes);
        directory.join(Session {
            node,
            node_hex: node.to_string(),
            id: i as u64,
            conn: None,
            offers: vec![ModelOffer {
                sha256: sha.clone(),
                alias: "model".into(),
                context_length: 2048,
                price: Price {
                    input: (i * 13 % 50) as u64,
                    output: (i * 17 % 100) as u64,
                },
            }],
            slots: 4 + i % 13,
            hardware: String::new(),
        });
        directory.record_part(
            &node,
            PartOutcome::Done,
            100,
            Some((i * 104_729 % 1000) as f64),
        );
        directory.record_audit(&node, i % 7 != 0);
    }
    let prefs = tessera_backend::RoutePrefs::any();
    let need = Need {
        sha256: &sha,
        tokens: 100,
        exclude: &[],
        prefs: &prefs,
        probe: false,
        prefix: None,
    };
    // Load: keep some slots claimed on every provider.
    let mut held = Vec::new();
    for _ in 0..n * 2 {
        if let Some(c) = directory.pick(&need) {
            held.push(c);
        }
    }
    let mut times = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let claim = std::hint::black_box(directory.pick(&need));
        times.push(t.elapsed().as_secs_f64() * 1e6);
        drop(claim);
    }
    println!(
        "router pick among {n} providers (snapshot, filters, ranking, slot claim; 2000 picks, {} slots held): p50 {:.1} µs, p99 {:.1} µs",
        held.len(),
        percentile(times.clone(), 0.5),
        percentile(times, 0.99)
    );
}
