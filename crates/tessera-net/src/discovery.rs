//! Discovery: signed announcements on a gossip topic.
//!
//! Every node of a network (gateways and providers) joins one iroh-gossip
//! topic, derived from the network's name, through the tickets it was given.
//! Each node broadcasts an [`Announcement`] of itself (role, addresses,
//! models) every [`ANNOUNCE_EVERY`], signed with its node key and valid for
//! [`TTL`]. Gossip relays messages through other nodes, so a signature, not
//! the neighbour that delivered it, says who an announcement is from; stale,
//! future-dated, foreign-network and badly signed ones are dropped.
//!
//! What a node learns is kept in [`Discovery`]: a provider given one
//! gateway's ticket learns the other gateways from it and dials several
//! (see `provider.rs`); a gateway shows what it heard in `/health`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures::StreamExt;
use iroh::address_lookup::memory::MemoryLookup;
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointId, PublicKey, SecretKey, Signature};
use iroh_gossip::api::Event;
use iroh_gossip::{Gossip, TopicId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use tessera_core::{now_ms, NodeId};

use crate::admission::Admission;
use crate::node::{node_id, Ticket};

/// The ALPN gossip connections use.
pub const GOSSIP_ALPN: &[u8] = iroh_gossip::ALPN;
/// How often a node announces itself (and at once when a neighbour joins).
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(3);
/// How long an announcement is believed after it was issued.
pub const TTL: Duration = Duration::from_secs(15);
/// How far in the future an announcement's clock may be (clock skew).
const MAX_SKEW: Duration = Duration::from_secs(60);
/// Most nodes of each role a node remembers (a bound on what a flood of
/// fresh node keys can make it keep).
pub const MAX_KNOWN: usize = 1024;
/// Largest announcement accepted (gossip's own limit is 4 KiB).
const MAX_ANNOUNCEMENT: usize = 4096;

/// What a node does in the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Takes requests and routes them to providers.
    Gateway,
    /// Serves jobs.
    Provider,
}

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// The network's name: announcements of other networks are ignored.
    pub network: String,
    /// What the node does.
    pub role: Role,
    /// Node id (hex of the ed25519 public key that signed this).
    pub node: NodeId,
    /// Where the node can be dialled.
    pub addrs: Vec<SocketAddr>,
    /// sha256 of each model it serves (a gateway: accepts).
    pub models: Vec<String>,
    /// Milliseconds since the Unix epoch when this was signed.
    pub issued_ms: u64,
    /// How long after `issued_ms` it may be believed.
    pub ttl_ms: u64,
    /// A gateway's certificate from the network's operator (see
    /// [`crate::admission`]): providers dial only gateways showing one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// The bytes on the gossip topic: the announcement's JSON and a signature
/// over exactly those bytes.
#[derive(Serialize, Deserialize)]
struct Envelope {
    announcement: String,
    signature: String,
}

/// The gossip topic of the network called `name`.
pub fn topic(name: &str) -> TopicId {
    let digest: [u8; 32] = Sha256::digest(format!("tessera/1 network {name}")).into();
    TopicId::from_bytes(digest)
}

impl Announcement {
    /// Sign this announcement with `key` (whose public half must be `node`).
    pub fn sign(&self, key: &SecretKey) -> Bytes {
        let announcement = serde_json::to_string(self).unwrap_or_default();
        let signature = hex::encode(key.sign(announcement.as_bytes()).to_bytes());
        let envelope = Envelope {
            announcement,
            signature,
        };
        Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default())
    }

    /// Check a received announcement: well-formed, signed by the node it
    /// names, of `network`, and neither expired nor from the future.
    pub fn verify(bytes: &[u8], network: &str) -> anyhow::Result<Announcement> {
        if bytes.len() > MAX_ANNOUNCEMENT {
            bail!("announcement of {} bytes is too large", bytes.len());
        }
        let envelope: Envelope =
            serde_json::from_slice(bytes).context("not an announcement envelope")?;
        let a: Announcement =
            serde_json::from_str(&envelope.announcement).context("malformed announcement")?;
        let key =
            PublicKey::from_bytes(a.node.as_bytes()).map_err(|e| anyhow!("bad node id: {e}"))?;
        let sig: [u8; 64] = hex::decode(&envelope.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("signature is not 64 bytes of hex"))?;
        key.verify(
            envelope.announcement.as_bytes(),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| anyhow!("bad signature for node {}", a.node.short()))?;
        if a.network != network {
            bail!("announcement for network '{}', not '{network}'", a.network);
        }
        let now = now_ms();
        if a.issued_ms > now + MAX_SKEW.as_millis() as u64 {
            bail!("announcement issued in the future");
        }
        if !a.fresh_at(now) {
            bail!("announcement expired");
        }
        Ok(a)
    }

    /// Whether it may still be believed at `now`: its TTL counts up to ten
    /// of ours, whatever it claims.
    fn fresh_at(&self, now: u64) -> bool {
        let ttl = self.ttl_ms.min(10 * TTL.as_millis() as u64);
        self.issued_ms.saturating_add(ttl) >= now
    }

    fn fresh(&self) -> bool {
        self.fresh_at(now_ms())
    }

    /// A ticket to dial this node.
    pub fn ticket(&self) -> Option<Ticket> {
        format!("{}@{}", self.node, join_addrs(&self.addrs))
            .parse()
            .ok()
    }
}

