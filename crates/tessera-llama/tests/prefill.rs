//! The engine on the real default model: one prefill over prompt + output
//! reproduces what the scheduler generated, which is what the auditor relies
//! on; and the auditor passes honest answers and fails tampered ones.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use tessera_core::{FinishReason, GenerationRequest, Proof, SamplingParams, Token, Usage};
use tessera_engine::audit::{audit, AuditJob, Thresholds};
use tessera_engine::sampling;
use tessera_engine::{prefill_all, ChatMessage, Engine, Event, Model, Scheduler, SchedulerConfig};
use tessera_llama::{EngineConfig, LlamaEngine, LlamaModelFile};

fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TESSERA_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/tessera/home");
    tessera_models::ModelStore::open(&home)
        .and_then(|s| s.resolve(tessera_models::DEFAULT_MODEL.alias))
        .unwrap_or_else(|e| panic!("the default model is needed: run `make test` ({e})"))
        .path
}

fn config() -> EngineConfig {
    EngineConfig {
        slots: 2,
        context_per_slot: 512,
        ..EngineConfig::default()
    }
}

/// The auditor's context: hidden states on.
fn audit_config() -> EngineConfig {
    EngineConfig {
        hidden_states: true,
        ..config()
    }
}

/// Generate with the scheduler; returns (prompt, output tokens).
fn generate(
    file: &Arc<LlamaModelFile>,
    sampling: SamplingParams,
    n: u32,
) -> (Vec<Token>, Vec<Token>) {
    let f = file.clone();
    let (scheduler, handle) =
        Scheduler::spawn(file.clone(), SchedulerConfig::default(), move || {
            Ok(Box::new(LlamaEngine::new(&f, config())?) as Box<dyn Engine>)
        })
        .expect("scheduler");
    let messages = [ChatMessage {
        role: "user".into(),
        content: "Describe a sunrise over the mountains.".into(),
    }];
    let prompt = file
        .tokenize(&file.apply_chat_template(&messages).unwrap(), true)
        .unwrap();
    let mut rx = handle
        .submit(GenerationRequest {
            prompt: prompt.clone(),
            sampling,
            max_tokens: Some(n),
            stop: vec![],
            top_logprobs: 0,
            ignore_eos: true,
            cache: None,
        })
        .unwrap();
    let mut out = Vec::new();
    loop {
        match rx.blocking_recv().expect("event") {
            Event::Token(t) => out.push(t.token),
            Event::Done { .. } => break,
            Event::Error(e) => panic!("{e}"),
            Event::Proof { .. } => {}
        }
    }
    drop(handle);
    scheduler.join();
    (prompt, out)
}

/// Logits and hidden state of every position of prompt + output, by prefill.
fn prefill(file: &LlamaModelFile, tokens: &[Token]) -> (Vec<Vec<f32>>, Vec<usize>) {
    let mut engine = LlamaEngine::new(file, audit_config()).unwrap();
    let mut logits = Vec::new();
    let mut widths = Vec::new();
    prefill_all(&mut engine, 0, tokens, 0, &mut |pos, l, h| {
        assert_eq!(pos, logits.len());
        logits.push(l.to_vec());
        widths.push(h.len());
    })
    .unwrap();
    (logits, widths)
}

#[test]
fn prefill_argmax_reproduces_a_greedy_generation() {
    let file = LlamaModelFile::load(&model_path()).unwrap();
    assert!(
        file.info().eog_tokens.len() >= 2,
        "<|im_end|> and EOS both end generation"
    );
    let (prompt, out) = generate(&file, SamplingParams::greedy(), 24);
    assert_eq!(out.len(), 24);
    let all: Vec<Token> = prompt.iter().chain(&out).copied().collect();
    let (logits, widths) = prefill(&file, &all);
    assert_eq!(logits.len(), all.len());
    assert!(
        widths.iter().all(|&w| w == file.info().n_embd),
        "hidden states are {} wide",
        file.info().n_embd
    );
    assert_eq!(file.info().n_embd, 576);
    for (k, &token) in out.iter().enumerate() {
        let pos = prompt.len() - 1 + k;
        assert_eq!(
            sampling::argmax(&logits[pos]),
            token,
            "output token {k} differs"
        );
    }
}

#[test]
fn seeded_sampling_replays_from_prefill_logits() {
    let file = LlamaModelFile::load(&model_path()).unwrap();
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: 1234,
        ..SamplingParams::default()
    };
    let (prompt, out) = generate(&file, params.clone(), 32);
    let all: Vec<Token> = prompt.iter().chain(&out).copied().collect();
    let (logits, _) = prefill(&file, &all);
    let mut exact = 0;
    for (k, &token) in out.iter().enumerate() {
        let pos = prompt.len() - 1 + k;
        // The token sits at absolute position pos + 1.
        let replay = sampling::sample(&logits[pos], &params, (pos + 1) as u32);
        if replay == token {
            exact += 1;
        } else {
            // Only a near-tie between the two candidates may flip.
            let inv_t = 1.0 / f64::from(params.temperature);
            let score = |t: Token| {
                f64::from(logits[pos][t as usize]) * inv_t
                    + sampling::gumbel(params.seed, (pos + 1) as u32, t)
            };
            assert!(
                (score(replay) - score(token)).abs() < 0.05,
                "token {k} differs beyond a near-tie"
            );
        }
    }
    assert!(exact >= 30, "only {exact}/32 tokens replayed exactly");
}

