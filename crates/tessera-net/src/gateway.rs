//! The gateway: its endpoint, the models it takes requests for, its
//! directory of providers, and the accept loop that hands each incoming
//! connection to the provider session ([`crate::session`]), an auditor's
//! session ([`crate::auditors`]) or gossip discovery.
//!
//! Every task the gateway starts (sessions, canaries, verdicts) is tracked
//! and stops when its shutdown token is cancelled, so a stopping process
//! leaves nothing half-done behind in the background.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use iroh::Endpoint;
use tessera_backend::ServedModel;
use tessera_core::NodeId;
use tessera_protocol::{AUDIT_ALPN, BLOBS_ALPN};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::Audits;
use crate::auditors::AuditorPool;
use crate::directory::Directory;
use crate::discovery::{Discovery, GOSSIP_ALPN};
use crate::federated::Trainers;
use crate::job::JobSetup;
use crate::node::node_id;
pub use crate::session::MAX_HANDSHAKES;
use crate::session::{GatewayIdentity, Handshakes, OfferLimits};

/// How long a job keeps looking for a provider after the last one failed
/// it, by default.
pub const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);

/// Longest silence between two frames of a provider's answer, by default:
/// a provider that goes quiet longer has failed the part, and the answer
/// continues elsewhere.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(30);

/// Most connections a gateway holds at once, of every kind (providers,
/// auditors, gossip peers, handshakes); beyond it new ones are refused.
pub const MAX_CONNECTIONS: usize = 2048;

/// A gateway: its endpoint, the models it can tokenize, its directory.
#[derive(Clone)]
pub struct Gateway {
    endpoint: Endpoint,
    node: NodeId,
    /// Its node id and certificate, as providers see them.
    identity: Arc<GatewayIdentity>,
    /// Models this gateway knows (it needs their tokenizer to take requests).
    models: Arc<Vec<ServedModel>>,
    directory: Arc<Directory>,
    /// Providers that train (federated tasks run on them).
    trainers: Arc<Trainers>,
    workers: Arc<crate::diloco::Workers>,
    discovery: Option<Discovery>,
    /// The auditor of each model (by sha256) this gateway audits.
    audits: Arc<HashMap<String, Arc<Audits>>>,
    /// Where those audits run, auditor processes included.
    auditors: Option<Arc<AuditorPool>>,
    /// The model files served to peers ([`tessera_protocol::BLOBS_ALPN`]).
    blobs: Option<crate::blobs::BlobServer>,
    failover_deadline: Duration,
    frame_deadline: Duration,
    offer_limits: OfferLimits,
    prefix_cache: bool,
    prefix_routing: bool,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    handshakes: Arc<Handshakes>,
    connections: Arc<tokio::sync::Semaphore>,
}

