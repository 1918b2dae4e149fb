//! `tessera bench audit`: how well the auditor tells honest answers from
//! cheating ones, and what an audit costs.
//!
//! Honest answers (64–128 tokens by default) are generated the way a
//! provider generates them (scheduler, hidden states on, proofs built) at
//! several thread counts and batch sizes, with every sampling setting, and
//! each is audited by a separate engine: the failures among them are the
//! false positives, and their evidence is the calibration data (one JSON
//! line per answer, `--out`). Then each misbehaviour mode produces answers
//! that are audited the same way: the failures are the detections.
//!
//! Modes: `substitute` (another model of the same shape: the transformer
//! blocks in reverse order), `requantize` (the Q4_1 model requantized to
//! Q4_0), `skip-layers` (one block's output projections zeroed), `forged`
//! (commitments of another answer), `garbage` (random tokens), `early-stop`
//! (half the tokens, claimed as a stop), `inflated` (usage claims more
//! tokens). Altered model files are written to a temporary folder.
//!
//! Both engines live in this one process and run one after the other (each
//! phase generates, then audits), so their thread pools never compete.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tessera_core::{FinishReason, GenerationRequest, Proof, SamplingParams, Token};
use tessera_engine::audit::{audit, AuditJob, Evidence, Thresholds};
use tessera_engine::{ChatMessage, Engine, Event, Model, Scheduler, SchedulerConfig};
use tessera_llama::{EngineConfig, LlamaEngine, LlamaModelFile};

#[derive(Args, Debug)]
pub struct AuditBench {
    /// Model (alias, sha256 or GGUF path) the honest providers serve.
    #[arg(long, default_value = tessera_models::DEFAULT_MODEL.alias)]
    pub model: String,
    /// Honest answers in all, shared out over the configurations.
    #[arg(long, default_value_t = 1000)]
    pub answers: usize,
    /// Answers per misbehaviour mode.
    #[arg(long, default_value_t = 50)]
    pub per_mode: usize,
    #[arg(long, default_value_t = 64)]
    pub min_tokens: u32,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Generation configurations as THREADSxSLOTS (answers in flight =
    /// slots).
    #[arg(long, value_delimiter = ',', default_value = "2x1,1x4,2x8,1x16")]
    pub configs: Vec<String>,
    /// Misbehaviour modes to measure (none: honest only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "substitute,requantize,skip-layers,forged,garbage,early-stop,inflated"
    )]
    pub modes: Vec<String>,
    /// Write every answer's evidence here, one JSON object per line.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Random seed of the prompts and settings.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

const TOPICS: &[&str] = &[
    "a lighthouse keeper",
    "volcanoes",
    "the history of bread",
    "how trains brake",
    "a chess opening",
    "rain in the city",
    "bees",
    "the moon landing",
    "a jazz trio",
    "paper making",
    "glaciers",
    "an old library",
    "learning to swim",
    "solar panels",
    "a market at dawn",
    "the water cycle",
];
const ASKS: &[&str] = &[
    "Write a short paragraph about",
    "Explain to a child",
    "List some facts about",
    "Tell a story about",
    "Describe",
];

/// A small deterministic generator for prompts and settings.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn setting(rng: &mut Rng) -> SamplingParams {
    let seed = rng.next();
    let base = SamplingParams {
        seed,
        ..SamplingParams::default()
    };
    match rng.below(6) {
        0 => SamplingParams::greedy(),
        1 => SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            ..base
        },
        2 => base,
        3 => SamplingParams {
            temperature: 1.3,
            top_k: 40,
            ..base
        },
        4 => SamplingParams {
            temperature: 0.8,
            min_p: 0.05,
            ..base
        },
        _ => SamplingParams {
            temperature: 0.5,
            top_k: 20,
            top_p: 0.95,
            ..base
        },
    }
}

/// One generated answer with what its provider sent.
struct Answer {
    prompt: Vec<Token>,
    tokens: Vec<Token>,
    proof: Proof,
    finish: FinishReason,
    completion_tokens: u32,
    sampling: SamplingParams,
    max_tokens: u32,
    gen_ms: f64,
}

