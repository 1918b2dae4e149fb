//! Federated learning over the network: providers train on data that never
//! leaves them; the gateway coordinates rounds, checks each update, pays
//! per verified round.
//!
//! - [`client`]: the provider's side of a round (check, train, commit,
//!   reveal).
//! - [`Trainers`]: the providers connected now that hold training data
//!   (their `Hello` said so), next to the inference [`crate::Directory`].
//! - [`Coordinator`]: the gateway's tasks behind the API's
//!   [`tessera_backend::Training`] seam: a task's escrow is held before its
//!   first round (one hold per round, so that each round settles on its
//!   own), and [`task`] runs its rounds.
//!
//! What "verified" means here (a task without SecAgg, where every update
//! is visible): the provider committed to its result before any was
//! revealed and the reveal opens the commitment; its sample count and loss
//! are the committed ones and no more samples than its `Hello` announced;
//! the update passes `tessera_train::verify::plausible` (finite, within the
//! task's norm bound, not against the round's median direction); and it is
//! not one of the round's outliers (`tessera_train::outliers`). An update
//! that fails any of these is left out of the aggregate and not paid; a
//! provider whose update fails the commitment or plausibility is not
//! sampled again in that task. Re-executing rounds (possible only when the
//! task owner ships the data) and SecAgg over the network are not built
//! yet; `tessera_train::secagg` and `tessera_train::verify::reexecute` are.

mod canary;
pub mod client;
mod pool;
mod secure;
mod service;
mod task;

pub use pool::{Trainer, Trainers};
pub use service::Coordinator;
pub use task::TaskRequest;
