//! Tessera's shared vocabulary, with no heavy dependencies.
//!
//! Every other crate speaks in these types, so they live at the bottom of
//! the house (like `iroh-base` under iroh): the wire protocol, the engine,
//! the router, the API and the ledger agree on them without depending on
//! each other.
//!
//! - [`NodeId`]: a peer's identity (its ed25519 public key), with a
//!   [`short`](NodeId::short) form for logs.
//! - [`Token`], [`SamplingParams`], [`GenerationRequest`], [`TokenEvent`],
//!   [`FinishReason`], [`Usage`]: what a generation job is and what it
//!   produces ([`generation`]).
//! - [`Price`]: micro-credits per token, and the exact cost of tokens.
//! - [`Proof`]: what a provider sends so that its answer can be audited;
//!   [`audit::AuditJob`] and [`audit::Evidence`]: what an auditor is given
//!   and what it finds.
//! - [`AuditStatus`], [`PartOutcome`], [`ProviderState`]: the states a job
//!   part, an audit and a provider go through ([`status`]).
//! - [`train`]: a training round's model, recipe and parameters on the wire.
//! - [`now_ms`], [`unique_u64`], [`secret_bytes`]: the one clock and the one
//!   source of randomness everything uses ([`system`]).

pub mod audit;
pub mod generation;
pub mod id;
pub mod price;
pub mod proof;
pub mod status;
pub mod system;
pub mod train;

pub use generation::{
    FinishReason, GenerationRequest, PrefixCache, SamplingParams, Token, TokenEvent, Usage,
};
pub use id::{NodeId, NodeIdError};
pub use price::Price;
pub use proof::Proof;
pub use status::{AuditStatus, PartOutcome, ProviderState};
pub use system::{now_ms, secret_bytes, unique_u64, RandomError};
