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
//! task's norm bound, a finite non-negative loss); and it is not one of the
//! round's outliers (`tessera_train::outliers`: further from the median
//! update than `outlier_factor` times the typical distance). An update that
//! fails any of these is left out of the aggregate and not paid; a provider
//! whose update fails the commitment or plausibility is also not sampled
//! again in that task (an outlier is only left out of that round: honest
//! providers with unusual data can be one now and then). The direction
//! test of `plausible` is not used: honest steps point up to 114° from the
//! round's median near convergence.
//!
//! With SecAgg no update is visible, so none of that applies: a provider
//! is verified by canary rounds (`canary`) on data the gateway supplies
//! and re-executes, before its first paid round of a task and then in a
//! random `canary_rate` share of rounds. That shows it trains as asked,
//! not that it used its private data in the masked rounds; a poisoning
//! provider in a SecAgg task is not caught (robust rules need each
//! update).
//!
//! Where the task owner shipped a provider its data (and says so in the
//! task's `audit_data`), the gateway re-executes a `reexecute_rate` share
//! of that provider's rounds from the same parameters, data, recipe and
//! seed (`tessera_train::verify::reexecute`, within its tolerance): this
//! catches a trainer that sends something close to the others but not the
//! round it was asked for (half a step, half the data), which the outlier
//! test cannot.
//!
//! - `secure`: the gateway's side of a SecAgg+ round.

mod canary;
pub mod client;
mod pool;
mod round;
mod secure;
mod service;
mod task;

pub use pool::{Trainer, Trainers};
pub use service::Coordinator;
pub use task::{Status, TaskRequest};
