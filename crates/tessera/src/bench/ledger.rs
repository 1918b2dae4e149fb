//! `tessera bench ledger`: settled requests per second, fully durable.
//!
//! Each "request" is what a paid API call does to the ledger: an escrow
//! hold, then a settlement paying one provider with the gateway's fee. Many
//! run at once, as they do in a busy gateway, so the writer's group commit
//! can share each disk sync. SQLite runs in WAL mode with `synchronous=FULL`;
//! PostgreSQL is a fresh server on loopback (Debian's package) with `fsync`
//! and `synchronous_commit` on. Every call returns only after its commit.

use std::time::Instant;

use clap::Args;
use tessera_ledger::{Charge, Hold, Ledger, Limits, MICRO};

use super::stats::percentile;

#[derive(Args)]
pub struct LedgerBench {
    /// Requests (hold + settle) per database.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// A PostgreSQL database to measure (its tables are created; use a
    /// throwaway one). Without it, builds with the `testing` feature (as
    /// `make bench` builds) start a throwaway server on loopback.
    #[arg(long)]
    pub postgres_url: Option<String>,
}

const ACCOUNTS: usize = 16;

async fn measure(ledger: &Ledger, b: &LedgerBench) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut accounts = Vec::new();
    for i in 0..ACCOUNTS {
        let name = format!("bench-{i}-{:08x}", getrandom::u32().unwrap_or_default());
        let (a, _) = ledger
            .create_account(&name, 1_000_000 * MICRO, Limits::default())
            .await?;
        accounts.push(a.id);
    }
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..b.concurrency {
        let (ledger, accounts, next, total) =
            (ledger.clone(), accounts.clone(), next.clone(), b.requests);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(latencies);
                }
                let t = Instant::now();
                let hold = match ledger
                    .hold(&accounts[i % ACCOUNTS], 50_000, "bench-gateway", None)
                    .await?
                {
                    Hold::New(id) => id,
                    other => anyhow::bail!("unexpected {other:?}"),
                };
                let charge = Charge {
                    provider: format!("bench-provider-{}", i % 8),
                    model_sha256: "00".repeat(32),
                    prompt_tokens: 100 + (i % 50) as u64,
                    completion_tokens: 200 + (i % 100) as u64,
                    input_price: 20,
                    output_price: 80,
                    receipt: None,
                };
                ledger.settle(&hold, "bench", vec![charge], 500).await?;
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
            }
        });
    }
    let mut latencies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        latencies.extend(r??);
    }
    let rate = b.requests as f64 / started.elapsed().as_secs_f64();
    let check = ledger.check().await?;
    anyhow::ensure!(
        check.ok() && check.open_holds == 0,
        "the books do not balance: {check:?}"
    );
    Ok((rate, latencies))
}

pub fn run(b: LedgerBench) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "tessera bench ledger: {} settled requests (hold + settle with fee) per database, {} in flight, full durability",
        b.requests, b.concurrency
    );
    println!(
        "  {:<34} {:>12} {:>12} {:>12}",
        "database", "settled/s", "p50 ms", "p99 ms"
    );
    let dir = tempfile::tempdir()?;
    let report = |label: &str, (rate, lat): (f64, Vec<f64>)| {
        println!(
            "  {label:<34} {rate:>12.0} {:>12.2} {:>12.2}",
            percentile(lat.clone(), 0.5),
            percentile(lat, 0.99)
        );
    };
    rt.block_on(async {
        let sqlite = Ledger::open_file(&dir.path().join("bench.db")).await?;
        report(
            "SQLite (WAL, synchronous=FULL)",
            measure(&sqlite, &b).await?,
        );
        anyhow::Ok(())
    })?;
    let postgres = |url: &str| {
        rt.block_on(async {
            let ledger = Ledger::open(url).await?;
            report(
                "PostgreSQL (fsync, sync commit)",
                measure(&ledger, &b).await?,
            );
            anyhow::Ok(())
        })
    };
    match &b.postgres_url {
        Some(url) => postgres(url)?,
        None => throwaway_postgres(postgres)?,
    }
    Ok(())
}

/// Measure on a PostgreSQL server started for the benchmark.
#[cfg(feature = "testing")]
fn throwaway_postgres(measure: impl Fn(&str) -> anyhow::Result<()>) -> anyhow::Result<()> {
    match tessera_ledger::pg::TempPostgres::start() {
        Ok(pg) => measure(&pg.url()),
        Err(e) => {
            println!("  PostgreSQL: not measured ({e})");
            Ok(())
        }
    }
}

/// Without the test harness there is no server to start.
#[cfg(not(feature = "testing"))]
fn throwaway_postgres(_: impl Fn(&str) -> anyhow::Result<()>) -> anyhow::Result<()> {
    println!("  PostgreSQL: not measured (pass --postgres-url, or build with `--features tessera/testing` as `make bench` does)");
    Ok(())
}
