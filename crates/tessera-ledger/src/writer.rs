//! The writer: every change to the books, committed in groups.
//!
//! Within a batch, what only needs adding up (system and provider balances,
//! new rows of holds, entries, postings and receipts) is gathered in a
//! [`Batch`] and written at the end with one statement per table or
//! account; only a client's balance, which a hold must check, is updated as
//! each operation runs.
//!
//! Operations queue on a channel; the writer takes all that are waiting (up
//! to [`MAX_BATCH`]), applies them in one transaction and commits once, then
//! answers each caller. An operation refused for a business reason (too few
//! credits, a closed hold) writes nothing and does not disturb the others. If
//! the database itself fails the batch (a deadlock between two gateways on
//! PostgreSQL, a unique key raced by another process), the batch is rolled
//! back and its operations are retried one by one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::{Any, AnyPool, Row, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::{
    new_id, now_ms, Charge, Hold, LedgerError, Limits, Refund, Result, Settlement, ESCROW, FEES,
    FORFEITS, ISSUANCE,
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
    Raise {
        hold: String,
        to: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    Settle {
        hold: String,
        job_id: String,
        charges: Vec<Charge>,
        fee_bps: u64,
        response: Option<String>,
        reply: oneshot::Sender<Result<Settlement>>,
    },
    Refund {
        receipt: String,
        reply: oneshot::Sender<Result<Refund>>,
    },
    Forfeit {
        provider: String,
        /// At most this much (a slash); everything when `None`.
        limit: Option<u64>,
        reply: oneshot::Sender<Result<Refund>>,
    },
    Verdict {
        job_id: String,
        provider: String,
        status: String,
        reply: oneshot::Sender<Result<Option<Refund>>>,
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
    Raise {
        hold: String,
        to: u64,
    },
    Settle {
        hold: String,
        job_id: String,
        charges: Vec<Charge>,
        fee_bps: u64,
        response: Option<String>,
    },
    Refund {
        receipt: String,
    },
    Forfeit {
        provider: String,
        limit: Option<u64>,
    },
}

enum Outcome {
    Id(String),
    Unit,
    Hold(Hold),
    Settle(Settlement),
    Refund(Refund),
}

enum Reply {
    /// Nobody waits for this outcome.
    Dropped,
    Id(oneshot::Sender<Result<String>>),
    Unit(oneshot::Sender<Result<()>>),
    Hold(oneshot::Sender<Result<Hold>>),
    Settle(oneshot::Sender<Result<Settlement>>),
    Refund(oneshot::Sender<Result<Refund>>),
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
                response,
                reply,
            } => (
                Work::Settle {
                    hold,
                    job_id,
                    charges,
                    fee_bps,
                    response,
                },
                Reply::Settle(reply),
            ),
            Op::Raise { hold, to, reply } => (Work::Raise { hold, to }, Reply::Unit(reply)),
            Op::Refund { receipt, reply } => (Work::Refund { receipt }, Reply::Refund(reply)),
            Op::Forfeit {
                provider,
                limit,
                reply,
            } => (Work::Forfeit { provider, limit }, Reply::Refund(reply)),
            // Lifecycle steps never reach a batch (see `run`).
            Op::Verdict { reply, .. } => {
                drop(reply.send(Err(LedgerError::Closed)));
                (
                    Work::Refund {
                        receipt: String::new(),
                    },
                    Reply::Dropped,
                )
            }
        }
    }
}

impl Reply {
    fn send(self, result: Result<Outcome>) {
        // A caller that went away no longer needs its answer; the write
        // stands either way.
        match (self, result) {
            (Reply::Dropped, _) => {}
            (Reply::Id(tx), Ok(Outcome::Id(id))) => drop(tx.send(Ok(id))),
            (Reply::Unit(tx), Ok(Outcome::Unit)) => drop(tx.send(Ok(()))),
            (Reply::Hold(tx), Ok(Outcome::Hold(h))) => drop(tx.send(Ok(h))),
            (Reply::Settle(tx), Ok(Outcome::Settle(s))) => drop(tx.send(Ok(s))),
            (Reply::Refund(tx), Ok(Outcome::Refund(r))) => drop(tx.send(Ok(r))),
            (Reply::Refund(tx), Err(e)) => drop(tx.send(Err(e))),
            (Reply::Id(tx), Err(e)) => drop(tx.send(Err(e))),
            (Reply::Unit(tx), Err(e)) => drop(tx.send(Err(e))),
            (Reply::Hold(tx), Err(e)) => drop(tx.send(Err(e))),
            (Reply::Settle(tx), Err(e)) => drop(tx.send(Err(e))),
            _ => unreachable!("an operation's outcome always matches its reply"),
        }
    }
}

