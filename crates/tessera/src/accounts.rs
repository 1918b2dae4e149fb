//! Accounts: the ledger behind the API, and `tessera account …`.
//!
//! [`LedgerAccounts`] implements the API's [`Accounts`] seam on a
//! `tessera-ledger` [`Ledger`]: key lookup, a per-key rate limit (token
//! bucket, in this process), escrow holds and settlement with the gateway's
//! fee. Amounts on the command line are credits (decimals allowed); the API
//! and `--json` output use integer micro-credits.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tessera_api::{Accounts, ApiError, BoxFuture, Caller, Held, Part, Settled};
use tessera_ledger::{Account, Charge, Hold, Ledger, LedgerError, Limits, MICRO};

/// Where the ledger lives.
#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// The ledger: `sqlite://PATH` or `postgres://USER@HOST:PORT/DB`
    /// (default: `sqlite://$TESSERA_HOME/ledger.db`).
    #[arg(long, env = "TESSERA_DATABASE_URL")]
    pub database_url: Option<String>,
}

impl DatabaseArgs {
    pub fn url(&self, home: &Path) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", home.join("ledger.db").display()))
    }

    /// Open the ledger (creating the home folder for a default SQLite file).
    pub async fn open(&self, home: &Path) -> anyhow::Result<Ledger> {
        std::fs::create_dir_all(home)
            .with_context(|| format!("cannot create {}", home.display()))?;
        let url = self.url(home);
        Ledger::open(&url)
            .await
            .with_context(|| format!("cannot open the ledger at {}", redact(&url)))
    }
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Parse an amount of credits ("12", "0.5") into micro-credits, exactly.
pub fn parse_credits(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
        || frac.len() > 6
    {
        bail!("'{s}' is not an amount of credits (e.g. 10 or 0.25, at most 6 decimals)");
    }
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse()? };
    let frac: u64 = format!("{frac:0<6}").parse()?;
    whole
        .checked_mul(MICRO)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(|| anyhow!("'{s}' credits is too large"))
}

/// Micro-credits as credits, for people.
pub fn credits(micro: i64) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let m = micro.unsigned_abs();
    format!("{sign}{}.{:06}", m / MICRO, m % MICRO)
}

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

/// A token bucket per account: `limit` requests per minute, bursts of `limit`.
#[derive(Default)]
struct RateLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    fn allow(&self, account: &str, per_minute: u64) -> bool {
        let Ok(mut map) = self.buckets.lock() else {
            return true;
        };
        let cap = per_minute as f64;
        let now = Instant::now();
        let (tokens, at) = map.entry(account.to_string()).or_insert((cap, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * cap / 60.0).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
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
    pub async fn start(ledger: Ledger, gateway: String, fee_bps: u64) -> anyhow::Result<Self> {
        if fee_bps > 10_000 {
            bail!("--fee-bps {fee_bps} is over 100%");
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
                if !limiter.allow(&account.id, limit.max(1) as u64) {
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
                Hold::Duplicate { cost, .. } => Ok(Held::Duplicate { cost }),
            }
        })
    }

