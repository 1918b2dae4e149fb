//! The writer: every change to the books, committed in groups.
//!
//! Operations queue on a channel; the writer takes all that are waiting (up
//! to [`MAX_BATCH`]), applies them in one transaction and commits once, then
//! answers each caller. An operation refused for a business reason (too few
//! credits, a closed hold) writes nothing and does not disturb the others. If
//! the database itself fails the batch (a deadlock between two gateways on
//! PostgreSQL, a unique key raced by another process), the batch is rolled
//! back and its operations are retried one by one.

use sqlx::{Any, AnyPool, Row, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::{
    new_id, now_ms, Charge, Hold, LedgerError, Limits, Result, Settlement, ESCROW, FEES, ISSUANCE,
};

const MAX_BATCH: usize = 512;
/// Tries of one operation alone after its batch failed.
const RETRIES: usize = 5;

pub(crate) struct Pending {
    pub op: Op,
}

pub(crate) enum Op {
    CreateAccount {
        name: String,
        key_hash: String,
        credits: u64,
        limits: Limits,
        reply: oneshot::Sender<Result<String>>,
    },
    Topup {
        account: String,
        credits: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    Hold {
        account: String,
        amount: u64,
        gateway: String,
        idempotency_key: Option<String>,
        reply: oneshot::Sender<Result<Hold>>,
    },
    Settle {
        hold: String,
        job_id: String,
        charges: Vec<Charge>,
        fee_bps: u64,
        reply: oneshot::Sender<Result<Settlement>>,
    },
}

/// An operation's data, replayable if its batch must be retried.
#[derive(Clone)]
enum Work {
    CreateAccount {
        name: String,
        key_hash: String,
        credits: u64,
        limits: Limits,
    },
    Topup {
        account: String,
        credits: u64,
    },
    Hold {
        account: String,
        amount: u64,
        gateway: String,
        idempotency_key: Option<String>,
    },
    Settle {
        hold: String,
        job_id: String,
        charges: Vec<Charge>,
        fee_bps: u64,
    },
}

enum Outcome {
    Id(String),
    Unit,
    Hold(Hold),
    Settle(Settlement),
}

enum Reply {
    Id(oneshot::Sender<Result<String>>),
    Unit(oneshot::Sender<Result<()>>),
    Hold(oneshot::Sender<Result<Hold>>),
    Settle(oneshot::Sender<Result<Settlement>>),
}

impl Op {
    fn split(self) -> (Work, Reply) {
        match self {
            Op::CreateAccount {
                name,
                key_hash,
                credits,
                limits,
                reply,
            } => (
                Work::CreateAccount {
                    name,
                    key_hash,
                    credits,
                    limits,
                },
                Reply::Id(reply),
            ),
            Op::Topup {
                account,
                credits,
                reply,
            } => (Work::Topup { account, credits }, Reply::Unit(reply)),
            Op::Hold {
                account,
                amount,
                gateway,
                idempotency_key,
                reply,
            } => (
                Work::Hold {
                    account,
                    amount,
                    gateway,
                    idempotency_key,
                },
                Reply::Hold(reply),
            ),
            Op::Settle {
                hold,
                job_id,
                charges,
                fee_bps,
                reply,
            } => (
                Work::Settle {
                    hold,
                    job_id,
                    charges,
                    fee_bps,
                },
                Reply::Settle(reply),
            ),
        }
    }
}

impl Reply {
    fn send(self, result: Result<Outcome>) {
        // A caller that went away no longer needs its answer; the write
        // stands either way.
        match (self, result) {
            (Reply::Id(tx), Ok(Outcome::Id(id))) => drop(tx.send(Ok(id))),
            (Reply::Unit(tx), Ok(Outcome::Unit)) => drop(tx.send(Ok(()))),
            (Reply::Hold(tx), Ok(Outcome::Hold(h))) => drop(tx.send(Ok(h))),
            (Reply::Settle(tx), Ok(Outcome::Settle(s))) => drop(tx.send(Ok(s))),
            (Reply::Id(tx), Err(e)) => drop(tx.send(Err(e))),
            (Reply::Unit(tx), Err(e)) => drop(tx.send(Err(e))),
            (Reply::Hold(tx), Err(e)) => drop(tx.send(Err(e))),
            (Reply::Settle(tx), Err(e)) => drop(tx.send(Err(e))),
            _ => unreachable!("an operation's outcome always matches its reply"),
        }
    }
}

pub(crate) async fn run(pool: AnyPool, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first.op.split()];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p.op.split()),
                Err(_) => break,
            }
        }
        let (works, replies): (Vec<Work>, Vec<Reply>) = batch.into_iter().unzip();
        match apply_batch(&pool, &works).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    reply.send(outcome);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, ops = works.len(), "ledger batch failed; retrying its operations one by one");
                for (work, reply) in works.into_iter().zip(replies) {
                    let mut last = None;
                    for attempt in 0..RETRIES {
                        match apply_batch(&pool, std::slice::from_ref(&work)).await {
                            Ok(mut out) => {
                                last = out.pop();
                                break;
                            }
                            Err(e) => {
                                last = Some(Err(LedgerError::Db(e)));
                                tokio::time::sleep(std::time::Duration::from_millis(5 << attempt))
                                    .await;
                            }
                        }
                    }
                    reply.send(last.unwrap_or(Err(LedgerError::Closed)));
                }
            }
        }
    }
}