/// How long a verdict waits for its request's settlement before it is
/// dropped (the request was lost with a crash, or settled elsewhere).
const PARKED_FOR: std::time::Duration = std::time::Duration::from_secs(600);
/// Released requests remembered, so a verdict after the release knows
/// there is nothing to refund.
const RELEASED_KEPT: usize = 100_000;

/// A forfeit (or a slash: at most its limit) and who waits for its outcome.
type WaitingForfeit = (Option<u64>, oneshot::Sender<Result<Refund>>);

/// A job's lifecycle steps that must wait for an earlier one: verdicts
/// that arrived before their request's settlement, forfeits that must
/// follow a provider's pending refunds.
#[derive(Default)]
struct Lifecycle {
    /// Verdicts by request (job id), in arrival order.
    verdicts: HashMap<String, Vec<ParkedVerdict>>,
    /// Forfeits waiting for a provider's parked verdicts.
    forfeits: HashMap<String, Vec<WaitingForfeit>>,
    /// Requests released without a charge (nothing to refund), newest last.
    released: std::collections::VecDeque<String>,
    released_set: BTreeSet<String>,
}

struct ParkedVerdict {
    provider: String,
    status: String,
    since: std::time::Instant,
    reply: oneshot::Sender<Result<Option<Refund>>>,
}

impl Lifecycle {
    fn release(&mut self, job: &str) {
        if job.is_empty() || !self.released_set.insert(job.to_string()) {
            return;
        }
        self.released.push_back(job.to_string());
        if self.released.len() > RELEASED_KEPT {
            if let Some(old) = self.released.pop_front() {
                self.released_set.remove(&old);
            }
        }
    }

    fn waiting_for(&self, provider: &str) -> bool {
        self.verdicts
            .values()
            .any(|v| v.iter().any(|p| p.provider == provider))
    }
}

pub(crate) async fn run(pool: AnyPool, postgres: bool, mut rx: mpsc::Receiver<Pending>) {
    let mut life = Lifecycle::default();
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first.op];
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => ops.push(p.op),
                Err(_) => break,
            }
        }
        let (steps, regular): (Vec<Op>, Vec<Op>) = ops
            .into_iter()
            .partition(|op| matches!(op, Op::Verdict { .. } | Op::Forfeit { .. }));
        let (works, replies): (Vec<Work>, Vec<Reply>) = regular.into_iter().map(Op::split).unzip();
        let outcomes = apply_works(&pool, postgres, &works).await;
        // Settlements just committed: their parked verdicts may go now.
        let mut settled = Vec::new();
        for (work, outcome) in works.iter().zip(&outcomes) {
            if let (
                Work::Settle {
                    job_id, charges, ..
                },
                Ok(_),
            ) = (work, outcome)
            {
                if charges.is_empty() {
                    life.release(job_id);
                } else {
                    settled.push(job_id.clone());
                }
            }
        }
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            reply.send(outcome);
        }
        let released: Vec<String> = life
            .verdicts
            .keys()
            .filter(|j| life.released_set.contains(*j))
            .cloned()
            .collect();
        for job in released {
            for v in life.verdicts.remove(&job).unwrap_or_default() {
                drop(v.reply.send(Ok(None)));
            }
        }
        for job in settled {
            for v in life.verdicts.remove(&job).unwrap_or_default() {
                let r = apply_verdict(&pool, postgres, &job, &v.provider, &v.status).await;
                drop(v.reply.send(r));
            }
        }
        for step in steps {
            match step {
                Op::Verdict {
                    job_id,
                    provider,
                    status,
                    reply,
                } => {
                    if life.released_set.contains(&job_id) {
                        drop(reply.send(Ok(None)));
                        continue;
                    }
                    match settled_hold(&pool, &job_id).await {
                        Ok(Some(_)) => {
                            let r =
                                apply_verdict(&pool, postgres, &job_id, &provider, &status).await;
                            drop(reply.send(r));
                        }
                        Ok(None) => life
                            .verdicts
                            .entry(job_id)
                            .or_default()
                            .push(ParkedVerdict {
                                provider,
                                status,
                                since: std::time::Instant::now(),
                                reply,
                            }),
                        Err(e) => drop(reply.send(Err(e))),
                    }
                }
                Op::Forfeit {
                    provider,
                    limit,
                    reply,
                } => {
                    if life.waiting_for(&provider) {
                        life.forfeits
                            .entry(provider)
                            .or_default()
                            .push((limit, reply));
                    } else {
                        let r = forfeit_now(&pool, postgres, &provider, limit).await;
                        drop(reply.send(r));
                    }
                }
                other => other.split().1.send(Err(LedgerError::Closed)),
            }
        }
        // Verdicts whose request never settled here are dropped in time.
        life.verdicts.retain(|job, parked| {
            parked.retain(|v| v.since.elapsed() < PARKED_FOR);
            if parked.is_empty() {
                tracing::debug!(%job, "dropped verdicts of a request that never settled here");
            }
            !parked.is_empty()
        });
        // Forfeits whose provider has no refund pending any more.
        let ready: Vec<String> = life
            .forfeits
            .keys()
            .filter(|p| !life.waiting_for(p))
            .cloned()
            .collect();
        for provider in ready {
            for (limit, reply) in life.forfeits.remove(&provider).unwrap_or_default() {
                let r = forfeit_now(&pool, postgres, &provider, limit).await;
                drop(reply.send(r));
            }
        }
    }
}