    fn settle(
        &self,
        hold: String,
        job_id: String,
        model_sha256: String,
        parts: Vec<Part>,
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
                .settle(&hold, &job_id, charges, fee_bps)
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

/// Credits the demo account starts with.
const DEMO_CREDITS: u64 = 1_000 * MICRO;

/// The demo account's key: the one in `$TESSERA_HOME/demo.key` if it still
/// opens an account in this ledger, else a new demo account's.
pub async fn demo_key(home: &Path, ledger: &Ledger) -> anyhow::Result<String> {
    let path = home.join("demo.key");
    if let Ok(key) = std::fs::read_to_string(&path) {
        if ledger.account_by_key(key.trim()).await?.is_some() {
            return Ok(key.trim().to_string());
        }
    }
    let mut name = "demo".to_string();
    while ledger.account(&name).await?.is_some() {
        name = format!("demo-{:08x}", getrandom::u32().unwrap_or_default());
    }
    let (_, key) = ledger
        .create_account(&name, DEMO_CREDITS, Limits::default())
        .await?;
    crate::serve::write_private(&path, &key)?;
    Ok(key)
}

#[derive(Subcommand, Debug)]
pub enum AccountCommand {
    /// Create a client account and print its API key (shown once; only its
    /// hash is stored).
    Create {
        name: String,
        /// Starting credits (e.g. 10 or 0.5).
        #[arg(long, default_value = "0")]
        credits: String,
        /// Most credits the key may ever spend (a budget for an AI agent).
        #[arg(long)]
        spend_limit: Option<String>,
        /// Most requests per minute.
        #[arg(long)]
        rate_limit: Option<u64>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Add credits to an account.
    Topup {
        name: String,
        #[arg(long)]
        credits: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Balance, holds, spending and usage of an account (by name or id;
    /// providers are `provider:NODEID`).
    Show {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Refund a settled request by its receipt (`tessera.receipt` of the
    /// response): the client gets the whole cost back, the providers and
    /// the gateway give back what they got.
    Refund {
        receipt: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Verify the books: every entry sums to zero, every balance equals its
    /// postings, all balances sum to zero, escrow equals the open holds.
    Check {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

fn print_account(a: &Account, json: bool) {
    if json {
        println!("{}", account_json(a));
        return;
    }
    println!("account {} ({})", a.name, a.id);
    println!("  balance  {} credits", credits(a.balance));
    println!("  held     {} credits", credits(a.held));
    println!("  spent    {} credits", credits(a.spent));
    if let Some(l) = a.spend_limit {
        println!("  limit    {} credits", credits(l));
    }
    if let Some(r) = a.rate_limit {
        println!("  rate     {r} requests/minute");
    }
    println!(
        "  usage    {} requests, {} prompt + {} completion tokens",
        a.requests, a.prompt_tokens, a.completion_tokens
    );
}

pub fn run(home: &Path, command: AccountCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match command {
            AccountCommand::Create {
                name,
                credits: amount,
                spend_limit,
                rate_limit,
                json,
                db,
            } => {
                let ledger = db.open(home).await?;
                let limits = Limits {
                    spend_limit: spend_limit.as_deref().map(parse_credits).transpose()?,
                    rate_limit,
                };
                let (a, key) = ledger
                    .create_account(&name, parse_credits(&amount)?, limits)
                    .await?;
                if json {
                    let mut v = account_json(&a);
                    v["api_key"] = json!(key);
                    println!("{v}");
                } else {
                    print_account(&a, false);
                    println!("API key (shown once, keep it safe):\n  {key}");
                }
            }
            AccountCommand::Topup {
                name,
                credits: amount,
                json,
                db,
            } => {
                let ledger = db.open(home).await?;
                let a = ledger.topup(&name, parse_credits(&amount)?).await?;
                print_account(&a, json);
            }
            AccountCommand::Show { name, json, db } => {
                let ledger = db.open(home).await?;
                let a = ledger
                    .account(&name)
                    .await?
                    .ok_or_else(|| anyhow!("no account '{name}'"))?;
                print_account(&a, json);
            }
            AccountCommand::Refund { receipt, json, db } => {
                let ledger = db.open(home).await?;
                let r = ledger.refund(&receipt).await?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "refunded {} credits (entry {})",
                        credits(r.amount as i64),
                        r.entry
                    );
                }
            }
            AccountCommand::Check { json, db } => {
                let ledger = db.open(home).await?;
                let c = ledger.check().await?;
                if json {
                    println!("{}", serde_json::to_string(&c)?);
                } else {
                    println!(
                        "{} entries; unbalanced {}; mismatched accounts {}; sum of balances {}; \
                         issued {} credits; open holds {} ({} credits; escrow {})",
                        c.entries,
                        c.unbalanced_entries,
                        c.mismatched_accounts,
                        c.total,
                        credits(c.issued),
                        c.open_holds,
                        credits(c.open_held),
                        credits(c.escrow)
                    );
                }
                if !c.ok() {
                    bail!("the books do not balance");
                }
            }
        }
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_parse_exactly() {
        assert_eq!(parse_credits("10").unwrap(), 10_000_000);
        assert_eq!(parse_credits("0.5").unwrap(), 500_000);
        assert_eq!(parse_credits(".000001").unwrap(), 1);
        assert!(parse_credits("1.0000001").is_err());
        assert!(parse_credits("-1").is_err());
        assert!(parse_credits("abc").is_err());
        assert!(parse_credits("").is_err());
        assert!(parse_credits("99999999999999999").is_err());
        assert_eq!(credits(1_500_000), "1.500000");
        assert_eq!(credits(-1), "-0.000001");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("sqlite:///x/ledger.db"), "sqlite:///x/ledger.db");
    }
}
