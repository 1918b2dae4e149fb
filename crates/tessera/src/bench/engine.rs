//! `tessera bench engine`: the engine against llama.cpp's own loop.
//!
//! It runs, in one process and on the same model and threads:
//! the minimal direct llama.cpp loop, the Tessera engine on one stream, the
//! engine at several concurrencies, and time to first token inside the
//! engine vs through the HTTP API on loopback; then it reports peak RSS.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tessera_api::accounts::LedgerAccounts;
use tessera_api::ApiConfig;
use tessera_backend::Backend;
use tessera_core::{GenerationRequest, SamplingParams, Token};
use tessera_engine::{ChatMessage, Event, Model, SchedulerHandle};

use super::stats::{median, percentile};
use crate::local;
use crate::EngineArgs;

#[derive(Args)]
pub struct DirectBench {
    /// Path to the GGUF file.
    #[arg(long)]
    pub model_file: std::path::PathBuf,
    #[arg(long)]
    pub threads: usize,
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Decode this many streams together in one llama.cpp batch (32-token
    /// prompts) instead of timing one stream.
    #[arg(long)]
    pub streams: Option<usize>,
}

/// What `bench direct` reports.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct DirectReport {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    tokens: Vec<Token>,
    /// Generated tokens per second over all streams (with `--streams`).
    aggregate_tok_s: f64,
}

/// Run `tessera bench direct` in a child process: llama.cpp's OpenMP thread
/// pools belong to the thread that first decodes, and two pools in one
/// process spin against each other on a small machine.
fn direct_child(
    model: &Path,
    threads: usize,
    tokens: usize,
    prompt_tokens: usize,
    streams: Option<usize>,
) -> anyhow::Result<DirectReport> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["bench", "direct", "--model-file"])
        .arg(model)
        .args([
            "--threads",
            &threads.to_string(),
            "--tokens",
            &tokens.to_string(),
        ])
        .args(["--prompt-tokens", &prompt_tokens.to_string()])
        .stderr(std::process::Stdio::inherit());
    if let Some(n) = streams {
        cmd.args(["--streams", &n.to_string()]);
    }
    let out = cmd.output().context("cannot run `tessera bench direct`")?;
    if !out.status.success() {
        bail!("`tessera bench direct` failed: {}", out.status);
    }
    serde_json::from_slice(&out.stdout).context("bad output from `bench direct`")
}

#[derive(Args)]
pub struct EngineBench {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Tokens generated per stream.
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Repetitions of the single-stream runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Concurrency levels for the aggregate-throughput runs.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub concurrency: Vec<usize>,
    /// Requests per time-to-first-token measurement.
    #[arg(long, default_value_t = 30)]
    pub ttft_samples: usize,
    /// Folder with llama.cpp's `llama-server`: then the run ends with
    /// `tessera bench server` (Tessera's API against llama-server on the
    /// default model and on the published Q4_1 file).
    #[arg(long, env = "TESSERA_LLAMA_BIN")]
    pub llama_bin: Option<std::path::PathBuf>,
}

/// A prompt of exactly `n` tokens of ordinary English.
fn prompt_of(model: &dyn Model, n: usize) -> anyhow::Result<Vec<Token>> {
    let para = "The history of computing is a story of people finding new ways to share scarce machines. \
                Early computers were rare and expensive, so researchers queued for hours to run their programs. \
                Time-sharing systems later let many users work on one machine at once, each with the illusion of having it alone. ";
    let mut tokens = model.tokenize(&para.repeat(n / 40 + 2), true)?;
    if tokens.len() < n {
        bail!("could not build a prompt of {n} tokens");
    }
    tokens.truncate(n);
    Ok(tokens)
}

/// Timings of one generation through the scheduler.
struct Timed {
    ttft: Duration,
    /// From the first to the last token.
    decode: Duration,
    tokens: Vec<Token>,
}