async fn apply_batch(pool: &AnyPool, works: &[Work]) -> Result<Vec<Result<Outcome>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut out = Vec::with_capacity(works.len());
    for work in works {
        match apply(&mut tx, work).await {
            Err(LedgerError::Db(e)) => return Err(e),
            other => out.push(other),
        }
    }
    tx.commit().await?;
    Ok(out)
}

type Tx = Transaction<'static, Any>;

fn amount(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| LedgerError::Amount(format!("{v} is too large")))
}

async fn apply(tx: &mut Tx, work: &Work) -> Result<Outcome> {
    match work {
        Work::CreateAccount {
            name,
            key_hash,
            credits,
            limits,
        } => {
            let taken = sqlx::query("SELECT id FROM accounts WHERE name = $1")
                .bind(name.clone())
                .fetch_optional(&mut **tx)
                .await?;
            if taken.is_some() {
                return Err(LedgerError::NameTaken(name.clone()));
            }
            let id = new_id("acct");
            sqlx::query(
                "INSERT INTO accounts (id, name, kind, key_hash, spend_limit, rate_limit, created_ms) \
                 VALUES ($1, $2, 'client', $3, $4, $5, $6)",
            )
            .bind(id.clone())
            .bind(name.clone())
            .bind(key_hash.clone())
            .bind(limits.spend_limit.map(amount).transpose()?)
            .bind(limits.rate_limit.map(amount).transpose()?)
            .bind(now_ms())
            .execute(&mut **tx)
            .await?;
            if *credits > 0 {
                topup(tx, &id, *credits).await?;
            }
            Ok(Outcome::Id(id))
        }
        Work::Topup { account, credits } => {
            topup(tx, account, *credits).await?;
            Ok(Outcome::Unit)
        }
        Work::Hold {
            account,
            amount: held,
            gateway,
            idempotency_key,
        } => hold(tx, account, *held, gateway, idempotency_key.as_deref()).await,
        Work::Settle {
            hold,
            job_id,
            charges,
            fee_bps,
        } => settle(tx, hold, job_id, charges, *fee_bps).await,
    }
}

async fn entry(
    tx: &mut Tx,
    kind: &str,
    hold: Option<&str>,
    postings: &[(&str, i64)],
) -> Result<String> {
    debug_assert_eq!(postings.iter().map(|p| p.1).sum::<i64>(), 0);
    let id = new_id("ent");
    sqlx::query("INSERT INTO entries (id, kind, hold_id, created_ms) VALUES ($1, $2, $3, $4)")
        .bind(id.clone())
        .bind(kind.to_string())
        .bind(hold.map(str::to_string))
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    for (account, amount) in postings.iter().filter(|p| p.1 != 0) {
        sqlx::query("INSERT INTO postings (entry_id, account_id, amount) VALUES ($1, $2, $3)")
            .bind(id.clone())
            .bind(account.to_string())
            .bind(*amount)
            .execute(&mut **tx)
            .await?;
    }
    Ok(id)
}

