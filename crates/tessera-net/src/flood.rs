//! A flood of strangers at one gateway, for `tessera bench flood` (test
//! builds only, like [`crate::synthetic`]).
//!
//! Node keys are free, so one attacker can be thousands of nodes. The flood
//! joins the network's gossip topic through the gateway and broadcasts an
//! announcement from each of `sybils` fresh keys, then opens `connections`
//! QUIC connections to the gateway, each from a fresh key, in four kinds
//! (a quarter each):
//!
//! - **slowloris**: opens the control stream, sends a frame header that
//!   announces 4 MiB and one byte of it, then nothing;
//! - **silent**: connects and never opens a stream;
//! - **stalling provider**: says a valid `Hello` (the gateway's model, 8
//!   slots), sends heartbeats, and never answers a job;
//! - **garbage**: opens the control stream and sends bytes that are not a
//!   frame.
//!
//! Everything is held open until the [`Flood`] is dropped.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use iroh::endpoint::Connection;
use iroh::{Endpoint, SecretKey};
use iroh_gossip::Gossip;
use tessera_core::now_ms;
use tessera_protocol::{write_frame, Frame, Heartbeat, Hello, ModelOffer, ALPN, PROTOCOL_VERSION};

use crate::discovery::{self, Announcement, Role};
use crate::node::{self, node_id, Ticket};

/// What to throw at the gateway.
#[derive(Clone, Debug)]
pub struct FloodConfig {
    /// The network's name (its gossip topic).
    pub network: String,
    /// Fresh node ids announced on gossip.
    pub sybils: usize,
    /// What they announce themselves as.
    pub role: Role,
    /// Connections opened to the gateway, each from a fresh node id.
    pub connections: usize,
    /// The model the stalling providers offer (sha256).
    pub model_sha256: String,
}

/// The flood, held open while it lives.
pub struct Flood {
    endpoints: Vec<Endpoint>,
    connections: Vec<Connection>,
    tasks: tokio::task::JoinSet<()>,
    _gossip: Gossip,
    /// Announcements broadcast.
    pub announced: usize,
}

impl Flood {
    /// Connections the gateway has not closed.
    pub fn open(&self) -> usize {
        self.connections
            .iter()
            .filter(|c| c.close_reason().is_none())
            .count()
    }

    /// Connections opened.
    pub fn opened(&self) -> usize {
        self.connections.len()
    }

    /// End the flood: close every connection and endpoint.
    pub async fn close(mut self) {
        self.tasks.abort_all();
        for c in &self.connections {
            c.close(0u32.into(), b"flood over");
        }
        let endpoints = std::mem::take(&mut self.endpoints);
        futures::future::join_all(endpoints.iter().map(Endpoint::close)).await;
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.tasks.abort_all();
        for c in &self.connections {
            c.close(0u32.into(), b"flood over");
        }
        self.endpoints.clear();
    }
}

async fn endpoint(alpns: Vec<Vec<u8>>) -> anyhow::Result<Endpoint> {
    node::bind(SecretKey::generate(), "127.0.0.1:0".parse()?, alpns).await
}

