//! The ledger's tables: one schema, valid SQL for SQLite and PostgreSQL.
//!
//! Migrations are numbered statements applied once each, recorded in
//! `ledger_migrations`; a ledger opened by a newer version simply has more.

use sqlx::{AnyPool, Row};

use crate::{now_ms, Result, ESCROW, FEES, FORFEITS, ISSUANCE};

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE accounts (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        key_hash TEXT UNIQUE,
        balance BIGINT NOT NULL DEFAULT 0,
        held BIGINT NOT NULL DEFAULT 0,
        spent BIGINT NOT NULL DEFAULT 0,
        spend_limit BIGINT,
        rate_limit BIGINT,
        requests BIGINT NOT NULL DEFAULT 0,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        created_ms BIGINT NOT NULL
    )",
    "CREATE TABLE entries (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        hold_id TEXT,
        created_ms BIGINT NOT NULL
    )",
    "CREATE TABLE postings (
        entry_id TEXT NOT NULL,
        account_id TEXT NOT NULL,
        amount BIGINT NOT NULL
    )",
    "CREATE INDEX postings_entry ON postings (entry_id)",
    "CREATE INDEX postings_account ON postings (account_id)",
    "CREATE TABLE holds (
        id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        amount BIGINT NOT NULL,
        state TEXT NOT NULL,
        gateway TEXT NOT NULL,
        idempotency_key TEXT,
        cost BIGINT,
        created_ms BIGINT NOT NULL,
        closed_ms BIGINT,
        UNIQUE (account_id, idempotency_key)
    )",
    "CREATE INDEX holds_open ON holds (gateway, state)",
    "CREATE TABLE receipts (
        id TEXT PRIMARY KEY,
        hold_id TEXT NOT NULL,
        job_id TEXT NOT NULL,
        part BIGINT NOT NULL,
        provider TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        input_price BIGINT NOT NULL,
        output_price BIGINT NOT NULL,
        cost BIGINT NOT NULL,
        fee BIGINT NOT NULL,
        created_ms BIGINT NOT NULL
    )",
    "CREATE INDEX receipts_provider ON receipts (provider)",
    // The provider's signed receipt, countersigned by the gateway (JSON).
    "ALTER TABLE receipts ADD COLUMN signed TEXT",
    // Refunds after a failed audit look requests up by job id.
    "CREATE INDEX receipts_job ON receipts (job_id)",
    // The audit status of the part (pending, passed, failed, not_audited).
    "ALTER TABLE receipts ADD COLUMN audit TEXT",
    // A settled request's answer (JSON, without its cost and receipt) and
    // its settlement entry, when the request carried an idempotency key: a
    // retry with the same key gets the same answer, charged once.
    "ALTER TABLE holds ADD COLUMN response TEXT",
    "ALTER TABLE holds ADD COLUMN receipt TEXT",
    // Each provider's standing with the auditors (audits passed and failed,
    // audits still to pass on watch, quarantine), shared by every gateway
    // on this ledger and kept across restarts.
    "CREATE TABLE standings (
        provider TEXT PRIMARY KEY,
        audits_passed BIGINT NOT NULL,
        audits_failed BIGINT NOT NULL,
        on_watch BIGINT NOT NULL,
        quarantined BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL
    )",
    "CREATE INDEX standings_updated ON standings (updated_ms)",
    // Requests each rate-limited key made per minute of the clock, across
    // every gateway on this ledger; gateways take them in batches (leases).
    "CREATE TABLE rate_windows (
        account TEXT NOT NULL,
        window_ms BIGINT NOT NULL,
        used BIGINT NOT NULL,
        PRIMARY KEY (account, window_ms)
    )",
];

/// Apply every migration not yet applied, and create the system accounts.
pub(crate) async fn migrate(pool: &AnyPool, postgres: bool) -> Result<()> {
    // Already up to date (the usual case): write nothing, take no lock.
    let applied = sqlx::query("SELECT COUNT(*) FROM ledger_migrations")
        .fetch_one(pool)
        .await
        .and_then(|r| r.try_get::<i64, _>(0));
    if applied.is_ok_and(|n| n as usize == MIGRATIONS.len()) {
        return Ok(());
    }
    let mut tx = crate::writer::begin(pool, postgres).await?;
    if postgres {
        // Two gateways starting together must not migrate at once.
        sqlx::query("SELECT pg_advisory_xact_lock(7447)")
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("CREATE TABLE IF NOT EXISTS ledger_migrations (version BIGINT PRIMARY KEY)")
        .execute(&mut *tx)
        .await?;
    let done: i64 = sqlx::query("SELECT COUNT(*) FROM ledger_migrations")
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done as usize) {
        sqlx::query(*sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO ledger_migrations (version) VALUES ($1)")
            .bind(i as i64 + 1)
            .execute(&mut *tx)
            .await?;
    }
    for id in [ISSUANCE, ESCROW, FEES, FORFEITS] {
        sqlx::query(
            "INSERT INTO accounts (id, name, kind, created_ms) VALUES ($1, $2, 'system', $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(id)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
