//! Node identity, iroh endpoints and tickets.
//!
//! Every node has one ed25519 key, kept in `$TESSERA_HOME/node.key`; its
//! public half is the node id that peers authenticate through QUIC and that
//! clients see as `tessera.provider`. Relays and public discovery are off:
//! peers find each other through tickets (`NODEID@IP:PORT[+IP:PORT…]`),
//! which is all a loopback devnet or a LAN needs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context};
use iroh::endpoint::{presets, IdleTimeout, QuicTransportConfig};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMode, SecretKey, TransportAddr};
use tessera_core::NodeId;

/// Load the node key from `home/node.key`, creating it on first use.
pub fn load_or_create_key(home: &Path) -> anyhow::Result<SecretKey> {
    load_or_create_key_file(&home.join("node.key"))
}

/// Load an ed25519 key from `path` (hex), creating it owner-only on first
/// use.
pub fn load_or_create_key_file(path: &Path) -> anyhow::Result<SecretKey> {
    let home = path.parent().unwrap_or(Path::new("."));
    let path = path.to_path_buf();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes = hex::decode(text.trim())
                .with_context(|| format!("{} is not hex", path.display()))?;
            let bytes: [u8; 32] = bytes
                .try_into()
                .map_err(|_| anyhow!("{} must hold 32 bytes of hex", path.display()))?;
            Ok(SecretKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(home)
                .with_context(|| format!("cannot create {}", home.display()))?;
            let key = SecretKey::generate();
            let tmp = path.with_extension("key.tmp");
            let _ = std::fs::remove_file(&tmp);
            // Created owner-only, so the key is never readable by others,
            // not even between writing and a chmod.
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options
                .open(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            std::io::Write::write_all(&mut file, hex::encode(key.to_bytes()).as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// A peer silent this long is gone: keep-alives every second make silence
/// mean death, so a killed provider leaves the directory within seconds.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Job streams one connection may carry at once.
pub const MAX_STREAMS: u32 = 8192;

/// Streams a peer may open to a gateway at once: a provider or auditor
/// opens one control stream and gossip one more; the job streams are the
/// gateway's own.
pub const GATEWAY_PEER_STREAMS: u32 = 16;

/// Bind an iroh endpoint with relays and discovery off. `alpns` are the
/// protocols it accepts (a provider, which only dials, passes none).
pub async fn bind(
    key: SecretKey,
    addr: SocketAddr,
    alpns: Vec<Vec<u8>>,
) -> anyhow::Result<Endpoint> {
    // Every job is a bi-stream the gateway opens: QUIC's default of 100
    // open streams per connection would cap a provider at 100 jobs.
    bind_with(key, addr, alpns, MAX_STREAMS, None).await
}

/// Bind a gateway's endpoint: like [`bind`], but a peer may open only
/// [`GATEWAY_PEER_STREAMS`] streams and have 1 MiB per stream, 4 MiB per
/// connection unread at the gateway, so a stranger's connection holds a
/// bounded amount of its memory.
pub async fn bind_gateway(
    key: SecretKey,
    addr: SocketAddr,
    alpns: Vec<Vec<u8>>,
) -> anyhow::Result<Endpoint> {
    bind_with(
        key,
        addr,
        alpns,
        GATEWAY_PEER_STREAMS,
        Some((1 << 20, 4 << 20)),
    )
    .await
}

async fn bind_with(
    key: SecretKey,
    addr: SocketAddr,
    alpns: Vec<Vec<u8>>,
    peer_streams: u32,
    windows: Option<(u32, u32)>,
) -> anyhow::Result<Endpoint> {
    let idle: IdleTimeout = IDLE_TIMEOUT
        .try_into()
        .map_err(|e| anyhow!("idle timeout: {e}"))?;
    let mut transport = QuicTransportConfig::builder()
        .max_idle_timeout(Some(idle))
        .max_concurrent_bidi_streams(peer_streams.into())
        .keep_alive_interval(std::time::Duration::from_secs(1));
    if let Some((stream, connection)) = windows {
        transport = transport
            .stream_receive_window(stream.into())
            .receive_window(connection.into());
    }
    let transport = transport.build();
    Endpoint::builder(presets::Minimal)
        .secret_key(key)
        .transport_config(transport)
        .relay_mode(RelayMode::Disabled)
        .alpns(alpns)
        .bind_addr(addr)
        .map_err(|e| anyhow!("bad bind address {addr}: {e}"))?
        .bind()
        .await
        .map_err(|e| anyhow!("cannot bind an iroh endpoint on {addr}: {e}"))
}

/// The node id of an iroh endpoint id (the same public key).
pub fn node_id(id: &EndpointId) -> NodeId {
    NodeId::from_bytes(*id.as_bytes())
}

/// How to reach a gateway: its node id and direct addresses, and the key of
/// the network's operator who certified it (`#OPERATOR`, see
/// [`crate::admission`]), which a provider then checks every gateway
/// against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The gateway's endpoint id (its public key).
    pub id: EndpointId,
    /// Where it listens.
    pub addrs: Vec<SocketAddr>,
    /// The network operator's key, when the gateway is certified.
    pub operator: Option<NodeId>,
}

impl Ticket {
    /// The ticket of a bound endpoint; unspecified addresses (0.0.0.0, ::)
    /// are advertised as loopback, so give `public` for other machines.
    pub fn of(endpoint: &Endpoint, public: Option<SocketAddr>) -> Ticket {
        let addrs = match public {
            Some(a) => vec![a],
            None => endpoint
                .bound_sockets()
                .into_iter()
                .map(|mut a| {
                    if a.ip().is_unspecified() {
                        a.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
                    }
                    a
                })
                .collect(),
        };
        Ticket {
            id: endpoint.id(),
            addrs,
            operator: None,
        }
    }

    /// The address iroh dials.
    pub fn endpoint_addr(&self) -> EndpointAddr {
        EndpointAddr::from_parts(self.id, self.addrs.iter().map(|a| TransportAddr::Ip(*a)))
    }
}

impl std::fmt::Display for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs: Vec<String> = self.addrs.iter().map(SocketAddr::to_string).collect();
        write!(f, "{}@{}", node_id(&self.id), addrs.join("+"))?;
        match &self.operator {
            Some(op) => write!(f, "#{op}"),
            None => Ok(()),
        }
    }
}

impl FromStr for Ticket {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Ticket> {
        let (rest, operator) = match s.trim().split_once('#') {
            Some((rest, op)) => {
                let op: NodeId = op.parse().map_err(|_| {
                    anyhow!("the operator key in ticket '{s}' is not 64 hex digits")
                })?;
                (rest, Some(op))
            }
            None => (s.trim(), None),
        };
        let (id, addrs) = rest
            .split_once('@')
            .ok_or_else(|| anyhow!("a ticket looks like NODEID@IP:PORT, got '{s}'"))?;
        let bytes: [u8; 32] = hex::decode(id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("the node id in ticket '{s}' is not 64 hex digits"))?;
        let id =
            EndpointId::from_bytes(&bytes).map_err(|e| anyhow!("bad node id in ticket: {e}"))?;
        let addrs = addrs
            .split('+')
            .map(|a| {
                a.parse::<SocketAddr>()
                    .with_context(|| format!("bad address '{a}' in ticket"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if addrs.is_empty() {
            bail!("ticket '{s}' has no address");
        }
        Ok(Ticket {
            id,
            addrs,
            operator,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_and_bad_ones_are_refused() {
        let id = SecretKey::generate().public();
        let t = Ticket {
            id,
            addrs: vec![
                "127.0.0.1:4433".parse().unwrap(),
                "[::1]:4433".parse().unwrap(),
            ],
            operator: None,
        };
        assert_eq!(t.to_string().parse::<Ticket>().unwrap(), t);
        let certified = Ticket {
            operator: Some(node_id(&SecretKey::generate().public())),
            ..t.clone()
        };
        assert_eq!(certified.to_string().parse::<Ticket>().unwrap(), certified);
        assert!(format!("{t}#zz").parse::<Ticket>().is_err());
        assert!("nope".parse::<Ticket>().is_err());
        assert!("abcd@127.0.0.1:1".parse::<Ticket>().is_err());
        assert!(format!("{}@not-an-address", node_id(&id))
            .parse::<Ticket>()
            .is_err());
    }

    #[test]
    fn the_node_key_persists() {
        let home = std::env::temp_dir().join(format!("tessera-key-{}", std::process::id()));
        let a = load_or_create_key(&home).unwrap();
        let b = load_or_create_key(&home).unwrap();
        assert_eq!(a.public(), b.public());
        let _ = std::fs::remove_dir_all(home);
    }
}
