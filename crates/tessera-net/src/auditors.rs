//! Where a gateway's audits run: its own auditor engine, and auditor
//! processes that dial in (`tessera auditor --gateway TICKET`).
//!
//! An audit costs about a quarter of the answer's generation, so one
//! gateway's CPU would cap how much of the network it can check. An
//! operator adds capacity by starting auditors on other machines and
//! naming their node ids (`tessera gateway --auditor NODEID`); an auditor
//! nobody named is refused at the handshake, since a verdict slashes a
//! provider's bond and only the operator's own auditors may give one.
//!
//! [`AuditorPool::submit`] sends each audit to the auditor with the least
//! work per slot, remote ones first on a tie (they exist to take load off
//! the gateway). A remote auditor keeps its own queues, probation last,
//! like the gateway's. An audit whose auditor vanishes, fails or takes
//! longer than [`REMOTE_DEADLINE`] runs on the gateway's own engine
//! instead: nothing is lost with a peer.
//!
//! [`run_auditor`] is the other side: the auditor process's sessions with
//! its gateways.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::Endpoint;
use serde::Serialize;
use tessera_core::audit::{AuditJob, Evidence};
use tessera_core::NodeId;
use tessera_engine::audit::{AuditorHandle, Priority};
use tessera_engine::EngineError;
use tessera_protocol::{
    read_frame, write_frame, AuditRequest, AuditorHello, Frame, JobError, AUDIT_ALPN,
    PROTOCOL_VERSION,
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::node::{node_id, Ticket};
use crate::session::describe;

/// Longest an audit may take on a remote auditor before the gateway runs
/// it itself.
pub const REMOTE_DEADLINE: Duration = Duration::from_secs(300);
/// Longest wait for an auditor's `AuditorHello`, or for an audit request
/// on a stream the gateway opened.
const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// Most audits one remote auditor slot is given at once.
const MAX_SLOTS: usize = 64;

/// What an audit sends back to whoever submitted it.
pub type AuditReply = oneshot::Receiver<Result<Evidence, EngineError>>;

/// An auditor process connected now.
struct Remote {
    node: NodeId,
    /// Identifies this connection (an auditor may reconnect).
    id: usize,
    conn: Connection,
    models: HashSet<String>,
    slots: usize,
    hardware: String,
    in_flight: AtomicUsize,
    done: AtomicU64,
    failed: AtomicU64,
}

/// One auditor as the operator's status shows it.
#[derive(Clone, Debug, Serialize)]
pub struct AuditorSummary {
    /// Its node id (hex).
    pub node: String,
    /// Audits it runs at once.
    pub slots: usize,
    /// Its machine, as it describes it.
    pub hardware: String,
    /// Audits sent to it and not yet answered.
    pub in_flight: usize,
    /// Audits it answered since it connected.
    pub done: u64,
    /// Audits it could not answer (they ran on the gateway instead).
    pub failed: u64,
}

/// The gateway's auditors: its own engine per model, and the auditor
/// processes the operator named.
pub struct AuditorPool {
    local: HashMap<String, AuditorHandle>,
    allowed: HashSet<NodeId>,
    remote: Mutex<Vec<Arc<Remote>>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl AuditorPool {
    /// A pool of the gateway's own auditors (model sha256 → auditor) that
    /// admits the auditor processes in `allowed`.
    pub fn new(
        local: HashMap<String, AuditorHandle>,
        allowed: impl IntoIterator<Item = NodeId>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Arc<AuditorPool> {
        Arc::new(AuditorPool {
            local,
            allowed: allowed.into_iter().collect(),
            remote: Mutex::default(),
            tasks,
            shutdown,
        })
    }

    /// Whether the gateway's own engine audits model `sha256`.
    pub fn audits(&self, sha256: &str) -> bool {
        self.local.contains_key(sha256)
    }

    /// Audits queued or running, on every auditor.
    pub fn waiting(&self) -> usize {
        let local: usize = self.local.values().map(AuditorHandle::waiting).sum();
        let remote: usize = self
            .remotes()
            .iter()
            .map(|r| r.in_flight.load(Ordering::Relaxed))
            .sum();
        local + remote
    }

    /// The auditor processes connected now.
    pub fn describe(&self) -> Vec<AuditorSummary> {
        self.remotes()
            .iter()
            .map(|r| AuditorSummary {
                node: r.node.to_string(),
                slots: r.slots,
                hardware: r.hardware.clone(),
                in_flight: r.in_flight.load(Ordering::Relaxed),
                done: r.done.load(Ordering::Relaxed),
                failed: r.failed.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn remotes(&self) -> Vec<Arc<Remote>> {
        self.remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Queue an audit of an answer of model `sha256`; the receiver gets its
    /// evidence.
    pub fn submit(self: &Arc<Self>, sha256: &str, job: AuditJob, priority: Priority) -> AuditReply {
        let Some(local) = self.local.get(sha256) else {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(EngineError::Load(format!(
                "this gateway does not audit model {sha256}"
            ))));
            return rx;
        };
        // Least work per slot; a remote auditor wins a tie.
        let own = local.waiting() as f64;
        let best = self
            .remotes()
            .into_iter()
            .filter(|r| r.models.contains(sha256))
            .map(|r| {
                (
                    r.in_flight.load(Ordering::Relaxed) as f64 / r.slots as f64,
                    r,
                )
            })
            .filter(|(load, _)| *load <= own)
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let Some((_, remote)) = best else {
            return local.submit_with(job, priority);
        };
        remote.in_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let (local, sha256) = (local.clone(), sha256.to_string());
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let request = AuditRequest {
                model_sha256: sha256,
                probation: priority == Priority::Probation,
                job,
            };
            let result = tokio::select! {
                r = tokio::time::timeout(REMOTE_DEADLINE, remote_audit(&remote.conn, &request)) => r,
                _ = shutdown.cancelled() => return,
            };
            remote.in_flight.fetch_sub(1, Ordering::Relaxed);
            let error = match result {
                Ok(Ok(evidence)) => {
                    remote.done.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Ok(evidence));
                    return;
                }
                Ok(Err(e)) => e,
                Err(_) => anyhow!("no answer within {} s", REMOTE_DEADLINE.as_secs()),
            };
            remote.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(auditor = %remote.node.short(), error = %error, "a remote audit failed; the gateway runs it itself");
            let own = local.submit_with(request.job, priority);
            let _ = tx.send(own.await.unwrap_or_else(|_| {
                Err(EngineError::Load("the gateway's auditor stopped".into()))
            }));
        });
        rx
    }

    /// Whether the operator named `node` as an auditor.
    pub fn admits(&self, node: &NodeId) -> bool {
        self.allowed.contains(node)
    }

    /// Run one auditor process's session: admit it only if the operator
    /// named it, then offer it audits until its connection ends.
    pub async fn serve(self: Arc<Self>, conn: Connection, gateway: NodeId) -> anyhow::Result<()> {
        let node = node_id(&conn.remote_id());
        let (mut send, mut recv) = tokio::time::timeout(HELLO_DEADLINE, conn.accept_bi())
            .await
            .map_err(|_| anyhow!("no control stream within {} s", HELLO_DEADLINE.as_secs()))?
            .map_err(|e| anyhow!("control stream: {e}"))?;
        let hello = match tokio::time::timeout(HELLO_DEADLINE, read_frame(&mut recv)).await {
            Ok(Ok(Some(Frame::AuditorHello(h)))) => h,
            Ok(Ok(other)) => {
                conn.close(2u32.into(), b"expected AuditorHello");
                bail!("expected AuditorHello, got {}", describe(other.as_ref()));
            }
            Ok(Err(e)) => {
                conn.close(2u32.into(), b"bad frame");
                bail!("garbage instead of AuditorHello: {e}");
            }
            Err(_) => {
                conn.close(2u32.into(), b"no AuditorHello");
                bail!("no AuditorHello within {} s", HELLO_DEADLINE.as_secs());
            }
        };
        let models: HashSet<String> = hello
            .models
            .iter()
            .filter(|m| self.local.contains_key(*m))
            .cloned()
            .collect();
        let refusal = if !self.allowed.contains(&node) {
            Some(format!(
                "auditor {node} was not named by this gateway's operator \
                 (they admit it with `tessera gateway --auditor {node}`)"
            ))
        } else if hello.protocol_version != PROTOCOL_VERSION {
            Some(format!(
                "protocol version {} is not supported; this gateway speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            ))
        } else if models.is_empty() {
            Some("none of the auditor's models is one this gateway audits".into())
        } else if hello.slots == 0 {
            Some("an auditor must offer at least one slot".into())
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::warn!(auditor = %node.short(), %reason, "auditor refused");
            let _ = write_frame(&mut send, &Frame::Refused { reason }).await;
            let _ = send.finish();
            // Give the frame time to arrive before the connection closes.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(3u32.into(), b"refused");
            return Ok(());
        }
        let welcome = Frame::Welcome {
            gateway: gateway.to_string(),
            heartbeat_ms: crate::session::HEARTBEAT.as_millis() as u64,
            certificate: None,
        };
        write_frame(&mut send, &welcome).await?;
        let remote = Arc::new(Remote {
            node,
            id: conn.stable_id(),
            conn: conn.clone(),
            models,
            slots: hello.slots.min(MAX_SLOTS),
            hardware: hello.hardware.chars().take(200).collect(),
            in_flight: AtomicUsize::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        self.remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(remote);
        tracing::info!(auditor = %node.short(), slots = hello.slots, "auditor joined");
        // The session lasts while the control stream does (heartbeats keep
        // it busy; their figures are not needed here).
        let result = loop {
            tokio::select! {
                frame = read_frame(&mut recv) => match frame {
                    Ok(Some(Frame::Heartbeat(_))) => {}
                    Ok(Some(other)) => break Err(anyhow!("unexpected frame on an auditor's control stream: {}", other.kind())),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(anyhow!("bad control frame: {e}")),
                },
                _ = self.shutdown.cancelled() => {
                    conn.close(0u32.into(), b"gateway shutting down");
                    break Ok(());
                }
            }
        };
        let id = conn.stable_id();
        self.remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r| !(r.node == node && r.id == id));
        tracing::info!(auditor = %node.short(), "auditor left");
        result
    }
}

/// Send one audit to a remote auditor and wait for its evidence.
async fn remote_audit(conn: &Connection, request: &AuditRequest) -> anyhow::Result<Evidence> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &Frame::AuditRequest(Box::new(request.clone()))).await?;
    let _ = send.finish();
    match read_frame(&mut recv).await? {
        Some(Frame::AuditDone { evidence }) => Ok(evidence),
        Some(Frame::JobError(e)) => bail!("the auditor could not run it: {}", e.message),
        other => bail!("expected AuditDone, got {}", describe(other.as_ref())),
    }
}

/// What an auditor process offers its gateways.
#[derive(Clone)]
pub struct AuditorConfig {
    /// Gateways to audit for.
    pub gateways: Vec<Ticket>,
    /// Its auditor of each model (by sha256).
    pub auditors: HashMap<String, AuditorHandle>,
    /// One line about the machine.
    pub hardware: String,
}

/// Audit for every gateway in `config`, redialling with backoff, until a
/// gateway refuses this auditor (an error naming its reason) or the
/// process ends.
pub async fn run_auditor(endpoint: Endpoint, config: AuditorConfig) -> anyhow::Result<()> {
    let mut sessions = tokio::task::JoinSet::new();
    for ticket in config.gateways.clone() {
        let (endpoint, config) = (endpoint.clone(), config.clone());
        sessions.spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match auditor_session(&endpoint, &config, &ticket).await {
                    Ok(Refusal(Some(reason))) => {
                        bail!("gateway {} refused this auditor: {reason}", ticket.id.fmt_short())
                    }
                    Ok(Refusal(None)) => {
                        tracing::info!(gateway = %ticket.id.fmt_short(), "audit session ended")
                    }
                    Err(e) => {
                        tracing::warn!(gateway = %ticket.id.fmt_short(), error = %e, "audit session failed")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }
    while let Some(ended) = sessions.join_next().await {
        ended??;
    }
    Ok(())
}

/// How a session ended: refused (with the reason) or not.
struct Refusal(Option<String>);

/// One connection to one gateway.
async fn auditor_session(
    endpoint: &Endpoint,
    config: &AuditorConfig,
    ticket: &Ticket,
) -> anyhow::Result<Refusal> {
    let conn = endpoint
        .connect(ticket.endpoint_addr(), AUDIT_ALPN)
        .await
        .map_err(|e| anyhow!("cannot reach gateway: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = AuditorHello {
        protocol_version: PROTOCOL_VERSION,
        models: config.auditors.keys().cloned().collect(),
        slots: 1,
        hardware: config.hardware.clone(),
        software: format!("tessera {}", env!("CARGO_PKG_VERSION")),
    };
    write_frame(&mut send, &Frame::AuditorHello(hello)).await?;
    let heartbeat_ms = match read_frame(&mut recv).await? {
        Some(Frame::Welcome {
            gateway,
            heartbeat_ms,
            ..
        }) => {
            tracing::info!(%gateway, "auditing for gateway");
            heartbeat_ms.clamp(100, 60_000)
        }
        Some(Frame::Refused { reason }) => return Ok(Refusal(Some(reason))),
        other => bail!("expected Welcome, got {}", describe(other.as_ref())),
    };
    let waiting: Vec<AuditorHandle> = config.auditors.values().cloned().collect();
    let beats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(heartbeat_ms)).await;
            let active: usize = waiting.iter().map(AuditorHandle::waiting).sum();
            let beat = tessera_protocol::Heartbeat {
                active,
                free_slots: 0,
                tok_s: 0.0,
                evicted: Vec::new(),
                reused_tokens: 0,
                prompt_tokens: 0,
            };
            if write_frame(&mut send, &Frame::Heartbeat(beat))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let ended = loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => break anyhow!("connection closed: {e}"),
        };
        let auditors = config.auditors.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_audit(send, recv, &auditors).await {
                tracing::debug!(error = %e, "audit stream ended early");
            }
        });
    };
    beats.abort();
    tracing::info!(reason = %ended, "left gateway");
    Ok(Refusal(None))
}

/// Run one audit the gateway sent and answer with its evidence.
async fn serve_audit(
    mut send: SendStream,
    mut recv: RecvStream,
    auditors: &HashMap<String, AuditorHandle>,
) -> anyhow::Result<()> {
    let error = |message: String| {
        Frame::JobError(JobError {
            message,
            retryable: false,
        })
    };
    let request = match tokio::time::timeout(HELLO_DEADLINE, read_frame(&mut recv)).await {
        Ok(Ok(Some(Frame::AuditRequest(r)))) => r,
        Ok(Ok(other)) => {
            let message = format!("expected an AuditRequest, got {}", describe(other.as_ref()));
            write_frame(&mut send, &error(message)).await?;
            return Ok(());
        }
        Ok(Err(e)) => bail!("bad audit request: {e}"),
        Err(_) => bail!("no audit request within {} s", HELLO_DEADLINE.as_secs()),
    };
    let reply = match auditors.get(&request.model_sha256) {
        None => error(format!(
            "this auditor has no model {}",
            request.model_sha256
        )),
        Some(auditor) => {
            let priority = match request.probation {
                true => Priority::Probation,
                false => Priority::First,
            };
            match auditor.submit_with(request.job, priority).await {
                Ok(Ok(evidence)) => Frame::AuditDone { evidence },
                Ok(Err(e)) => error(format!("the audit could not run: {e}")),
                Err(_) => error("the auditor stopped".into()),
            }
        }
    };
    write_frame(&mut send, &reply).await?;
    let _ = send.finish();
    Ok(())
}
