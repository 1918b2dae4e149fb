//! A chat's next turn reuses the KV cache of its history on the real model:
//! the greedy answer is the same as without the cache, the reused tokens
//! are not evaluated again, and the proof of an answer built on a reused
//! prefix passes the auditor.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use tessera_core::{GenerationRequest, PrefixCache, SamplingParams, Token};
use tessera_engine::audit::{audit, AuditJob, Thresholds};
use tessera_engine::{
    ChatMessage, Engine, Event, Model, Scheduler, SchedulerConfig, SchedulerHandle,
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

fn scheduler(file: &Arc<LlamaModelFile>, hidden_states: bool) -> (Scheduler, SchedulerHandle) {
    let f = file.clone();
    let config = EngineConfig {
        slots: 2,
        context_per_slot: 1024,
        hidden_states,
        ..EngineConfig::default()
    };
    Scheduler::spawn(file.clone(), SchedulerConfig::default(), move || {
        Ok(Box::new(LlamaEngine::new(&f, config)?) as Box<dyn Engine>)
    })
    .unwrap()
}

/// The proof of an answer: every generated token and the proof.
type Proven = Option<(Vec<Token>, tessera_core::Proof)>;

/// Generate greedily; returns (tokens, text, proof tokens and proof).
fn generate(
    h: &SchedulerHandle,
    prompt: &[Token],
    cache: Option<PrefixCache>,
) -> (Vec<Token>, String, Proven) {
    let mut rx = h
        .submit(GenerationRequest {
            prompt: prompt.to_vec(),
            sampling: SamplingParams::greedy(),
            max_tokens: Some(24),
            stop: vec![],
            top_logprobs: 0,
            ignore_eos: false,
            cache,
        })
        .unwrap();
    let (mut tokens, mut text, mut proof) = (vec![], String::new(), None);
    loop {
        match rx.blocking_recv().expect("an event") {
            Event::Token(t) => {
                tokens.push(t.token);
                text.push_str(&t.text);
            }
            Event::Proof { tokens, proof: p } => proof = Some((tokens, p)),
            Event::Done { text: tail, .. } => {
                text.push_str(&tail);
                return (tokens, text, proof);
            }
            Event::Error(e) => panic!("{e}"),
        }
    }
}

fn chat(file: &LlamaModelFile, turns: &[(&str, &str)]) -> Vec<Token> {
    let messages: Vec<ChatMessage> = turns
        .iter()
        .map(|(role, content)| ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        })
        .collect();
    file.tokenize(&file.apply_chat_template(&messages).unwrap(), true)
        .unwrap()
}

#[test]
fn the_next_turn_reuses_the_history_and_answers_the_same() {
    let file = LlamaModelFile::load(&model_path()).unwrap();
    let system = "You are a careful assistant who answers questions about lighthouses, \
                  their keepers and the ships they guard, in plain English.";
    let turn1 = chat(
        &file,
        &[("system", system), ("user", "What does a lighthouse do?")],
    );
    let key = |tag: &str| {
        Some(PrefixCache {
            key: 7,
            tag: tag.into(),
        })
    };
    let (cached_sched, cached) = scheduler(&file, true);
    let (_, answer1, _) = generate(&cached, &turn1, key("turn-1"));
    let turn2 = chat(
        &file,
        &[
            ("system", system),
            ("user", "What does a lighthouse do?"),
            ("assistant", &answer1),
            ("user", "And who keeps it?"),
        ],
    );
    let (reused_before, _) = cached.prefix_reuse();
    let (tokens, with_cache, proof) = generate(&cached, &turn2, key("turn-2"));
    let (reused, _) = cached.prefix_reuse();
    assert!(
        reused - reused_before >= turn1.len() as u64 - 1,
        "only {} of the {} history tokens were reused",
        reused - reused_before,
        turn1.len()
    );
    assert!(cached.take_evicted().contains(&"turn-1".to_string()));

    // The same turn on a fresh engine, nothing kept: the same answer.
    let (fresh_sched, fresh) = scheduler(&file, false);
    let (_, without_cache, _) = generate(&fresh, &turn2, None);
    assert_eq!(
        with_cache, without_cache,
        "the cache changed a greedy answer"
    );
    drop(fresh);
    fresh_sched.join();

    // And the answer built on the reused prefix passes the auditor.
    let (out, proof) = proof.expect("a proof");
    assert!(out.starts_with(&tokens));
    let mut auditor = LlamaEngine::new(
        &file,
        EngineConfig {
            slots: 1,
            context_per_slot: 1024,
            hidden_states: true,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let job = AuditJob {
        prompt: turn2.clone(),
        output: out.clone(),
        sampling: SamplingParams::greedy(),
        proof: Some(proof),
        finish_reason: Some(if out.len() < 24 {
            tessera_core::FinishReason::Stop
        } else {
            tessera_core::FinishReason::Length
        }),
        stopped_by_sequence: false,
        max_tokens: Some(24),
        context: 1024,
        ignore_eos: false,
        claimed_completion_tokens: out.len() as u32,
    };
    let evidence = audit(&mut auditor, file.as_ref(), 0, &job, &Thresholds::default()).unwrap();
    assert!(evidence.passed(), "{:?}", evidence.failures);
    drop(cached);
    cached_sched.join();
}
