//! The gateway side: accept providers, keep a directory, route jobs.
//!
//! Providers dial in. Each connection starts with a control stream
//! (Hello → Welcome or Refused, then heartbeats); the provider stays in the
//! [`Directory`] while that stream lives and its heartbeats are recent. A job
//! goes to the least-loaded healthy provider serving the model's sha256,
//! on a fresh bi-stream; a provider that fails before the first token is
//! replaced by another (at most [`MAX_TRIES`] in all). A client that goes
//! away resets the job stream, which cancels the job on the provider.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use iroh::endpoint::{Connection, SendStream};
use iroh::Endpoint;
use serde_json::{json, Value};
use tessera_api::{ApiError, Backend, BoxFuture, Dispatch, ServedModel};
use tessera_engine::GenerationRequest;
use tessera_protocol::{read_frame, write_frame, Frame, ModelOffer, PROTOCOL_VERSION};

use crate::job::RoutedJob;
use crate::node::node_id;

/// Providers tried for one job before the client gets a 503.
pub const MAX_TRIES: usize = 3;
/// How often providers are asked to send a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A provider whose heartbeats stopped this long ago is not routed to.
const STALE: Duration = Duration::from_secs(6);

/// One connected provider.
pub(crate) struct Provider {
    pub(crate) node: String,
    /// This session (node + connection): a job that saw it fail avoids it,
    /// but not the same node reconnected after a restart.
    pub(crate) session: String,
    pub(crate) conn: Connection,
    offers: Vec<ModelOffer>,
    slots: usize,
    hardware: String,
    /// Jobs this gateway has in flight on it.
    pub(crate) inflight: AtomicUsize,
    last_heartbeat: Mutex<Instant>,
    /// Its own measured tok/s from the last heartbeat.
    tok_s: Mutex<f64>,
}

impl Provider {
    fn healthy(&self) -> bool {
        self.last_heartbeat
            .lock()
            .is_ok_and(|t| t.elapsed() < STALE)
    }
}

/// Every provider this gateway can reach right now.
#[derive(Default)]
pub struct Directory {
    providers: Mutex<HashMap<String, Arc<Provider>>>,
    /// Breaks ties between equally loaded providers in turn.
    turn: AtomicUsize,
}

impl Directory {
    fn insert(&self, p: Arc<Provider>) {
        if let Ok(mut map) = self.providers.lock() {
            if let Some(old) = map.insert(p.node.clone(), p) {
                old.conn.close(0u32.into(), b"replaced by a newer session");
            }
        }
    }

    /// Remove `node` if its entry is still the session `conn` belongs to.
    fn remove(&self, node: &str, conn: &Connection) {
        if let Ok(mut map) = self.providers.lock() {
            if map
                .get(node)
                .is_some_and(|p| p.conn.stable_id() == conn.stable_id())
            {
                map.remove(node);
            }
        }
    }

