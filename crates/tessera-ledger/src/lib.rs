//! Tessera's ledger: accounts, API keys and every movement of credits.
//!
//! Amounts are integer **micro-credits** (1 credit = 1,000,000). The ledger
//! is double-entry: every change is an *entry* whose *postings* (one per
//! account touched) sum to zero, and each account's `balance` column is kept
//! equal to the sum of its postings in the same transaction. New credits come
//! from the `system:issuance` account (whose balance is minus everything ever
//! issued), so the balances of all accounts always sum to zero.
//!
//! A paid request goes through **escrow**: before dispatch its largest
//! possible cost is *held* (client → `system:escrow`); when it ends the hold
//! is *settled*: each provider part is paid its cost less the gateway's fee
//! (fee → `system:fees`) and the rest goes back to the client. A settled
//! request may later be *refunded* (a failed audit, an operator's decision):
//! one more entry returning every credit of it. A hold left
//! open by a crash is released when its gateway starts again. A hold may
//! carry an idempotency key: while a hold with that key on that account is
//! open or settled, the key holds (and charges) nothing more; once a hold
//! was released (nothing charged), the key may be used again by a retry.
//!
//! The same SQL runs on SQLite (one file, WAL, `synchronous=FULL`) and on
//! PostgreSQL, through sqlx's Any driver. Writes go through one writer task
//! per [`Ledger`] that commits many operations in one transaction (group
//! commit): every operation is durable when its call returns, and the disk
//! sync is shared. Conditional updates (`balance >= amount`, `state =
//! 'open'`) make concurrent writers — several gateways on one PostgreSQL —
//! lose no update.

#[cfg(any(test, feature = "testing"))]
pub mod pg;
mod schema;
mod writer;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use tokio::sync::{mpsc, oneshot};

use writer::{Op, Pending};

/// Where new credits come from; its balance is minus all credits issued.
pub const ISSUANCE: &str = "system:issuance";
/// Credits held for requests in flight.
pub const ESCROW: &str = "system:escrow";
/// The gateways' fees.
pub const FEES: &str = "system:fees";
/// Slashes after failed audits and bonds forfeited by quarantined providers.
pub const FORFEITS: &str = "system:forfeits";

/// Micro-credits per credit.
pub const MICRO: u64 = 1_000_000;

/// Why the ledger refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The account's balance does not cover the hold.
    #[error("insufficient credits: {needed} micro-credits needed, {available} available")]
    Insufficient {
        /// Micro-credits the hold needs.
        needed: u64,
        /// Micro-credits the account has.
        available: u64,
    },
    /// The key's spending limit does not cover the hold.
    #[error("spending limit reached: {limit} micro-credits, {used} spent or held")]
    SpendLimit {
        /// The limit.
        limit: u64,
        /// Spent plus held already.
        used: u64,
    },
    /// No account has this id or name.
    #[error("no account '{0}'")]
    NoAccount(String),
    /// The account name is in use.
    #[error("an account named '{0}' already exists")]
    NameTaken(String),
    /// The hold was settled or released before, or never existed.
    #[error("hold {0} is unknown or already closed")]
    HoldClosed(String),
    /// The receipt names no settled, unrefunded request.
    #[error("'{0}' is not a settled request that can be refunded (unknown, released or already refunded)")]
    NotRefundable(String),
    /// A settlement asked for more than was held.
    #[error("charges of {charged} exceed the hold of {held} micro-credits")]
    OverHold {
        /// Micro-credits the charges add up to.
        charged: u64,
        /// Micro-credits held.
        held: u64,
    },
    /// An amount out of range.
    #[error("invalid amount: {0}")]
    Amount(String),
    /// The operating system's random source failed (no key was made).
    #[error("{0}")]
    Random(#[from] tessera_core::RandomError),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The writer task is gone (the process is stopping).
    #[error("the ledger's writer has stopped")]
    Closed,
}

/// The ledger's results.
pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