/// Apply works in one batch; if the database fails it, one by one.
async fn apply_works(pool: &AnyPool, postgres: bool, works: &[Work]) -> Vec<Result<Outcome>> {
    if works.is_empty() {
        return Vec::new();
    }
    match apply_batch(pool, postgres, works).await {
        Ok(outcomes) => outcomes,
        Err(e) => {
            tracing::debug!(error = %e, ops = works.len(), "ledger batch failed; retrying its operations one by one");
            let mut out = Vec::with_capacity(works.len());
            for work in works {
                let mut last = None;
                for attempt in 0..RETRIES {
                    match apply_batch(pool, postgres, std::slice::from_ref(work)).await {
                        Ok(mut o) => {
                            last = o.pop();
                            break;
                        }
                        Err(e) => {
                            last = Some(Err(LedgerError::Db(e)));
                            tokio::time::sleep(std::time::Duration::from_millis(5 << attempt))
                                .await;
                        }
                    }
                }
                out.push(last.unwrap_or(Err(LedgerError::Closed)));
            }
            out
        }
    }
}

/// The hold of request `job_id` if it has been settled with a charge.
async fn settled_hold(pool: &AnyPool, job_id: &str) -> Result<Option<String>> {
    let row = sqlx::query("SELECT hold_id FROM receipts WHERE job_id = $1 LIMIT 1")
        .bind(job_id.to_string())
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|r| r.try_get::<String, _>("hold_id")).transpose()?)
}

/// Record a verdict on a settled request's receipts and, for a failure,
/// refund the request (once).
async fn apply_verdict(
    pool: &AnyPool,
    postgres: bool,
    job_id: &str,
    provider: &str,
    status: &str,
) -> Result<Option<Refund>> {
    sqlx::query("UPDATE receipts SET audit = $1 WHERE job_id = $2 AND provider = $3")
        .bind(status.to_string())
        .bind(job_id.to_string())
        .bind(provider.to_string())
        .execute(pool)
        .await?;
    if status != "failed" {
        return Ok(None);
    }
    let Some(hold) = settled_hold(pool, job_id).await? else {
        return Ok(None);
    };
    let work = Work::Refund { receipt: hold };
    match apply_works(pool, postgres, std::slice::from_ref(&work))
        .await
        .pop()
    {
        Some(Ok(Outcome::Refund(r))) => Ok(Some(r)),
        // Refunded before (another part's failure): once is enough.
        Some(Err(LedgerError::NotRefundable(_))) => Ok(None),
        Some(Err(e)) => Err(e),
        _ => Err(LedgerError::Closed),
    }
}

async fn forfeit_now(
    pool: &AnyPool,
    postgres: bool,
    provider: &str,
    limit: Option<u64>,
) -> Result<Refund> {
    let work = Work::Forfeit {
        provider: provider.to_string(),
        limit,
    };
    match apply_works(pool, postgres, std::slice::from_ref(&work))
        .await
        .pop()
    {
        Some(Ok(Outcome::Refund(r))) => Ok(r),
        Some(Err(e)) => Err(e),
        _ => Err(LedgerError::Closed),
    }
}

