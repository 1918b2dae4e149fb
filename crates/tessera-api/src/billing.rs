//! Paying for a request: the [`Accounts`] seam and one request's [`Bill`].
//!
//! The API does not know how credits are stored; [`Accounts`] (the ledger,
//! in the `tessera` binary) authenticates keys, holds credits in escrow and
//! settles them. A [`Bill`] follows one answer: a part per provider (a
//! continued answer has several), each with its price and the tokens it
//! produced. When the answer ends the bill settles at the real cost; if it
//! failed, the hold is released (nothing charged); if the client went away
//! mid-answer, the tokens already generated are charged.
//!
//! **What a client pays for on the network** (the rule every settlement
//! follows): only parts that ended *verifiable* — with a proof of exactly
//! the tokens streamed and a receipt the gateway countersigned. Tokens of a
//! part that ended unverifiable (no proof, a malformed one, reset, error,
//! silence, a protocol violation) are free to the client, and its provider
//! earns nothing for them. The prompt is paid once, at the price of the
//! first paid part; a continuation's re-read of the prompt is the
//! network's cost. A part cut off because the client went away is
//! unverifiable too, and so free: the provider's loss, bounded by what it
//! generated before the gateway stopped it. An answer that ends in an
//! error is released, charging nothing: its last part failed, and so did
//! every part before it (a part ends verifiable only with its proof, which
//! a provider sends when it finishes or is asked to wrap up, and neither
//! leads to an error but a gateway shutting down mid-answer, which charges
//! nothing), so releasing is exactly this rule — a client pinned
//! to a provider that fails mid-answer gets that partial answer free, and
//! the provider, not the network, bears it. Local answers (`tessera serve`)
//! have no receipts and are always billed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use tessera_backend::{Budget, JobEvent, Parts};
use tessera_core::{Price, Usage};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use crate::ApiError;

/// How long a bill whose client went away waits for the provider's proof.
pub(crate) const DRAIN_LIMIT: Duration = Duration::from_secs(15);

/// Who is calling: the account behind the request's API key.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The account's id.
    pub account: String,
    /// Its name.
    pub name: String,
}

/// One provider's stretch of an answer, as billed (see
/// [`tessera_backend::Parts`] for the rule of what is paid).
pub use tessera_backend::BilledPart as Part;

/// What settling a request charged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    /// Micro-credits charged.
    pub cost: u64,
    /// The receipt id (the settlement's ledger entry).
    pub receipt: String,
}

/// Outcome of asking for a hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// Held under this id.
    New(String),
    /// The idempotency key was used before (settled for `cost` if `Some`).
    Duplicate {
        /// What that request was settled for, once settled.
        cost: Option<u64>,
        /// Its answer (JSON), when one was stored: a retry gets it again.
        response: Option<String>,
        /// Its receipt (settlement entry).
        receipt: Option<String>,
    },
}

/// Accounts, keys and escrow, as the API needs them.
pub trait Accounts: Send + Sync + 'static {
    /// The account of an API key: 401 if none, 429 over its rate limit.
    fn authenticate(&self, key: &str) -> BoxFuture<'static, Result<Caller, ApiError>>;
    /// Hold `amount` micro-credits: 402 when credits or the spending limit
    /// do not cover it.
    fn hold(
        &self,
        caller: &Caller,
        amount: u64,
        idempotency_key: Option<String>,
    ) -> BoxFuture<'static, Result<Held, ApiError>>;
    /// Raise an open hold to `to` micro-credits in all (the route the
    /// router took is dearer than the one the hold was sized by): 402 when
    /// credits or the spending limit do not cover the difference.
    fn raise(&self, hold: String, to: u64) -> BoxFuture<'static, Result<(), ApiError>>;
    /// Charge `parts` against the hold and return the rest (no parts:
    /// release it all). `response`, the answer the charge is for, is kept
    /// with it when given (requests with an idempotency key), in the same
    /// transaction, so a retry with that key gets it again.
    fn settle(
        &self,
        hold: String,
        job_id: String,
        model_sha256: String,
        parts: Vec<Part>,
        response: Option<String>,
    ) -> BoxFuture<'static, Result<Settled, ApiError>>;
    /// The caller's account as `GET /v1/account` shows it.
    fn account(&self, caller: &Caller) -> BoxFuture<'static, Result<Value, ApiError>>;
}

/// One request's hold as the router sees it: sized by the route quoted
/// before the job, raised (for the whole request: its prompt and every
/// token it may generate) when the provider the router takes is dearer.
pub(crate) struct HoldBudget {
    accounts: Arc<dyn Accounts>,
    hold: String,
    prompt_tokens: u64,
    max_tokens: u64,
    covers: Arc<Mutex<Price>>,
}

impl HoldBudget {
    /// The budget of `hold`, which covers `price` for `prompt_tokens` and
    /// `max_tokens`.
    pub(crate) fn new(
        accounts: Arc<dyn Accounts>,
        hold: String,
        price: Price,
        prompt_tokens: u64,
        max_tokens: u64,
    ) -> HoldBudget {
        HoldBudget {
            accounts,
            hold,
            prompt_tokens,
            max_tokens,
            covers: Arc::new(Mutex::new(price)),
        }
    }
}

impl Budget for HoldBudget {
    fn covers(&self) -> Price {
        *self.covers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raise(&self, price: Price) -> BoxFuture<'static, bool> {
        let price = self.covers().max(price);
        let to = price.cost(self.prompt_tokens, self.max_tokens);
        let (accounts, hold, covers) = (
            self.accounts.clone(),
            self.hold.clone(),
            self.covers.clone(),
        );
        Box::pin(async move {
            match accounts.raise(hold, to).await {
                Ok(()) => {
                    let mut c = covers.lock().unwrap_or_else(|e| e.into_inner());
                    *c = c.max(price);
                    true
                }
                Err(e) => {
                    tracing::debug!(message = %e.message, "the hold could not be raised for a dearer provider");
                    false
                }
            }
        })
    }
}

