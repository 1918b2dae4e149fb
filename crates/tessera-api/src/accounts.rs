//! The API's accounts kept in the ledger: the adapter between the
//! [`Accounts`] seam and a `tessera-ledger` [`Ledger`].
//!
//! [`LedgerAccounts`] looks keys up, applies a per-key rate limit (per
//! minute, across every gateway on the ledger, leased in batches), holds
//! credits in escrow and settles them with
//! the gateway's fee. Ledger errors become the API's 401/402/500 here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde_json::{json, Value};
use tessera_ledger::{Account, Charge, Hold, Ledger, LedgerError};

use crate::{Accounts, ApiError, Caller, Held, Part, Settled};

/// An account as `GET /v1/account` and `tessera account show --json` show
/// it (micro-credits).
pub fn account_json(a: &Account) -> Value {
    json!({
        "id": a.id,
        "name": a.name,
        "unit": "micro-credits",
        "balance": a.balance,
        "held": a.held,
        "spent": a.spent,
        "spend_limit": a.spend_limit,
        "rate_limit_per_minute": a.rate_limit,
        "usage": {
            "requests": a.requests,
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
        },
    })
}

/// Rate limits that hold across every gateway on one ledger, without a
/// ledger write per request: a key may make `limit` requests per minute of
/// the clock, and each gateway takes them from the ledger in batches
/// (leases of an eighth of the limit, 1 to 64) and spends them locally. A
/// gateway's unspent lease is lost at the minute's end, so with G gateways
/// a key may be refused up to G batches early; never let through beyond
/// its limit.
#[derive(Default)]
struct RateLimiter {
    /// Per account: the minute (its start, ms) and requests left in this
    /// gateway's lease for it.
    leases: Mutex<HashMap<String, (u64, u64)>>,
}

impl RateLimiter {
    async fn allow(
        &self,
        ledger: &Ledger,
        account: &str,
        per_minute: u64,
    ) -> Result<bool, LedgerError> {
        let window = tessera_core::now_ms() / 60_000 * 60_000;
        if let Ok(mut leases) = self.leases.lock() {
            if let Some((w, left)) = leases.get_mut(account) {
                if *w == window && *left > 0 {
                    *left -= 1;
                    return Ok(true);
                }
            }
        }
        let batch = (per_minute / 8).clamp(1, 64);
        let granted = ledger.take_rate(account, window, batch, per_minute).await?;
        if granted == 0 {
            return Ok(false);
        }
        if let Ok(mut leases) = self.leases.lock() {
            if leases.len() > 100_000 {
                leases.retain(|_, (w, _)| *w == window);
            }
            let entry = leases.entry(account.to_string()).or_insert((window, 0));
            if entry.0 != window {
                *entry = (window, 0);
            }
            entry.1 += granted - 1;
        }
        Ok(true)
    }
}

/// The API's accounts, kept in the ledger.
pub struct LedgerAccounts {
    ledger: Ledger,
    /// Who holds: the gateway's node id (its holds are released when it
    /// restarts after a crash).
    gateway: String,
    fee_bps: u64,
    limiter: Arc<RateLimiter>,
}

impl LedgerAccounts {
    /// Release the holds this gateway left open (a crash), then serve.
    pub async fn start(ledger: Ledger, gateway: String, fee_bps: u64) -> Result<Self, LedgerError> {
        if fee_bps > 10_000 {
            return Err(LedgerError::Amount(format!(
                "a fee of {fee_bps} basis points is over 100%"
            )));
        }
        let released = ledger.release_open_holds(&gateway).await?;
        if released > 0 {
            tracing::warn!(released, "released holds left open by an earlier run");
        }
        Ok(LedgerAccounts {
            ledger,
            gateway,
            fee_bps,
            limiter: Arc::default(),
        })
    }
}

