//! DiLoCo over the network: a model owner rents workers' compute to train
//! one language model together. Federated learning ([`crate::federated`])
//! trains where the data is; this trains where the compute is, on text
//! every worker holds (a task names it by its BLAKE3).
//!
//! - [`worker`]: the provider's side of an outer step (fetch the change or
//!   the checkpoint, inner steps, commit, reveal, open states for audits).
//! - [`Workers`]: the providers connected now that offer compute.
//! - `task`: the gateway's side — the outer optimizer, elastic membership,
//!   compressed exchange, audits with bisection, payment per verified step.
//!   Tasks are created, watched and cancelled through the same routes as
//!   federated tasks (the federated [`crate::federated::Coordinator`]
//!   dispatches on `"kind": "diloco"`).
//! - [`Store`]: the gateway's file of its tasks, written as each outer step
//!   settles, so a restarted gateway resumes them.

mod pool;
mod records;
mod store;
pub(crate) mod task;
pub mod worker;

pub use pool::{Worker, Workers};
pub use records::DilocoRequest;
pub use store::Store;
