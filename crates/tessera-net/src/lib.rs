//! Gateways and providers over iroh.
//!
//! Transport is iroh: QUIC connections in which every peer is identified and
//! authenticated by its ed25519 key ([`node`]). Providers dial out to
//! gateways ([`provider`]), so a provider behind NAT needs no open port; a
//! gateway keeps a directory of the providers connected to it and routes
//! each API request to one of them ([`gateway`]). The messages themselves
//! are `tessera-protocol`'s frames.
//!
//! Not yet here (see the open network issue): gossip discovery of other
//! gateways, continuing an answer on another provider after a provider dies
//! mid-answer, and OpenRouter-style provider preferences.

pub mod gateway;
pub mod node;
pub mod provider;

pub use gateway::{Gateway, NetworkBackend};
pub use node::Ticket;
pub use provider::ProviderConfig;