async fn generate(
    handle: &SchedulerHandle,
    prompt: Vec<Token>,
    max_tokens: usize,
) -> anyhow::Result<Timed> {
    let start = Instant::now();
    let mut rx = handle.submit(GenerationRequest {
        prompt,
        sampling: SamplingParams::greedy(),
        max_tokens: Some(max_tokens as u32),
        stop: Vec::new(),
        top_logprobs: 0,
        ignore_eos: true,
        cache: None,
    })?;
    let mut first = None;
    let mut tokens = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Token(t)) => {
                first.get_or_insert_with(Instant::now);
                tokens.push(t.token);
            }
            Some(Event::Done { .. }) => break,
            Some(Event::Error(e)) => return Err(e.into()),
            Some(Event::Proof { .. }) => {}
            None => bail!("engine stopped"),
        }
    }
    let first = first.context("no token generated")?;
    Ok(Timed {
        ttft: first - start,
        decode: first.elapsed(),
        tokens,
    })
}

pub(crate) fn sampling(home: &Path, args: &EngineArgs) -> anyhow::Result<()> {
    use tessera_engine::sampling::{logprobs, sample};
    let model = crate::models::resolve_or_pull(home, &args.model)?;
    let file = tessera_llama::LlamaModelFile::load(&model.path)?;
    let config = tessera_llama::EngineConfig {
        slots: 1,
        context_per_slot: 1024,
        threads: args.threads.unwrap_or_else(tessera_llama::physical_cores),
        hidden_states: true,
        ..tessera_llama::EngineConfig::default()
    };
    let mut engine = tessera_llama::LlamaEngine::new(&file, config)?;
    // Real distributions: every position of a prompt plus a story.
    let messages = vec![ChatMessage {
        role: "user".into(),
        content: "Tell me a story about a lighthouse keeper.".into(),
    }];
    let mut tokens = file.tokenize(&file.apply_chat_template(&messages)?, true)?;
    tokens.extend(prompt_of(file.as_ref(), 200)?);
    let mut rows: Vec<Vec<f32>> = Vec::new();
    tessera_engine::prefill_all(&mut engine, 0, &tokens, 0, &mut |_, l, _| {
        rows.push(l.to_vec())
    })?;
    println!(
        "tessera bench sampling: {} ({} logit rows of {} tokens)",
        model.alias,
        rows.len(),
        file.info().n_vocab
    );
    let settings = [
        ("greedy (T=0)", SamplingParams::greedy()),
        (
            "T=1, no filter",
            SamplingParams {
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        (
            "T=0.7, top_p=0.9",
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        (
            "T=1, top_k=40",
            SamplingParams {
                top_k: 40,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        (
            "T=1, min_p=0.05",
            SamplingParams {
                min_p: 0.05,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
    ];
    let reps = 5;
    for (name, p) in settings {
        let start = Instant::now();
        let mut sink = 0i64;
        for _ in 0..reps {
            for (pos, row) in rows.iter().enumerate() {
                sink += i64::from(sample(row, &p, pos as u32));
            }
        }
        let per = start.elapsed().as_secs_f64() * 1e6 / (reps * rows.len()) as f64;
        println!("  sample {name:<20} {per:>8.1} µs/token   (checksum {sink})");
    }
    for n in [0usize, 5] {
        let start = Instant::now();
        let mut sink = 0.0f32;
        for _ in 0..reps {
            for row in &rows {
                sink += logprobs(row, 0, n).0;
            }
        }
        let per = start.elapsed().as_secs_f64() * 1e6 / (reps * rows.len()) as f64;
        println!("  logprobs, top {n:<13} {per:>8.1} µs/token   (checksum {sink:.1})");
    }
    Ok(())
}

pub(crate) fn direct(b: DirectBench) -> anyhow::Result<()> {
    let file = tessera_llama::LlamaModelFile::load(&b.model_file)?;
    let report = match b.streams {
        None => {
            let prompt = prompt_of(file.as_ref(), b.prompt_tokens)?;
            let r = tessera_llama::direct::generate(&file, &prompt, b.tokens, b.threads)?;
            DirectReport {
                prefill_tok_s: r.prompt_tokens as f64 / r.prefill.as_secs_f64(),
                decode_tok_s: (r.generated.len() - 1) as f64 / r.decode.as_secs_f64(),
                tokens: r.generated,
                ..DirectReport::default()
            }
        }
        Some(n) => {
            let prompt = prompt_of(file.as_ref(), b.prompt_tokens)?;
            let rate = tessera_llama::direct::batched_rate(&file, &prompt, b.tokens, n, b.threads)?;
            DirectReport {
                aggregate_tok_s: rate,
                ..DirectReport::default()
            }
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub(crate) fn run(home: &Path, b: EngineBench) -> anyhow::Result<()> {
    let max_conc = b.concurrency.iter().copied().max().unwrap_or(1);
    let mut args = b.engine.clone();
    args.slots = args.slots.max(max_conc);
    let eng = local::start(home, &args, false)?;
    let threads = eng.config.threads;
    let model: Arc<dyn Model> = eng.file.clone();
    println!("tessera bench engine");
    println!(
        "model {} ({}), threads {threads}, slots {}, context/slot {}, {} CPUs online",
        eng.model.alias,
        &eng.model.sha256[..12],
        eng.config.slots,
        eng.config.context_per_slot,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let long = prompt_of(model.as_ref(), b.prompt_tokens)?;
    let runs = b.runs.max(1);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let handle = eng.handle.clone();

    // 1. One stream, same prompt: the direct loop (child process) and the
    // engine take turns, so drift in the machine's speed hits both alike.
    let (mut d_prefill, mut d_decode, mut t_prefill, mut t_decode) =
        (vec![], vec![], vec![], vec![]);
    let mut same = true;
    for _ in 0..runs {
        let d = direct_child(&eng.model.path, threads, b.tokens, b.prompt_tokens, None)?;
        d_prefill.push(d.prefill_tok_s);
        d_decode.push(d.decode_tok_s);
        let r = rt.block_on(generate(&handle, long.clone(), b.tokens))?;
        t_prefill.push(long.len() as f64 / r.ttft.as_secs_f64());
        t_decode.push((r.tokens.len() - 1) as f64 / r.decode.as_secs_f64());
        same &= d.tokens == r.tokens;
    }
    let (dp, dd, tp, td) = (
        median(d_prefill),
        median(d_decode),
        median(t_prefill),
        median(t_decode),
    );
    println!();
    println!(
        "single stream ({} prompt tokens, {} generated, median of {runs})",
        long.len(),
        b.tokens
    );
    println!(
        "  {:<22} {:>13} {:>13}",
        "", "prefill tok/s", "decode tok/s"
    );
    println!(
        "  {:<22} {:>13.1} {:>13.1}",
        "direct llama.cpp loop", dp, dd
    );
    println!("  {:<22} {:>13.1} {:>13.1}", "tessera engine", tp, td);
    println!(
        "  {:<22} {:>13.3} {:>13.3}",
        "ratio tessera/direct",
        tp / dp,
        td / dd
    );
    println!("  greedy tokens identical to the direct loop: {same}");

    // 2. Aggregate throughput at several concurrencies, each beside llama.cpp
    // decoding the same number of streams in one batch (the ceiling).
    println!();
    println!(
        "aggregate decode, {} tokens per stream, 32-token prompts (tok/s)",
        b.tokens
    );
    println!(
        "  {:>7} {:>14} {:>8} {:>22} {:>8}",
        "streams", "tessera engine", "vs 1", "direct llama.cpp batch", "vs 1"
    );
    let short = prompt_of(model.as_ref(), 32)?;
    let mut single = None;
    let mut d_single = None;
    for &c in &b.concurrency {
        let ceiling =
            direct_child(&eng.model.path, threads, b.tokens, 32, Some(c))?.aggregate_tok_s;
        let start = Instant::now();
        let results = rt.block_on(async {
            let jobs = (0..c).map(|_| generate(&handle, short.clone(), b.tokens));
            futures::future::join_all(jobs).await
        });
        let wall = start.elapsed().as_secs_f64();
        let mut total = 0usize;
        for r in results {
            total += r?.tokens.len();
        }
        let agg = total as f64 / wall;
        let base = *single.get_or_insert(agg);
        let d_base = *d_single.get_or_insert(ceiling);
        println!(
            "  {c:>7} {agg:>14.1} {:>7.2}x {ceiling:>22.1} {:>7.2}x",
            agg / base,
            ceiling / d_base
        );
    }

    // 4. Time to first token: inside the engine vs through HTTP on loopback.
    // Through the whole API, keys and escrow included (a ledger in a
    // temporary folder, SQLite with full sync, as `serve` runs it).
    let backend: Arc<dyn Backend> = Arc::new(eng.backend(Default::default()));
    let ledger_dir = tempfile::tempdir()?;
    let messages = vec![ChatMessage {
        role: "user".into(),
        content: "Say hello.".into(),
    }];
    let chat_prompt = model.tokenize(&model.apply_chat_template(&messages)?, true)?;
    let (engine_ttft, http_ttft) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let ledger =
            tessera_ledger::Ledger::open_file(&ledger_dir.path().join("ledger.db")).await?;
        let key = crate::accounts::demo_key(ledger_dir.path(), &ledger).await?;
        let accounts = Arc::new(LedgerAccounts::start(ledger, "bench".into(), 0).await?);
        let app = tessera_api::router(backend, accounts, ApiConfig::default());
        let server =
            tokio::spawn(async move { axum::serve(tessera_api::nodelay(listener), app).await });
        let client = reqwest::Client::new();
        let api = format!("http://{addr}/v1");
        let body = serde_json::json!({
            "model": eng.model.alias,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 1, "temperature": 0, "stream": true,
        });
        let mut e_ttft = Vec::new();
        let mut h_ttft = Vec::new();
        for i in 0..b.ttft_samples + 2 {
            let r = generate(&handle, chat_prompt.clone(), 1).await?;
            let (http_ms, _) = super::network::stream(&client, &api, &key, &body).await?;
            if i >= 2 {
                e_ttft.push(r.ttft.as_secs_f64() * 1e3);
                h_ttft.push(http_ms);
            }
        }
        server.abort();
        anyhow::Ok((e_ttft, h_ttft))
    })?;
    println!();
    println!(
        "time to first token, {}-token chat prompt, {} samples (ms)",
        chat_prompt.len(),
        engine_ttft.len()
    );
    println!("  {:<22} {:>8} {:>8}", "", "p50", "p90");
    println!(
        "  {:<22} {:>8.2} {:>8.2}",
        "inside the engine",
        percentile(engine_ttft.clone(), 0.5),
        percentile(engine_ttft.clone(), 0.9)
    );
    println!(
        "  {:<22} {:>8.2} {:>8.2}",
        "through HTTP",
        percentile(http_ttft.clone(), 0.5),
        percentile(http_ttft.clone(), 0.9)
    );
    println!(
        "  HTTP overhead p50: {:+.2} ms",
        percentile(http_ttft, 0.5) - percentile(engine_ttft, 0.5)
    );

    // 5. Memory.
    let kv =
        eng.file.kv_bytes_per_token() * (eng.config.slots * eng.config.context_per_slot) as u64;
    println!();
    if let Some(rss) = peak_rss_bytes() {
        let budget = eng.model.size + kv + 100 * 1024 * 1024;
        println!(
            "peak RSS {:.1} MiB; model file {:.1} MiB + KV cache {:.1} MiB + 100 MiB = {:.1} MiB budget ({})",
            rss as f64 / 1048576.0,
            eng.model.size as f64 / 1048576.0,
            kv as f64 / 1048576.0,
            budget as f64 / 1048576.0,
            if rss <= budget { "within" } else { "OVER" }
        );
    }
    drop(handle);
    drop(eng);
    drop(rt);
    if let Some(dir) = b.llama_bin {
        println!();
        let server = super::server::ServerBench::defaults(dir, b.engine.threads, b.tokens);
        super::server::run(home, server)?;
    }
    Ok(())
}