/// An account as clients and operators see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Account {
    /// `acct_…` for clients, `provider:NODEID`, `system:…`.
    pub id: String,
    /// Unique, chosen by the operator.
    pub name: String,
    /// `client`, `provider` or `system`.
    pub kind: String,
    /// Credits available to spend (holds already taken out).
    pub balance: i64,
    /// Credits held for requests in flight.
    pub held: i64,
    /// Credits charged so far.
    pub spent: i64,
    /// Most credits this account may spend in all (spent + held), if set.
    pub spend_limit: Option<i64>,
    /// Most requests per minute, if set.
    pub rate_limit: Option<i64>,
    /// Requests settled.
    pub requests: i64,
    /// Prompt tokens of those requests.
    pub prompt_tokens: i64,
    /// Generated tokens of those requests.
    pub completion_tokens: i64,
}

/// A provider's standing with the auditors, as every gateway on this
/// ledger shares it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Standing {
    /// The provider's node id.
    pub provider: String,
    /// Audits it passed.
    pub audits_passed: u32,
    /// Audits it failed.
    pub audits_failed: u32,
    /// Audits it must still pass in a row to clear its last failure.
    pub on_watch: u32,
    /// Caught twice: never routed to again by any gateway on this ledger.
    pub quarantined: bool,
    /// When it last changed (ms since the epoch).
    pub updated_ms: u64,
}

/// Limits handed out with a key (e.g. to an AI agent given a budget).
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Most micro-credits the key may ever spend (spent + held).
    pub spend_limit: Option<u64>,
    /// Most requests per minute.
    pub rate_limit: Option<u64>,
}

/// What one provider's part of a request costs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Charge {
    /// The provider's node id.
    pub provider: String,
    /// The model it served.
    pub model_sha256: String,
    /// Prompt tokens billed to this part (the first part's only).
    pub prompt_tokens: u64,
    /// Tokens it generated.
    pub completion_tokens: u64,
    /// Micro-credits per input token (= credits per million).
    pub input_price: u64,
    /// Micro-credits per output token.
    pub output_price: u64,
    /// The provider's receipt for this part, countersigned (JSON), if any.
    pub receipt: Option<String>,
}

impl Charge {
    /// tokens × price, exactly (saturating: an absurd price is refused
    /// as an invalid amount, never wrapped).
    pub fn cost(&self) -> u64 {
        self.prompt_tokens
            .saturating_mul(self.input_price)
            .saturating_add(self.completion_tokens.saturating_mul(self.output_price))
    }
}

/// Outcome of settling a hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Settlement {
    /// The settlement entry's id; the response's `tessera.receipt`.
    pub receipt: String,
    /// Micro-credits charged to the client.
    pub cost: u64,
    /// The gateway's share of it.
    pub fee: u64,
    /// Receipt ids of the parts, in order.
    pub parts: Vec<String>,
}

/// Outcome of a refund.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Refund {
    /// The refund's ledger entry.
    pub entry: String,
    /// Micro-credits returned to the client.
    pub amount: u64,
}

/// Outcome of asking for a hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Credits are held under this id.
    New(String),
    /// The idempotency key is taken by this hold: still open (`cost` is
    /// `None`) or settled for `cost`.
    Duplicate {
        /// The hold that took the key.
        hold: String,
        /// What it was settled for, once settled.
        cost: Option<u64>,
        /// The answer it was settled with, when one was stored.
        response: Option<String>,
        /// Its settlement entry (the answer's `tessera.receipt`).
        receipt: Option<String>,
    },
}

/// Result of [`Ledger::check`]: what must hold for the books to be right.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Entries in the books.
    pub entries: i64,
    /// Entries whose postings do not sum to zero (must be 0).
    pub unbalanced_entries: i64,
    /// Accounts whose balance is not the sum of their postings (must be 0).
    pub mismatched_accounts: i64,
    /// Sum of all balances (must be 0).
    pub total: i64,
    /// Credits ever issued.
    pub issued: i64,
    /// Holds not yet settled or released.
    pub open_holds: i64,
    /// Micro-credits they hold.
    pub open_held: i64,
    /// Balance of the escrow account (must equal `open_held`).
    pub escrow: i64,
}

