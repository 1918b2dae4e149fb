//! The seam between the HTTP API's training routes and whatever runs
//! federated tasks (the gateway's coordinator, `tessera_net::federated`).
//!
//! Tasks cross it as JSON: the coordinator owns their schema (model,
//! strategy, rounds, …), parses and validates a task itself and answers a
//! client's mistake with [`TrainingError::Invalid`] and a message that
//! names the field. The API authenticates, maps each error to its status
//! and writes the bytes.

use futures::future::BoxFuture;
use serde_json::Value;

/// Why a training call failed, by the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainingError {
    /// The task is malformed or impossible (400).
    #[error("{0}")]
    Invalid(String),
    /// No such task for this account (404).
    #[error("no training task '{0}' of this account is known here")]
    NotFound(String),
    /// The account cannot cover the task's escrow (402).
    #[error("{0}")]
    Insufficient(String),
    /// The task is in a state that does not allow this (409): a model not
    /// trained yet, a task already over.
    #[error("{0}")]
    Conflict(String),
    /// The gateway cannot do it now (503): its ledger failed.
    #[error("{0}")]
    Unavailable(String),
}

/// Federated tasks for the API.
pub trait Training: Send + Sync + 'static {
    /// Create a task for `account`: hold its escrow, start its rounds, and
    /// answer its status.
    fn create(&self, account: &str, task: Value) -> BoxFuture<'_, Result<Value, TrainingError>>;
    /// A task's status: progress, each round's loss, accuracy, bytes,
    /// payments.
    fn status(&self, account: &str, id: &str) -> Result<Value, TrainingError>;
    /// Every task of `account`, newest first (their statuses without rounds).
    fn list(&self, account: &str) -> Vec<Value>;
    /// Stop a task once its round in flight is done (its providers trained
    /// for it, so it is paid); every hold not spent is refunded.
    fn cancel(&self, account: &str, id: &str) -> BoxFuture<'_, Result<Value, TrainingError>>;
    /// The task's model now, as safetensors bytes.
    fn model(&self, account: &str, id: &str) -> Result<Vec<u8>, TrainingError>;
}

impl std::fmt::Debug for dyn Training {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Training")
    }
}
