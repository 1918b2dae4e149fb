//! `tessera gateway` and `tessera provider`: the two halves of the network.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tessera_api::{ApiConfig, Backend, ServedModel};
use tessera_engine::Model;
use tessera_net::node::{self, Ticket};
use tessera_net::{Gateway, NetworkBackend, ProviderConfig};
use tessera_protocol::{ModelOffer, ALPN};

use crate::serve::{shutdown_signal, write_json, EndpointFile};
use crate::EngineArgs;

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
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn gateway(home: &Path, args: GatewayArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(home).with_context(|| format!("cannot create {}", home.display()))?;
    let mut models = Vec::new();
    for name in &args.models {
        let m = crate::models::resolve_or_pull(home, name)?;
        let file = tessera_llama::LlamaModelFile::load(&m.path)?;
        let context_length = file.info().n_ctx_train;
        models.push(ServedModel {
            id: m.alias.clone(),
            sha256: m.sha256.clone(),
            tokenizer: file as Arc<dyn Model>,
            context_length,
            providers: 0,
        });
    }
    let key = node::load_or_create_key(home)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let endpoint = node::bind(key, args.bind, vec![ALPN.to_vec()]).await?;
        let ticket = Ticket::of(&endpoint, args.public_addr);
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let gateway = Gateway::new(endpoint.clone(), models);
        tokio::spawn(gateway.clone().accept());
        let path = home.join("endpoint.json");
        write_json(
            &path,
            &json!({
                "api_base": format!("http://{addr}/v1"),
                "api_key": null,
                "ticket": ticket.to_string(),
                "node": node::node_id(&endpoint.id()),
                "pid": std::process::id(),
            }),
        )?;
        let _endpoint_file = EndpointFile(path);
        tracing::info!(%addr, "gateway serving");
        println!("Tessera gateway: API on http://{addr}/v1");
        println!("Providers join with:\n  tessera provider --gateway {ticket}");
        let backend: Arc<dyn Backend> = Arc::new(NetworkBackend::new(gateway));
        let app = tessera_api::router(
            backend,
            ApiConfig {
                body_limit: args.body_limit,
            },
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        endpoint.close().await;
        anyhow::Ok(())
    })
}

pub fn provider(home: &Path, args: ProviderArgs) -> anyhow::Result<()> {
    let engine = crate::local::start(home, &args.engine)?;
    let key = node::load_or_create_key(home)?;
    let offers = vec![ModelOffer {
        sha256: engine.model.sha256.clone(),
        alias: engine.model.alias.clone(),
        context_length: engine.handle.context_per_sequence(),
    }];
    let hardware = format!(
        "{} CPU threads, {} slots, {}",
        engine.config.threads,
        engine.config.slots,
        std::env::consts::ARCH
    );
    let config = ProviderConfig {
        gateways: args.gateways,
        offers,
        hardware,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let endpoint = node::bind(key, args.bind, vec![]).await?;
        let id = node::node_id(&endpoint.id());
        let path = home.join("provider.json");
        write_json(&path, &json!({ "node": id, "pid": std::process::id() }))?;
        let _file = EndpointFile(path);
        println!("Tessera provider {id} serving {}", engine.model.alias);
        tokio::select! {
            _ = tessera_net::provider::run(endpoint.clone(), engine.handle.clone(), config) => {}
            _ = shutdown_signal() => tracing::info!("provider shutting down"),
        }
        endpoint.close().await;
        anyhow::Ok(())
    })
}