async fn add(tx: &mut Tx, account: &str, delta: i64) -> Result<()> {
    sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
        .bind(delta)
        .bind(account.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn topup(tx: &mut Tx, account: &str, credits: u64) -> Result<()> {
    let credits = amount(credits)?;
    if credits <= 0 {
        return Err(LedgerError::Amount("a top-up must be positive".into()));
    }
    let done =
        sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2 AND kind = 'client'")
            .bind(credits)
            .bind(account.to_string())
            .execute(&mut **tx)
            .await?;
    if done.rows_affected() == 0 {
        return Err(LedgerError::NoAccount(account.to_string()));
    }
    add(tx, ISSUANCE, -credits).await?;
    entry(
        tx,
        "topup",
        None,
        &[(ISSUANCE, -credits), (account, credits)],
    )
    .await?;
    Ok(())
}

async fn hold(
    tx: &mut Tx,
    account: &str,
    held: u64,
    gateway: &str,
    key: Option<&str>,
) -> Result<Outcome> {
    if let Some(key) = key {
        let prior = sqlx::query(
            "SELECT id, state, cost FROM holds WHERE account_id = $1 AND idempotency_key = $2",
        )
        .bind(account.to_string())
        .bind(key.to_string())
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(row) = prior {
            let state: String = row.try_get("state")?;
            let id: String = row.try_get("id")?;
            if state == "released" {
                // That attempt was charged nothing (it failed or its gateway
                // crashed): the key is free for the retry.
                sqlx::query("UPDATE holds SET idempotency_key = NULL WHERE id = $1")
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
            } else {
                let cost: Option<i64> = row.try_get("cost")?;
                return Ok(Outcome::Hold(Hold::Duplicate {
                    hold: id,
                    cost: (state == "settled").then_some(cost.unwrap_or(0).max(0) as u64),
                }));
            }
        }
    }
    let held = amount(held)?;
    let done = sqlx::query(
        "UPDATE accounts SET balance = balance - $1, held = held + $1 \
         WHERE id = $2 AND kind = 'client' AND balance >= $1 \
         AND (spend_limit IS NULL OR spent + held + $1 <= spend_limit)",
    )
    .bind(held)
    .bind(account.to_string())
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        let row =
            sqlx::query("SELECT balance, held, spent, spend_limit FROM accounts WHERE id = $1")
                .bind(account.to_string())
                .fetch_optional(&mut **tx)
                .await?
                .ok_or_else(|| LedgerError::NoAccount(account.to_string()))?;
        let balance: i64 = row.try_get("balance")?;
        if balance < held {
            return Err(LedgerError::Insufficient {
                needed: held as u64,
                available: balance.max(0) as u64,
            });
        }
        let limit: Option<i64> = row.try_get("spend_limit")?;
        let used = row.try_get::<i64, _>("spent")? + row.try_get::<i64, _>("held")?;
        return Err(LedgerError::SpendLimit {
            limit: limit.unwrap_or(0).max(0) as u64,
            used: used.max(0) as u64,
        });
    }
    add(tx, ESCROW, held).await?;
    let id = new_id("hold");
    sqlx::query(
        "INSERT INTO holds (id, account_id, amount, state, gateway, idempotency_key, created_ms) \
         VALUES ($1, $2, $3, 'open', $4, $5, $6)",
    )
    .bind(id.clone())
    .bind(account.to_string())
    .bind(held)
    .bind(gateway.to_string())
    .bind(key.map(str::to_string))
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    entry(tx, "hold", Some(&id), &[(account, -held), (ESCROW, held)]).await?;
    Ok(Outcome::Hold(Hold::New(id)))
}

async fn settle(
    tx: &mut Tx,
    hold: &str,
    job_id: &str,
    charges: &[Charge],
    fee_bps: u64,
) -> Result<Outcome> {
    let row = sqlx::query("SELECT account_id, amount, state FROM holds WHERE id = $1")
        .bind(hold.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| LedgerError::HoldClosed(hold.to_string()))?;
    let account: String = row.try_get("account_id")?;
    let held: i64 = row.try_get("amount")?;
    if row.try_get::<String, _>("state")? != "open" {
        return Err(LedgerError::HoldClosed(hold.to_string()));
    }
    let costs: Vec<u64> = charges.iter().map(Charge::cost).collect();
    let total: u64 = costs.iter().sum();
    if total > held as u64 {
        return Err(LedgerError::OverHold {
            charged: total,
            held: held as u64,
        });
    }
    let total = amount(total)?;
    let now = now_ms();
    // Claim the hold; a concurrent settlement of the same hold finds it gone.
    let claimed = sqlx::query(
        "UPDATE holds SET state = $1, cost = $2, closed_ms = $3 WHERE id = $4 AND state = 'open'",
    )
    .bind(if charges.is_empty() {
        "released"
    } else {
        "settled"
    })
    .bind(total)
    .bind(now)
    .bind(hold.to_string())
    .execute(&mut **tx)
    .await?;
    if claimed.rows_affected() == 0 {
        return Err(LedgerError::HoldClosed(hold.to_string()));
    }
    let prompt: i64 = charges.iter().map(|c| c.prompt_tokens as i64).sum();
    let completion: i64 = charges.iter().map(|c| c.completion_tokens as i64).sum();
    sqlx::query(
        "UPDATE accounts SET balance = balance + $1, held = held - $2, spent = spent + $3, \
         requests = requests + $4, prompt_tokens = prompt_tokens + $5, \
         completion_tokens = completion_tokens + $6 WHERE id = $7",
    )
    .bind(held - total)
    .bind(held)
    .bind(total)
    .bind(i64::from(!charges.is_empty()))
    .bind(prompt)
    .bind(completion)
    .bind(account.clone())
    .execute(&mut **tx)
    .await?;
    add(tx, ESCROW, -held).await?;
    let providers: Vec<String> = charges
        .iter()
        .map(|c| format!("provider:{}", c.provider))
        .collect();
    let mut postings: Vec<(&str, i64)> = vec![(ESCROW, -held), (&account, held - total)];
    let mut fees = 0i64;
    let mut parts = Vec::new();
    for (i, (c, cost)) in charges.iter().zip(&costs).enumerate() {
        let cost = *cost as i64;
        let fee = (cost as i128 * fee_bps as i128 / 10_000) as i64;
        fees += fee;
        sqlx::query(
            "INSERT INTO accounts (id, name, kind, created_ms) VALUES ($1, $2, 'provider', $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(providers[i].clone())
        .bind(providers[i].clone())
        .bind(now)
        .execute(&mut **tx)
        .await?;
        add(tx, &providers[i], cost - fee).await?;
        postings.push((&providers[i], cost - fee));
        let receipt = new_id("rcpt");
        sqlx::query(
            "INSERT INTO receipts (id, hold_id, job_id, part, provider, model_sha256, \
             prompt_tokens, completion_tokens, input_price, output_price, cost, fee, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(receipt.clone())
        .bind(hold.to_string())
        .bind(job_id.to_string())
        .bind(i as i64)
        .bind(c.provider.clone())
        .bind(c.model_sha256.clone())
        .bind(c.prompt_tokens as i64)
        .bind(c.completion_tokens as i64)
        .bind(amount(c.input_price)?)
        .bind(amount(c.output_price)?)
        .bind(cost)
        .bind(fee)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        parts.push(receipt);
    }
    if fees != 0 {
        add(tx, FEES, fees).await?;
        postings.push((FEES, fees));
    }
    let kind = if charges.is_empty() {
        "release"
    } else {
        "settle"
    };
    let receipt = entry(tx, kind, Some(hold), &postings).await?;
    Ok(Outcome::Settle(Settlement {
        receipt,
        cost: total as u64,
        fee: fees as u64,
        parts,
    }))
}
