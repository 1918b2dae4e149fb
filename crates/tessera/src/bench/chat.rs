//! `tessera bench chat`: multi-turn conversations with and without
//! prefix-aware routing.
//!
//! Agents and chats resend their whole history on every turn. This starts a
//! devnet (a gateway and `--providers` providers at `--threads` each) and
//! runs `--conversations` conversations at once, `--turns` turns each, every
//! turn streamed; then it does the same on fresh devnets whose gateway
//! routes without looking at the providers' prefix caches (the providers
//! still keep them), and whose providers keep nothing (every turn evaluates
//! its whole history: Tessera before prefix caching). It reports time to
//! first token (p50, p90) of the turns after the first — the ones a kept
//! history can speed up — and the providers' own prefix-cache hit rate
//! (prompt tokens served from a kept prefix ÷ prompt tokens).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};

use super::network::{start, Api};
use super::stats::percentile;

#[derive(Args)]
pub struct ChatBench {
    /// Model (alias, sha256 or GGUF path).
    #[arg(long, default_value = tessera_models::DEFAULT_MODEL.alias)]
    pub model: String,
    /// Providers in the devnet.
    #[arg(long, default_value_t = 3)]
    pub providers: usize,
    /// CPU threads per provider.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Slots per provider.
    #[arg(long, default_value_t = 4)]
    pub slots: usize,
    /// Conversations run at once.
    #[arg(long, default_value_t = 10)]
    pub conversations: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 8)]
    pub turns: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 48)]
    pub tokens: usize,
}

const SYSTEM: &str = "You are the help desk of a small coastal town. You answer questions \
    from residents and visitors about the harbour, the ferry timetable, the lighthouse, the \
    weekly market, the library, waste collection, parking, the swimming pool and the local \
    history museum. Keep answers short, friendly and practical. If you do not know something, \
    say so and suggest who to ask. Never invent phone numbers or opening hours. When a question \
    is about safety at sea, remind the person to check the coastguard's forecast first.";

const QUESTIONS: &[&str] = &[
    "When does the first ferry leave on Sundays?",
    "Can I park near the harbour overnight?",
    "Is the lighthouse open to visitors?",
    "What can I buy at the weekly market?",
    "How do I get a library card?",
    "Which day is the recycling collected?",
    "Is the swimming pool heated in winter?",
    "What is the oldest thing in the museum?",
    "Where can I rent a small boat?",
    "Are dogs allowed on the beach?",
];

/// One streamed turn: time to the first content, and the answer's text.
async fn turn(
    client: &reqwest::Client,
    api: &Api,
    model: &str,
    messages: &[Value],
    tokens: usize,
    seed: u64,
) -> anyhow::Result<(f64, String)> {
    let body = json!({
        "model": model, "messages": messages, "max_tokens": tokens,
        "temperature": 0.7, "seed": seed, "stream": true,
    });
    let start = Instant::now();
    let resp = client
        .post(format!("{}/chat/completions", api.base))
        .bearer_auth(&api.key)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let (mut text, mut first) = (String::new(), None);
    super::sse::each_event(resp, |v| {
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            if !c.is_empty() {
                first.get_or_insert_with(Instant::now);
                text.push_str(c);
            }
        }
    })
    .await?;
    let first = first.context("no content in a turn")?;
    Ok(((first - start).as_secs_f64() * 1e3, text))
}

/// What one devnet run measured.
struct Run {
    /// TTFT (ms) of turns 2.. and of first turns.
    later: Vec<f64>,
    first: Vec<f64>,
    hit_rate: f64,
    wall_s: f64,
}

