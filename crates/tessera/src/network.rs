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
    /// failure. Off by default until the thresholds are calibrated on
    /// enough honest answers (see README); without it every answer is
    /// `not_audited`.
    #[arg(long, env = "TESSERA_AUDIT")]
    pub audit: bool,
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
        let ledger = ledger.clone();
        let refund: tessera_net::audit::OnFailure = Arc::new(move |job: String| {
            let ledger = ledger.clone();
            tokio::spawn(async move { refund_when_settled(&ledger, &job).await });
        });
        let policy = tessera_net::audit::AuditPolicy {
            base_rate: args.audit_rate.clamp(0.0, 1.0),
            probation: args.audit_probation,
        };
        out.insert(
            sha256.clone(),
            tessera_net::audit::Audits::new(handle, policy, Some(metrics.clone()), Some(refund)),
        );
    }
    Ok(out)
}

/// Refund a request whose audit failed, once its settlement is in the
/// ledger (the audit may finish first); gives up after a minute.
async fn refund_when_settled(ledger: &tessera_ledger::Ledger, job: &str) {
    for _ in 0..120 {
        if let Ok(Some(hold)) = ledger.hold_of_job(job).await {
            match ledger.refund(&hold).await {
                Ok(r) => {
                    tracing::info!(%job, amount = r.amount, "refunded after a failed audit");
                    return;
                }
                Err(e) => tracing::debug!(%job, error = %e, "not refundable yet"),
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    tracing::error!(%job, "could not refund a request whose audit failed");
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
            let local = engine.insert(crate::local::start(home, &args.engine, true)?);
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
