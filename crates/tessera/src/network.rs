//! `tessera gateway` and `tessera provider`: the two halves of the network.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tessera_api::{ApiConfig, Backend, ServedModel};
use tessera_engine::Model;
use tessera_net::discovery::GOSSIP_ALPN;
use tessera_net::node::{self, Ticket};
use tessera_net::provider::JobRunner;
use tessera_net::synthetic::SyntheticRunner;
use tessera_net::{Discovery, DiscoveryConfig, Gateway, NetworkBackend, ProviderConfig, Role};
use tessera_protocol::{ModelOffer, ALPN};

use crate::accounts::{demo_key, DatabaseArgs, LedgerAccounts};
use crate::serve::{shutdown_signal, write_json, EndpointFile};
use crate::{EngineArgs, PriceArgs};

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Address of the HTTP API (the API lives under /v1).
    #[arg(long, env = "TESSERA_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// UDP address of the iroh endpoint providers dial.
    #[arg(long, env = "TESSERA_BIND", default_value = "0.0.0.0:7447")]
    pub bind: SocketAddr,
    /// Address to put in the ticket when the bound one is not reachable as
    /// is (0.0.0.0 is advertised as 127.0.0.1 otherwise).
    #[arg(long, env = "TESSERA_PUBLIC_ADDR")]
    pub public_addr: Option<SocketAddr>,
    /// Models this gateway accepts (it needs their tokenizer); repeatable.
    #[arg(long = "model", env = "TESSERA_MODEL", value_delimiter = ',', default_value = tessera_models::DEFAULT_MODEL.alias)]
    pub models: Vec<String>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "TESSERA_BODY_LIMIT", default_value_t = 4 * 1024 * 1024)]
    pub body_limit: usize,
    /// Ticket of another gateway (or any node) of the network to join its
    /// gossip topic through; repeatable.
    #[arg(long = "join", env = "TESSERA_JOIN", value_delimiter = ',')]
    pub join: Vec<Ticket>,
    #[command(flatten)]
    pub network: NetworkArgs,
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// The gateway's fee, in basis points of each charge (500 = 5%).
    #[arg(long, env = "TESSERA_FEE_BPS", default_value_t = 500)]
    pub fee_bps: u64,
    /// Create (or reuse) a demo account and put its key in endpoint.json
    /// (`tessera devnet` does this).
    #[arg(long)]
    pub demo_account: bool,
    #[command(flatten)]
    pub audit: AuditArgs,
}

/// How the gateway audits providers' answers.
#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Share of a trusted provider's answers audited at random (0–1).
    #[arg(long, env = "TESSERA_AUDIT_RATE", default_value_t = 0.05)]
    pub audit_rate: f64,
    /// Audits a new provider must pass before only --audit-rate of its
    /// answers are audited (every answer is audited until then, and after
    /// any failure).
    #[arg(long, env = "TESSERA_AUDIT_PROBATION", default_value_t = 20)]
    pub audit_probation: u32,
    /// CPU threads of the auditor's own engine.
    #[arg(long, env = "TESSERA_AUDIT_THREADS", default_value_t = 1)]
    pub audit_threads: usize,
    /// Positions (prompt + output) the auditor can re-check; longer answers
    /// are not audited.
    #[arg(long, env = "TESSERA_AUDIT_CONTEXT", default_value_t = 4096)]
    pub audit_context: usize,
    /// Audit providers' answers: re-check them with the gateway's own
    /// engine, refund failed ones, quarantine a provider after a second
    /// failure. Off by default: the auditor loads a second copy of the
    /// model and costs about half of each audited answer's generation in
    /// CPU (see README); without it every answer is `not_audited`.
    #[arg(long, env = "TESSERA_AUDIT")]
    pub audit: bool,
    /// Seconds between canary jobs to every provider (0: none). Canaries
    /// are audited when --audit is on; 3 missed in a row make a provider
    /// unroutable until it answers one again.
    #[arg(long, env = "TESSERA_CANARY_INTERVAL", default_value_t = 300.0)]
    pub canary_interval: f64,
    /// Seconds a canary may take.
    #[arg(long, env = "TESSERA_CANARY_DEADLINE", default_value_t = 30.0)]
    pub canary_deadline: f64,
    /// Tokens a canary generates.
    #[arg(long, env = "TESSERA_CANARY_TOKENS", default_value_t = 32)]
    pub canary_tokens: u32,
}

