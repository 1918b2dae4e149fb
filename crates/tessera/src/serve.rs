//! `tessera serve`: the API and one in-process provider on this machine.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tessera_api::accounts::LedgerAccounts;
use tessera_api::ApiConfig;
use tessera_backend::Backend;

use crate::accounts::{demo_key, DatabaseArgs};
use crate::local;
use crate::process::{shutdown_signal, write_json, EndpointFile};
use crate::{EngineArgs, PriceArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the HTTP API (the API lives under /v1).
    #[arg(long, env = "TESSERA_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "TESSERA_BODY_LIMIT", default_value_t = 4 * 1024 * 1024)]
    pub body_limit: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub price: PriceArgs,
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Build an audit proof of every answer, as a provider does, and
    /// discard it (`serve` has no auditor). It costs what proving costs a
    /// provider; `tessera bench network` turns it on to compare like with
    /// like.
    #[arg(long)]
    pub proofs: bool,
}

fn write_endpoint(
    home: &Path,
    addr: SocketAddr,
    model: &str,
    key: &str,
    ledger: &str,
) -> anyhow::Result<EndpointFile> {
    std::fs::create_dir_all(home).with_context(|| format!("cannot create {}", home.display()))?;
    let path = home.join("endpoint.json");
    let body = json!({
        "api_base": format!("http://{addr}/v1"),
        "api_key": key,
        "model": model,
        "ledger": ledger,
        "pid": std::process::id(),
    });
    write_json(&path, &body)?;
    Ok(EndpointFile(path))
}

/// How long answers in flight may run on after SIGTERM or Ctrl-C.
const GRACE: Duration = Duration::from_secs(10);

/// Serve `app` until Ctrl-C or SIGTERM; then take no new requests, give the
/// answers in flight [`GRACE`] to finish, end the rest (their holds are
/// released), and wait until every bill is closed, so nothing stays held
/// in escrow when the process exits.
pub async fn serve_until_stopped(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: tokio_util::sync::CancellationToken,
    in_flight: tokio_util::task::TaskTracker,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server =
        axum::serve(tessera_api::nodelay(listener), app).with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: finishing requests in flight");
            let _ = stop_tx.send(true);
        });
    let mut grace = stop_rx.clone();
    tokio::select! {
        r = server => r.context("HTTP server failed")?,
        _ = async {
            let _ = grace.wait_for(|s| *s).await;
            tokio::time::sleep(GRACE).await;
        } => tracing::warn!("answers still running after {} s; ending them", GRACE.as_secs()),
    }
    stop.cancel();
    in_flight.close();
    if tokio::time::timeout(Duration::from_secs(10), in_flight.wait())
        .await
        .is_err()
    {
        tracing::error!(
            "some bills were not closed within 10 s; their holds are released at the next start"
        );
    }
    Ok(())
}

pub fn run(home: &Path, args: ServeArgs) -> anyhow::Result<()> {
    let engine = local::start(home, &args.engine, args.proofs)?;
    let backend: Arc<dyn Backend> = Arc::new(engine.backend(args.price.price()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let ledger = args.db.open(home).await?;
        let key = demo_key(home, &ledger).await?;
        // `serve` charges like a provider without a gateway: no fee.
        let view = Arc::new(crate::observe::View {
            metrics: tessera_api::Metrics::new(),
            ledger: ledger.clone(),
            backend: backend.clone(),
            directory: None,
            auditors: None,
            node: "local".into(),
            network: "local".into(),
            started: std::time::Instant::now(),
            operator_token: None,
            training: None,
        });
        let accounts = Arc::new(LedgerAccounts::start(ledger, "local".into(), 0).await?);
        let _endpoint =
            write_endpoint(home, addr, &engine.model.alias, &key, &args.db.url(home))?;
        tracing::info!(
            %addr,
            model = %engine.model.alias,
            sha256 = %engine.model.sha256,
            threads = engine.config.threads,
            slots = engine.config.slots,
            context = engine.config.context_per_slot,
            "serving"
        );
        println!("Tessera is serving {} on http://{addr}/v1", engine.model.alias);
        println!("  API key (demo account): {key}");
        println!(
            "  curl http://{addr}/v1/chat/completions -H 'Content-Type: application/json' -H 'Authorization: Bearer {key}' \\\n    -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Say hello\"}}]}}'",
            engine.model.alias
        );
        let config = ApiConfig {
            body_limit: args.body_limit,
            metrics: view.metrics.clone(),
            ..ApiConfig::default()
        };
        let (stop, in_flight) = (config.shutdown.clone(), config.tasks.clone());
        let app = tessera_api::router(backend, accounts, config)
            .merge(crate::observe::metrics_route(view));
        serve_until_stopped(listener, app, stop, in_flight).await
    })?;
    drop(runtime);
    // The router held the last other handle; once ours goes, the engine
    // thread finishes and can be joined.
    let local::LocalEngine {
        scheduler, handle, ..
    } = engine;
    drop(handle);
    scheduler.join();
    tracing::info!("stopped");
    Ok(())
}
