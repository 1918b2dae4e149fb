//! `tessera bench …`: the figures BENCHMARKS.md quotes.
//!
//! One module per benchmark: [`engine`] (the engine against llama.cpp's
//! own loop), [`server`] (Tessera's HTTP API against llama.cpp's
//! `llama-server`), [`quality`] (which quantization the default model
//! uses), [`network`] (the network hop and the router),
//! [`chat`] (multi-turn conversations and prefix-aware routing),
//! [`gateway`] (concurrent streams), [`ledger`], [`audit`] and
//! [`economics`] (what cheating earns under the policy), [`train`] (a
//! training step and federated rounds in one process); [`stats`]
//! holds the order statistics they share.

pub mod audit;
pub mod chat;
pub mod diloco;
pub mod economics;
pub mod engine;
#[cfg(feature = "testing")]
pub mod flood;
pub mod gateway;
pub mod ledger;
pub mod network;
pub mod quality;
pub mod server;
mod sse;
pub mod stats;
pub mod train;

use std::path::Path;

use clap::Subcommand;

use crate::EngineArgs;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Engine throughput and latency against a direct llama.cpp loop.
    Engine(engine::EngineBench),
    /// What the network hop costs: `serve` vs a devnet, and router timing.
    Network(network::NetworkBench),
    /// Multi-turn conversations: time to first token with and without
    /// prefix-aware routing, and the providers' prefix-cache hit rate.
    Chat(chat::ChatBench),
    /// Settled requests per second on SQLite and PostgreSQL, fully durable.
    Ledger(ledger::LedgerBench),
    /// Concurrent streams one gateway holds (SYNTHETIC-engine providers).
    Gateway(gateway::GatewayBench),
    /// A gateway under a sybil flood (gossip ids, slowloris, stalling
    /// providers): its memory and honest requests' time to first token
    /// (builds with the `testing` feature).
    #[cfg(feature = "testing")]
    Flood(flood::FloodBench),
    /// The auditor: detection per cheating mode, honest false positives,
    /// audit cost; writes the calibration data.
    Audit(audit::AuditBench),
    /// Every cheating strategy's profit per job against honest work, under
    /// the gateway's own audit, bond and slashing rules (simulated
    /// providers).
    Economics(economics::EconomicsBench),
    /// Tessera's API against llama.cpp's `llama-server`, same model,
    /// threads and slots, at several stream counts.
    Server(server::ServerBench),
    /// Candidate quantizations of the default model: quality against the
    /// published file and speed, with llama.cpp's own tools.
    Quality(quality::QualityBench),
    /// A training step on 1 and 2 threads, and federated rounds of the
    /// digits set in one process against centralized training.
    Train(train::TrainBench),
    /// DiLoCo over worker processes (one at half speed) against one
    /// process on the same tokens: loss curves, bytes, utilization, audits.
    Diloco(diloco::DilocoBench),
    /// Cost of Tessera's sampling rule per token, on real logits.
    Sampling {
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// The direct llama.cpp loop alone, as JSON (`bench engine` runs it in a
    /// child process so the two never share llama.cpp's thread pools).
    Direct(engine::DirectBench),
}

pub fn run(home: &Path, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Engine(b) => engine::run(home, b),
        BenchCommand::Direct(b) => engine::direct(b),
        BenchCommand::Server(b) => server::run(home, b),
        BenchCommand::Quality(b) => quality::run(home, b),
        BenchCommand::Chat(b) => chat::run(home, b),
        BenchCommand::Network(b) => network::run(home, b),
        BenchCommand::Gateway(b) => gateway::run(home, b),
        #[cfg(feature = "testing")]
        BenchCommand::Flood(b) => flood::run(home, b),
        BenchCommand::Ledger(b) => ledger::run(b),
        BenchCommand::Audit(b) => audit::run(home, b),
        BenchCommand::Economics(b) => economics::run(b),
        BenchCommand::Train(b) => train::run(home, b),
        BenchCommand::Diloco(b) => diloco::run(home, b),
        BenchCommand::Sampling { engine } => engine::sampling(home, &engine),
    }
}