fn join_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join("+")
}

/// How a node takes part in discovery.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// The network's name (its gossip topic).
    pub network: String,
    /// What this node does.
    pub role: Role,
    /// Addresses to announce (a gateway: those of its ticket).
    pub addrs: Vec<SocketAddr>,
    /// sha256 of the models it serves (a gateway: accepts).
    pub models: Vec<String>,
    /// Nodes to join the topic through.
    pub bootstrap: Vec<Ticket>,
    /// A gateway's certificate, announced with it.
    pub certificate: Option<String>,
    /// The network's operator key and the revocations heard: a node with
    /// one takes the operator's revocation lists off gossip and
    /// rebroadcasts the newest.
    pub admission: Option<Admission>,
    /// A file holding the operator's signed revocation list (a gateway's
    /// `--revocations`), read again at every announcement.
    pub revocations_file: Option<PathBuf>,
}

/// A node's view of the network, kept fresh by the gossip topic.
#[derive(Clone)]
pub struct Discovery {
    gossip: Gossip,
    me: NodeId,
    network: String,
    known: Arc<Mutex<HashMap<NodeId, Announcement>>>,
    admission: Option<Admission>,
    /// Gateways refused lately (to say why once each).
    refused: Arc<Mutex<std::collections::HashSet<NodeId>>>,
}

impl Discovery {
    /// Join the network's topic and start announcing. The endpoint must
    /// accept [`GOSSIP_ALPN`] and hand such connections to [`Self::handle`].
    pub fn start(endpoint: &Endpoint, key: SecretKey, config: DiscoveryConfig) -> Discovery {
        let lookup = MemoryLookup::new();
        if let Ok(services) = endpoint.address_lookup() {
            services.add(lookup.clone());
        }
        for t in &config.bootstrap {
            lookup.add_endpoint_info(t.endpoint_addr());
        }
        let gossip = Gossip::builder().spawn(endpoint.clone());
        let discovery = Discovery {
            gossip: gossip.clone(),
            me: node_id(&endpoint.id()),
            network: config.network.clone(),
            known: Arc::default(),
            admission: config.admission.clone(),
            refused: Arc::default(),
        };
        tokio::spawn(discovery.clone().run(key, config, lookup));
        discovery
    }

    /// Take an incoming gossip connection.
    pub async fn handle(&self, conn: Connection) {
        if let Err(e) = self.gossip.handle_connection(conn).await {
            tracing::debug!(error = %e, "gossip connection refused");
        }
    }