fn run_once(
    model: &Path,
    alias: &str,
    b: &ChatBench,
    prefix_cache: bool,
    prefix_routing: bool,
) -> anyhow::Result<Run> {
    let (providers, threads, slots) = (
        b.providers.to_string(),
        b.threads.to_string(),
        b.slots.to_string(),
    );
    let (_net, api, _) = start(
        &[
            "devnet",
            "--listen",
            "127.0.0.1:0",
            "--providers",
            &providers,
            "--threads",
            &threads,
            "--slots",
            &slots,
            "--prefix-cache",
            if prefix_cache { "true" } else { "false" },
            "--prefix-routing",
            if prefix_routing { "true" } else { "false" },
            // Speed is measured here; the auditor would share the CPU.
            "--no-audit",
        ],
        model,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let results = rt.block_on(async {
        let convs = (0..b.conversations).map(|c| {
            let (client, api) = (&client, &api);
            async move {
                let mut messages = vec![json!({"role": "system", "content": SYSTEM})];
                let mut ttfts = Vec::new();
                for t in 0..b.turns {
                    let q = QUESTIONS[(c + t) % QUESTIONS.len()];
                    messages.push(json!({"role": "user", "content": format!("{q} (visitor {c})")}));
                    let (ttft, answer) = turn(
                        client,
                        api,
                        alias,
                        &messages,
                        b.tokens,
                        (c * 100 + t) as u64,
                    )
                    .await?;
                    messages.push(json!({"role": "assistant", "content": answer}));
                    ttfts.push((t, ttft));
                }
                anyhow::Ok(ttfts)
            }
        });
        futures::future::join_all(convs).await
    });
    let wall_s = started.elapsed().as_secs_f64();
    let (mut later, mut first) = (Vec::new(), Vec::new());
    for r in results {
        for (t, ttft) in r? {
            if t == 0 {
                first.push(ttft);
            } else {
                later.push(ttft);
            }
        }
    }
    // The providers' own count of prompt tokens served from kept prefixes.
    let status: Value =
        reqwest::blocking::get(format!("{}/api/status", api.base.trim_end_matches("/v1")))?
            .json()?;
    let (mut reused, mut prompt) = (0u64, 0u64);
    for p in status["providers"].as_array().into_iter().flatten() {
        reused += p["prefix_reused_tokens"].as_u64().unwrap_or(0);
        prompt += p["prefix_prompt_tokens"].as_u64().unwrap_or(0);
    }
    Ok(Run {
        later,
        first,
        hit_rate: reused as f64 / prompt.max(1) as f64,
        wall_s,
    })
}

pub fn run(home: &Path, b: ChatBench) -> anyhow::Result<()> {
    let model = crate::models::resolve_or_pull(home, &b.model)?;
    println!(
        "tessera bench chat: {} conversations × {} turns ({} tokens per answer) on a devnet of {} providers × {} thread(s), {} slots each; model {}",
        b.conversations, b.turns, b.tokens, b.providers, b.threads, b.slots, model.alias
    );
    let with = run_once(&model.path, &model.alias, &b, true, true)?;
    let unrouted = run_once(&model.path, &model.alias, &b, true, false)?;
    let without = run_once(&model.path, &model.alias, &b, false, false)?;
    println!();
    println!(
        "  {:<36} {:>10} {:>10} {:>12} {:>10} {:>8}",
        "", "TTFT p50", "TTFT p90", "1st turn p50", "hit rate", "wall s"
    );
    for (name, r) in [
        ("prefix cache + prefix-aware routing", &with),
        ("prefix cache, routing ignores it", &unrouted),
        ("no prefix cache", &without),
    ] {
        println!(
            "  {:<36} {:>8.0}ms {:>8.0}ms {:>10.0}ms {:>9.1}% {:>8.1}",
            name,
            percentile(r.later.clone(), 0.5),
            percentile(r.later.clone(), 0.9),
            percentile(r.first.clone(), 0.5),
            r.hit_rate * 100.0,
            r.wall_s
        );
    }
    let p50 = |r: &Run| percentile(r.later.clone(), 0.5);
    println!(
        "  turns after the first, TTFT p50: {:.2}x lower than without a prefix cache, {:.2}x lower than caching without prefix-aware routing",
        p50(&without) / p50(&with),
        p50(&unrouted) / p50(&with)
    );
    Ok(())
}
