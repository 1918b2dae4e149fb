//! Uptime canaries: the gateway's own small jobs to every provider.
//!
//! Every [`CanaryConfig::interval`] the gateway sends each connected
//! provider of each model it audits one canary job: a random prompt with a
//! random seed, [`CanaryConfig::tokens`] tokens, due within
//! [`CanaryConfig::deadline`]. A canary is always audited (when the gateway
//! audits), and the tokens per second it was delivered at become the
//! provider's *verified* throughput. A provider that misses
//! [`CANARY_MISSES`] canaries in a row is not routed to until it answers
//! one again (canaries still go to it). Canaries are not billed.

use std::time::{Duration, Instant};

use tessera_api::{JobTicket, RoutePrefs, ServedModel};
use tessera_engine::{ChatMessage, Event, GenerationRequest, SamplingParams};

use crate::gateway::{Gateway, CANARY_MISSES};
use crate::job::RoutedJob;

/// The account canary jobs are filed under (never billed).
pub const CANARY_ACCOUNT: &str = "system:canary";

#[derive(Clone, Debug)]
pub struct CanaryConfig {
    pub interval: Duration,
    pub deadline: Duration,
    pub tokens: u32,
}

const WORDS: &[&str] = &[
    "river", "copper", "lantern", "orbit", "meadow", "violin", "harbor", "pepper", "glacier",
    "ember", "tunnel", "falcon", "quartz", "saddle", "thistle", "canyon", "velvet", "magnet",
];

fn random() -> u64 {
    getrandom::u64().unwrap_or(0)
}

/// Run canaries until the process ends.
pub fn spawn(gateway: Gateway, config: CanaryConfig) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(config.interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            for model in gateway.models.iter() {
                for node in gateway.directory().serving_nodes(&model.sha256) {
                    let (gw, model, config) = (gateway.clone(), model.clone(), config.clone());
                    tokio::spawn(async move { probe(&gw, &model, node, &config).await });
                }
            }
        }
    });
}

/// One canary to `node`; records its verified tok/s or a miss.
async fn probe(gw: &Gateway, model: &ServedModel, node: String, config: &CanaryConfig) {
    let words: Vec<&str> = (0..6)
        .map(|_| WORDS[(random() % WORDS.len() as u64) as usize])
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
    let request = GenerationRequest {
        prompt,
        sampling: SamplingParams {
            temperature: 1.0,
            seed: random(),
            ..SamplingParams::default()
        },
        max_tokens: Some(config.tokens),
        stop: vec![],
        top_logprobs: 0,
        ignore_eos: true,
    };
    let route = RoutePrefs {
        only: vec![node.clone()],
        probe: true,
        ..RoutePrefs::default()
    };
    let ticket = JobTicket {
        id: format!("canary-{:016x}", random()),
        account: CANARY_ACCOUNT.into(),
    };
    let job = RoutedJob::new(
        gw.directory().clone(),
        model.clone(),
        request,
        route,
        gw.endpoint.secret_key().clone(),
    )
    .audited(gw.audits.get(&model.sha256).cloned(), ticket);
    let run = async {
        let mut d = job.dispatch().await.ok()?;
        let (mut n, mut first) = (0u32, None);
        loop {
            match d.events.recv().await? {
                Event::Token(_) => {
                    n += 1;
                    first.get_or_insert_with(Instant::now);
                }
                Event::Done { .. } => {
                    let secs = first?.elapsed().as_secs_f64();
                    return (n > 1 && secs > 0.0).then(|| f64::from(n - 1) / secs);
                }
                Event::Error(_) => return None,
                _ => {}
            }
        }
    };
    let tok_s = tokio::time::timeout(config.deadline, run)
        .await
        .ok()
        .flatten();
    if tok_s.is_none() {
        tracing::warn!(provider = %&node[..12], "missed a canary job (unroutable after {CANARY_MISSES} in a row)");
    }
    gw.directory().record_canary(&node, tok_s);
}