/// One request's escrow and usage so far; settles exactly once.
pub struct Bill {
    accounts: Arc<dyn Accounts>,
    /// Where a bill dropped mid-answer settles in the background (tracked,
    /// so a stopping process waits for it).
    tasks: tokio_util::task::TaskTracker,
    /// `None` once settled or released.
    hold: Option<String>,
    job_id: String,
    model_sha256: String,
    parts: Parts,
    pub settled: Option<Settled>,
}

impl Bill {
    pub(crate) fn new(
        accounts: Arc<dyn Accounts>,
        tasks: tokio_util::task::TaskTracker,
        hold: String,
        job_id: String,
        model_sha256: String,
        prompt_tokens: u64,
    ) -> Bill {
        Bill {
            accounts,
            tasks,
            hold: Some(hold),
            job_id,
            model_sha256,
            parts: Parts::new(prompt_tokens),
            settled: None,
        }
    }

    /// Bill only parts with a countersigned receipt from now on (the
    /// backend is the network).
    pub(crate) fn require_receipts(&mut self, required: bool) {
        self.parts.require_receipts(required);
    }

    /// A provider starts (or takes over) the answer at `price`.
    pub(crate) fn part(&mut self, provider: String, price: Price) {
        self.parts.start(provider, price);
    }

    /// The current provider's countersigned receipt for its part.
    pub(crate) fn receipt(&mut self, receipt: String) {
        self.parts.receipt(receipt);
    }

    /// One more token from the current provider.
    pub(crate) fn token(&mut self) {
        self.parts.token();
    }

    /// The answer ended: charge what `usage` reports (tokens not seen as
    /// events, such as a final end-of-generation token, go to the last part),
    /// keeping `response` (the answer, for a replay) with the charge.
    pub(crate) async fn settle(&mut self, usage: &Usage, response: Option<String>) {
        self.parts.ended(u64::from(usage.completion_tokens));
        let parts = self.parts.payable();
        let Some(settle) = self.close(parts, response) else {
            return;
        };
        match settle.await {
            Ok(s) => self.settled = Some(s),
            Err(e) => {
                tracing::error!(job = %self.job_id, message = %e.message, "settlement failed; the hold stays open until the gateway restarts")
            }
        }
    }

    /// Whether the hold is still open (neither settled nor released).
    pub(crate) fn is_open(&self) -> bool {
        self.hold.is_some()
    }

    /// The client went away mid-answer on the network: ask the job to wrap
    /// up (its provider stops and proves what it generated) and settle in
    /// the background for what `events` brings by the end, within
    /// [`DRAIN_LIMIT`]. This bill is left closed.
    pub(crate) fn drain(
        &mut self,
        mut events: UnboundedReceiver<JobEvent>,
        wrap_up: CancellationToken,
    ) {
        let mut bill = Bill {
            accounts: self.accounts.clone(),
            tasks: self.tasks.clone(),
            hold: self.hold.take(),
            job_id: self.job_id.clone(),
            model_sha256: self.model_sha256.clone(),
            parts: self.parts.take(),
            settled: None,
        };
        wrap_up.cancel();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // `bill` drops, and settles what it has
        };
        self.tasks.spawn_on(
            async move {
                let give_up = tokio::time::sleep(DRAIN_LIMIT);
                tokio::pin!(give_up);
                loop {
                    let event = tokio::select! {
                        e = events.recv() => e,
                        _ = &mut give_up => None,
                    };
                    match event {
                        Some(JobEvent::Token(_)) => bill.token(),
                        Some(JobEvent::Provider { node, price }) => bill.part(node, price),
                        Some(JobEvent::Receipt(r)) => bill.receipt(r),
                        Some(JobEvent::Done { usage, .. }) => {
                            bill.settle(&usage, None).await;
                            return;
                        }
                        // Dropping the bill settles the parts it can pay.
                        Some(JobEvent::Error(_)) | None => return,
                    }
                }
            },
            &rt,
        );
    }

    /// The request failed: charge nothing.
    pub(crate) async fn release(&mut self) {
        self.parts.clear();
        if let Some(settle) = self.close(vec![], None) {
            if let Err(e) = settle.await {
                tracing::error!(job = %self.job_id, message = %e.message, "release failed");
            }
        }
    }

    /// Settle the hold with `parts`, once: `None` if it was already closed.
    fn close(
        &mut self,
        parts: Vec<Part>,
        response: Option<String>,
    ) -> Option<BoxFuture<'static, Result<Settled, ApiError>>> {
        let hold = self.hold.take()?;
        Some(self.accounts.settle(
            hold,
            self.job_id.clone(),
            self.model_sha256.clone(),
            parts,
            response,
        ))
    }
}

impl Drop for Bill {
    /// The response went away before the end (the client disconnected):
    /// charge the tokens generated so far, in the background.
    fn drop(&mut self) {
        let parts: Vec<Part> = self
            .parts
            .payable()
            .into_iter()
            .filter(|p| p.completion_tokens > 0 || p.prompt_tokens > 0)
            .collect();
        let Some(settle) = self.close(parts, None) else {
            return;
        };
        let job = self.job_id.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                self.tasks.spawn_on(
                    async move {
                        if let Err(e) = settle.await {
                            tracing::error!(%job, message = %e.message, "settling an abandoned request failed");
                        }
                    },
                    &rt,
                );
            }
            Err(_) => {
                tracing::error!(%job, "no runtime to settle an abandoned request; its hold is released at restart")
            }
        }
    }
}
