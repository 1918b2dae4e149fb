//! The seam between the HTTP API and whatever runs jobs.
//!
//! The API validates a request, renders and tokenizes its prompt, holds
//! its cost in escrow, and hands it to a [`Backend`]: `tessera serve` puts
//! an in-process engine behind it ([`LocalBackend`]), a gateway puts the
//! network's router there (`tessera_net::NetworkBackend`). Neither side
//! knows the other: the network never imports HTTP, the API never imports
//! QUIC. What crosses the seam:
//!
//! - [`ServedModel`]: a model that can be requested, with its tokenizer.
//! - [`RoutePrefs`]: the client's provider preferences (OpenRouter's
//!   `provider` object), already validated.
//! - [`Quote`] and [`Budget`]: what the request's hold is sized by (the
//!   route the router would take now) and how the router raises it when
//!   the route it actually takes is dearer.
//! - [`Dispatch`]: an accepted job, a stream of [`JobEvent`]s.
//! - [`JobError`]: why a job could not run or finish, typed, so that the
//!   API maps each case to its HTTP status in one place.
//! - [`Training`]: federated training tasks (create, watch, cancel, fetch
//!   the model), for the gateway's training routes.

mod local;
mod parts;
mod route;
mod training;

use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use tessera_core::{AuditStatus, FinishReason, GenerationRequest, Price, TokenEvent, Usage};
use tessera_engine::Model;
use tokio::sync::mpsc::UnboundedReceiver;

pub use local::LocalBackend;
pub use parts::{BilledPart, Parts};
pub use route::{RoutePrefs, Sort};
pub use training::{Training, TrainingError};

/// A model as the API shows it and as requests name it.
#[derive(Clone)]
pub struct ServedModel {
    /// The friendly name clients send as `model`.
    pub id: String,
    /// sha256 of the GGUF file: the model's identity on the network.
    pub sha256: String,
    /// Tokenizer and chat template of the model.
    pub tokenizer: Arc<dyn Model>,
    /// Positions (prompt + output) one request may use.
    pub context_length: usize,
    /// Providers currently able to serve it.
    pub providers: usize,
    /// Lowest and highest price among them.
    pub prices: Option<(Price, Price)>,
}

/// Who a job is for: the API's response id, the paying account and its
/// hold.
#[derive(Clone)]
pub struct JobTicket {
    /// The response id the client sees (`chatcmpl-…`).
    pub id: String,
    /// The paying account.
    pub account: String,
    /// The escrow behind the job, when it has one (a client's request): the
    /// router takes a provider dearer than it covers only after raising it.
    /// Without one the router stays within `RoutePrefs::max_price`.
    pub budget: Option<Arc<dyn Budget>>,
}

impl std::fmt::Debug for JobTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTicket")
            .field("id", &self.id)
            .field("account", &self.account)
            .field("budget", &self.budget.as_ref().map(|b| b.covers()))
            .finish()
    }
}

/// What a request's hold is sized by: the price of the provider the router
/// would choose now, the cheapest that may serve it (held instead when the
/// account cannot cover the first: the router then keeps to what it can
/// pay), and the dearest price it may go to (the client's `max_price`, or
/// the dearest provider within the market cap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote {
    /// Hold at this price.
    pub hold: Price,
    /// The cheapest provider's price (by output, then input price).
    pub cheapest: Price,
    /// Never route above this price (per side).
    pub ceiling: Price,
}

/// The escrow behind one request, as the router sees it. The hold starts
/// at the quoted route's price; when the provider the router takes (first,
/// or after a failure) is dearer, the router asks to raise it to that
/// price for the whole request and takes the provider only if that
/// succeeds; otherwise it keeps to providers the hold covers.
pub trait Budget: Send + Sync {
    /// The price (per side) the hold covers for the whole request.
    fn covers(&self) -> Price;
    /// Raise the hold to cover `price` (per side) for the whole request;
    /// `false` when the account cannot afford it or the hold is closed.
    fn raise(&self, price: Price) -> BoxFuture<'static, bool>;
}

/// What a running job reports, in order: tokens (with provider changes
/// and receipts between them) and exactly one `Done` or `Error` at the end.
#[derive(Clone, Debug, PartialEq)]
pub enum JobEvent {
    /// One generated token.
    Token(TokenEvent),
    /// From here on the answer comes from this provider, at its price (a
    /// provider died mid-answer and another took over).
    Provider {
        /// The new provider's id (node id in hex).
        node: String,
        /// Its price.
        price: Price,
    },
    /// The countersigned receipt (JSON) of the provider's part that just
    /// ended.
    Receipt(String),
    /// The answer ended; `text` is text held back until the end.
    Done {
        /// Why it ended.
        finish_reason: FinishReason,
        /// Tokens of the whole answer.
        usage: Usage,
        /// Text released at the end.
        text: String,
    },
    /// The answer broke off.
    Error(JobError),
}

/// A job on its way: its events and who produces them.
pub struct Dispatch {
    /// The job's events; dropping the receiver cancels the job.
    pub events: UnboundedReceiver<JobEvent>,
    /// The serving provider's id, shown to the client in `tessera.provider`.
    pub provider: String,
    /// Its price (later providers announce theirs in `JobEvent::Provider`).
    pub price: Price,
    /// Whether a part is billed only with a countersigned receipt (the
    /// network: proof or nothing). Local parts are always billed.
    pub receipts_required: bool,
    /// Ends the job early but properly (the network): the provider stops,
    /// and its proof, receipt and `Done` still come as events, so the part
    /// is paid. Without it (local), dropping `events` cancels the job.
    pub wrap_up: Option<tokio_util::sync::CancellationToken>,
}

