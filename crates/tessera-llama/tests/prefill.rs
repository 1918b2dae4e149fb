//! The engine on the real default model: one prefill over prompt + output
//! reproduces what the scheduler generated, which is what the auditor will
//! rely on.

use std::path::PathBuf;
use std::sync::Arc;

use tessera_engine::sampling::{self, SamplingParams};
use tessera_engine::{
    prefill_all, ChatMessage, Engine, Event, GenerationRequest, Model, Scheduler, SchedulerConfig,
    Token,
};
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
        })
        .unwrap();
    let mut out = Vec::new();
    loop {
        match rx.blocking_recv().expect("event") {
            Event::Token(t) => out.push(t.token),
            Event::Done { .. } => break,
            Event::Error(e) => panic!("{e}"),
            Event::Provider { .. } | Event::Receipt(_) => {}
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
    prefill_all(&mut engine, 0, tokens, &mut |pos, l, h| {
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
