//! `tessera bench server`: Tessera's API against llama.cpp's own server.
//!
//! Both sides are separate processes on loopback, serving the same GGUF
//! file with the same threads, slots and context per slot, and both are
//! driven by the same client through the OpenAI streaming API
//! (`/v1/completions`, greedy, end of generation ignored so every stream
//! generates the same number of tokens). They take turns: for every
//! (model, streams) cell the benchmark starts `tessera serve`, measures,
//! stops it, then does the same with `llama-server`, `--runs` times, and
//! reports medians, so drift in the machine's speed hits both alike.
//!
//! Prompts differ per stream and per run (a number in front), and
//! llama-server is asked not to reuse its prompt cache, so neither side
//! skips a prefill the other does.
//!
//! Figures: aggregate decode (generated tokens of all streams ÷ wall time
//! from the first request to the last token) at each stream count;
//! single-stream decode after a 512-token prompt (tokens after the first ÷
//! time after the first), and prefill (prompt tokens ÷ time to first token).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::network::{start, Api};
use super::stats::median;
use crate::process::Children;

#[derive(Args, Clone)]
pub struct ServerBench {
    /// Folder with llama.cpp's `llama-server` (`scripts/llama-ref.sh`
    /// builds it and prints the folder).
    #[arg(long, env = "TESSERA_LLAMA_BIN")]
    pub llama_bin: PathBuf,
    /// Models to compare (aliases, hashes or GGUF paths).
    #[arg(long, value_delimiter = ',', default_values_t = [
        tessera_models::DEFAULT_MODEL.alias.to_string(),
        tessera_models::SMOLLM2_Q4_1.alias.to_string(),
    ])]
    pub models: Vec<String>,
    /// Concurrent streams (each side gets as many slots).
    #[arg(long, value_delimiter = ',', default_value = "1,8,16")]
    pub streams: Vec<usize>,
    /// Tokens generated per stream.
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Prompt of the long-prompt run.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Turns per side (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// CPU threads on both sides (default: the physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Context per slot on both sides.
    #[arg(long, default_value_t = 2048)]
    pub context: usize,
}

impl ServerBench {
    /// The default comparison, as `tessera bench engine --llama-bin` runs it.
    pub fn defaults(llama_bin: PathBuf, threads: Option<usize>, tokens: usize) -> Self {
        ServerBench {
            llama_bin,
            models: vec![
                tessera_models::DEFAULT_MODEL.alias.to_string(),
                tessera_models::SMOLLM2_Q4_1.alias.to_string(),
            ],
            streams: vec![1, 8, 16],
            tokens,
            prompt_tokens: 512,
            runs: 3,
            threads,
            context: 2048,
        }
    }
}

/// One server under test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Tessera,
    LlamaServer,
}