/// Generate `n` answers on `file` (an altered file keeps the model's
/// tokenizer) with `threads` threads, `slots` at once; `shorten`: ask for
/// half the tokens.
fn generate(
    file: &Arc<LlamaModelFile>,
    threads: usize,
    slots: usize,
    n: usize,
    bench: &AuditBench,
    rng: &mut Rng,
    shorten: bool,
) -> anyhow::Result<Vec<Answer>> {
    let f = file.clone();
    let config = EngineConfig {
        slots,
        context_per_slot: 512,
        threads,
        hidden_states: true,
        ..EngineConfig::default()
    };
    let (scheduler, handle) =
        Scheduler::spawn(file.clone(), SchedulerConfig::default(), move || {
            Ok(Box::new(LlamaEngine::new(&f, config)?) as Box<dyn Engine>)
        })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut out = Vec::with_capacity(n);
    let mut queued = 0;
    runtime.block_on(async {
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            while queued < n && running.len() < slots {
                queued += 1;
                let text = format!(
                    "{} {}.",
                    ASKS[rng.below(ASKS.len())],
                    TOPICS[rng.below(TOPICS.len())]
                );
                let messages = [ChatMessage {
                    role: "user".into(),
                    content: text,
                }];
                let prompt = file.tokenize(&file.apply_chat_template(&messages)?, true)?;
                let span = (bench.max_tokens - bench.min_tokens + 1) as usize;
                let mut max_tokens = bench.min_tokens + rng.below(span) as u32;
                if shorten {
                    max_tokens /= 2;
                }
                let sampling = setting(rng);
                let request = GenerationRequest {
                    prompt: prompt.clone(),
                    sampling: sampling.clone(),
                    max_tokens: Some(max_tokens),
                    stop: vec![],
                    top_logprobs: 0,
                    ignore_eos: false,
                    cache: None,
                };
                let mut rx = handle
                    .submit(request)
                    .map_err(|e| anyhow::anyhow!("submit: {e}"))?;
                running.push(async move {
                    let started = Instant::now();
                    let mut proved = None;
                    loop {
                        match rx.recv().await {
                            Some(Event::Proof { tokens, proof }) => proved = Some((tokens, proof)),
                            Some(Event::Done {
                                finish_reason,
                                usage,
                                ..
                            }) => {
                                let (tokens, proof) = proved.take()?;
                                return Some(Answer {
                                    prompt,
                                    tokens,
                                    proof,
                                    finish: finish_reason,
                                    completion_tokens: usage.completion_tokens,
                                    sampling,
                                    max_tokens,
                                    gen_ms: started.elapsed().as_secs_f64() * 1e3,
                                });
                            }
                            Some(Event::Error(_)) | None => return None,
                            _ => {}
                        }
                    }
                });
            }
            match futures::StreamExt::next(&mut running).await {
                Some(Some(a)) => out.push(a),
                Some(None) => anyhow::bail!("a generation failed"),
                None => break,
            }
        }
        anyhow::Ok(())
    })?;
    drop(handle);
    scheduler.join();
    Ok(out)
}

fn job(a: &Answer) -> AuditJob {
    AuditJob {
        prompt: a.prompt.clone(),
        output: a.tokens.clone(),
        sampling: a.sampling.clone(),
        proof: Some(a.proof.clone()),
        finish_reason: Some(a.finish),
        stopped_by_sequence: false,
        max_tokens: Some(a.max_tokens),
        context: 512,
        ignore_eos: false,
        claimed_completion_tokens: a.completion_tokens,
    }
}

/// Per mode: answers, failures, audit and generation time.
#[derive(Default)]
struct Tally {
    answers: usize,
    failed: usize,
    tokens: usize,
    audit_ms: f64,
    gen_ms: f64,
    commit_bytes: usize,
}

