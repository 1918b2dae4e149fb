//! Uptime canaries: the gateway's own small jobs to every provider.
//!
//! Every [`CanaryConfig::interval`] the gateway sends each connected
//! provider of each model one canary job: a random prompt with a random
//! seed, [`CanaryConfig::tokens`] tokens, due within
//! [`CanaryConfig::deadline`]. A canary is always audited (when the gateway
//! audits), and the tokens per second it was delivered at become the
//! provider's *verified* throughput. A provider that misses
//! [`CANARY_MISSES`] canaries in a row is not routed to until it answers
//! one again (canaries still go to it). Canaries are not billed; that they
//! are canaries is known only on the gateway's side of the job.

use std::time::{Duration, Instant};

use tessera_backend::{JobEvent, JobTicket, RoutePrefs, ServedModel};
use tessera_core::{GenerationRequest, NodeId, SamplingParams};
use tessera_engine::ChatMessage;

use crate::audit::Origin;
use crate::directory::CANARY_MISSES;
use crate::gateway::Gateway;
use crate::job::RoutedJob;

/// When and how big canaries are.
#[derive(Clone, Debug)]
pub struct CanaryConfig {
    /// Time between rounds.
    pub interval: Duration,
    /// Time one canary may take.
    pub deadline: Duration,
    /// Tokens one canary generates.
    pub tokens: u32,
}

const WORDS: &[&str] = &[
    "river", "copper", "lantern", "orbit", "meadow", "violin", "harbor", "pepper", "glacier",
    "ember", "tunnel", "falcon", "quartz", "saddle", "thistle", "canyon", "velvet", "magnet",
];

/// Run canaries until the gateway shuts down.
pub fn spawn(gateway: Gateway, config: CanaryConfig) {
    let tasks = gateway.tasks().clone();
    let shutdown = gateway.shutdown_token().clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(config.interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            for model in gateway.models() {
                for node in gateway.directory().serving_nodes(&model.sha256) {
                    let (gw, model, config) = (gateway.clone(), model.clone(), config.clone());
                    let shutdown = shutdown.clone();
                    gateway.tasks().spawn(async move {
                        tokio::select! {
                            _ = probe(&gw, &model, node, &config) => {}
                            _ = shutdown.cancelled() => {}
                        }
                    });
                }
            }
        }
    });
}

/// One canary to `node`; records its verified tok/s or a miss.
async fn probe(gw: &Gateway, model: &ServedModel, node: NodeId, config: &CanaryConfig) {
    // The seed and words must be unguessable; without the OS random source
    // this round is skipped rather than made predictable.
    let Ok(random) = tessera_core::secret_bytes::<16>() else {
        tracing::error!("no randomness for a canary; skipping it");
        return;
    };
    let words: Vec<&str> = random[8..14]
        .iter()
        .map(|b| WORDS[*b as usize % WORDS.len()])
        .collect();
    let messages = [ChatMessage {
        role: "user".into(),
        content: format!("Write a story using these words: {}.", words.join(", ")),
    }];
    let tokenizer = model.tokenizer.clone();
    let Ok(prompt) = tokenizer
        .apply_chat_template(&messages)
        .and_then(|t| tokenizer.tokenize(&t, true))
    else {
        return;
    };
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&random[..8]);
    let request = GenerationRequest {
        prompt,
        sampling: SamplingParams {
            temperature: 1.0,
            seed: u64::from_le_bytes(seed),
            ..SamplingParams::default()
        },
        max_tokens: Some(config.tokens),
        stop: vec![],
        top_logprobs: 0,
        ignore_eos: true,
        cache: None,
    };
    let route = RoutePrefs {
        only: vec![node.to_string()],
        ..RoutePrefs::any()
    };
    let ticket = JobTicket {
        id: format!("canary-{:016x}", tessera_core::unique_u64()),
        account: String::new(),
    };
    let job = RoutedJob::new(
        gw.job_setup(&model.sha256),
        model.clone(),
        request,
        route,
        ticket,
        Origin::Canary,
    );
    let run = async {
        let mut d = job.dispatch().await.ok()?;
        let (mut n, mut first) = (0u32, None);
        loop {
            match d.events.recv().await? {
                JobEvent::Token(_) => {
                    n += 1;
                    first.get_or_insert_with(Instant::now);
                }
                JobEvent::Done { .. } => {
                    let secs = first?.elapsed().as_secs_f64();
                    return (n > 1 && secs > 0.0).then(|| f64::from(n - 1) / secs);
                }
                JobEvent::Error(_) => return None,
                _ => {}
            }
        }
    };
    let tok_s = tokio::time::timeout(config.deadline, run)
        .await
        .ok()
        .flatten();
    if tok_s.is_none() {
        tracing::warn!(provider = %node.short(), "missed a canary job (unroutable after {CANARY_MISSES} in a row)");
    }
    gw.directory().record_canary(&node, tok_s);
}