    /// Accept gossip connections on an endpoint that accepts nothing else
    /// (a provider's), until it closes.
    pub async fn accept(self, endpoint: Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let this = self.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) if conn.alpn() == GOSSIP_ALPN => this.handle(conn).await,
                    Ok(conn) => conn.close(1u32.into(), b"unknown protocol"),
                    Err(e) => tracing::debug!(error = %e, "incoming connection failed"),
                }
            });
        }
    }

    /// Tickets of the gateways announced and still fresh.
    pub fn gateways(&self) -> Vec<Ticket> {
        self.fresh(Role::Gateway)
            .iter()
            .filter_map(Announcement::ticket)
            .collect()
    }

    /// The gateways announced and still fresh, each with the certificate
    /// it showed.
    pub fn gateway_offers(&self) -> Vec<(Ticket, Option<String>)> {
        self.fresh(Role::Gateway)
            .into_iter()
            .filter_map(|a| Some((a.ticket()?, a.certificate)))
            .collect()
    }

    fn fresh(&self, role: Role) -> Vec<Announcement> {
        self.known
            .lock()
            .map(|k| {
                k.values()
                    .filter(|a| a.role == role && a.fresh())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What this node has heard, for `/health`.
    pub fn describe(&self) -> Value {
        let now = now_ms();
        let list = |role| {
            let mut v: Vec<Value> = self
                .fresh(role)
                .iter()
                .map(|a| {
                    json!({
                        "node": a.node,
                        "addrs": a.addrs,
                        "models": a.models,
                        "age_ms": now.saturating_sub(a.issued_ms),
                    })
                })
                .collect();
            v.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
            v
        };
        json!({
            "network": self.network,
            "gateways": list(Role::Gateway),
            "providers": list(Role::Provider),
        })
    }

    /// Subscribe, announce and listen, resubscribing whenever the topic
    /// subscription ends (it does when we lag behind).
    async fn run(self, key: SecretKey, config: DiscoveryConfig, lookup: MemoryLookup) {
        let topic = topic(&config.network);
        loop {
            let mut bootstrap: Vec<EndpointId> = config.bootstrap.iter().map(|t| t.id).collect();
            bootstrap.extend(self.gateways().iter().map(|t| t.id));
            bootstrap.retain(|id| node_id(id) != self.me);
            let sub = match self.gossip.subscribe(topic, bootstrap.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot join the gossip topic");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let (sender, mut receiver) = sub.split();
            let announce = || {
                Announcement {
                    network: config.network.clone(),
                    role: config.role,
                    node: self.me,
                    addrs: config.addrs.clone(),
                    models: config.models.clone(),
                    issued_ms: now_ms(),
                    ttl_ms: TTL.as_millis() as u64,
                    certificate: config.certificate.clone(),
                }
                .sign(&key)
            };
            // The operator's newest revocation list, from the file a gateway
            // was given or as heard, goes out with every announcement.
            let revocations = || {
                let admission = self.admission.as_ref()?;
                if let Some(path) = &config.revocations_file {
                    match std::fs::read_to_string(path) {
                        Ok(text) => {
                            if let Err(e) = admission.learn_revocations(&text) {
                                tracing::warn!(file = %path.display(), error = %e, "ignored a revocation list");
                            }
                        }
                        // None yet: nothing was revoked.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(file = %path.display(), error = %e, "cannot read the revocation list")
                        }
                    }
                }
                admission.revocations_text().map(Bytes::from)
            };
            let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if receiver.neighbors().next().is_none() && !bootstrap.is_empty() {
                            let _ = sender.join_peers(bootstrap.clone()).await;
                        }
                        if sender.broadcast(announce()).await.is_err() {
                            break;
                        }
                        if let Some(list) = revocations() {
                            let _ = sender.broadcast(list).await;
                        }
                    }
                    event = receiver.next() => match event {
                        Some(Ok(Event::Received(msg))) => self.learn(&msg.content, &lookup),
                        Some(Ok(Event::NeighborUp(peer))) => {
                            tracing::debug!(peer = %peer.fmt_short(), "gossip neighbour up");
                            let _ = sender.broadcast(announce()).await;
                        }
                        Some(Ok(Event::NeighborDown(_))) => {}
                        Some(Ok(Event::Lagged)) | Some(Err(_)) | None => break,
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn learn(&self, bytes: &[u8], lookup: &MemoryLookup) {
        let a = match Announcement::verify(bytes, &self.network) {
            Ok(a) => a,
            Err(_) if self.learn_revocations(bytes) => return,
            Err(e) => {
                tracing::debug!(error = %e, "dropped an announcement");
                return;
            }
        };
        if a.node == self.me {
            return;
        }
        // A gateway that could not be served is not worth remembering by a
        // node that knows the network's operator.
        if let (Role::Gateway, Some(admission)) = (a.role, &self.admission) {
            if let Err(reason) = admission.check(&a.node, a.certificate.as_deref()) {
                // Said once per gateway (the set is bounded: a flood of
                // rogues is said again, never remembered without limit).
                let first = self.refused.lock().is_ok_and(|mut r| {
                    if r.len() >= 256 {
                        r.clear();
                    }
                    r.insert(a.node)
                });
                if first {
                    tracing::warn!(%reason, "a gateway this node will not serve");
                }
                return;
            }
        }
        let Ok(mut known) = self.known.lock() else {
            return;
        };
        // Forget the stale, and their addresses with them.
        known.retain(|_, old| {
            let keep = old.fresh();
            if !keep {
                if let Ok(id) = EndpointId::from_bytes(old.node.as_bytes()) {
                    lookup.remove_endpoint_info(id);
                }
            }
            keep
        });
        match known.get(&a.node) {
            Some(old) if old.issued_ms >= a.issued_ms => return,
            Some(_) => {}
            None => {
                // Node keys are free: a flood of fresh ones fills at most
                // MAX_KNOWN records per role; the nodes known keep theirs.
                let of_role = known.values().filter(|k| k.role == a.role).count();
                if of_role >= MAX_KNOWN {
                    tracing::debug!(node = %a.node.short(), "discovery is full: ignored a new node");
                    return;
                }
                tracing::info!(node = %a.node.short(), role = ?a.role, "discovered");
            }
        }
        if let Some(t) = a.ticket() {
            lookup.add_endpoint_info(t.endpoint_addr());
        }
        known.insert(a.node, a);
    }

    /// Nodes known now, for tests and metrics.
    pub fn known(&self) -> usize {
        self.known.lock().map(|k| k.len()).unwrap_or(0)
    }

    /// Take `bytes` as the operator's revocation list, if they are one
    /// (a node without the operator's key ignores them).
    fn learn_revocations(&self, bytes: &[u8]) -> bool {
        let (Some(admission), Ok(text)) = (&self.admission, std::str::from_utf8(bytes)) else {
            return false;
        };
        match admission.learn_revocations(text) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "not a revocation list of this network");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(key: &SecretKey) -> Announcement {
        Announcement {
            network: "test".into(),
            role: Role::Gateway,
            node: node_id(&key.public()),
            addrs: vec!["127.0.0.1:7447".parse().unwrap()],
            models: vec!["ab".repeat(32)],
            issued_ms: now_ms(),
            ttl_ms: TTL.as_millis() as u64,
            certificate: None,
        }
    }

    #[test]
    fn a_signed_announcement_verifies_and_gives_a_ticket() {
        let key = SecretKey::generate();
        let a = sample(&key);
        let back = Announcement::verify(&a.sign(&key), "test").unwrap();
        assert_eq!(back, a);
        assert_eq!(back.ticket().unwrap().id, key.public());
    }

    /// An announcement claiming to live for ever is believed for at most
    /// ten TTLs, when it arrives and every time it is looked at after.
    #[test]
    fn an_endless_ttl_does_not_keep_an_announcement_fresh() {
        let key = SecretKey::generate();
        let mut a = sample(&key);
        a.ttl_ms = u64::MAX;
        assert!(Announcement::verify(&a.sign(&key), "test").is_ok());
        assert!(a.fresh());
        a.issued_ms = now_ms() - 11 * TTL.as_millis() as u64;
        assert!(!a.fresh(), "eleven TTLs later it is stale");
        assert!(Announcement::verify(&a.sign(&key), "test").is_err());
    }

    #[test]
    fn forged_altered_stale_and_foreign_announcements_are_refused() {
        let key = SecretKey::generate();
        let a = sample(&key);
        // Signed by another key than the node it names.
        let forged = a.sign(&SecretKey::generate());
        assert!(Announcement::verify(&forged, "test").is_err());
        // Altered after signing.
        let mut env: Envelope = serde_json::from_slice(&a.sign(&key)).unwrap();
        env.announcement = env.announcement.replace("7447", "7448");
        let altered = serde_json::to_vec(&env).unwrap();
        let err = Announcement::verify(&altered, "test").unwrap_err();
        assert!(err.to_string().contains("signature"), "{err}");
        // Expired, from the future, of another network, garbage.
        let old = Announcement {
            issued_ms: now_ms() - 60_000,
            ..a.clone()
        };
        assert!(Announcement::verify(&old.sign(&key), "test").is_err());
        let future = Announcement {
            issued_ms: now_ms() + 3_600_000,
            ..a.clone()
        };
        assert!(Announcement::verify(&future.sign(&key), "test").is_err());
        assert!(Announcement::verify(&a.sign(&key), "other").is_err());
        assert!(Announcement::verify(b"\x00garbage", "test").is_err());
        assert!(Announcement::verify(&vec![b'{'; 5000], "test").is_err());
    }

    #[test]
    fn networks_have_distinct_topics() {
        assert_ne!(topic("a"), topic("b"));
        assert_eq!(topic("a"), topic("a"));
    }
}
