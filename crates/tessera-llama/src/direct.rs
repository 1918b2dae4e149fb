//! The baseline: the shortest llama.cpp generation loop, as in llama.cpp's
//! own `simple` example (one sequence, greedy sampler inside llama.cpp).
//! `tessera bench engine` runs it beside the Tessera engine so the cost of
//! Tessera's scheduling and sampling shows as a ratio.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tessera_core::Token;
use tessera_engine::EngineError;

use crate::{backend, LlamaModelFile};

/// A plain llama.cpp context: `n_seq` sequences sharing one KV cache.
fn context(
    file: &LlamaModelFile,
    n_ctx: u32,
    n_batch: u32,
    n_seq: usize,
    threads: usize,
) -> Result<LlamaContext<'_>, EngineError> {
    let threads = i32::try_from(threads.max(1)).unwrap_or(1);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch.min(512))
        .with_n_seq_max(n_seq as u32)
        .with_kv_unified(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    file.llama()
        .new_context(backend()?, params)
        .map_err(|e| EngineError::Decode(e.to_string()))
}

/// Timings of one direct run.
#[derive(Clone, Debug)]
pub struct DirectRun {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Time to evaluate the prompt and sample the first token.
    pub prefill: Duration,
    /// Every generated token.
    pub generated: Vec<Token>,
    /// Time for all decode steps after the first sampled token.
    pub decode: Duration,
}

/// Prefill `prompt` in one batch, then greedily decode `n_gen` tokens
/// (end-of-generation tokens are ignored so every run decodes `n_gen`).
pub fn generate(
    file: &LlamaModelFile,
    prompt: &[Token],
    n_gen: usize,
    threads: usize,
) -> Result<DirectRun, EngineError> {
    let err = |e: &dyn std::fmt::Display| EngineError::Decode(e.to_string());
    let n_ctx = (prompt.len() + n_gen + 16) as u32;
    let mut ctx = context(file, n_ctx, n_ctx.max(512), 1, threads)?;
    let mut batch = LlamaBatch::new(n_ctx as usize, 1);
    let last = prompt.len().saturating_sub(1);
    for (i, &t) in prompt.iter().enumerate() {
        batch
            .add(LlamaToken(t), i as i32, &[0], i == last)
            .map_err(|e| err(&e))?;
    }
    let start = Instant::now();
    ctx.decode(&mut batch).map_err(|e| err(&e))?;
    let mut sampler = LlamaSampler::greedy();
    let mut token = sampler.sample(&ctx, batch.n_tokens() - 1);
    let prefill = start.elapsed();
    let mut generated = vec![token.0];
    let start = Instant::now();
    for pos in prompt.len()..prompt.len() + n_gen.saturating_sub(1) {
        batch.clear();
        batch
            .add(token, pos as i32, &[0], true)
            .map_err(|e| err(&e))?;
        ctx.decode(&mut batch).map_err(|e| err(&e))?;
        token = sampler.sample(&ctx, 0);
        generated.push(token.0);
    }
    Ok(DirectRun {
        prompt_tokens: prompt.len(),
        prefill,
        generated,
        decode: start.elapsed(),
    })
}

/// Aggregate decode rate of `n_seq` sequences advanced together in one
/// batch per step, straight on llama.cpp: the ceiling for continuous
/// batching on this machine. Returns generated tokens per second over the
/// whole run (prompts included, as a client sees it).
pub fn batched_rate(
    file: &LlamaModelFile,
    prompt: &[Token],
    n_gen: usize,
    n_seq: usize,
    threads: usize,
) -> Result<f64, EngineError> {
    let err = |e: &dyn std::fmt::Display| EngineError::Decode(e.to_string());
    let n_seq = n_seq.max(1);
    let per_seq = prompt.len() + n_gen + 16;
    let n_ctx = (per_seq * n_seq) as u32;
    let n_batch = (prompt.len() * n_seq).max(512) as u32;
    let mut ctx = context(file, n_ctx, n_batch, n_seq, threads)?;
    let mut batch = LlamaBatch::new(n_batch as usize, 1);
    let start = Instant::now();
    let last = prompt.len() - 1;
    for s in 0..n_seq {
        for (i, &t) in prompt.iter().enumerate() {
            batch
                .add(LlamaToken(t), i as i32, &[s as i32], i == last)
                .map_err(|e| err(&e))?;
        }
    }
    ctx.decode(&mut batch).map_err(|e| err(&e))?;
    let mut samplers: Vec<LlamaSampler> = (0..n_seq).map(|_| LlamaSampler::greedy()).collect();
    let mut next: Vec<LlamaToken> = samplers
        .iter_mut()
        .enumerate()
        .map(|(s, sm)| sm.sample(&ctx, ((s + 1) * prompt.len() - 1) as i32))
        .collect();
    for step in 1..n_gen {
        batch.clear();
        for (s, &t) in next.iter().enumerate() {
            batch
                .add(t, (prompt.len() + step - 1) as i32, &[s as i32], true)
                .map_err(|e| err(&e))?;
        }
        ctx.decode(&mut batch).map_err(|e| err(&e))?;
        for (s, sm) in samplers.iter_mut().enumerate() {
            next[s] = sm.sample(&ctx, s as i32);
        }
    }
    Ok((n_gen * n_seq) as f64 / start.elapsed().as_secs_f64())
}