/// Apply a batch in one transaction. Operations are concurrent requests, so
/// any order is a valid one: account changes first, then settlements (which
/// return credits), then holds, so a hold sees every credit settled with it.
async fn apply_batch(
    pool: &AnyPool,
    postgres: bool,
    works: &[Work],
) -> Result<Vec<Result<Outcome>>, sqlx::Error> {
    let mut tx = begin(pool, postgres).await?;
    let mut batch = Batch {
        postgres,
        ..Batch::default()
    };
    let mut out: Vec<Option<Result<Outcome>>> = (0..works.len()).map(|_| None).collect();
    let rank = |w: &Work| match w {
        Work::CreateAccount { .. } | Work::Topup { .. } => 0,
        Work::Settle { .. } | Work::Refund { .. } | Work::Forfeit { .. } => 1,
        Work::Hold { .. } | Work::Raise { .. } => 2,
    };
    for pass in 0..3 {
        if pass == 2 {
            batch.flush_clients(&mut tx).await?;
            holds(&mut tx, &mut batch, works, &mut out).await?;
            for (i, work) in works.iter().enumerate() {
                if let Work::Raise { hold, to } = work {
                    match raise(&mut tx, &mut batch, hold, *to).await {
                        Err(LedgerError::Db(e)) => return Err(e),
                        other => out[i] = Some(other),
                    }
                }
            }
            continue;
        }
        for (i, work) in works.iter().enumerate().filter(|(_, w)| rank(w) == pass) {
            match apply(&mut tx, &mut batch, work).await {
                Err(LedgerError::Db(e)) => return Err(e),
                other => out[i] = Some(other),
            }
        }
    }
    batch.flush(&mut tx).await?;
    tx.commit().await?;
    Ok(out
        .into_iter()
        .map(|o| o.unwrap_or(Err(LedgerError::Closed)))
        .collect())
}

/// The batch's holds, grouped by account: one conditional update covers
/// all of an account's holds when its balance and limit allow them all
/// (the usual case); otherwise, and for holds with idempotency keys, each
/// is tried on its own.
async fn holds(
    tx: &mut Tx,
    batch: &mut Batch,
    works: &[Work],
    out: &mut [Option<Result<Outcome>>],
) -> Result<(), sqlx::Error> {
    let mut by_account: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, w) in works.iter().enumerate() {
        if let Work::Hold { account, .. } = w {
            by_account.entry(account.as_str()).or_default().push(i);
        }
    }
    for (account, ids) in by_account {
        let plain: Vec<usize> = ids
            .iter()
            .copied()
            .filter(|&i| {
                matches!(
                    &works[i],
                    Work::Hold {
                        idempotency_key: None,
                        ..
                    }
                )
            })
            .collect();
        let mut together = false;
        if plain.len() > 1 {
            let sum: Option<i64> = plain.iter().try_fold(0i64, |acc, &i| match &works[i] {
                Work::Hold { amount: a, .. } => {
                    i64::try_from(*a).ok().and_then(|a| acc.checked_add(a))
                }
                _ => Some(acc),
            });
            if let Some(sum) = sum {
                together = take(tx, account, sum).await?;
            }
        }
        for i in ids {
            let result = match &works[i] {
                Work::Hold {
                    account,
                    amount: held,
                    gateway,
                    idempotency_key: None,
                } if together => Ok(record_hold(batch, account, *held as i64, gateway, None)),
                work => apply(tx, batch, work).await,
            };
            match result {
                Err(LedgerError::Db(e)) => return Err(e),
                other => out[i] = Some(other),
            }
        }
    }
    Ok(())
}

/// Take `held` from a client's balance into its holds if its balance and
/// spending limit allow; false (and nothing written) if not.
async fn take(tx: &mut Tx, account: &str, held: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE accounts SET balance = balance - $1, held = held + $1 \
         WHERE id = $2 AND kind = 'client' AND balance >= $1 \
         AND (spend_limit IS NULL OR spent + held + $1 <= spend_limit)",
    )
    .bind(held)
    .bind(account.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

type Tx = Transaction<'static, Any>;

/// Begin a write transaction. On SQLite it takes the write lock at once
/// (`BEGIN IMMEDIATE`), so another process writing the same file makes it
/// wait (busy timeout) instead of failing when a read would turn into a write.
pub(crate) async fn begin(pool: &AnyPool, postgres: bool) -> Result<Tx, sqlx::Error> {
    if postgres {
        pool.begin().await
    } else {
        pool.begin_with("BEGIN IMMEDIATE").await
    }
}

fn amount(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| LedgerError::Amount(format!("{v} is too large")))
}

/// Rows and balance changes gathered over a batch and written at its end:
/// one multi-row INSERT per table, one UPDATE per account touched. Only a
/// client's own balance (which a hold must check) is updated at once.
#[derive(Default)]
struct Batch {
    /// Balance changes of system and provider accounts.
    deltas: BTreeMap<String, i64>,
    providers: BTreeSet<String>,
    holds: Vec<[Value; 7]>,
    entries: Vec<[Value; 4]>,
    postings: Vec<[Value; 3]>,
    receipts: Vec<[Value; 14]>,
    /// Idempotency keys taken in this batch: (account, key) → hold.
    keys: HashMap<(String, String), String>,
    /// Settlements' changes to client accounts, applied before the holds.
    clients: BTreeMap<String, ClientDelta>,
    /// PostgreSQL numbers its placeholders; SQLite gets anonymous `?`, which
    /// it binds without a name lookup per parameter.
    postgres: bool,
}