/// Discovery settings shared by gateways and providers.
#[derive(Args, Debug)]
pub struct NetworkArgs {
    /// Name of the network: nodes announce themselves on a gossip topic
    /// derived from it and ignore announcements of other networks.
    #[arg(long = "network", env = "TESSERA_NETWORK", default_value = "tessera")]
    pub name: String,
}

#[derive(Args, Debug)]
pub struct ProviderArgs {
    /// Ticket of a gateway to serve (NODEID@IP:PORT, printed by `tessera
    /// gateway`); repeatable.
    #[arg(
        long = "gateway",
        env = "TESSERA_GATEWAY",
        value_delimiter = ',',
        required = true
    )]
    pub gateways: Vec<Ticket>,
    /// Local UDP address of the provider's iroh endpoint.
    #[arg(long, env = "TESSERA_BIND", default_value = "0.0.0.0:0")]
    pub bind: SocketAddr,
    /// Most gateways to serve at once: the given ones plus those learnt
    /// through discovery.
    #[arg(long, env = "TESSERA_MAX_GATEWAYS", default_value_t = 4)]
    pub max_gateways: usize,
    /// FOR LOAD BENCHMARKS ONLY: run no model, answer every job by echoing
    /// its prompt tokens at this many tokens/s per stream (`tessera bench
    /// gateway` uses it; the gateway sees the provider as synthetic).
    #[arg(long, value_name = "TOK_S")]
    pub synthetic: Option<f64>,
    #[command(flatten)]
    pub network: NetworkArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub price: PriceArgs,
    #[cfg(feature = "adversary")]
    #[command(flatten)]
    pub cheat: CheatArgs,
}

/// TEST BUILDS ONLY (feature `adversary`): ways to cheat, for the
/// auditor's tests.
#[cfg(feature = "adversary")]
#[derive(Args, Debug)]
pub struct CheatArgs {
    /// Cheat: garbage, forged-commitments, early-stop or inflated-usage; or
    /// stall (jobs hang while HOME/stall exists; connection stays alive).
    #[arg(long)]
    pub misbehave: Option<tessera_net::adversary::Misbehave>,
    /// Cheat: run this (altered) model file while announcing --model's hash.
    #[arg(long)]
    pub misbehave_model: Option<std::path::PathBuf>,
}

pub fn gateway(home: &Path, args: GatewayArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(home).with_context(|| format!("cannot create {}", home.display()))?;
    let mut models = Vec::new();
    let mut files = Vec::new();
    for name in &args.models {
        let m = crate::models::resolve_or_pull(home, name)?;
        let file = tessera_llama::LlamaModelFile::load(&m.path)?;
        files.push((m.sha256.clone(), file.clone()));
        let context_length = file.info().n_ctx_train;
        models.push(ServedModel {
            id: m.alias.clone(),
            sha256: m.sha256.clone(),
            tokenizer: file as Arc<dyn Model>,
            context_length,
            providers: 0,
            prices: None,
        });
    }
    let key = node::load_or_create_key(home)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let endpoint = node::bind(
            key.clone(),
            args.bind,
            vec![ALPN.to_vec(), GOSSIP_ALPN.to_vec()],
        )
        .await?;
        let ticket = Ticket::of(&endpoint, args.public_addr);
        let discovery = Discovery::start(
            &endpoint,
            key,
            DiscoveryConfig {
                network: args.network.name.clone(),
                role: Role::Gateway,
                addrs: ticket.addrs.clone(),
                models: models.iter().map(|m| m.sha256.clone()).collect(),
                bootstrap: args.join.clone(),
            },
        );
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let metrics = tessera_api::Metrics::new();
        let ledger = args.db.open(home).await?;
        let audits = match args.audit.audit {
            true => start_auditors(&files, &args.audit, &metrics, &ledger)?,
            false => Default::default(),
        };
        let gateway = Gateway::new(endpoint.clone(), models)
            .with_discovery(discovery)
            .with_metrics(metrics.clone())
            .with_audits(audits);
        let key = match args.demo_account {
            true => Some(demo_key(home, &ledger).await?),
            false => None,
        };
        let gateway_id = node::node_id(&endpoint.id());
        let receipts = crate::earnings::route(ledger.clone());
        let directory = gateway.directory().clone();
        let ledger_view = ledger.clone();
        let accounts =
            Arc::new(LedgerAccounts::start(ledger, gateway_id.clone(), args.fee_bps).await?);
        tokio::spawn(gateway.clone().accept());
        if args.audit.canary_interval > 0.0 {
            tessera_net::canary::spawn(
                gateway.clone(),
                tessera_net::canary::CanaryConfig {
                    interval: std::time::Duration::from_secs_f64(args.audit.canary_interval),
                    deadline: std::time::Duration::from_secs_f64(
                        args.audit.canary_deadline.max(0.1),
                    ),
                    tokens: args.audit.canary_tokens.max(2),
                },
            );
        }
        let path = home.join("endpoint.json");
        write_json(
            &path,
            &json!({
                "api_base": format!("http://{addr}/v1"),
                "api_key": key,
                "ticket": ticket.to_string(),
                "node": node::node_id(&endpoint.id()),
                "network": args.network.name,
                "pid": std::process::id(),
            }),
        )?;
        let _endpoint_file = EndpointFile(path);
        tracing::info!(%addr, "gateway serving");
        println!("Tessera gateway: API on http://{addr}/v1");
        println!("Providers join with:\n  tessera provider --gateway {ticket}");
        let backend: Arc<dyn Backend> = Arc::new(NetworkBackend::new(gateway));
        let view = Arc::new(crate::observe::View {
            metrics: metrics.clone(),
            ledger: ledger_view,
            backend: backend.clone(),
            directory: Some(directory),
            node: gateway_id.clone(),
            network: args.network.name.clone(),
            started: std::time::Instant::now(),
        });
        println!("Dashboard: http://{addr}/dashboard");
        let app = tessera_api::router(
            backend,
            accounts,
            ApiConfig {
                body_limit: args.body_limit,
                metrics,
            },
        )
        .merge(receipts)
        .merge(crate::observe::routes(view));
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        endpoint.close().await;
        anyhow::Ok(())
    })
}

