//! Gateways and providers over iroh.
//!
//! Transport is iroh: QUIC connections in which every peer is identified and
//! authenticated by its ed25519 key ([`node`]). Providers dial out to
//! gateways ([`provider`]), so a provider behind NAT needs no open port. The
//! messages themselves are `tessera-protocol`'s frames.
//!
//! The gateway side, in the order a request meets it:
//!
//! - [`backend`]: the API's `Backend` seam; a request becomes a job.
//! - [`job`]: one request across providers: parts, failover until a
//!   deadline, continuation mid-answer, receipts.
//! - [`router`]: which providers may take a job, what it may cost, which
//!   one takes it (pure functions, benchmarked at 10,000 providers).
//! - [`directory`]: every provider connected now and what the gateway has
//!   seen of each, behind one lock; picks claim slots atomically.
//! - [`prefix`]: which provider keeps which prompt prefixes cached, so a
//!   chat's next turn goes where its history already is.
//! - [`session`]: a provider's handshake and heartbeats.
//! - [`gateway`]: the endpoint, the accept loop and the shutdown of all of
//!   the above.
//! - [`audit`] and [`canary`]: verdicts on providers' answers, and the
//!   gateway's own probes; both feed the directory and the ledger;
//!   [`auditors`]: where audits run (the gateway's engine, and auditor
//!   processes the operator named, which dial in like providers).
//!
//! Federated training ([`federated`]): providers that hold training data
//! say so in their `Hello`; the gateway's coordinator runs a task's rounds
//! on them as jobs, checks every update and pays per verified round.
//!
//! DiLoCo ([`diloco`]): providers that offer compute train one language
//! model together in rare outer steps; the same coordinator runs those
//! tasks, audits sampled steps by re-execution and bisection, and pays per
//! verified inner step.
//!
//! Nodes find each other through signed announcements on a gossip topic
//! ([`discovery`]): a provider given one gateway's ticket learns the others
//! and serves several. Every job ends with a receipt the provider signs and
//! the gateway countersigns after checking it ([`receipt`]). A provider
//! serves only gateways its network's operator certified ([`admission`]).
//! A gateway serves the model files it serves to peers, checked by sha256
//! on arrival, so a provider can join without a package registry
//! ([`blobs`]).

pub mod admission;
#[cfg(feature = "adversary")]
pub mod adversary;
pub mod audit;
pub mod auditors;
pub mod backend;
pub mod blobs;
pub mod canary;
pub mod diloco;
pub mod directory;
pub mod discovery;
pub mod federated;
#[cfg(feature = "testing")]
pub mod flood;
pub mod gateway;
pub mod job;
pub mod node;
pub mod prefix;
pub mod provider;
pub mod receipt;
pub mod router;
pub mod session;
#[cfg(feature = "testing")]
pub mod synthetic;

pub use backend::NetworkBackend;
pub use discovery::{Discovery, DiscoveryConfig, Role};
pub use gateway::Gateway;
/// A node's secret key (its identity): providers sign receipts and requests with it.
pub use iroh::SecretKey;
pub use node::Ticket;
pub use provider::ProviderConfig;