#[derive(Default)]
struct ClientDelta {
    balance: i64,
    held: i64,
    spent: i64,
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
}

/// A bound value of a multi-row INSERT.
#[derive(Clone)]
enum Value {
    Int(i64),
    Text(String),
    OptText(Option<String>),
}

/// Rows per INSERT statement (well under both databases' bind limits).
const ROWS_PER_INSERT: usize = 400;

impl Batch {
    fn entry(&mut self, kind: &str, hold: Option<&str>, postings: &[(&str, i64)]) -> String {
        self.entry_with_id(new_id("ent"), kind, hold, postings)
    }

    fn entry_with_id(
        &mut self,
        id: String,
        kind: &str,
        hold: Option<&str>,
        postings: &[(&str, i64)],
    ) -> String {
        debug_assert_eq!(postings.iter().map(|p| p.1).sum::<i64>(), 0);
        self.entries.push([
            Value::Text(id.clone()),
            Value::Text(kind.to_string()),
            Value::OptText(hold.map(str::to_string)),
            Value::Int(now_ms()),
        ]);
        for (account, amount) in postings.iter().filter(|p| p.1 != 0) {
            self.postings.push([
                Value::Text(id.clone()),
                Value::Text(account.to_string()),
                Value::Int(*amount),
            ]);
        }
        id
    }

    fn add(&mut self, account: &str, delta: i64) {
        *self.deltas.entry(account.to_string()).or_default() += delta;
    }

    /// Apply the settlements' client changes, one update per account.
    async fn flush_clients(&mut self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        for (account, d) in std::mem::take(&mut self.clients) {
            sqlx::query(
                "UPDATE accounts SET balance = balance + $1, held = held + $2, \
                 spent = spent + $3, requests = requests + $4, \
                 prompt_tokens = prompt_tokens + $5, completion_tokens = completion_tokens + $6 \
                 WHERE id = $7",
            )
            .bind(d.balance)
            .bind(d.held)
            .bind(d.spent)
            .bind(d.requests)
            .bind(d.prompt_tokens)
            .bind(d.completion_tokens)
            .bind(account)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn flush(self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let providers: Vec<[Value; 4]> = self
            .providers
            .iter()
            .map(|p| {
                [
                    Value::Text(p.clone()),
                    Value::Text(p.clone()),
                    Value::Text("provider".into()),
                    Value::Int(now),
                ]
            })
            .collect();
        let pg = self.postgres;
        insert(
            tx,
            pg,
            "accounts (id, name, kind, created_ms)",
            &providers,
            " ON CONFLICT (id) DO NOTHING",
        )
        .await?;
        // Sorted by account id: concurrent writers lock rows in one order.
        for (account, delta) in self.deltas.iter().filter(|d| *d.1 != 0) {
            sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
                .bind(*delta)
                .bind(account.clone())
                .execute(&mut **tx)
                .await?;
        }
        insert(
            tx,
            pg,
            "holds (id, account_id, amount, state, gateway, idempotency_key, created_ms)",
            &self.holds,
            "",
        )
        .await?;
        insert(
            tx,
            pg,
            "entries (id, kind, hold_id, created_ms)",
            &self.entries,
            "",
        )
        .await?;
        insert(
            tx,
            pg,
            "postings (entry_id, account_id, amount)",
            &self.postings,
            "",
        )
        .await?;
        insert(
            tx,
            pg,
            "receipts (id, hold_id, job_id, part, provider, model_sha256, prompt_tokens, \
             completion_tokens, input_price, output_price, cost, fee, created_ms, signed)",
            &self.receipts,
            "",
        )
        .await?;
        Ok(())
    }
}

/// `INSERT INTO table (cols) VALUES (…), (…) suffix`, in chunks.
async fn insert<const N: usize>(
    tx: &mut Tx,
    postgres: bool,
    table: &str,
    rows: &[[Value; N]],
    suffix: &str,
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut sql = format!("INSERT INTO {table} VALUES ");
        let mut n = 0;
        for (r, _) in chunk.iter().enumerate() {
            if r > 0 {
                sql.push(',');
            }
            sql.push('(');
            for c in 0..N {
                if c > 0 {
                    sql.push(',');
                }
                n += 1;
                if postgres {
                    sql.push_str(&format!("${n}"));
                } else {
                    sql.push('?');
                }
            }
            sql.push(')');
        }
        sql.push_str(suffix);
        // Only table names and placeholders are in the text; values are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for row in chunk {
            for v in row {
                q = match v {
                    Value::Int(i) => q.bind(*i),
                    Value::Text(t) => q.bind(t.clone()),
                    Value::OptText(t) => q.bind(t.clone()),
                };
            }
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

async fn apply(tx: &mut Tx, batch: &mut Batch, work: &Work) -> Result<Outcome> {
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
                topup(tx, batch, &id, *credits).await?;
            }
            Ok(Outcome::Id(id))
        }
        Work::Topup { account, credits } => {
            topup(tx, batch, account, *credits).await?;
            Ok(Outcome::Unit)
        }
        Work::Hold {
            account,
            amount: held,
            gateway,
            idempotency_key,
        } => {
            hold(
                tx,
                batch,
                account,
                *held,
                gateway,
                idempotency_key.as_deref(),
            )
            .await
        }
        Work::Raise { hold, to } => raise(tx, batch, hold, *to).await,
        Work::Settle {
            hold,
            job_id,
            charges,
            fee_bps,
            response,
        } => {
            settle(
                tx,
                batch,
                hold,
                job_id,
                charges,
                *fee_bps,
                response.as_deref(),
            )
            .await
        }
        Work::Refund { receipt } => refund(tx, batch, receipt).await,
        Work::Forfeit { provider, limit } => forfeit(tx, batch, provider, *limit).await,
    }
}

