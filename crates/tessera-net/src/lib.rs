//! Gateways and providers over iroh.
//!
//! Transport is iroh: QUIC connections in which every peer is identified and
//! authenticated by its ed25519 key ([`node`]). Providers dial out to
//! gateways ([`provider`]), so a provider behind NAT needs no open port; a
//! gateway keeps a directory of the providers connected to it and routes
//! each API request to one of them ([`gateway`]). The messages themselves
//! are `tessera-protocol`'s frames.
//!
//! A request whose provider dies mid-answer continues on another provider
//! from the tokens already sent ([`job`] explains how).
//!
//! Nodes find each other through signed announcements on a gossip topic
//! ([`discovery`]): a provider given one gateway's ticket learns the others
//! and serves several. Every job ends with a receipt the provider signs and
//! the gateway countersigns after checking it ([`receipt`]).

#[cfg(feature = "adversary")]
pub mod adversary;
pub mod audit;
pub mod canary;
pub mod discovery;
pub mod gateway;
mod job;
pub mod node;
pub mod provider;
pub mod receipt;
pub mod synthetic;

pub use discovery::{Discovery, DiscoveryConfig, Role};
pub use gateway::{Gateway, NetworkBackend};
pub use node::Ticket;
pub use provider::ProviderConfig;