impl Gateway {
    /// A gateway on `endpoint` for `models`, keeping providers in
    /// `directory`.
    pub fn new(endpoint: Endpoint, models: Vec<ServedModel>, directory: Arc<Directory>) -> Self {
        Gateway {
            node: node_id(&endpoint.id()),
            identity: Arc::new(GatewayIdentity {
                node: node_id(&endpoint.id()),
                certificate: None,
            }),
            endpoint,
            models: Arc::new(models),
            directory,
            trainers: Arc::default(),
            workers: Arc::default(),
            discovery: None,
            audits: Arc::default(),
            auditors: None,
            blobs: None,
            failover_deadline: FAILOVER_DEADLINE,
            frame_deadline: FRAME_DEADLINE,
            offer_limits: OfferLimits::default(),
            prefix_cache: true,
            prefix_routing: true,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            handshakes: Arc::default(),
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    /// Serve these files to peers that dial with
    /// [`tessera_protocol::BLOBS_ALPN`] (the endpoint must accept it).
    pub fn with_blobs(mut self, blobs: crate::blobs::BlobServer) -> Self {
        self.blobs = Some(blobs);
        self
    }

    /// Audit answers of these models (sha256 → their audits), on
    /// `auditors` (which auditor processes dial in to join).
    pub fn with_audits(
        mut self,
        audits: HashMap<String, Arc<Audits>>,
        auditors: Arc<AuditorPool>,
    ) -> Self {
        self.audits = Arc::new(audits);
        self.auditors = Some(auditors);
        self
    }

    /// The providers connected now that train.
    pub fn trainers(&self) -> &Arc<Trainers> {
        &self.trainers
    }

    /// The providers connected now that offer DiLoCo compute.
    pub fn workers(&self) -> &Arc<crate::diloco::Workers> {
        &self.workers
    }

    /// Where audits run, when this gateway audits.
    pub fn auditors(&self) -> Option<&Arc<AuditorPool>> {
        self.auditors.as_ref()
    }

    /// Show providers the network operator's certificate of this gateway
    /// (see [`crate::admission`]).
    pub fn with_certificate(mut self, certificate: String) -> Self {
        self.identity = Arc::new(GatewayIdentity {
            node: self.node,
            certificate: Some(certificate),
        });
        self
    }

    /// Take part in gossip discovery (the endpoint must accept its ALPN).
    pub fn with_discovery(mut self, discovery: Discovery) -> Self {
        self.discovery = Some(discovery);
        self
    }

    /// How long a job keeps looking for providers after failures.
    pub fn with_failover_deadline(mut self, deadline: Duration) -> Self {
        self.failover_deadline = deadline;
        self
    }

    /// What providers may announce (prices, context).
    pub fn with_offer_limits(mut self, limits: OfferLimits) -> Self {
        self.offer_limits = limits;
        self
    }

    /// Longest silence allowed between two frames of a provider's answer.
    pub fn with_frame_deadline(mut self, deadline: Duration) -> Self {
        self.frame_deadline = deadline;
        self
    }

    /// Whether providers keep answers' KV caches for an account's next
    /// request (`cache`), and whether requests go to the provider keeping
    /// the longest prefix of them (`routing`); both on by default, off only
    /// to measure what they bring.
    pub fn with_prefix_cache(mut self, cache: bool, routing: bool) -> Self {
        self.prefix_cache = cache;
        self.prefix_routing = cache && routing;
        self
    }

    /// Stop every task of this gateway when `token` is cancelled; track
    /// them in `tasks` so the caller can wait for them.
    pub fn with_shutdown(mut self, token: CancellationToken, tasks: TaskTracker) -> Self {
        self.shutdown = token;
        self.tasks = tasks;
        self
    }

    /// The providers this gateway knows.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// This gateway's node id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The models requests may name.
    pub fn models(&self) -> &[ServedModel] {
        &self.models
    }

    /// Gossip discovery, when this gateway takes part.
    pub fn discovery(&self) -> Option<&Discovery> {
        self.discovery.as_ref()
    }

    /// The auditor of model `sha256`, when this gateway audits it.
    pub fn audits(&self, sha256: &str) -> Option<Arc<Audits>> {
        self.audits.get(sha256).cloned()
    }

    /// Whether this gateway audits any model.
    pub fn audits_any(&self) -> bool {
        !self.audits.is_empty()
    }

    /// Every model's auditor.
    pub fn all_audits(&self) -> impl Iterator<Item = &Arc<Audits>> {
        self.audits.values()
    }

    /// How jobs of model `sha256` are run.
    pub fn job_setup(&self, sha256: &str) -> JobSetup {
        JobSetup {
            directory: self.directory.clone(),
            key: self.endpoint.secret_key().clone(),
            audits: self.audits(sha256),
            failover_deadline: self.failover_deadline,
            frame_deadline: self.frame_deadline,
            prefix_cache: self.prefix_cache,
            prefix_routing: self.prefix_routing,
        }
    }

    /// The token that stops this gateway's tasks.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Tracks this gateway's tasks.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Accept providers (and gossip peers) until the endpoint closes or
    /// shutdown is asked for.
    pub async fn accept(self) {
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => i,
                _ = self.shutdown.cancelled() => return,
            };
            let Some(incoming) = incoming else {
                return;
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                tracing::debug!("at the connection limit: refused a connection");
                incoming.refuse();
                continue;
            };
            let gw = self.clone();
            self.tasks.spawn(async move {
                let _permit = permit;
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "incoming connection failed");
                        return;
                    }
                };
                if conn.alpn() == GOSSIP_ALPN {
                    match &gw.discovery {
                        Some(d) => d.handle(conn).await,
                        None => conn.close(1u32.into(), b"no discovery here"),
                    }
                    return;
                }
                if conn.alpn() == BLOBS_ALPN {
                    match &gw.blobs {
                        Some(b) => b.serve(conn).await,
                        None => conn.close(4u32.into(), b"no blobs here"),
                    }
                    return;
                }
                if conn.alpn() == AUDIT_ALPN {
                    let Some(pool) = gw.auditors.clone() else {
                        conn.close(3u32.into(), b"this gateway does not audit");
                        return;
                    };
                    // A stranger dialling as an auditor is refused within
                    // the Hello deadline; until then it counts among the
                    // bounded handshakes.
                    let node = node_id(&conn.remote_id());
                    let _pending = (!pool.admits(&node)).then(|| gw.handshakes.begin(&conn));
                    if let Err(e) = pool.serve(conn, gw.node).await {
                        tracing::warn!(error = %e, "auditor session ended");
                    }
                    return;
                }
                let node = node_id(&conn.remote_id());
                let pending = gw.handshakes.begin(&conn);
                let session = crate::session::serve(
                    &gw.directory,
                    &gw.trainers,
                    &gw.workers,
                    &gw.models,
                    &gw.offer_limits,
                    &gw.identity,
                    conn.clone(),
                    node,
                    pending,
                );
                tokio::select! {
                    result = session => {
                        if let Err(e) = result {
                            tracing::warn!(provider = %node.short(), error = %e, "provider session ended");
                        }
                    }
                    _ = gw.shutdown.cancelled() => conn.close(0u32.into(), b"gateway shutting down"),
                }
            });
        }
    }
}