/// Result of [`Ledger::totals`], in micro-credits (counts of requests).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Credits ever issued (top-ups).
    pub issued: i64,
    /// Held now for requests in flight.
    pub escrow: i64,
    /// Paid by clients for settled requests, net of refunds
    /// (`provider_earnings + fees`).
    pub revenue: i64,
    /// What providers hold from their work.
    pub provider_earnings: i64,
    /// The gateways' fees.
    pub fees: i64,
    /// Requests settled.
    pub settled: i64,
    /// Settled requests later refunded.
    pub refunded: i64,
    /// Slashes after failed audits and bonds forfeited by quarantined providers.
    pub forfeited: i64,
}

impl Check {
    /// Whether the books balance.
    pub fn ok(&self) -> bool {
        self.unbalanced_entries == 0
            && self.mismatched_accounts == 0
            && self.total == 0
            && self.escrow == self.open_held
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}_{:016x}{:08x}",
        tessera_core::unique_u64(),
        tessera_core::unique_u64() as u32
    )
}

/// sha256 of an API key, as stored.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The ledger: a pool for reads and one writer task for writes.
#[derive(Clone)]
pub struct Ledger {
    pool: AnyPool,
    writer: mpsc::Sender<Pending>,
}

const ACCOUNT_COLUMNS: &str = "id, name, kind, balance, held, spent, spend_limit, rate_limit, \
                               requests, prompt_tokens, completion_tokens";

fn account_of(row: &AnyRow) -> Result<Account> {
    Ok(Account {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        balance: row.try_get("balance")?,
        held: row.try_get("held")?,
        spent: row.try_get("spent")?,
        spend_limit: row.try_get("spend_limit")?,
        rate_limit: row.try_get("rate_limit")?,
        requests: row.try_get("requests")?,
        prompt_tokens: row.try_get("prompt_tokens")?,
        completion_tokens: row.try_get("completion_tokens")?,
    })
}