/// A quarantined provider forfeits its bond: everything its account holds
/// at this ledger (its earnings) goes to `system:forfeits`, in one entry;
/// a slash (`limit`) takes at most that much.
async fn forfeit(
    tx: &mut Tx,
    batch: &mut Batch,
    provider: &str,
    limit: Option<u64>,
) -> Result<Outcome> {
    let account = format!("provider:{provider}");
    let stored: i64 = sqlx::query("SELECT balance FROM accounts WHERE id = $1")
        .bind(account.clone())
        .fetch_optional(&mut **tx)
        .await?
        .map(|r| r.try_get::<i64, _>("balance"))
        .transpose()?
        .unwrap_or(0);
    // Settlements earlier in this batch are not written yet.
    let held = stored + batch.deltas.get(&account).copied().unwrap_or(0);
    let amount = limit.map_or(held, |l| held.min(i64::try_from(l).unwrap_or(i64::MAX)));
    if amount <= 0 {
        return Ok(Outcome::Refund(Refund {
            entry: String::new(),
            amount: 0,
        }));
    }
    batch.add(&account, -amount);
    batch.add(FORFEITS, amount);
    let kind = if limit.is_some() { "slash" } else { "forfeit" };
    let entry = batch.entry(kind, None, &[(&account, -amount), (FORFEITS, amount)]);
    Ok(Outcome::Refund(Refund {
        entry,
        amount: amount as u64,
    }))
}

/// Undo a settlement: the client gets its cost back, each provider gives
/// back what it earned and the gateway its fee, in one entry.
async fn refund(tx: &mut Tx, batch: &mut Batch, receipt: &str) -> Result<Outcome> {
    let hold: String = if receipt.starts_with("hold_") {
        receipt.to_string()
    } else {
        sqlx::query("SELECT hold_id FROM entries WHERE id = $1 AND kind = 'settle'")
            .bind(receipt.to_string())
            .fetch_optional(&mut **tx)
            .await?
            .map(|r| r.try_get::<Option<String>, _>("hold_id"))
            .transpose()?
            .flatten()
            .ok_or_else(|| LedgerError::NotRefundable(receipt.to_string()))?
    };
    let claimed = sqlx::query(
        "UPDATE holds SET state = 'refunded' WHERE id = $1 AND state = 'settled' \
         RETURNING account_id, cost",
    )
    .bind(hold.clone())
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| LedgerError::NotRefundable(receipt.to_string()))?;
    let account: String = claimed.try_get("account_id")?;
    let cost: i64 = claimed.try_get::<Option<i64>, _>("cost")?.unwrap_or(0);
    let parts = sqlx::query("SELECT provider, cost, fee FROM receipts WHERE hold_id = $1")
        .bind(hold.clone())
        .fetch_all(&mut **tx)
        .await?;
    sqlx::query("UPDATE accounts SET balance = balance + $1, spent = spent - $2 WHERE id = $3")
        .bind(cost)
        .bind(cost)
        .bind(account.clone())
        .execute(&mut **tx)
        .await?;
    let mut postings: Vec<(String, i64)> = vec![(account, cost)];
    let mut fees = 0;
    for p in &parts {
        let provider = format!("provider:{}", p.try_get::<String, _>("provider")?);
        let (c, f): (i64, i64) = (p.try_get("cost")?, p.try_get("fee")?);
        batch.add(&provider, -(c - f));
        postings.push((provider, -(c - f)));
        fees += f;
    }
    if fees != 0 {
        batch.add(FEES, -fees);
        postings.push((FEES.to_string(), -fees));
    }
    let refs: Vec<(&str, i64)> = postings.iter().map(|(a, v)| (a.as_str(), *v)).collect();
    let entry = batch.entry("refund", Some(&hold), &refs);
    Ok(Outcome::Refund(Refund {
        entry,
        amount: cost.max(0) as u64,
    }))
}