pub fn run(home: &Path, bench: AuditBench) -> anyhow::Result<()> {
    let model = crate::models::resolve_or_pull(home, &bench.model)?;
    let file = LlamaModelFile::load(&model.path)?;
    let mut auditor = LlamaEngine::new(
        &file,
        EngineConfig {
            slots: 1,
            context_per_slot: 1024,
            hidden_states: true,
            ..EngineConfig::default()
        },
    )?;
    let th = Thresholds::default();
    let mut out = match &bench.out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?,
        )),
        None => None,
    };
    let mut rng = Rng(bench.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let configs: Vec<(usize, usize)> = bench
        .configs
        .iter()
        .map(|c| {
            let (t, s) = c.split_once('x').context("configs are THREADSxSLOTS")?;
            Ok((t.parse()?, s.parse()?))
        })
        .collect::<anyhow::Result<_>>()?;
    println!(
        "tessera bench audit: {} ({}), {} honest answers over {:?} (threads x slots), {} per mode, {}-{} tokens",
        model.alias, &model.sha256[..12], bench.answers, bench.configs, bench.per_mode,
        bench.min_tokens, bench.max_tokens
    );
    let mut audit_one = |mode: &str,
                         config: &str,
                         a: &Answer,
                         j: AuditJob,
                         tally: &mut Tally|
     -> anyhow::Result<Evidence> {
        let started = Instant::now();
        let ev = audit(&mut auditor, file.as_ref(), 0, &j, &th)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        tally.answers += 1;
        tally.failed += usize::from(!ev.passed());
        tally.tokens += a.tokens.len();
        tally.audit_ms += ms;
        tally.gen_ms += a.gen_ms;
        tally.commit_bytes += a.proof.commitments.len();
        if let Some(w) = out.as_mut() {
            writeln!(
                w,
                "{}",
                json!({"mode": mode, "config": config, "sampling": a.sampling, "tokens": a.tokens.len(),
                       "gen_ms": a.gen_ms, "audit_ms": ms, "passed": ev.passed(), "evidence": ev})
            )?;
        }
        Ok(ev)
    };
    // Honest answers, per configuration.
    let mut honest = Tally::default();
    let mut alone = Tally::default();
    let mut kept: Vec<Answer> = Vec::new();
    for (i, &(threads, slots)) in configs.iter().enumerate() {
        let n = bench.answers / configs.len() + usize::from(i < bench.answers % configs.len());
        let started = Instant::now();
        let answers = generate(&file, threads, slots, n, &bench, &mut rng, false)?;
        let gen_s = started.elapsed().as_secs_f64();
        let name = format!("{threads}x{slots}");
        let mut t = Tally::default();
        for a in &answers {
            let ev = audit_one("honest", &name, a, job(a), &mut t)?;
            if !ev.passed() {
                println!(
                    "  honest answer FAILED ({name}, {:?}): {:?}",
                    a.sampling, ev.failures
                );
            }
        }
        println!(
            "  honest {name}: {} answers, {} failed; generated in {gen_s:.0} s, audited in {:.0} s",
            t.answers,
            t.failed,
            t.audit_ms / 1e3
        );
        if slots == 1 {
            alone.answers += t.answers;
            alone.audit_ms += t.audit_ms;
            alone.gen_ms += t.gen_ms;
            alone.tokens += t.tokens;
        }
        honest.answers += t.answers;
        honest.failed += t.failed;
        honest.tokens += t.tokens;
        honest.commit_bytes += t.commit_bytes;
        kept.extend(answers);
    }
    // Cheating answers.
    let dir = tempfile::tempdir()?;
    let mut results: Vec<(String, Tally)> = Vec::new();
    for mode in bench.modes.iter().filter(|m| !m.is_empty()) {
        let mut t = Tally::default();
        let cheat_file = |path: PathBuf| -> anyhow::Result<Arc<LlamaModelFile>> {
            Ok(LlamaModelFile::load(&path)?)
        };
        let answers: Vec<(Answer, AuditJob)> = match mode.as_str() {
            "substitute" | "requantize" | "skip-layers" => {
                let path = dir.path().join(format!("{mode}.gguf"));
                match mode.as_str() {
                    "substitute" => {
                        tessera_models::gguf::reverse_layers(&model.path, &path)?;
                    }
                    "skip-layers" => {
                        tessera_models::gguf::skip_layers(&model.path, &path, &[15])?;
                    }
                    _ => tessera_llama::requantize(
                        &model.path,
                        &path,
                        tessera_llama::Quantization::Q4_0,
                        2,
                    )?,
                }
                let cheat = cheat_file(path)?;
                let list = generate(&cheat, 2, 8, bench.per_mode, &bench, &mut rng, false)?;
                list.into_iter()
                    .map(|a| {
                        let j = job(&a);
                        (a, j)
                    })
                    .collect()
            }
            "early-stop" => {
                let list = generate(&file, 2, 8, bench.per_mode, &bench, &mut rng, true)?;
                list.into_iter()
                    .map(|a| {
                        let mut j = job(&a);
                        // Half the tokens it was asked for, claimed as a
                        // natural stop (answers that really ended are no cheat).
                        j.max_tokens = Some(a.max_tokens * 2);
                        j.finish_reason = Some(FinishReason::Stop);
                        (a, j)
                    })
                    .filter(|(a, _)| a.finish == FinishReason::Length)
                    .collect()
            }
            "forged" | "garbage" | "inflated" => kept
                .iter()
                .take(bench.per_mode)
                .enumerate()
                .map(|(i, a)| {
                    let mut j = job(a);
                    match mode.as_str() {
                        "forged" => {
                            // Well-formed commitments of another answer.
                            let other = &kept[(i + 1) % kept.len()].proof.commitments;
                            if let Some(p) = j.proof.as_mut() {
                                for (k, b) in p.commitments.iter_mut().enumerate() {
                                    *b = other[k % other.len()];
                                }
                            }
                        }
                        "garbage" => {
                            let mut r = Rng(i as u64 + 7);
                            for tok in &mut j.output {
                                *tok = r.below(file.info().n_vocab) as Token;
                            }
                        }
                        _ => j.claimed_completion_tokens += 1 + (i % 10) as u32,
                    }
                    let copy = Answer {
                        prompt: a.prompt.clone(),
                        tokens: a.tokens.clone(),
                        proof: a.proof.clone(),
                        finish: a.finish,
                        completion_tokens: a.completion_tokens,
                        sampling: a.sampling.clone(),
                        max_tokens: a.max_tokens,
                        gen_ms: a.gen_ms,
                    };
                    (copy, j)
                })
                .collect(),
            other => anyhow::bail!("unknown mode {other}"),
        };
        for (a, j) in &answers {
            audit_one(mode, "2x8", a, j.clone(), &mut t)?;
        }
        println!("  {mode}: {} of {} caught", t.failed, t.answers);
        results.push((mode.clone(), t));
    }
    if let Some(w) = out.as_mut() {
        w.flush()?;
    }
    println!();
    println!("| answers | audited | failed | rate |");
    println!("|---|---:|---:|---:|");
    println!(
        "| honest (false positives) | {} | {} | {:.2}% |",
        honest.answers,
        honest.failed,
        100.0 * honest.failed as f64 / honest.answers.max(1) as f64
    );
    for (mode, t) in &results {
        println!(
            "| {mode} (detected) | {} | {} | {:.1}% |",
            t.answers,
            t.failed,
            100.0 * t.failed as f64 / t.answers.max(1) as f64
        );
    }
    println!();
    if alone.answers > 0 {
        println!(
            "audit cost: {:.0}% of generating the same answers alone ({} answers, {:.0} ms audit vs {:.0} ms generation on average)",
            100.0 * alone.audit_ms / alone.gen_ms,
            alone.answers,
            alone.audit_ms / alone.answers as f64,
            alone.gen_ms / alone.answers as f64
        );
    }
    println!(
        "commitments: {:.2} bytes per generated token ({} bytes for {} tokens)",
        honest.commit_bytes as f64 / honest.tokens.max(1) as f64,
        honest.commit_bytes,
        honest.tokens
    );
    println!("thresholds: {}", serde_json::to_string(&th)?);
    Ok(())
}
