//! Canaries: the gateway's own jobs, sent to every provider at random
//! times, indistinguishable from clients' requests.
//!
//! Each provider gets canaries as a Poisson process of its own (on average
//! one per [`CanaryConfig::interval`], never all providers at once), each
//! drawn from a large space of prompts and settings ([`generator`]), due
//! within [`CanaryConfig::deadline`]. A canary is routed like a client's
//! request and, when the gateway has a ledger ([`CanaryPayer`]), paid like
//! one (from the operator's canary account, under the same proof-or-nothing
//! rule), so neither its shape, its timing nor the provider's earnings mark
//! it. It is always audited (when the gateway audits), and the tokens per
//! second it was delivered at become the provider's *verified* throughput.
//! A provider that misses [`CANARY_MISSES`] canaries in a row is not routed
//! to until it answers one again (canaries still go to it). A provider has
//! at most one canary in flight: a draw that falls while its last canary is
//! still running is skipped, so a slow provider (or an interval shorter
//! than a canary takes) never has canaries pile up in its queue, crowd out
//! clients and flood the auditor. That a job is a canary is known only on
//! the gateway's side of it.

pub mod generator;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_backend::{JobEvent, JobTicket, Parts, RoutePrefs, ServedModel};
use tessera_core::{GenerationRequest, NodeId};
use tessera_engine::ChatMessage;
use tessera_ledger::{Charge, Hold, Ledger};

use crate::audit::Origin;
use crate::directory::CANARY_MISSES;
use crate::gateway::Gateway;
use crate::job::RoutedJob;

/// Who pays for canaries: an account of the operator's at the ledger.
#[derive(Clone)]
pub struct CanaryPayer {
    /// The ledger.
    pub ledger: Ledger,
    /// The paying account (id).
    pub account: String,
    /// The gateway's fee, as on clients' requests.
    pub fee_bps: u64,
}

/// When and how big canaries are.
#[derive(Clone)]
pub struct CanaryConfig {
    /// Mean time between two canaries to one provider.
    pub interval: Duration,
    /// Time one canary may take.
    pub deadline: Duration,
    /// Most tokens one canary asks for.
    pub tokens: u32,
    /// The operator's own prompts (instead of the built-in templates).
    pub prompts: Arc<Vec<String>>,
    /// Pays canaries like clients' requests (none: unpaid).
    pub payer: Option<CanaryPayer>,
}

/// How often the scheduler rolls the dice for each provider.
const TICK: Duration = Duration::from_millis(250);