async fn topup(tx: &mut Tx, batch: &mut Batch, account: &str, credits: u64) -> Result<()> {
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
    batch.add(ISSUANCE, -credits);
    batch.entry("topup", None, &[(ISSUANCE, -credits), (account, credits)]);
    Ok(())
}

async fn hold(
    tx: &mut Tx,
    batch: &mut Batch,
    account: &str,
    held: u64,
    gateway: &str,
    key: Option<&str>,
) -> Result<Outcome> {
    if let Some(key) = key {
        if let Some(id) = batch.keys.get(&(account.to_string(), key.to_string())) {
            return Ok(Outcome::Hold(Hold::Duplicate {
                hold: id.clone(),
                cost: None,
                response: None,
                receipt: None,
            }));
        }
        let prior = sqlx::query(
            "SELECT id, state, cost, response, receipt FROM holds \
             WHERE account_id = $1 AND idempotency_key = $2",
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
                let settled = state == "settled";
                return Ok(Outcome::Hold(Hold::Duplicate {
                    hold: id,
                    cost: settled.then_some(cost.unwrap_or(0).max(0) as u64),
                    response: row
                        .try_get::<Option<String>, _>("response")?
                        .filter(|_| settled),
                    receipt: row
                        .try_get::<Option<String>, _>("receipt")?
                        .filter(|_| settled),
                }));
            }
        }
    }
    // More than any balance can hold is simply more than this one has.
    let held = i64::try_from(held).unwrap_or(i64::MAX);
    if !take(tx, account, held).await? {
        return Err(shortfall(tx, account, held).await?);
    }
    Ok(record_hold(batch, account, held, gateway, key))
}

/// Why `account` cannot hold `needed` more: its balance or its spending
/// limit.
async fn shortfall(tx: &mut Tx, account: &str, needed: i64) -> Result<LedgerError> {
    let row = sqlx::query("SELECT balance, held, spent, spend_limit FROM accounts WHERE id = $1")
        .bind(account.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| LedgerError::NoAccount(account.to_string()))?;
    let balance: i64 = row.try_get("balance")?;
    if balance < needed {
        return Ok(LedgerError::Insufficient {
            needed: needed as u64,
            available: balance.max(0) as u64,
        });
    }
    let limit: Option<i64> = row.try_get("spend_limit")?;
    let used = row.try_get::<i64, _>("spent")? + row.try_get::<i64, _>("held")?;
    Ok(LedgerError::SpendLimit {
        limit: limit.unwrap_or(0).max(0) as u64,
        used: used.max(0) as u64,
    })
}

/// Raise an open hold to `to` micro-credits in all, taking the difference
/// from its account (never lowered: a hold at or above `to` is left as it
/// is).
async fn raise(tx: &mut Tx, batch: &mut Batch, hold: &str, to: u64) -> Result<Outcome> {
    let row = sqlx::query("SELECT account_id, amount FROM holds WHERE id = $1 AND state = 'open'")
        .bind(hold.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| LedgerError::HoldClosed(hold.to_string()))?;
    let account: String = row.try_get("account_id")?;
    let held: i64 = row.try_get("amount")?;
    let to = i64::try_from(to).unwrap_or(i64::MAX);
    let extra = to.saturating_sub(held);
    if extra <= 0 {
        return Ok(Outcome::Unit);
    }
    if !take(tx, &account, extra).await? {
        return Err(shortfall(tx, &account, extra).await?);
    }
    sqlx::query("UPDATE holds SET amount = $1 WHERE id = $2")
        .bind(to)
        .bind(hold.to_string())
        .execute(&mut **tx)
        .await?;
    batch.add(ESCROW, extra);
    batch.entry("raise", Some(hold), &[(&account, -extra), (ESCROW, extra)]);
    Ok(Outcome::Unit)
}

