//! `tessera account …`, and where the ledger lives.
//!
//! Amounts on the command line are credits (decimals allowed); the API and
//! `--json` output use integer micro-credits. The adapter that serves the
//! API's accounts from the ledger is `tessera_api::accounts`.

use std::path::Path;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use serde_json::json;
use tessera_api::accounts::account_json;
use tessera_ledger::{Account, Ledger, Limits, MICRO};

/// Where the ledger lives.
#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// The ledger: `sqlite://PATH` or `postgres://USER@HOST:PORT/DB`
    /// (default: `sqlite://$TESSERA_HOME/ledger.db`).
    #[arg(long, env = "TESSERA_DATABASE_URL")]
    pub database_url: Option<String>,
}

impl DatabaseArgs {
    /// The ledger's URL: `--database-url`, else this home's own SQLite file.
    pub fn url(&self, home: &Path) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", home.join("ledger.db").display()))
    }

    /// The ledger an operator command means: `--database-url`; else, when
    /// a gateway, `serve` or devnet runs from this home (its endpoint.json
    /// names its ledger), that ledger — so that after `make demo`,
    /// `tessera account create` gives a key the demo's gateway accepts;
    /// else this home's own SQLite file.
    pub fn operator_url(&self, home: &Path) -> String {
        if let Some(url) = &self.database_url {
            return url.clone();
        }
        let running = std::fs::read(home.join("endpoint.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["ledger"].as_str().map(str::to_string));
        match running {
            Some(url) => {
                eprintln!(
                    "(the ledger of the network running from {}: {})",
                    home.display(),
                    redact(&url)
                );
                url
            }
            None => self.url(home),
        }
    }

    /// Open the ledger an operator command means ([`Self::operator_url`]).
    pub async fn open_operator(&self, home: &Path) -> anyhow::Result<Ledger> {
        std::fs::create_dir_all(home)
            .with_context(|| format!("cannot create {}", home.display()))?;
        let url = self.operator_url(home);
        Ledger::open(&url)
            .await
            .with_context(|| format!("cannot open the ledger at {}", redact(&url)))
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
    crate::process::write_private(&path, &key)?;
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
                let ledger = db.open_operator(home).await?;
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
                let ledger = db.open_operator(home).await?;
                let a = ledger.topup(&name, parse_credits(&amount)?).await?;
                print_account(&a, json);
            }
            AccountCommand::Show { name, json, db } => {
                let ledger = db.open_operator(home).await?;
                let a = ledger
                    .account(&name)
                    .await?
                    .ok_or_else(|| anyhow!("no account '{name}'"))?;
                print_account(&a, json);
            }
            AccountCommand::Refund { receipt, json, db } => {
                let ledger = db.open_operator(home).await?;
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
                let ledger = db.open_operator(home).await?;
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