    fn snapshot(&self) -> Vec<Arc<Provider>> {
        self.providers
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Healthy providers of `sha256` with a free slot and room for `tokens`.
    pub(crate) fn pick(
        &self,
        sha256: &str,
        tokens: usize,
        tried: &[String],
    ) -> Option<Arc<Provider>> {
        let mut candidates: Vec<Arc<Provider>> = self
            .snapshot()
            .into_iter()
            .filter(|p| !tried.contains(&p.session) && p.healthy())
            .filter(|p| p.inflight.load(Ordering::Relaxed) < p.slots)
            .filter(|p| {
                p.offers
                    .iter()
                    .any(|o| o.sha256 == sha256 && o.context_length > tokens)
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        candidates.sort_by(|a, b| a.node.cmp(&b.node));
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let n = candidates.len();
        let load = |p: &Provider| p.inflight.load(Ordering::Relaxed) as f64 / p.slots.max(1) as f64;
        (0..n)
            .map(|k| candidates[(turn + k) % n].clone())
            .min_by(|a, b| load(a).total_cmp(&load(b)))
    }

    /// Whether a healthy provider not in `exclude` serves `sha256` with room
    /// for `tokens`, busy or not: then a job should wait for a slot.
    pub(crate) fn could_serve(&self, sha256: &str, tokens: usize, exclude: &[String]) -> bool {
        self.snapshot().iter().any(|p| {
            !exclude.contains(&p.session)
                && p.healthy()
                && p.offers
                    .iter()
                    .any(|o| o.sha256 == sha256 && o.context_length > tokens)
        })
    }

    /// Providers serving `sha256` now, and the largest context among them.
    fn serving(&self, sha256: &str) -> (usize, usize) {
        let mut count = 0;
        let mut context = 0;
        for p in self.snapshot().iter().filter(|p| p.healthy()) {
            if let Some(o) = p.offers.iter().find(|o| o.sha256 == sha256) {
                count += 1;
                context = context.max(o.context_length);
            }
        }
        (count, context)
    }

    /// The directory as JSON, for `/health` and operators.
    pub fn describe(&self) -> Value {
        let mut list: Vec<Value> = self
            .snapshot()
            .iter()
            .map(|p| {
                json!({
                    "node": p.node,
                    "models": p.offers.iter().map(|o| o.alias.clone()).collect::<Vec<_>>(),
                    "slots": p.slots,
                    "inflight": p.inflight.load(Ordering::Relaxed),
                    "healthy": p.healthy(),
                    "tok_s": p.tok_s.lock().map_or(0.0, |t| *t),
                    "hardware": p.hardware,
                })
            })
            .collect();
        list.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        Value::Array(list)
    }
}

/// A gateway: its endpoint, the models it can tokenize, its directory.
#[derive(Clone)]
pub struct Gateway {
    endpoint: Endpoint,
    /// Models this gateway knows (it needs their tokenizer to take requests).
    models: Arc<Vec<ServedModel>>,
    directory: Arc<Directory>,
}

impl Gateway {
    pub fn new(endpoint: Endpoint, models: Vec<ServedModel>) -> Self {
        Gateway {
            endpoint,
            models: Arc::new(models),
            directory: Arc::default(),
        }
    }

    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// Accept providers until the endpoint closes.
    pub async fn accept(self) {
        while let Some(incoming) = self.endpoint.accept().await {
            let gw = self.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "incoming connection failed");
                        return;
                    }
                };
                let node = node_id(&conn.remote_id());
                if let Err(e) = gw.provider_session(conn, &node).await {
                    tracing::warn!(provider = %&node[..12], error = %e, "provider session ended");
                }
            });
        }
    }

    async fn provider_session(&self, conn: Connection, node: &str) -> anyhow::Result<()> {
        let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
            .await
            .map_err(|_| anyhow!("no control stream within 10 s"))?
            .map_err(|e| anyhow!("control stream: {e}"))?;
        let hello = match read_frame(&mut recv).await {
            Ok(Some(Frame::Hello(h))) => h,
            Ok(other) => {
                conn.close(2u32.into(), b"expected Hello");
                return Err(anyhow!("expected Hello, got {other:?}"));
            }
            Err(e) => {
                conn.close(2u32.into(), b"bad frame");
                return Err(anyhow!("garbage instead of Hello: {e}"));
            }
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            let reason = format!(
                "protocol version {} is not supported; this gateway speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            );
            return refuse(&mut send, &conn, node, reason).await;
        }
        let known: Vec<ModelOffer> = hello
            .models
            .iter()
            .filter(|o| self.models.iter().any(|m| m.sha256 == o.sha256))
            .cloned()
            .collect();
        if known.is_empty() {
            let hashes: Vec<&str> = hello.models.iter().map(|o| o.sha256.as_str()).collect();
            let reason =
                format!("unknown model hash(es) {hashes:?}; this gateway serves other models");
            return refuse(&mut send, &conn, node, reason).await;
        }
        if hello.slots == 0 {
            return refuse(
                &mut send,
                &conn,
                node,
                "a provider must offer at least one slot".into(),
            )
            .await;
        }
        let welcome = Frame::Welcome {
            gateway: node_id(&self.endpoint.id()),
            heartbeat_ms: HEARTBEAT.as_millis() as u64,
        };
        write_frame(&mut send, &welcome).await?;
        let provider = Arc::new(Provider {
            node: node.to_string(),
            session: format!("{node}/{}", conn.stable_id()),
            conn: conn.clone(),
            offers: known,
            slots: hello.slots,
            hardware: hello.hardware,
            inflight: AtomicUsize::new(0),
            last_heartbeat: Mutex::new(Instant::now()),
            tok_s: Mutex::new(0.0),
        });
        self.directory.insert(provider.clone());
        tracing::info!(provider = %&node[..12], slots = hello.slots, "provider joined");
        let result = loop {
            match read_frame(&mut recv).await {
                Ok(Some(Frame::Heartbeat(beat))) => {
                    if let Ok(mut t) = provider.last_heartbeat.lock() {
                        *t = Instant::now();
                    }
                    if let Ok(mut t) = provider.tok_s.lock() {
                        *t = beat.tok_s;
                    }
                }
                Ok(Some(other)) => {
                    conn.close(2u32.into(), b"unexpected frame");
                    break Err(anyhow!("unexpected frame on the control stream: {other:?}"));
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    conn.close(2u32.into(), b"bad frame");
                    break Err(anyhow!("bad control frame: {e}"));
                }
            }
        };
        self.directory.remove(node, &conn);
        tracing::info!(provider = %&node[..12], "provider left");
        result
    }
}

/// Tell a provider why it is refused, then close its connection.
async fn refuse(
    send: &mut SendStream,
    conn: &Connection,
    node: &str,
    reason: String,
) -> anyhow::Result<()> {
    tracing::warn!(provider = %&node[..12], %reason, "refusing provider");
    let _ = write_frame(
        send,
        &Frame::Refused {
            reason: reason.clone(),
        },
    )
    .await;
    let _ = send.finish();
    // Give the frame time to arrive before the connection goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.close(3u32.into(), b"refused");
    Err(anyhow!("refused: {reason}"))
}

/// `Backend` that routes jobs to providers over the network.
pub struct NetworkBackend {
    gateway: Gateway,
}

impl NetworkBackend {
    pub fn new(gateway: Gateway) -> Self {
        NetworkBackend { gateway }
    }
}

impl Backend for NetworkBackend {
    fn models(&self) -> Vec<ServedModel> {
        self.gateway
            .models
            .iter()
            .map(|m| {
                let (providers, context) = self.gateway.directory.serving(&m.sha256);
                let mut m = m.clone();
                m.providers = providers;
                if context > 0 {
                    m.context_length = context;
                }
                m
            })
            .collect()
    }

    fn submit(
        &self,
        model: &ServedModel,
        request: GenerationRequest,
    ) -> BoxFuture<'static, Result<Dispatch, ApiError>> {
        let job = RoutedJob::new(self.gateway.directory.clone(), model.clone(), request);
        Box::pin(job.dispatch())
    }

    fn health(&self) -> Value {
        json!({ "kind": "gateway", "providers": self.gateway.directory.describe() })
    }
}
