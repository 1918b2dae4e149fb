//! Training on Tessera's providers, the machine-learning half (no
//! networking: the provider protocol, the gateway's task API and billing
//! build on this).
//!
//! - [`Trainer`]: the seam between training logic and the ML crate — a
//!   model's mean loss and its gradients for a batch, parameters as one
//!   flat `f32` vector. [`CandleTrainer`] implements it on candle's CPU
//!   backend, each trainer on its own thread pool of a set size.
//! - [`train_locally`]: what a client does in a round (mini-batch SGD from
//!   the global parameters, FedProx's proximal term, seeded shuffles, so an
//!   auditor can re-execute a round).
//! - [`Server`], [`Strategy`], [`Aggregation`]: how the global model moves
//!   (FedAvg, FedProx, FedAvgM, FedAdam; the weighted mean or a robust rule:
//!   median, trimmed mean, Krum).
//! - [`data`]: labelled data, the 8×8 digits set shipped inside `smartcore`,
//!   IID and Dirichlet(α) splits over clients.
//! - [`privacy`]: clipping, Gaussian noise (distributed through SecAgg, or
//!   local) and a Rényi-DP accountant reporting ε at δ.
//! - [`secagg`]: SecAgg+ — the aggregator learns only the sum of the
//!   clients' vectors, and the round survives clients that drop out.
//! - [`verify`]: checking trainers nobody trusts — commit before reveal,
//!   plausibility, re-execution within a tolerance.
//! - [`lm`], [`corpus`], [`diloco`]: a small transformer language model,
//!   the `fortunes` text it learns, and DiLoCo — inner AdamW steps on
//!   workers, int8 pseudo-gradients, the outer Nesterov step, committed
//!   state traces, re-execution audits and bisection.
//! - [`export`]: a trained model as a safetensors file.
//! - [`simulate`]: rounds run in one process, the reference the networked
//!   runs and the benchmarks compare against (and centralized training,
//!   the baseline federated accuracy is measured against).

mod candle;
pub mod corpus;
pub mod data;
pub mod diloco;
pub mod export;
pub mod lm;
pub mod privacy;
mod rng;
pub mod secagg;
pub mod simulate;
mod strategy;
mod trainer;
pub mod verify;

pub use crate::candle::CandleTrainer;
pub use data::{Dataset, Split};
pub use rng::Rng;
pub use strategy::{outliers, Aggregation, ClientUpdate, Server, Strategy};
pub use trainer::{train_locally, Evaluation, Initialize, LocalUpdate, ModelSpec, Recipe, Trainer};

/// Why training could not go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// Data that cannot be trained on (shape, labels, values).
    #[error("bad training data: {0}")]
    Data(String),
    /// Parameters or a batch of the wrong shape for the model.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// The loss stopped being a finite number (after this many steps).
    #[error("training diverged after {0} steps (the loss is not finite); lower the learning rate")]
    Diverged(usize),
    /// Updates that cannot be combined.
    #[error("cannot aggregate: {0}")]
    Aggregate(String),
    /// The ML crate failed.
    #[error("training engine: {0}")]
    Engine(String),
}