/// What a provider's scheduler (hidden states on) hands over with an answer.
struct Proved {
    prompt: Vec<Token>,
    tokens: Vec<Token>,
    proof: Proof,
    finish: FinishReason,
    usage: Usage,
}

fn generate_proved(file: &Arc<LlamaModelFile>, sampling: SamplingParams, n: u32) -> Proved {
    let f = file.clone();
    let (scheduler, handle) =
        Scheduler::spawn(file.clone(), SchedulerConfig::default(), move || {
            Ok(Box::new(LlamaEngine::new(&f, audit_config())?) as Box<dyn Engine>)
        })
        .expect("scheduler");
    let messages = [ChatMessage {
        role: "user".into(),
        content: "Write two sentences about a lighthouse keeper.".into(),
    }];
    let prompt = file
        .tokenize(&file.apply_chat_template(&messages).unwrap(), true)
        .unwrap();
    let mut rx = handle
        .submit(GenerationRequest {
            prompt: prompt.clone(),
            sampling,
            max_tokens: Some(n),
            stop: vec![],
            top_logprobs: 0,
            ignore_eos: false,
            cache: None,
        })
        .unwrap();
    let mut proved = None;
    let (finish, usage) = loop {
        match rx.blocking_recv().expect("event") {
            Event::Proof { tokens, proof } => proved = Some((tokens, proof)),
            Event::Done {
                finish_reason,
                usage,
                ..
            } => break (finish_reason, usage),
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    };
    drop(handle);
    scheduler.join();
    let (tokens, proof) = proved.expect("a proof before Done");
    Proved {
        prompt,
        tokens,
        proof,
        finish,
        usage,
    }
}

fn job_of(p: &Proved, sampling: &SamplingParams, max_tokens: u32) -> AuditJob {
    AuditJob {
        prompt: p.prompt.clone(),
        output: p.tokens.clone(),
        sampling: sampling.clone(),
        proof: Some(p.proof.clone()),
        finish_reason: Some(p.finish),
        stopped_by_sequence: false,
        max_tokens: Some(max_tokens),
        context: 512,
        ignore_eos: false,
        claimed_completion_tokens: p.usage.completion_tokens,
    }
}

#[test]
fn honest_answers_pass_their_audit_and_each_kind_of_tampering_fails() {
    let file = LlamaModelFile::load(&model_path()).unwrap();
    let mut auditor = LlamaEngine::new(&file, audit_config()).unwrap();
    let th = Thresholds::default();
    let settings = [
        SamplingParams::greedy(),
        SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: 7,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.2,
            top_k: 40,
            seed: 99,
            ..SamplingParams::default()
        },
    ];
    let mut kept = None;
    for params in &settings {
        let p = generate_proved(&file, params.clone(), 80);
        assert_eq!(p.tokens.len() as u32, p.usage.completion_tokens);
        assert!(
            p.proof.commitments.len() <= 10 * p.tokens.len(),
            "{} commitment bytes for {} tokens",
            p.proof.commitments.len(),
            p.tokens.len()
        );
        let ev = audit(&mut auditor, file.as_ref(), 0, &job_of(&p, params, 80), &th).unwrap();
        eprintln!("honest {params:?}: {ev:?}");
        assert!(ev.passed(), "an honest answer failed: {:?}", ev.failures);
        kept = Some((p, params.clone()));
    }
    let (p, params) = kept.unwrap();
    let n = p.tokens.len();
    assert!(n > 20, "the answer is long enough to tamper with");
    let fails = |job: AuditJob, what: &str| {
        let mut engine = LlamaEngine::new(&file, audit_config()).unwrap();
        let ev = audit(&mut engine, file.as_ref(), 0, &job, &th).unwrap();
        assert!(!ev.passed(), "{what} was not caught: {ev:?}");
        eprintln!("{what}: {:?}", ev.failures);
    };
    // Garbage: other tokens in the middle.
    let mut job = job_of(&p, &params, 80);
    for t in &mut job.output[5..15] {
        *t = (*t + 17) % 1000;
    }
    fails(job, "substituted tokens");
    // Forged commitments.
    let mut job = job_of(&p, &params, 80);
    for (i, b) in job
        .proof
        .as_mut()
        .unwrap()
        .commitments
        .iter_mut()
        .enumerate()
    {
        *b = (i * 37 % 251) as u8;
    }
    fails(job, "forged commitments");
    // Made-up logprobs.
    let mut job = job_of(&p, &params, 80);
    for lp in &mut job.proof.as_mut().unwrap().logprobs {
        *lp -= 0.5;
    }
    fails(job, "forged logprobs");
    // Inflated usage.
    let mut job = job_of(&p, &params, 80);
    job.claimed_completion_tokens += 3;
    fails(job, "inflated usage");
    // Early stop: a prefix of an answer passed off as complete.
    let short = generate_proved(&file, params.clone(), 12);
    let mut job = job_of(&short, &params, 80);
    job.finish_reason = Some(FinishReason::Stop);
    fails(job, "early stop claimed as a stop");
    let mut job = job_of(&short, &params, 80);
    job.finish_reason = Some(FinishReason::Length);
    fails(job, "early stop claimed as the length limit");
    // The same tokens under another seed are not what the rule picks.
    let mut job = job_of(&p, &params, 80);
    job.sampling.seed += 1;
    if params.temperature > 0.0 {
        fails(job, "a different seed");
    }
}