/// A server process, stopped when dropped (the fields are held only for
/// that).
enum Process {
    Tessera(#[allow(dead_code)] super::network::Proc),
    LlamaServer(#[allow(dead_code)] Children),
}

/// A running server: its process and API.
struct Running {
    _proc: Process,
    api: Api,
    /// The model name requests carry.
    model: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn launch(
    side: Side,
    b: &ServerBench,
    model: &Path,
    alias: &str,
    slots: usize,
    threads: usize,
) -> anyhow::Result<Running> {
    match side {
        Side::Tessera => {
            let (slots, threads, context) = (
                slots.to_string(),
                threads.to_string(),
                b.context.to_string(),
            );
            let (proc, api, _) = start(
                &[
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--slots",
                    &slots,
                    "--threads",
                    &threads,
                    "--context",
                    &context,
                ],
                model,
            )?;
            Ok(Running {
                _proc: Process::Tessera(proc),
                api,
                model: alias.to_string(),
            })
        }
        Side::LlamaServer => {
            let port = free_port()?;
            let exe = b.llama_bin.join("llama-server");
            let child = Command::new(&exe)
                .arg("-m")
                .arg(model)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
                .args(["-np", &slots.to_string()])
                .args(["-c", &(slots * b.context).to_string()])
                .args(["-b", "512", "-ub", "512", "--kv-unified", "--no-webui"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {}", exe.display()))?;
            let mut proc = Children(vec![child]);
            let base = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let ok = reqwest::blocking::get(format!("{base}/health"))
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    break;
                }
                if let Ok(Some(status)) = proc.0[0].try_wait() {
                    bail!("llama-server exited: {status}");
                }
                if Instant::now() > deadline {
                    bail!("llama-server did not start");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(Running {
                _proc: Process::LlamaServer(proc),
                api: Api {
                    base: format!("{base}/v1"),
                    key: "none".into(),
                },
                model: alias.to_string(),
            })
        }
    }
}

/// What one streamed completion showed the client.
struct Streamed {
    ttft: Duration,
    /// From the first token to the last.
    after_first: Duration,
    tokens: usize,
    prompt_tokens: usize,
    end: Instant,
}

async fn complete(
    client: &reqwest::Client,
    run: &Running,
    prompt: &str,
    tokens: usize,
) -> anyhow::Result<Streamed> {
    let body = json!({
        "model": run.model, "prompt": prompt, "max_tokens": tokens,
        "temperature": 0, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true},
        // llama-server: no reuse of a slot's earlier prompt.
        "cache_prompt": false,
    });
    let start = Instant::now();
    let resp = client
        .post(format!("{}/completions", run.api.base))
        .bearer_auth(&run.api.key)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let (mut first, mut last) = (None, None);
    let (mut chunks, mut usage) = (0usize, None);
    super::sse::each_event(resp, |v| {
        if v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            chunks += 1;
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some((
                u["completion_tokens"].as_u64().unwrap_or(0) as usize,
                u["prompt_tokens"].as_u64().unwrap_or(0) as usize,
            ));
        }
    })
    .await?;
    let (first, last) = (
        first.context("no token in the stream")?,
        last.unwrap_or(start),
    );
    let (tokens, prompt_tokens) = usage.unwrap_or((chunks, 0));
    Ok(Streamed {
        ttft: first - start,
        after_first: last - first,
        tokens,
        prompt_tokens,
        end: last,
    })
}

/// A prompt of about `words` words of ordinary English, made distinct by
/// `tag`.
fn prompt(tag: usize, words: usize) -> String {
    let para = "The history of computing is a story of people finding new ways to share scarce \
                machines. Early computers were rare and expensive, so researchers queued for \
                hours to run their programs. Time-sharing systems later let many users work on \
                one machine at once, each with the illusion of having it alone.";
    let mut out = format!("{tag}. ");
    let mut n = 0;
    while n < words {
        for w in para.split(' ') {
            if n == words {
                break;
            }
            out.push_str(w);
            out.push(' ');
            n += 1;
        }
    }
    out
}

/// One cell's figures from one turn.
#[derive(Default, Clone, Copy)]
struct Cell {
    aggregate: f64,
    long_decode: f64,
    prefill: f64,
    long_prompt: usize,
}

fn measure(
    rt: &tokio::runtime::Runtime,
    run: &Running,
    b: &ServerBench,
    streams: usize,
    turn: usize,
    long: bool,
) -> anyhow::Result<Cell> {
    // A fresh connection per request: no keep-alive race with a server
    // closing an idle connection as the next request goes out.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    rt.block_on(async {
        // Warm-up: the first request of a fresh process pays for page
        // faults and thread start-up.
        complete(&client, run, &prompt(9999, 24), 8).await?;
        let start = Instant::now();
        let jobs = (0..streams).map(|s| {
            let p = prompt(turn * 1000 + s, 24);
            let c = &client;
            async move { complete(c, run, &p, b.tokens).await }
        });
        let results = futures::future::join_all(jobs).await;
        let mut total = 0;
        let mut end = start;
        for r in results {
            let r = r?;
            total += r.tokens;
            end = end.max(r.end);
        }
        let mut cell = Cell {
            aggregate: total as f64 / (end - start).as_secs_f64(),
            ..Cell::default()
        };
        if long {
            // ~0.75 words per token for this text.
            let words = b.prompt_tokens * 3 / 4;
            let r = complete(&client, run, &prompt(turn * 1000 + 999, words), b.tokens).await?;
            cell.long_decode = (r.tokens.saturating_sub(1)) as f64 / r.after_first.as_secs_f64();
            cell.prefill = r.prompt_tokens as f64 / r.ttft.as_secs_f64();
            cell.long_prompt = r.prompt_tokens;
        }
        anyhow::Ok(cell)
    })
}

pub fn run(home: &Path, b: ServerBench) -> anyhow::Result<()> {
    let threads = b.threads.unwrap_or_else(tessera_llama::physical_cores);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "tessera bench server: tessera serve vs llama-server ({}), {threads} threads, \
         {} tokens per stream, greedy, median of {} turns each",
        b.llama_bin.display(),
        b.tokens,
        b.runs
    );
    for name in &b.models {
        let model = crate::models::resolve_or_pull(home, name)?;
        println!();
        println!(
            "{} ({}), context {} per slot; slots = streams",
            model.alias,
            &model.sha256[..12],
            b.context
        );
        println!(
            "  {:>7} {:>14} {:>14} {:>7}",
            "streams", "tessera tok/s", "llama-server", "ratio"
        );
        let mut long = [Vec::new(), Vec::new()];
        for &streams in &b.streams {
            let mut agg = [Vec::new(), Vec::new()];
            for turn in 0..b.runs.max(1) {
                for (i, side) in [Side::Tessera, Side::LlamaServer].into_iter().enumerate() {
                    let run = launch(side, &b, &model.path, &model.alias, streams, threads)?;
                    let what = match side {
                        Side::Tessera => "tessera serve",
                        Side::LlamaServer => "llama-server",
                    };
                    let cell = measure(&rt, &run, &b, streams, turn, streams == 1)
                        .with_context(|| format!("{what}, {streams} streams"))?;
                    agg[i].push(cell.aggregate);
                    if streams == 1 {
                        long[i].push(cell);
                    }
                }
            }
            let (t, l) = (median(agg[0].clone()), median(agg[1].clone()));
            println!("  {streams:>7} {t:>14.1} {l:>14.1} {:>6.2}x", t / l);
        }
        if !long[0].is_empty() {
            let pick = |v: &[Cell], f: fn(&Cell) -> f64| median(v.iter().map(f).collect());
            let n = long[0][0].long_prompt.max(long[1][0].long_prompt);
            println!("  one stream after a {n}-token prompt:");
            for (label, f) in [
                (
                    "decode tok/s",
                    (|c: &Cell| c.long_decode) as fn(&Cell) -> f64,
                ),
                ("prefill tok/s", |c: &Cell| c.prefill),
            ] {
                let (t, l) = (pick(&long[0], f), pick(&long[1], f));
                println!("  {label:>22} {t:>14.1} {l:>14.1} {:>6.2}x", t / l);
            }
        }
    }
    Ok(())
}