/// The rows of a hold whose credits were taken.
fn record_hold(
    batch: &mut Batch,
    account: &str,
    held: i64,
    gateway: &str,
    key: Option<&str>,
) -> Outcome {
    batch.add(ESCROW, held);
    let id = new_id("hold");
    if let Some(key) = key {
        batch
            .keys
            .insert((account.to_string(), key.to_string()), id.clone());
    }
    batch.holds.push([
        Value::Text(id.clone()),
        Value::Text(account.to_string()),
        Value::Int(held),
        Value::Text("open".into()),
        Value::Text(gateway.to_string()),
        Value::OptText(key.map(str::to_string)),
        Value::Int(now_ms()),
    ]);
    batch.entry("hold", Some(&id), &[(account, -held), (ESCROW, held)]);
    Outcome::Hold(Hold::New(id))
}

async fn settle(
    tx: &mut Tx,
    batch: &mut Batch,
    hold: &str,
    job_id: &str,
    charges: &[Charge],
    fee_bps: u64,
    response: Option<&str>,
) -> Result<Outcome> {
    // Check every number before writing anything.
    let costs: Vec<u64> = charges.iter().map(Charge::cost).collect();
    let total = amount(costs.iter().fold(0u64, |a, c| a.saturating_add(*c)))?;
    for c in charges {
        amount(c.input_price)?;
        amount(c.output_price)?;
    }
    let now = now_ms();
    let entry = new_id("ent");
    // Claim the hold (still open, and holding enough); a second settlement
    // of the same hold finds it gone. The answer (for a replay) is stored
    // in the same transaction as the charge.
    let claimed = sqlx::query(
        "UPDATE holds SET state = $1, cost = $2, closed_ms = $3, response = $4, receipt = $5 \
         WHERE id = $6 AND state = 'open' AND amount >= $7 RETURNING account_id, amount",
    )
    .bind(if charges.is_empty() {
        "released"
    } else {
        "settled"
    })
    .bind(total)
    .bind(now)
    .bind(response.filter(|_| !charges.is_empty()).map(str::to_string))
    .bind(entry.clone())
    .bind(hold.to_string())
    .bind(total)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = claimed else {
        let row = sqlx::query("SELECT amount, state FROM holds WHERE id = $1")
            .bind(hold.to_string())
            .fetch_optional(&mut **tx)
            .await?;
        return Err(match row {
            Some(r) if r.try_get::<String, _>("state")? == "open" => LedgerError::OverHold {
                charged: total as u64,
                held: r.try_get::<i64, _>("amount")?.max(0) as u64,
            },
            _ => LedgerError::HoldClosed(hold.to_string()),
        });
    };
    let account: String = row.try_get("account_id")?;
    let held: i64 = row.try_get("amount")?;
    let c = batch.clients.entry(account.clone()).or_default();
    c.balance += held - total;
    c.held -= held;
    c.spent += total;
    c.requests += i64::from(!charges.is_empty());
    c.prompt_tokens += charges.iter().map(|c| c.prompt_tokens as i64).sum::<i64>();
    c.completion_tokens += charges
        .iter()
        .map(|c| c.completion_tokens as i64)
        .sum::<i64>();
    batch.add(ESCROW, -held);
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
        batch.providers.insert(providers[i].clone());
        batch.add(&providers[i], cost - fee);
        postings.push((&providers[i], cost - fee));
        let receipt = new_id("rcpt");
        batch.receipts.push([
            Value::Text(receipt.clone()),
            Value::Text(hold.to_string()),
            Value::Text(job_id.to_string()),
            Value::Int(i as i64),
            Value::Text(c.provider.clone()),
            Value::Text(c.model_sha256.clone()),
            Value::Int(c.prompt_tokens as i64),
            Value::Int(c.completion_tokens as i64),
            Value::Int(c.input_price as i64),
            Value::Int(c.output_price as i64),
            Value::Int(cost),
            Value::Int(fee),
            Value::Int(now),
            Value::OptText(c.receipt.clone()),
        ]);
        parts.push(receipt);
    }
    if fees != 0 {
        batch.add(FEES, fees);
        postings.push((FEES, fees));
    }
    let kind = if charges.is_empty() {
        "release"
    } else {
        "settle"
    };
    let receipt = batch.entry_with_id(entry, kind, Some(hold), &postings);
    Ok(Outcome::Settle(Settlement {
        receipt,
        cost: total as u64,
        fee: fees as u64,
        parts,
    }))
}