/// Why a job could not start or did not finish. The API maps each case to
/// an HTTP status in one place (`tessera_api::error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// No provider serves the model right now (503).
    #[error("No provider serving this model is available right now; retry shortly.")]
    NoProvider,
    /// Providers exist, but none within `provider.max_price` (503).
    #[error("No provider of this model is available within the request's provider.max_price.")]
    OverPriceCap,
    /// The providers that could take the job are dearer than the request's
    /// hold, and the account could not raise it (402).
    #[error(
        "The providers able to take this request now are dearer than your credits or spending \
         limit allow for it; add credits, lower max_tokens, or retry shortly."
    )]
    Unaffordable,
    /// The client's `provider` preferences exclude every provider (503).
    #[error("No provider matches the request's provider preferences (order, only, ignore).")]
    Excluded,
    /// Every provider that could serve it was tried or stayed busy until
    /// the failover deadline (503).
    #[error(
        "No provider could finish the job: {tried} tried within {deadline_s} s; last error: {last}"
    )]
    FailoverExhausted {
        /// Providers tried.
        tried: usize,
        /// The failover deadline in seconds.
        deadline_s: u64,
        /// What the last one did.
        last: String,
    },
    /// Every slot is busy and the queue is full (503).
    #[error("Every slot is busy and the queue is full; retry shortly.")]
    Busy,
    /// The prompt is longer than the context (400).
    #[error("This model's context holds {limit} tokens, but the prompt has {prompt} tokens. Shorten the prompt.")]
    ContextLength {
        /// Tokens of the prompt.
        prompt: usize,
        /// Tokens the context holds.
        limit: usize,
    },
    /// The prompt is empty or cannot be rendered or tokenized (400).
    #[error("{0}")]
    BadPrompt(String),
    /// The server is stopping (503).
    #[error("The server is shutting down.")]
    ShuttingDown,
    /// The client went away before the answer was complete (nobody sees
    /// it; its bill settles for what was verified).
    #[error("The client went away.")]
    Cancelled,
    /// Our fault, never the client's (500).
    #[error("{0}")]
    Internal(String),
}

impl From<tessera_engine::EngineError> for JobError {
    fn from(e: tessera_engine::EngineError) -> Self {
        use tessera_engine::EngineError as E;
        match e {
            E::ContextLength { prompt, limit } => JobError::ContextLength { prompt, limit },
            E::Template(m) => JobError::BadPrompt(format!(
                "The messages could not be rendered with the model's chat template: {m}"
            )),
            E::Tokenize(m) => {
                JobError::BadPrompt(format!("The prompt could not be tokenized: {m}"))
            }
            E::Closed => JobError::ShuttingDown,
            E::Load(m) | E::Decode(m) => JobError::Internal(m),
        }
    }
}

impl From<tessera_engine::SubmitError> for JobError {
    fn from(e: tessera_engine::SubmitError) -> Self {
        use tessera_engine::SubmitError as S;
        match e {
            S::EmptyPrompt => JobError::BadPrompt("The prompt is empty.".into()),
            S::Busy => JobError::Busy,
            S::Engine(e) => e.into(),
        }
    }
}

/// What `GET /health` says about the backend.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Health {
    /// An in-process engine.
    Local {
        /// Requests being generated.
        active: usize,
        /// Requests waiting for a slot.
        waiting: usize,
        /// Requests decoded together at most.
        slots: usize,
    },
    /// A gateway in front of providers.
    Gateway {
        /// The providers connected now (one summary each).
        providers: Vec<Value>,
        /// Nodes learnt through discovery.
        #[serde(skip_serializing_if = "Option::is_none")]
        discovered: Option<Value>,
    },
}

/// Where the API sends work.
pub trait Backend: Send + Sync + 'static {
    /// Every model that can be requested now.
    fn models(&self) -> Vec<ServedModel>;
    /// What this request's hold is sized by (see [`Quote`]), within
    /// `route.max_price`; an error when no provider may serve it.
    fn quote(&self, model: &ServedModel, route: &RoutePrefs) -> Result<Quote, JobError>;
    /// Start a generation of `model`. The future resolves once a provider
    /// has accepted the job (a network backend tries others before that),
    /// so a job nobody can take fails as an HTTP error, not a broken stream.
    fn submit(
        &self,
        model: &ServedModel,
        request: GenerationRequest,
        route: &RoutePrefs,
        ticket: &JobTicket,
    ) -> BoxFuture<'static, Result<Dispatch, JobError>>;
    /// Whether this backend audits answers (then it counts their verdicts).
    fn audits(&self) -> bool {
        false
    }
    /// The audit status of a request now.
    fn audit_status(&self, _id: &str) -> AuditStatus {
        AuditStatus::NotAudited
    }
    /// A request's verdict and evidence, for the account that paid for it
    /// (`None`: unknown, or not this account's).
    fn audit_report(&self, _id: &str, _account: &str) -> Option<Value> {
        None
    }
    /// What `GET /health` shows about the backend.
    fn health(&self) -> Health;
}