fn ledger_error(e: LedgerError) -> ApiError {
    match e {
        LedgerError::Insufficient { needed, available } => ApiError::payment_required(
            format!(
                "Insufficient credits: this request may cost up to {needed} micro-credits \
                 and the account has {available} available. Top up, or lower max_tokens."
            ),
            "insufficient_credits",
        ),
        LedgerError::SpendLimit { limit, used } => ApiError::payment_required(
            format!(
                "This key's spending limit of {limit} micro-credits is reached \
                 ({used} spent or held)."
            ),
            "spend_limit_exceeded",
        ),
        LedgerError::NoAccount(_) => {
            ApiError::unauthorized("The API key's account no longer exists.")
        }
        other => ApiError::internal(format!("ledger: {other}")),
    }
}

impl Accounts for LedgerAccounts {
    fn authenticate(&self, key: &str) -> BoxFuture<'static, Result<Caller, ApiError>> {
        let ledger = self.ledger.clone();
        let key = key.to_string();
        let limiter = self.limiter.clone();
        Box::pin(async move {
            let account = ledger
                .account_by_key(&key)
                .await
                .map_err(ledger_error)?
                .ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))?;
            if let Some(limit) = account.rate_limit {
                let allowed = limiter
                    .allow(&ledger, &account.id, limit.max(1) as u64)
                    .await
                    .map_err(ledger_error)?;
                if !allowed {
                    return Err(ApiError::rate_limited(format!(
                        "Rate limit of {limit} requests per minute reached for this key; retry shortly."
                    )));
                }
            }
            Ok(Caller {
                account: account.id,
                name: account.name,
            })
        })
    }

    fn hold(
        &self,
        caller: &Caller,
        amount: u64,
        idempotency_key: Option<String>,
    ) -> BoxFuture<'static, Result<Held, ApiError>> {
        let (ledger, gateway, account) = (
            self.ledger.clone(),
            self.gateway.clone(),
            caller.account.clone(),
        );
        Box::pin(async move {
            match ledger
                .hold(&account, amount, &gateway, idempotency_key.as_deref())
                .await
                .map_err(ledger_error)?
            {
                Hold::New(id) => Ok(Held::New(id)),
                Hold::Duplicate {
                    cost,
                    response,
                    receipt,
                    ..
                } => Ok(Held::Duplicate {
                    cost,
                    response,
                    receipt,
                }),
            }
        })
    }

    fn raise(&self, hold: String, to: u64) -> BoxFuture<'static, Result<(), ApiError>> {
        let ledger = self.ledger.clone();
        Box::pin(async move { ledger.raise(&hold, to).await.map_err(ledger_error) })
    }

    fn settle(
        &self,
        hold: String,
        job_id: String,
        model_sha256: String,
        parts: Vec<Part>,
        response: Option<String>,
    ) -> BoxFuture<'static, Result<Settled, ApiError>> {
        let (ledger, fee_bps) = (self.ledger.clone(), self.fee_bps);
        Box::pin(async move {
            let charges = parts
                .into_iter()
                .map(|p| Charge {
                    provider: p.provider,
                    model_sha256: model_sha256.clone(),
                    prompt_tokens: p.prompt_tokens,
                    completion_tokens: p.completion_tokens,
                    input_price: p.price.input,
                    output_price: p.price.output,
                    receipt: p.receipt,
                })
                .collect();
            let s = ledger
                .settle_with_response(&hold, &job_id, charges, fee_bps, response)
                .await
                .map_err(ledger_error)?;
            Ok(Settled {
                cost: s.cost,
                receipt: s.receipt,
            })
        })
    }

    fn account(&self, caller: &Caller) -> BoxFuture<'static, Result<Value, ApiError>> {
        let (ledger, id) = (self.ledger.clone(), caller.account.clone());
        Box::pin(async move {
            let a = ledger
                .account(&id)
                .await
                .map_err(ledger_error)?
                .ok_or_else(|| ApiError::unauthorized("The API key's account no longer exists."))?;
            Ok(account_json(&a))
        })
    }
}
