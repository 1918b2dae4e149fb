//! Gateway admission: which gateways a provider works for.
//!
//! Anyone can run a gateway, and a gateway keeps the fees and the ledger of
//! every job it routes, so providers must not serve whichever gateway
//! announces itself on gossip. A network has an **operator key** (an
//! ed25519 key made by `tessera network init`); the operator signs a
//! [`Certificate`] for each gateway it runs or trusts (`tessera network
//! certify NODEID`), valid until an expiry. A gateway shows its certificate
//! in its announcements and in the `Welcome` of every provider session.
//!
//! A provider learns the operator's public key from the ticket it was given
//! (`NODEID@IP:PORT#OPERATOR`, printed by a certified gateway) and then:
//!
//! - serves a gateway only while that gateway holds an unexpired
//!   certificate of this network, signed by that key, naming that gateway's
//!   node id, and not revoked;
//! - dials a discovered gateway only when its announcement carries such a
//!   certificate (so uncertified gateways use none of its gateway slots);
//! - given a ticket without an operator key, serves exactly the gateways it
//!   was given and no discovered one.
//!
//! Revocations are a list the operator signs (`tessera network revoke`),
//! with an issue time; any node rebroadcasts the newest list it has seen on
//! the gossip topic, so a revocation reaches every provider within seconds
//! and a stale list can never replace a newer one. A provider ends its
//! session with a gateway that is revoked or whose certificate expires.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context};
use iroh::{PublicKey, SecretKey, Signature};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use tessera_core::{now_ms, NodeId};

/// Most node ids a revocation list may hold (it travels on gossip, whose
/// messages are at most 4 KiB, so the list is also kept in a file).
pub const MAX_REVOKED: usize = 40;

/// The operator's signature over a document: the exact JSON signed, and the
/// signature in hex.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Signed {
    /// What kind of document (so a certificate is never read as a list).
    kind: String,
    body: String,
    signature: String,
}

fn sign<T: Serialize>(kind: &str, doc: &T, key: &SecretKey) -> String {
    let body = serde_json::to_string(doc).unwrap_or_default();
    let signature = hex::encode(key.sign(body.as_bytes()).to_bytes());
    serde_json::to_string(&Signed {
        kind: kind.into(),
        body,
        signature,
    })
    .unwrap_or_default()
}

/// Parse a signed document of `kind` and check its signature by the key
/// `signer` it names (the caller then checks that key is the right one).
fn open<T: DeserializeOwned>(
    text: &str,
    kind: &str,
    signer: impl Fn(&T) -> NodeId,
) -> anyhow::Result<T> {
    if text.len() > 4096 {
        bail!("a signed {kind} of {} bytes is too large", text.len());
    }
    let signed: Signed =
        serde_json::from_str(text.trim()).with_context(|| format!("not a signed {kind}"))?;
    if signed.kind != kind {
        bail!("a {}, not a {kind}", signed.kind);
    }
    let doc: T = serde_json::from_str(&signed.body).with_context(|| format!("malformed {kind}"))?;
    let key = PublicKey::from_bytes(signer(&doc).as_bytes())
        .map_err(|e| anyhow!("bad operator key: {e}"))?;
    let sig: [u8; 64] = hex::decode(&signed.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow!("signature is not 64 bytes of hex"))?;
    key.verify(signed.body.as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| anyhow!("the {kind}'s signature does not verify"))?;
    Ok(doc)
}

/// The operator's word that a gateway belongs to its network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// The network's name (its gossip topic).
    pub network: String,
    /// The operator's public key, which signed this.
    pub operator: NodeId,
    /// The certified gateway's node id.
    pub gateway: NodeId,
    /// Milliseconds since the Unix epoch when it was signed.
    pub issued_ms: u64,
    /// When it stops being valid.
    pub expires_ms: u64,
}

impl Certificate {
    /// Sign it with the operator's key (whose public half is `operator`).
    pub fn sign(&self, key: &SecretKey) -> String {
        sign("certificate", self, key)
    }

    /// Read a signed certificate, checking only its signature.
    pub fn open(text: &str) -> anyhow::Result<Certificate> {
        open(text, "certificate", |c: &Certificate| c.operator)
    }

    /// The operator's certificate of `gateway` in `network`, valid from
    /// now for `valid_for`, signed with `operator`'s key.
    pub fn issue(
        operator: &SecretKey,
        network: &str,
        gateway: NodeId,
        valid_for: std::time::Duration,
    ) -> String {
        let now = now_ms();
        Certificate {
            network: network.to_string(),
            operator: crate::node::node_id(&operator.public()),
            gateway,
            issued_ms: now,
            expires_ms: now.saturating_add(valid_for.as_millis() as u64),
        }
        .sign(operator)
    }