impl Ledger {
    /// Open (creating if need be) the ledger at `url`: `sqlite://PATH` or
    /// `postgres://…`. SQLite runs in WAL mode with full sync.
    pub async fn open(url: &str) -> Result<Ledger> {
        sqlx::any::install_default_drivers();
        let postgres = url.starts_with("postgres");
        let url = if postgres || url.contains('?') {
            url.to_string()
        } else {
            format!("{url}?mode=rwc")
        };
        if !postgres {
            create_owner_only(&url);
        }
        let pool = AnyPoolOptions::new()
            .max_connections(if postgres { 8 } else { 4 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if !postgres {
                        for pragma in [
                            "PRAGMA journal_mode=WAL",
                            "PRAGMA synchronous=FULL",
                            "PRAGMA busy_timeout=10000",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        schema::migrate(&pool, postgres).await?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(writer::run(pool.clone(), postgres, rx));
        Ok(Ledger { pool, writer: tx })
    }

    /// Open a SQLite ledger file.
    pub async fn open_file(path: &std::path::Path) -> Result<Ledger> {
        Ledger::open(&format!("sqlite://{}", path.display())).await
    }

    async fn write<T>(&self, op: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Pending { op: op(tx) })
            .await
            .map_err(|_| LedgerError::Closed)?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Create a client account with `credits` micro-credits; returns it and
    /// its API key (shown once; only its hash is stored).
    pub async fn create_account(
        &self,
        name: &str,
        credits: u64,
        limits: Limits,
    ) -> Result<(Account, String)> {
        let key = format!("tsk_{}", hex::encode(tessera_core::secret_bytes::<24>()?));
        let name = name.to_string();
        let key_hash = hash_key(&key);
        let id = self
            .write(|reply| Op::CreateAccount {
                name,
                key_hash,
                credits,
                limits,
                reply,
            })
            .await?;
        let account = self
            .account(&id)
            .await?
            .ok_or_else(|| LedgerError::NoAccount(id.clone()))?;
        Ok((account, key))
    }

    /// Add credits to an account (by name or id).
    pub async fn topup(&self, account: &str, credits: u64) -> Result<Account> {
        let found = self
            .account(account)
            .await?
            .ok_or_else(|| LedgerError::NoAccount(account.to_string()))?;
        let id = found.id.clone();
        self.write(|reply| Op::Topup {
            account: id.clone(),
            credits,
            reply,
        })
        .await?;
        self.account(&id).await?.ok_or(LedgerError::NoAccount(id))
    }

    /// An account by id or name.
    pub async fn account(&self, id_or_name: &str) -> Result<Option<Account>> {
        // Built from constants only: no input reaches the SQL text.
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1 OR name = $2"
        )))
        .bind(id_or_name.to_string())
        .bind(id_or_name.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(account_of).transpose()
    }

    /// The account an API key belongs to.
    pub async fn account_by_key(&self, key: &str) -> Result<Option<Account>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE key_hash = $1"
        )))
        .bind(hash_key(key))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(account_of).transpose()
    }

    /// Hold `amount` from `account` for a request `gateway` is about to run.
    pub async fn hold(
        &self,
        account: &str,
        amount: u64,
        gateway: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Hold> {
        let (account, gateway) = (account.to_string(), gateway.to_string());
        let idempotency_key = idempotency_key.map(str::to_string);
        self.write(|reply| Op::Hold {
            account,
            amount,
            gateway,
            idempotency_key,
            reply,
        })
        .await
    }

    /// Raise an open hold to `to` micro-credits in all (the route chosen for
    /// its request turned out dearer than what was held), taking the
    /// difference from the account: the errors of [`Ledger::hold`] when the
    /// balance or spending limit does not cover it, `HoldClosed` when the
    /// hold was settled or released. A hold already at `to` or above is left
    /// as it is.
    pub async fn raise(&self, hold: &str, to: u64) -> Result<()> {
        let hold = hold.to_string();
        self.write(|reply| Op::Raise { hold, to, reply }).await
    }

    /// Settle a hold: charge `charges` (each provider paid its cost less
    /// `fee_bps`/10,000), return the rest. No charges releases the hold.
    pub async fn settle(
        &self,
        hold: &str,
        job_id: &str,
        charges: Vec<Charge>,
        fee_bps: u64,
    ) -> Result<Settlement> {
        self.settle_with_response(hold, job_id, charges, fee_bps, None)
            .await
    }

    /// [`Ledger::settle`], storing `response` (the answer) with the charge
    /// in one transaction, so that a retry with the hold's idempotency key
    /// gets the answer it paid for ([`Hold::Duplicate`]).
    pub async fn settle_with_response(
        &self,
        hold: &str,
        job_id: &str,
        charges: Vec<Charge>,
        fee_bps: u64,
        response: Option<String>,
    ) -> Result<Settlement> {
        if fee_bps > 10_000 {
            return Err(LedgerError::Amount(format!(
                "a fee of {fee_bps} basis points is over 100%"
            )));
        }
        let (hold, job_id) = (hold.to_string(), job_id.to_string());
        self.write(|reply| Op::Settle {
            hold,
            job_id,
            charges,
            fee_bps,
            response,
            reply,
        })
        .await
    }

    /// Refund a settled request, by its receipt (the settlement entry id in
    /// `tessera.receipt`) or its hold id: the client gets the whole cost
    /// back; providers and the gateway give back what they got. Once only.
    pub async fn refund(&self, receipt: &str) -> Result<Refund> {
        let receipt = receipt.to_string();
        self.write(|reply| Op::Refund { receipt, reply }).await
    }

    /// A quarantined provider (node id) forfeits its bond: its whole
    /// balance at this ledger moves to [`FORFEITS`] in one entry — after
    /// the refunds of its failed answers that are still waiting for their
    /// settlement (the writer queues the forfeit behind them).
    pub async fn forfeit(&self, provider: &str) -> Result<Refund> {
        let provider = provider.to_string();
        self.write(|reply| Op::Forfeit {
            provider,
            limit: None,
            reply,
        })
        .await
    }

    /// Slash `provider` by up to `amount` micro-credits after a failed
    /// audit: from its account at this ledger (its bond) to
    /// `system:forfeits`, after the refunds of its failed answers that are
    /// still waiting for their settlement. Resolves with what was taken
    /// (less than `amount` when the account held less).
    pub async fn slash(&self, provider: &str, amount: u64) -> Result<Refund> {
        let provider = provider.to_string();
        self.write(|reply| Op::Forfeit {
            provider,
            limit: Some(amount),
            reply,
        })
        .await
    }

    /// An audit verdict on `provider`'s part of request `job_id` (the API's
    /// response id): a step of the request's lifecycle, queued behind its
    /// settlement. The writer records `status` on the part's receipt and,
    /// for `failed`, refunds the request (the client gets the whole cost
    /// back, the providers and the gateway give back what they got) — once
    /// the request is settled, however the verdict and the settlement race;
    /// a verdict on a request released without a charge refunds nothing.
    /// Resolves when the step is done (`Some` when it refunded).
    pub async fn audit_verdict(
        &self,
        job_id: &str,
        provider: &str,
        status: tessera_core::AuditStatus,
    ) -> Result<Option<Refund>> {
        let (job_id, provider) = (job_id.to_string(), provider.to_string());
        let status = status.as_str().to_string();
        self.write(|reply| Op::Verdict {
            job_id,
            provider,
            status,
            reply,
        })
        .await
    }

    /// Record the audit status of `provider`'s part of job `job_id` on its
    /// receipts (the provider sees it with `tessera provider earnings`).
    pub async fn set_audit(&self, job_id: &str, provider: &str, status: &str) -> Result<()> {
        sqlx::query("UPDATE receipts SET audit = $1 WHERE job_id = $2 AND provider = $3")
            .bind(status.to_string())
            .bind(job_id.to_string())
            .bind(provider.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Save a provider's standing (its `updated_ms` is set to now). A
    /// quarantine is never undone by a later save, nor counts lowered: two
    /// gateways saving at once both keep the worst.
    pub async fn save_standing(&self, s: &Standing) -> Result<()> {
        sqlx::query(
            "INSERT INTO standings (provider, audits_passed, audits_failed, on_watch, \
             quarantined, updated_ms) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (provider) DO UPDATE SET \
             audits_passed = CASE WHEN excluded.audits_passed > standings.audits_passed \
               THEN excluded.audits_passed ELSE standings.audits_passed END, \
             audits_failed = CASE WHEN excluded.audits_failed > standings.audits_failed \
               THEN excluded.audits_failed ELSE standings.audits_failed END, \
             on_watch = excluded.on_watch, \
             quarantined = CASE WHEN excluded.quarantined > standings.quarantined \
               THEN excluded.quarantined ELSE standings.quarantined END, \
             updated_ms = excluded.updated_ms",
        )
        .bind(s.provider.clone())
        .bind(i64::from(s.audits_passed))
        .bind(i64::from(s.audits_failed))
        .bind(i64::from(s.on_watch))
        .bind(i64::from(s.quarantined))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Take up to `want` of `account`'s `limit` requests in the minute of
    /// the clock starting at `window_ms`, for every gateway on this ledger
    /// together: returns how many were granted (`want`, 1, or 0 when the
    /// minute's requests are used up). Each statement is atomic, so two
    /// gateways taking at once never grant more than `limit` in all.
    pub async fn take_rate(
        &self,
        account: &str,
        window_ms: u64,
        want: u64,
        limit: u64,
    ) -> Result<u64> {
        let window = i64::try_from(window_ms).unwrap_or(i64::MAX);
        let inserted = sqlx::query(
            "INSERT INTO rate_windows (account, window_ms, used) VALUES ($1, $2, 0) \
             ON CONFLICT (account, window_ms) DO NOTHING",
        )
        .bind(account.to_string())
        .bind(window)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted > 0 {
            // A new minute: forget the minutes before the last.
            sqlx::query("DELETE FROM rate_windows WHERE window_ms < $1")
                .bind(window - 120_000)
                .execute(&self.pool)
                .await?;
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        for take in [want.max(1), 1] {
            let take = i64::try_from(take).unwrap_or(1);
            let granted = sqlx::query(
                "UPDATE rate_windows SET used = used + $1 \
                 WHERE account = $2 AND window_ms = $3 AND used + $1 <= $4",
            )
            .bind(take)
            .bind(account.to_string())
            .bind(window)
            .bind(limit)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if granted > 0 {
                return Ok(take as u64);
            }
        }
        Ok(0)
    }

    /// Standings changed at or after `since_ms` (0: all), oldest first.
    pub async fn standings_since(&self, since_ms: u64) -> Result<Vec<Standing>> {
        let rows = sqlx::query(
            "SELECT provider, audits_passed, audits_failed, on_watch, quarantined, updated_ms \
             FROM standings WHERE updated_ms >= $1 ORDER BY updated_ms",
        )
        .bind(since_ms as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let n = |c: &str| -> Result<u32> {
                    Ok(u32::try_from(r.try_get::<i64, _>(c)?.max(0)).unwrap_or(u32::MAX))
                };
                Ok(Standing {
                    provider: r.try_get("provider")?,
                    audits_passed: n("audits_passed")?,
                    audits_failed: n("audits_failed")?,
                    on_watch: n("on_watch")?,
                    quarantined: r.try_get::<i64, _>("quarantined")? != 0,
                    updated_ms: r.try_get::<i64, _>("updated_ms")?.max(0) as u64,
                })
            })
            .collect()
    }

    /// Release every hold `gateway` left open (after a crash); returns how many.
    pub async fn release_open_holds(&self, gateway: &str) -> Result<usize> {
        let rows = sqlx::query("SELECT id FROM holds WHERE gateway = $1 AND state = 'open'")
            .bind(gateway.to_string())
            .fetch_all(&self.pool)
            .await?;
        let mut released = 0;
        for row in rows {
            let id: String = row.try_get("id")?;
            match self.settle(&id, "", vec![], 0).await {
                Ok(_) => released += 1,
                Err(LedgerError::HoldClosed(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(released)
    }

    /// Receipts of one provider (node id), newest first, with their total.
    pub async fn provider_receipts(&self, provider: &str) -> Result<Vec<serde_json::Value>> {
        let rows = sqlx::query(
            "SELECT id, hold_id, job_id, model_sha256, prompt_tokens, completion_tokens, \
             input_price, output_price, cost, fee, created_ms, signed, audit FROM receipts \
             WHERE provider = $1 ORDER BY created_ms DESC",
        )
        .bind(provider.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "id": r.try_get::<String, _>("id")?,
                    "hold": r.try_get::<String, _>("hold_id")?,
                    "job": r.try_get::<String, _>("job_id")?,
                    "model_sha256": r.try_get::<String, _>("model_sha256")?,
                    "prompt_tokens": r.try_get::<i64, _>("prompt_tokens")?,
                    "completion_tokens": r.try_get::<i64, _>("completion_tokens")?,
                    "input_price": r.try_get::<i64, _>("input_price")?,
                    "output_price": r.try_get::<i64, _>("output_price")?,
                    "cost": r.try_get::<i64, _>("cost")?,
                    "fee": r.try_get::<i64, _>("fee")?,
                    "earned": r.try_get::<i64, _>("cost")? - r.try_get::<i64, _>("fee")?,
                    "created_ms": r.try_get::<i64, _>("created_ms")?,
                    "audit": r
                        .try_get::<Option<String>, _>("audit")?
                        .unwrap_or_else(|| "not_audited".into()),
                    "signed": r
                        .try_get::<Option<String>, _>("signed")?
                        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok()),
                }))
            })
            .collect()
    }

    /// The hold of a settled request, by the request's job id (the API's
    /// response id), once it has been settled with at least one part.
    pub async fn hold_of_job(&self, job_id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT hold_id FROM receipts WHERE job_id = $1 LIMIT 1")
            .bind(job_id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<String, _>("hold_id")).transpose()?)
    }

    /// Totals for operators' dashboards and `/metrics` (see [`Totals`]).
    pub async fn totals(&self) -> Result<Totals> {
        let one = |sql: &'static str| async move {
            let row = sqlx::query(sql).fetch_one(&self.pool).await?;
            Ok::<i64, LedgerError>(row.try_get::<Option<i64>, _>(0)?.unwrap_or(0))
        };
        let fees = one("SELECT balance FROM accounts WHERE id = 'system:fees'").await?;
        let provider_earnings =
            one("SELECT CAST(SUM(balance) AS BIGINT) FROM accounts WHERE kind = 'provider'")
                .await?;
        Ok(Totals {
            issued: -one("SELECT balance FROM accounts WHERE id = 'system:issuance'").await?,
            escrow: one("SELECT balance FROM accounts WHERE id = 'system:escrow'").await?,
            revenue: fees + provider_earnings,
            provider_earnings,
            fees,
            settled: one("SELECT COUNT(*) FROM holds WHERE state = 'settled'").await?,
            refunded: one("SELECT COUNT(*) FROM holds WHERE state = 'refunded'").await?,
            forfeited: one("SELECT balance FROM accounts WHERE id = 'system:forfeits'").await?,
        })
    }

    /// Every provider's balance (what it earned, net of refunds), by node id.
    pub async fn provider_earnings(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT id, balance FROM accounts WHERE kind = 'provider'")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("id")?;
                let node = id.strip_prefix("provider:").unwrap_or(&id).to_string();
                Ok((node, r.try_get::<i64, _>("balance")?))
            })
            .collect()
    }

    /// Verify the books (see [`Check`]).
    pub async fn check(&self) -> Result<Check> {
        let one = |sql: &'static str| async move {
            let row = sqlx::query(sql).fetch_one(&self.pool).await?;
            Ok::<i64, LedgerError>(row.try_get::<Option<i64>, _>(0)?.unwrap_or(0))
        };
        Ok(Check {
            entries: one("SELECT COUNT(*) FROM entries").await?,
            unbalanced_entries: one(
                "SELECT COUNT(*) FROM (SELECT entry_id FROM postings GROUP BY entry_id \
                 HAVING SUM(amount) <> 0) AS bad",
            )
            .await?,
            mismatched_accounts: one(
                "SELECT COUNT(*) FROM accounts a LEFT JOIN (SELECT account_id, \
                 CAST(SUM(amount) AS BIGINT) AS s FROM postings GROUP BY account_id) p \
                 ON p.account_id = a.id WHERE a.balance <> COALESCE(p.s, 0)",
            )
            .await?,
            total: one("SELECT CAST(SUM(balance) AS BIGINT) FROM accounts").await?,
            issued: -one("SELECT balance FROM accounts WHERE id = 'system:issuance'").await?,
            open_holds: one("SELECT COUNT(*) FROM holds WHERE state = 'open'").await?,
            open_held: one("SELECT CAST(SUM(amount) AS BIGINT) FROM holds WHERE state = 'open'")
                .await?,
            escrow: one("SELECT balance FROM accounts WHERE id = 'system:escrow'").await?,
        })
    }
}
/// A new SQLite ledger file is created empty and owner-only before SQLite
/// opens it (its journal files take the same permissions): it holds API
/// key hashes and every account's money, and must not depend on the umask.
fn create_owner_only(url: &str) {
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return;
    };
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path == ":memory:" || std::path::Path::new(path).exists() {
        return;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    // A failure here is SQLite's to report when it opens the file.
    let _ = options.open(path);
}