/// One auditor (its own engine, hidden states on) per model; a failed
/// audit refunds its request in the ledger.
fn start_auditors(
    files: &[(String, Arc<tessera_llama::LlamaModelFile>)],
    args: &AuditArgs,
    metrics: &Arc<tessera_api::Metrics>,
    ledger: &tessera_ledger::Ledger,
) -> anyhow::Result<std::collections::HashMap<String, Arc<tessera_net::audit::Audits>>> {
    let mut out = std::collections::HashMap::new();
    for (sha256, file) in files {
        let f = file.clone();
        let config = tessera_llama::EngineConfig {
            slots: 1,
            context_per_slot: args.audit_context,
            threads: args.audit_threads.max(1),
            hidden_states: true,
            ..tessera_llama::EngineConfig::default()
        };
        let handle = tessera_engine::audit::spawn_auditor(
            file.clone() as Arc<dyn Model>,
            tessera_engine::audit::Thresholds::default(),
            move || {
                Ok(Box::new(tessera_llama::LlamaEngine::new(&f, config)?)
                    as Box<dyn tessera_engine::Engine>)
            },
        )?;
        let hooks = Arc::new(LedgerHooks(ledger.clone()));
        let policy = tessera_net::audit::AuditPolicy {
            base_rate: args.audit_rate.clamp(0.0, 1.0),
            probation: args.audit_probation,
        };
        out.insert(
            sha256.clone(),
            tessera_net::audit::Audits::new(handle, policy, Some(metrics.clone()), Some(hooks)),
        );
    }
    Ok(out)
}

/// Verdicts in the ledger: refunds, forfeited bonds, the audit status on
/// providers' receipts.
struct LedgerHooks(tessera_ledger::Ledger);