/// Run canaries until the gateway shuts down.
pub fn spawn(gateway: Gateway, config: CanaryConfig) {
    let tasks = gateway.tasks().clone();
    let shutdown = gateway.shutdown_token().clone();
    tasks.spawn(async move {
        let Ok(mut dice) = generator::Dice::new() else {
            tracing::error!("no randomness for canaries; none will be sent");
            return;
        };
        // Each provider independently, with the chance that makes the mean
        // gap `interval`: a Poisson process per provider.
        let chance = (TICK.as_secs_f64() / config.interval.as_secs_f64().max(1e-3)).min(1.0);
        let mut tick = tokio::time::interval(TICK);
        // Providers sent their first canary: one that never finished a job
        // gets one at once, so an honest newcomer proves itself to the
        // router (see `router::trial_term`) without a client's request
        // being its trial. Bounded: cleared when large.
        let mut introduced: HashSet<NodeId> = Default::default();
        // Providers with a canary running now (see the module's doc).
        let in_flight = InFlight::default();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            if introduced.len() > 100_000 {
                introduced.clear();
            }
            for model in gateway.models() {
                for node in gateway.directory().serving_nodes(&model.sha256) {
                    let first = gateway.directory().unproven(&node) && introduced.insert(node);
                    if !first && dice.unit() >= chance {
                        continue;
                    }
                    let Some(running) = Running::start(&in_flight, node) else {
                        continue;
                    };
                    let (gw, model, config) = (gateway.clone(), model.clone(), config.clone());
                    let shutdown = shutdown.clone();
                    gateway.tasks().spawn(async move {
                        let _running = running;
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

/// Providers with a canary running now.
type InFlight = Arc<Mutex<HashSet<NodeId>>>;

/// A provider's canary in flight; the provider is free for the next one
/// when this is dropped (the canary ended, or was cancelled).
struct Running {
    set: InFlight,
    node: NodeId,
}

impl Running {
    /// Mark `node` as having a canary in flight; `None` if it already has.
    fn start(set: &InFlight, node: NodeId) -> Option<Running> {
        let fresh = set.lock().unwrap_or_else(|p| p.into_inner()).insert(node);
        fresh.then(|| Running {
            set: set.clone(),
            node,
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.node);
    }
}

/// One canary to `node`; records its verified tok/s or a miss.
async fn probe(gw: &Gateway, model: &ServedModel, node: NodeId, config: &CanaryConfig) {
    // The prompt and seed must be unguessable; without the OS random source
    // this canary is skipped rather than made predictable.
    let Ok(mut dice) = generator::Dice::new() else {
        tracing::error!("no randomness for a canary; skipping it");
        return;
    };
    let drawn = generator::draw(&mut dice, &config.prompts, config.tokens);
    let tokenizer = model.tokenizer.clone();
    let text = match drawn.chat {
        true => {
            let messages = [ChatMessage {
                role: "user".into(),
                content: drawn.text.clone(),
            }];
            match tokenizer.apply_chat_template(&messages) {
                Ok(t) => t,
                Err(_) => return,
            }
        }
        false => drawn.text.clone(),
    };
    let Ok(prompt) = tokenizer.tokenize(&text, true) else {
        return;
    };
    let prompt_tokens = prompt.len() as u64;
    let request = GenerationRequest {
        prompt,
        sampling: drawn.sampling,
        max_tokens: Some(drawn.max_tokens),
        stop: drawn.stop,
        top_logprobs: 0,
        ignore_eos: false,
        cache: None,
    };
    let route = RoutePrefs {
        only: vec![node.to_string()],
        ..RoutePrefs::any()
    };
    let ticket = JobTicket {
        id: format!("canary-{:016x}", tessera_core::unique_u64()),
        account: String::new(),
        budget: None,
    };
    // Held like a client's request: the prompt and every token asked for at
    // the dearest price among the model's providers.
    let hold = match (&config.payer, model.prices) {
        (Some(payer), Some((_, dearest))) => {
            let most = dearest.cost(prompt_tokens, u64::from(drawn.max_tokens));
            match payer
                .ledger
                .hold(&payer.account, most, &gw.node().to_string(), None)
                .await
            {
                Ok(Hold::New(id)) => Some((payer, id)),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hold a canary's cost (top up the canary account); sent unpaid");
                    None
                }
            }
        }
        _ => None,
    };
    let job = RoutedJob::new(
        gw.job_setup(&model.sha256),
        model.clone(),
        request,
        route,
        ticket.clone(),
        Origin::Canary,
    );
    // Billed by the clients' rule (proof or nothing).
    let mut parts = Parts::new(prompt_tokens);
    parts.require_receipts(true);
    // Its delivered tokens per second, or why it missed.
    let run = async {
        let mut d = job
            .dispatch()
            .await
            .map_err(|e| format!("not routed: {e}"))?;
        parts.start(d.provider.clone(), d.price);
        let (mut n, mut first) = (0u32, None);
        loop {
            match d.events.recv().await {
                None => return Err("the job ended without an answer".to_string()),
                Some(JobEvent::Token(_)) => {
                    n += 1;
                    first.get_or_insert_with(Instant::now);
                    parts.token();
                }
                Some(JobEvent::Provider { node, price }) => parts.start(node, price),
                Some(JobEvent::Receipt(r)) => parts.receipt(r),
                Some(JobEvent::Done { usage, .. }) => {
                    parts.ended(u64::from(usage.completion_tokens));
                    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
                    return match n > 1 && secs > 0.0 {
                        true => Ok(f64::from(n - 1) / secs),
                        false => Err(format!("{n} tokens: no rate to measure")),
                    };
                }
                Some(JobEvent::Error(e)) => return Err(format!("failed: {e}")),
            }
        }
    };
    let tok_s = tokio::time::timeout(config.deadline, run)
        .await
        .unwrap_or_else(|_| Err("not done within its deadline".into()));
    if let Err(why) = &tok_s {
        tracing::warn!(provider = %node.short(), %why, "missed a canary job (unroutable after {CANARY_MISSES} in a row)");
    }
    gw.directory().record_canary(&node, tok_s.ok());
    if let Some((payer, hold)) = hold {
        pay(payer, &hold, &ticket.id, &model.sha256, parts).await;
    }
}

/// Settle a canary as a client's request is settled: what `parts` says
/// the client pays for.
async fn pay(payer: &CanaryPayer, hold: &str, job_id: &str, sha256: &str, mut parts: Parts) {
    let charges: Vec<Charge> = parts
        .payable()
        .into_iter()
        .map(|p| Charge {
            provider: p.provider,
            model_sha256: sha256.to_string(),
            prompt_tokens: p.prompt_tokens,
            completion_tokens: p.completion_tokens,
            input_price: p.price.input,
            output_price: p.price.output,
            receipt: p.receipt,
        })
        .collect();
    if let Err(e) = payer
        .ledger
        .settle(hold, job_id, charges, payer.fee_bps)
        .await
    {
        tracing::warn!(job = %job_id, error = %e, "could not settle a canary");
    }
}