/// Start the flood at the gateway of `target`.
pub async fn start(target: &Ticket, config: FloodConfig) -> anyhow::Result<Flood> {
    let mut tasks = tokio::task::JoinSet::new();
    // Gossip: one endpoint, many signed identities.
    let ep = endpoint(vec![discovery::GOSSIP_ALPN.to_vec()]).await?;
    let gossip = Gossip::builder().spawn(ep.clone());
    {
        let (ep, gossip) = (ep.clone(), gossip.clone());
        tasks.spawn(async move {
            while let Some(incoming) = ep.accept().await {
                if let Ok(conn) = incoming.await {
                    let _ = gossip.handle_connection(conn).await;
                }
            }
        });
    }
    if let Ok(lookup) = ep.address_lookup() {
        let memory = iroh::address_lookup::memory::MemoryLookup::new();
        memory.add_endpoint_info(target.endpoint_addr());
        lookup.add(memory);
    }
    let topic = tokio::time::timeout(
        Duration::from_secs(20),
        gossip.subscribe_and_join(discovery::topic(&config.network), vec![target.id]),
    )
    .await
    .map_err(|_| anyhow!("could not join the gateway's gossip topic within 20 s"))?
    .map_err(|e| anyhow!("gossip: {e}"))?;
    let (sender, receiver) = topic.split();
    tasks.spawn(async move {
        // Keep the subscription alive (and drained).
        let mut receiver = receiver;
        while futures::StreamExt::next(&mut receiver).await.is_some() {}
    });
    let mut announced = 0;
    for _ in 0..config.sybils {
        let key = SecretKey::generate();
        let a = Announcement {
            network: config.network.clone(),
            role: config.role,
            node: node_id(&key.public()),
            addrs: vec!["127.0.0.1:9".parse()?],
            models: vec![config.model_sha256.clone()],
            issued_ms: now_ms(),
            ttl_ms: discovery::TTL.as_millis() as u64,
            certificate: None,
        };
        if sender.broadcast(a.sign(&key)).await.is_ok() {
            announced += 1;
        }
    }
    // Connections, 50 at a time.
    let mut endpoints = vec![ep];
    let mut connections = Vec::new();
    let target = Arc::new(target.clone());
    let mut i = 0;
    while i < config.connections {
        let batch = (config.connections - i).min(50);
        let mut dials = tokio::task::JoinSet::new();
        for k in i..i + batch {
            let (target, sha) = (target.clone(), config.model_sha256.clone());
            dials.spawn(async move {
                let ep = endpoint(vec![]).await?;
                let conn = ep
                    .connect(target.endpoint_addr(), ALPN)
                    .await
                    .map_err(|e| anyhow!("connect: {e}"))?;
                let task = misbehave(k % 4, conn.clone(), sha).await;
                anyhow::Ok((ep, conn, task))
            });
        }
        while let Some(r) = dials.join_next().await {
            if let Ok(Ok((ep, conn, task))) = r {
                endpoints.push(ep);
                connections.push(conn);
                if let Some(t) = task {
                    tasks.spawn(t);
                }
            }
        }
        i += batch;
    }
    Ok(Flood {
        endpoints,
        connections,
        tasks,
        _gossip: gossip,
        announced,
    })
}

type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Do what connection kind `kind` does; a task to keep running, if any.
async fn misbehave(kind: usize, conn: Connection, sha256: String) -> Option<Task> {
    match kind {
        // Slowloris: a header announcing 4 MiB, one byte, then nothing.
        0 => {
            let (mut send, recv) = conn.open_bi().await.ok()?;
            let mut header = vec![b'T', PROTOCOL_VERSION];
            header.extend_from_slice(&(4u32 << 20).to_be_bytes());
            header.push(b'{');
            send.write_all(&header).await.ok()?;
            Some(Box::pin(async move {
                let _keep = (send, recv);
                std::future::pending::<()>().await
            }))
        }
        // Silent: nothing at all.
        1 => None,
        // A provider that says Hello, beats, and never answers a job.
        2 => {
            let (mut send, recv) = conn.open_bi().await.ok()?;
            let hello = Frame::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                models: vec![ModelOffer {
                    sha256,
                    alias: "sybil".into(),
                    context_length: 2048,
                    price: Default::default(),
                }],
                slots: 8,
                hardware: "sybil".into(),
                software: "sybil".into(),
                training: None,
                compute: None,
            });
            write_frame(&mut send, &hello).await.ok()?;
            Some(Box::pin(async move {
                let _recv = recv;
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let beat = Frame::Heartbeat(Heartbeat {
                        active: 0,
                        free_slots: 8,
                        tok_s: 1e6,
                        evicted: vec![],
                        reused_tokens: 0,
                        prompt_tokens: 0,
                    });
                    if write_frame(&mut send, &beat).await.is_err() {
                        return;
                    }
                }
            }))
        }
        // Garbage on the control stream.
        _ => {
            let (mut send, recv) = conn.open_bi().await.ok()?;
            send.write_all(b"\x00\xffGET / HTTP/1.1\r\n\r\n")
                .await
                .ok()?;
            Some(Box::pin(async move {
                let _keep = (send, recv);
                std::future::pending::<()>().await
            }))
        }
    }
}