/// Wait (up to a minute) for `job`'s settlement to be in the ledger: an
/// audit can finish before the answer is settled.
async fn settled_hold(ledger: &tessera_ledger::Ledger, job: &str) -> Option<String> {
    for _ in 0..120 {
        if let Ok(Some(hold)) = ledger.hold_of_job(job).await {
            return Some(hold);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    None
}

impl tessera_net::audit::AuditHooks for LedgerHooks {
    fn verdict(&self, request: &str, provider: &str, status: &'static str) {
        let (ledger, job, provider) = (self.0.clone(), request.to_string(), provider.to_string());
        tokio::spawn(async move {
            if settled_hold(&ledger, &job).await.is_some() {
                if let Err(e) = ledger.set_audit(&job, &provider, status).await {
                    tracing::warn!(%job, error = %e, "could not record an audit on its receipt");
                }
            }
        });
    }

    fn failed(&self, request: &str) {
        let (ledger, job) = (self.0.clone(), request.to_string());
        tokio::spawn(async move {
            let Some(hold) = settled_hold(&ledger, &job).await else {
                tracing::error!(%job, "could not refund a request whose audit failed: never settled");
                return;
            };
            match ledger.refund(&hold).await {
                Ok(r) => tracing::info!(%job, amount = r.amount, "refunded after a failed audit"),
                Err(e) => tracing::warn!(%job, error = %e, "no refund after a failed audit"),
            }
        });
    }

    fn quarantined(&self, provider: &str) {
        let (ledger, provider) = (self.0.clone(), provider.to_string());
        tokio::spawn(async move {
            // After the refunds of its failed answers have been taken back.
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            match ledger.forfeit(&provider).await {
                Ok(f) => {
                    tracing::warn!(provider = %&provider[..12], amount = f.amount, "bond forfeited")
                }
                Err(e) => {
                    tracing::error!(provider = %&provider[..12], error = %e, "could not forfeit a bond")
                }
            }
        });
    }
}

pub fn provider(home: &Path, args: ProviderArgs) -> anyhow::Result<()> {
    let key = node::load_or_create_key(home)?;
    // The engine (or the synthetic stand-in), kept alive for the whole run.
    let mut engine = None;
    let (runner, model, context, hardware): (Arc<dyn JobRunner>, _, _, _) = match args.synthetic {
        Some(tok_s) => (
            Arc::new(SyntheticRunner::new(args.engine.slots, tok_s)),
            crate::models::resolve_or_pull(home, &args.engine.model)?,
            args.engine.context,
            format!("SYNTHETIC engine for load benchmarks, {tok_s} tok/s per stream"),
        ),
        None => {
            #[allow(unused_mut)]
            let mut engine_args = args.engine.clone();
            #[cfg(feature = "adversary")]
            if let Some(path) = &args.cheat.misbehave_model {
                tracing::warn!(file = %path.display(), "CHEATING: serving another model file under --model's hash");
                engine_args.model = path.display().to_string();
            }
            let local = engine.insert(crate::local::start(home, &engine_args, true)?);
            let hardware = format!(
                "{} CPU threads, {} slots, {}",
                local.config.threads,
                local.config.slots,
                std::env::consts::ARCH
            );
            (
                Arc::new(local.handle.clone()),
                local.model.clone(),
                local.handle.context_per_sequence(),
                hardware,
            )
        }
    };
    #[cfg(feature = "adversary")]
    let (runner, model) = {
        let model = match &args.cheat.misbehave_model {
            Some(_) => crate::models::resolve_or_pull(home, &args.engine.model)?,
            None => model,
        };
        let runner: Arc<dyn JobRunner> = match args.cheat.misbehave {
            Some(mode) => {
                tracing::warn!(?mode, "CHEATING provider (test build)");
                let n_vocab = engine.as_ref().map_or(1, |e| e.file.info().n_vocab);
                Arc::new(tessera_net::adversary::CheatingRunner {
                    inner: runner,
                    mode,
                    n_vocab,
                    stall_flag: home.join("stall"),
                })
            }
            None => runner,
        };
        (runner, model)
    };
    let offers = vec![ModelOffer {
        sha256: model.sha256.clone(),
        alias: model.alias.clone(),
        context_length: context,
        price: args.price.price(),
    }];
    let models = offers.iter().map(|o| o.sha256.clone()).collect();
    let config = ProviderConfig {
        gateways: args.gateways.clone(),
        offers,
        hardware,
        max_gateways: args.max_gateways,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let endpoint = node::bind(key.clone(), args.bind, vec![GOSSIP_ALPN.to_vec()]).await?;
        let id = node::node_id(&endpoint.id());
        let discovery = Discovery::start(
            &endpoint,
            key,
            DiscoveryConfig {
                network: args.network.name.clone(),
                role: Role::Provider,
                addrs: Ticket::of(&endpoint, None).addrs,
                models,
                bootstrap: args.gateways,
            },
        );
        tokio::spawn(discovery.clone().accept(endpoint.clone()));
        let path = home.join("provider.json");
        write_json(&path, &json!({ "node": id, "pid": std::process::id() }))?;
        let _file = EndpointFile(path);
        println!("Tessera provider {id} serving {}", model.alias);
        let serve = tessera_net::provider::run(endpoint.clone(), runner, config, Some(discovery));
        tokio::select! {
            _ = serve => {}
            _ = shutdown_signal() => tracing::info!("provider shutting down"),
        }
        endpoint.close().await;
        anyhow::Ok(())
    })?;
    drop(engine);
    Ok(())
}