    /// Check an opened certificate: for `gateway` in `network`, under the
    /// operator key `operator`, not expired at `now`.
    pub fn validate(
        &self,
        network: &str,
        operator: &NodeId,
        gateway: &NodeId,
        now: u64,
    ) -> anyhow::Result<()> {
        let c = self;
        if c.operator != *operator {
            bail!(
                "certified by operator {}, not this network's {}",
                c.operator.short(),
                operator.short()
            );
        }
        if c.network != network {
            bail!("certified for network '{}', not '{network}'", c.network);
        }
        if c.gateway != *gateway {
            bail!(
                "the certificate is for gateway {}, not {}",
                c.gateway.short(),
                gateway.short()
            );
        }
        if c.expires_ms <= now {
            bail!("the certificate expired");
        }
        Ok(())
    }
}

/// The operator's list of gateways no longer certified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    /// The network's name.
    pub network: String,
    /// The operator's public key, which signed this.
    pub operator: NodeId,
    /// When it was signed: a newer list replaces an older one.
    pub issued_ms: u64,
    /// Gateways whose certificates no longer count.
    pub revoked: Vec<NodeId>,
}

impl Revocations {
    /// Sign the list with the operator's key.
    pub fn sign(&self, key: &SecretKey) -> String {
        sign("revocations", self, key)
    }

    /// Read a signed list, checking only its signature.
    pub fn open(text: &str) -> anyhow::Result<Revocations> {
        let r: Revocations = open(text, "revocations", |r: &Revocations| r.operator)?;
        if r.revoked.len() > MAX_REVOKED {
            bail!(
                "a revocation list of {} gateways is too long",
                r.revoked.len()
            );
        }
        Ok(r)
    }
}

/// The operator's key, kept in `home/network.key` (owner-only).
pub fn load_or_create_operator_key(home: &Path) -> anyhow::Result<SecretKey> {
    crate::node::load_or_create_key_file(&home.join("network.key"))
}

/// The operator's key, which must exist (`tessera network init`).
pub fn load_operator_key(home: &Path) -> anyhow::Result<SecretKey> {
    let path = home.join("network.key");
    if !path.exists() {
        bail!(
            "no network key in {}: run `tessera network init` there first",
            home.display()
        );
    }
    crate::node::load_or_create_key_file(&path)
}

/// What a provider checks gateways against: its network's name and
/// operator key, and the newest revocation list heard.
#[derive(Clone, Debug)]
pub struct Admission {
    network: String,
    operator: NodeId,
    /// The newest list: its issue time, the ids, and its signed text (which
    /// this node rebroadcasts).
    revocations: Arc<Mutex<Option<(Revocations, String)>>>,
}

impl Admission {
    /// Admission to the network `network` run by `operator`.
    pub fn new(network: &str, operator: NodeId) -> Admission {
        Admission {
            network: network.to_string(),
            operator,
            revocations: Arc::default(),
        }
    }

    /// The operator's key.
    pub fn operator(&self) -> NodeId {
        self.operator
    }

    /// Whether `gateway`, showing `certificate`, may be served now; the
    /// reason when not.
    pub fn check(&self, gateway: &NodeId, certificate: Option<&str>) -> Result<(), String> {
        let Some(text) = certificate else {
            return Err(format!(
                "gateway {} shows no certificate of network '{}'",
                gateway.short(),
                self.network
            ));
        };
        Certificate::open(text)
            .and_then(|c| c.validate(&self.network, &self.operator, gateway, now_ms()))
            .map_err(|e| format!("gateway {}: {e}", gateway.short()))?;
        if self.is_revoked(gateway) {
            return Err(format!(
                "gateway {} was revoked by the network's operator",
                gateway.short()
            ));
        }
        Ok(())
    }

    fn is_revoked(&self, gateway: &NodeId) -> bool {
        self.revocations
            .lock()
            .map(|r| r.as_ref().is_some_and(|(r, _)| r.revoked.contains(gateway)))
            .unwrap_or(false)
    }

    /// Take a signed revocation list if it is this network's operator's and
    /// newer than the one held; returns whether it was taken.
    pub fn learn_revocations(&self, text: &str) -> anyhow::Result<bool> {
        let r = Revocations::open(text)?;
        if r.operator != self.operator || r.network != self.network {
            bail!("a revocation list of another network or operator");
        }
        if r.issued_ms > now_ms() + 60_000 {
            bail!("a revocation list from the future");
        }
        let mut held = self
            .revocations
            .lock()
            .map_err(|_| anyhow!("revocations lock poisoned"))?;
        if held
            .as_ref()
            .is_some_and(|(h, _)| h.issued_ms >= r.issued_ms)
        {
            return Ok(false);
        }
        let ids: HashSet<&NodeId> = r.revoked.iter().collect();
        tracing::info!(revoked = ids.len(), "took the operator's revocation list");
        *held = Some((r, text.to_string()));
        Ok(true)
    }

    /// The newest list's signed text, to rebroadcast.
    pub fn revocations_text(&self) -> Option<String> {
        self.revocations
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|(_, t)| t.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::node_id;

    fn cert(operator: &SecretKey, gateway: NodeId, network: &str, expires_ms: u64) -> String {
        Certificate {
            network: network.into(),
            operator: node_id(&operator.public()),
            gateway,
            issued_ms: now_ms(),
            expires_ms,
        }
        .sign(operator)
    }

    #[test]
    fn only_a_valid_certificate_of_this_network_admits_a_gateway() {
        let op = SecretKey::generate();
        let gw = node_id(&SecretKey::generate().public());
        let admission = Admission::new("net", node_id(&op.public()));
        let later = now_ms() + 60_000;
        assert!(admission
            .check(&gw, Some(&cert(&op, gw, "net", later)))
            .is_ok());
        // No certificate, a stranger's, another network's, another
        // gateway's, an expired one, garbage.
        let none = admission.check(&gw, None).unwrap_err();
        assert!(none.contains("no certificate"), "{none}");
        let stranger = SecretKey::generate();
        let e = admission
            .check(&gw, Some(&cert(&stranger, gw, "net", later)))
            .unwrap_err();
        assert!(e.contains("operator"), "{e}");
        assert!(admission
            .check(&gw, Some(&cert(&op, gw, "other", later)))
            .is_err());
        let other = node_id(&SecretKey::generate().public());
        assert!(admission
            .check(&gw, Some(&cert(&op, other, "net", later)))
            .is_err());
        let e = admission
            .check(&gw, Some(&cert(&op, gw, "net", now_ms() - 1)))
            .unwrap_err();
        assert!(e.contains("expired"), "{e}");
        assert!(admission.check(&gw, Some("{garbage")).is_err());
        // A certificate altered after signing (its expiry pushed back).
        let good = cert(&op, gw, "net", later);
        let mut signed: Signed = serde_json::from_str(&good).unwrap();
        signed.body = signed
            .body
            .replace(&later.to_string(), &(later * 2).to_string());
        let altered = serde_json::to_string(&signed).unwrap();
        let e = admission.check(&gw, Some(&altered)).unwrap_err();
        assert!(e.contains("signature"), "{e}");
    }

    #[test]
    fn a_newer_revocation_list_revokes_and_an_older_one_cannot_undo_it() {
        let op = SecretKey::generate();
        let gw = node_id(&SecretKey::generate().public());
        let operator = node_id(&op.public());
        let admission = Admission::new("net", operator);
        let certificate = cert(&op, gw, "net", now_ms() + 60_000);
        let list = |issued_ms, revoked: Vec<NodeId>| {
            Revocations {
                network: "net".into(),
                operator,
                issued_ms,
                revoked,
            }
            .sign(&op)
        };
        let now = now_ms();
        assert!(admission
            .learn_revocations(&list(now - 10, vec![]))
            .unwrap());
        assert!(admission.check(&gw, Some(&certificate)).is_ok());
        assert!(admission.learn_revocations(&list(now, vec![gw])).unwrap());
        let e = admission.check(&gw, Some(&certificate)).unwrap_err();
        assert!(e.contains("revoked"), "{e}");
        // Replaying the older, empty list changes nothing.
        assert!(!admission
            .learn_revocations(&list(now - 10, vec![]))
            .unwrap());
        assert!(admission.check(&gw, Some(&certificate)).is_err());
        // A stranger's list, or one of another network, is refused.
        let stranger = SecretKey::generate();
        let forged = Revocations {
            network: "net".into(),
            operator: node_id(&stranger.public()),
            issued_ms: now + 1,
            revoked: vec![],
        }
        .sign(&stranger);
        assert!(admission.learn_revocations(&forged).is_err());
        // A certificate is never read as a list.
        assert!(admission.learn_revocations(&certificate).is_err());
    }
}
