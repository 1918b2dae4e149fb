//! The ledger's rules, each checked on a SQLite file and on a real
//! PostgreSQL server started on loopback for the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tessera_ledger::pg::TempPostgres;
use tessera_ledger::{Charge, Hold, Ledger, LedgerError, Limits, MICRO};

/// What keeps a test's database alive: its SQLite folder or its own
/// PostgreSQL server (stopped when dropped, after the ledger).
#[allow(dead_code)]
enum Store {
    Sqlite(tempfile::TempDir),
    Postgres(TempPostgres),
}

/// A fresh ledger of each kind, with its URL.
async fn ledgers() -> Vec<(Ledger, String, Store)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let sqlite = Ledger::open(&sqlite_url).await.unwrap();
    let pg = TempPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    let pg_url = pg.url();
    let postgres = Ledger::open(&pg_url).await.unwrap();
    vec![
        (sqlite, sqlite_url, Store::Sqlite(dir)),
        (postgres, pg_url, Store::Postgres(pg)),
    ]
}

fn charge(provider: &str, prompt: u64, completion: u64, input: u64, output: u64) -> Charge {
    Charge {
        provider: provider.into(),
        model_sha256: "ab".repeat(32),
        prompt_tokens: prompt,
        completion_tokens: completion,
        input_price: input,
        output_price: output,
        receipt: None,
    }
}

fn new_hold(h: Hold) -> String {
    match h {
        Hold::New(id) => id,
        other => panic!("expected a new hold, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn charges_are_tokens_times_price_and_the_fee_is_split() {
    for (ledger, url, _store) in ledgers().await {
        let (acct, key) = ledger
            .create_account("alice", 10 * MICRO, Limits::default())
            .await
            .unwrap();
        assert_eq!(acct.balance, 10 * MICRO as i64, "{url}");
        assert_eq!(
            ledger.account_by_key(&key).await.unwrap().unwrap().id,
            acct.id
        );
        assert!(ledger.account_by_key("tsk_wrong").await.unwrap().is_none());

        let hold = new_hold(ledger.hold(&acct.id, 50_000, "gw1", None).await.unwrap());
        let during = ledger.account(&acct.id).await.unwrap().unwrap();
        assert_eq!(
            (during.balance, during.held),
            (10 * MICRO as i64 - 50_000, 50_000)
        );
        // Two parts (an answer continued on a second provider).
        let parts = vec![
            charge("p1", 120, 30, 100, 300),
            charge("p2", 0, 40, 100, 250),
        ];
        let s = ledger.settle(&hold, "job-1", parts, 500).await.unwrap();
        let p1_cost = 120 * 100 + 30 * 300;
        let p2_cost = 40 * 250;
        assert_eq!(s.cost, p1_cost + p2_cost, "{url}");
        assert_eq!(s.fee, p1_cost * 5 / 100 + p2_cost * 5 / 100);
        assert_eq!(s.parts.len(), 2);
        let after = ledger.account(&acct.id).await.unwrap().unwrap();
        assert_eq!(after.balance, 10 * MICRO as i64 - s.cost as i64);
        assert_eq!((after.held, after.spent), (0, s.cost as i64));
        assert_eq!(
            (after.prompt_tokens, after.completion_tokens, after.requests),
            (120, 70, 1)
        );
        let p1 = ledger.account("provider:p1").await.unwrap().unwrap();
        assert_eq!(p1.balance, (p1_cost - p1_cost * 5 / 100) as i64);
        let fees = ledger.account(tessera_ledger::FEES).await.unwrap().unwrap();
        assert_eq!(fees.balance, s.fee as i64);
        let receipts = ledger.provider_receipts("p2").await.unwrap();
        assert_eq!(receipts.len(), 1);
        assert_eq!(receipts[0]["cost"], p2_cost);
        // The dashboard's totals: revenue is what providers and fees got.
        let t = ledger.totals().await.unwrap();
        assert_eq!(
            (t.revenue, t.fees, t.escrow, t.settled, t.refunded),
            (s.cost as i64, s.fee as i64, 0, 1, 0),
            "{url}"
        );
        assert_eq!(t.provider_earnings, (s.cost - s.fee) as i64);
        let mut earned = ledger.provider_earnings().await.unwrap();
        earned.sort();
        assert_eq!(
            earned,
            vec![
                ("p1".to_string(), (p1_cost - p1_cost * 5 / 100) as i64),
                ("p2".to_string(), (p2_cost - p2_cost * 5 / 100) as i64)
            ]
        );

        // Settling again, or charging more than was held, is refused.
        assert!(matches!(
            ledger.settle(&hold, "job-1", vec![], 500).await,
            Err(LedgerError::HoldClosed(_))
        ));
        let h2 = new_hold(ledger.hold(&acct.id, 1_000, "gw1", None).await.unwrap());
        assert!(matches!(
            ledger
                .settle(&h2, "job-2", vec![charge("p1", 10, 10, 100, 100)], 0)
                .await,
            Err(LedgerError::OverHold { .. })
        ));
        // A release returns everything.
        let r = ledger.settle(&h2, "job-2", vec![], 0).await.unwrap();
        assert_eq!(r.cost, 0);
        assert!(
            matches!(
                ledger.refund(&r.receipt).await,
                Err(LedgerError::NotRefundable(_))
            ),
            "a release is not refundable"
        );

        // A refund returns the whole cost and takes back earnings and fee.
        let back = ledger.refund(&s.receipt).await.unwrap();
        assert_eq!(back.amount, s.cost, "{url}");
        let refunded = ledger.account(&acct.id).await.unwrap().unwrap();
        assert_eq!((refunded.balance, refunded.spent), (10 * MICRO as i64, 0));
        let p1 = ledger.account("provider:p1").await.unwrap().unwrap();
        assert_eq!(p1.balance, 0);
        let fees = ledger.account(tessera_ledger::FEES).await.unwrap().unwrap();
        assert_eq!(fees.balance, 0);
        assert!(
            matches!(
                ledger.refund(&s.receipt).await,
                Err(LedgerError::NotRefundable(_))
            ),
            "refunded twice"
        );
        let check = ledger.check().await.unwrap();
        assert!(check.ok(), "{url}: {check:?}");
        assert_eq!(check.issued, 10 * MICRO as i64);
        let t = ledger.totals().await.unwrap();
        assert_eq!((t.revenue, t.settled, t.refunded), (0, 0, 1), "{url}");

        // A quarantined provider forfeits its bond: its whole balance.
        let h3 = new_hold(ledger.hold(&acct.id, 100_000, "gw1", None).await.unwrap());
        let s3 = ledger
            .settle(&h3, "job-3", vec![charge("p2", 10, 10, 100, 100)], 500)
            .await
            .unwrap();
        let earned = (s3.cost - s3.fee) as i64;
        ledger.set_audit("job-3", "p2", "failed").await.unwrap();
        let receipts = ledger.provider_receipts("p2").await.unwrap();
        assert_eq!(receipts[0]["audit"], "failed", "{url}");
        let f = ledger.forfeit("p2").await.unwrap();
        assert_eq!(f.amount as i64, earned, "{url}");
        let p2 = ledger.account("provider:p2").await.unwrap().unwrap();
        assert_eq!(p2.balance, 0);
        assert_eq!(ledger.totals().await.unwrap().forfeited, earned);
        assert_eq!(
            ledger.forfeit("p2").await.unwrap().amount,
            0,
            "nothing left"
        );
        let check = ledger.check().await.unwrap();
        assert!(check.ok(), "{url}: {check:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn short_balances_and_spend_limits_refuse_the_hold_and_write_nothing() {
    for (ledger, url, _store) in ledgers().await {
        let (poor, _) = ledger
            .create_account("poor", 1_000, Limits::default())
            .await
            .unwrap();
        let before = ledger.check().await.unwrap();
        match ledger.hold(&poor.id, 1_001, "gw", None).await {
            Err(LedgerError::Insufficient { needed, available }) => {
                assert_eq!((needed, available), (1_001, 1_000), "{url}")
            }
            other => panic!("{url}: {other:?}"),
        }
        assert_eq!(
            ledger.check().await.unwrap(),
            before,
            "{url}: a refused hold wrote"
        );
        let limits = Limits {
            spend_limit: Some(5_000),
            rate_limit: None,
        };
        let (agent, _) = ledger.create_account("agent", MICRO, limits).await.unwrap();
        let h = new_hold(ledger.hold(&agent.id, 4_000, "gw", None).await.unwrap());
        assert!(matches!(
            ledger.hold(&agent.id, 1_001, "gw", None).await,
            Err(LedgerError::SpendLimit {
                limit: 5_000,
                used: 4_000
            })
        ));
        ledger
            .settle(&h, "j", vec![charge("p", 10, 10, 100, 100)], 0)
            .await
            .unwrap();
        // 2,000 spent: 3,000 left under the limit.
        new_hold(ledger.hold(&agent.id, 3_000, "gw", None).await.unwrap());
        assert!(ledger.hold(&agent.id, 1, "gw", None).await.is_err());
        assert!(matches!(
            ledger.hold("acct_nobody", 1, "gw", None).await,
            Err(LedgerError::NoAccount(_))
        ));
        assert!(matches!(
            ledger.create_account("agent", 1, Limits::default()).await,
            Err(LedgerError::NameTaken(_))
        ));
        assert!(ledger.check().await.unwrap().ok());
    }
}

/// A request whose route turned out dearer than its hold raises it: the
/// difference comes from the balance (or the raise is refused and nothing
/// changes), the settlement charges against the raised amount and returns
/// the rest, and a closed hold cannot be raised.
#[tokio::test(flavor = "multi_thread")]
async fn a_hold_is_raised_only_as_far_as_the_account_allows() {
    for (ledger, url, _store) in ledgers().await {
        let limits = Limits {
            spend_limit: Some(9_000),
            rate_limit: None,
        };
        let (acct, _) = ledger.create_account("bob", 10_000, limits).await.unwrap();
        let h = new_hold(ledger.hold(&acct.id, 2_000, "gw", None).await.unwrap());
        ledger.raise(&h, 5_000).await.unwrap();
        let a = ledger.account(&acct.id).await.unwrap().unwrap();
        assert_eq!((a.balance, a.held), (5_000, 5_000), "{url}");
        // Never lowered.
        ledger.raise(&h, 1_000).await.unwrap();
        assert_eq!(ledger.account(&acct.id).await.unwrap().unwrap().held, 5_000);
        // The spending limit (9,000) and then the balance refuse more, and
        // a refused raise changes nothing.
        let before = ledger.check().await.unwrap();
        assert!(
            matches!(
                ledger.raise(&h, 9_500).await,
                Err(LedgerError::SpendLimit {
                    limit: 9_000,
                    used: 5_000
                })
            ),
            "{url}"
        );
        let other = new_hold(ledger.hold(&acct.id, 2_000, "gw", None).await.unwrap());
        ledger.settle(&other, "j0", vec![], 0).await.unwrap();
        assert_eq!(ledger.check().await.unwrap().open_held, before.open_held);
        // Charges above the original hold but within the raised one settle.
        let s = ledger
            .settle(&h, "j1", vec![charge("p", 10, 40, 100, 100)], 0)
            .await
            .unwrap();
        assert_eq!(s.cost, 5_000, "{url}");
        let a = ledger.account(&acct.id).await.unwrap().unwrap();
        assert_eq!((a.balance, a.held, a.spent), (5_000, 0, 5_000), "{url}");
        assert!(
            matches!(
                ledger.raise(&h, 6_000).await,
                Err(LedgerError::HoldClosed(_))
            ),
            "{url}"
        );
        let poor = new_hold(ledger.hold(&acct.id, 1_000, "gw", None).await.unwrap());
        assert!(
            matches!(
                ledger.raise(&poor, 6_000).await,
                Err(LedgerError::Insufficient { .. }) | Err(LedgerError::SpendLimit { .. })
            ),
            "{url}"
        );
        let check = ledger.check().await.unwrap();
        assert!(check.ok(), "{url}: {check:?}");
        assert_eq!(check.open_held, 1_000, "{url}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_never_charges_twice_and_crashed_holds_are_released() {
    for (ledger, url, _store) in ledgers().await {
        let (a, _) = ledger
            .create_account("a", MICRO, Limits::default())
            .await
            .unwrap();
        let h = new_hold(
            ledger
                .hold(&a.id, 10_000, "gw", Some("req-1"))
                .await
                .unwrap(),
        );
        assert_eq!(
            ledger
                .hold(&a.id, 10_000, "gw", Some("req-1"))
                .await
                .unwrap(),
            Hold::Duplicate {
                hold: h.clone(),
                cost: None,
                response: None,
                receipt: None,
            }
        );
        // The answer is stored with the charge, for a retry to replay.
        let s = ledger
            .settle_with_response(
                &h,
                "j",
                vec![charge("p", 5, 5, 100, 100)],
                0,
                Some("{\"answer\":42}".into()),
            )
            .await
            .unwrap();
        assert_eq!(
            ledger
                .hold(&a.id, 10_000, "gw", Some("req-1"))
                .await
                .unwrap(),
            Hold::Duplicate {
                hold: h,
                cost: Some(s.cost),
                response: Some("{\"answer\":42}".into()),
                receipt: Some(s.receipt.clone()),
            }
        );
        assert_eq!(ledger.account(&a.id).await.unwrap().unwrap().spent, 1_000);
        // A released attempt (nothing charged) frees its key for a retry.
        let failed = new_hold(
            ledger
                .hold(&a.id, 2_000, "gw", Some("req-2"))
                .await
                .unwrap(),
        );
        ledger.settle(&failed, "j", vec![], 0).await.unwrap();
        let retry = new_hold(
            ledger
                .hold(&a.id, 2_000, "gw", Some("req-2"))
                .await
                .unwrap(),
        );
        assert_ne!(retry, failed);
        ledger.settle(&retry, "j", vec![], 0).await.unwrap();

        // Holds of a gateway that crashed are released when it restarts;
        // another gateway's are left alone.
        new_hold(ledger.hold(&a.id, 7_000, "gw-crashed", None).await.unwrap());
        new_hold(ledger.hold(&a.id, 7_000, "gw-crashed", None).await.unwrap());
        let other = new_hold(ledger.hold(&a.id, 3_000, "gw-other", None).await.unwrap());
        drop(ledger);
        let reopened = Ledger::open(&url).await.unwrap();
        assert_eq!(reopened.release_open_holds("gw-crashed").await.unwrap(), 2);
        let check = reopened.check().await.unwrap();
        assert_eq!((check.open_holds, check.open_held), (1, 3_000), "{url}");
        assert!(check.ok(), "{url}: {check:?}");
        reopened.settle(&other, "j", vec![], 0).await.unwrap();
        let acct = reopened.account(&a.id).await.unwrap().unwrap();
        assert_eq!((acct.balance, acct.held), (MICRO as i64 - 1_000, 0));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_settling_at_once_lose_no_update() {
    for (first, url, _store) in ledgers().await {
        let second = Ledger::open(&url).await.unwrap();
        let mut accounts = vec![];
        for i in 0..4 {
            accounts.push(
                first
                    .create_account(&format!("c{i}"), 10 * MICRO, Limits::default())
                    .await
                    .unwrap()
                    .0
                    .id,
            );
        }
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..400u64 {
            let ledger = if n % 2 == 0 {
                first.clone()
            } else {
                second.clone()
            };
            let account = accounts[n as usize % 4].clone();
            tasks.spawn(async move {
                let gw = if n % 2 == 0 { "gw-a" } else { "gw-b" };
                let h = new_hold(ledger.hold(&account, 20_000, gw, None).await.unwrap());
                let c = charge(&format!("p{}", n % 3), 10 + n % 7, 20 + n % 5, 100, 200);
                let cost = c.cost();
                let s = ledger.settle(&h, "j", vec![c], 1_000).await.unwrap();
                assert_eq!(s.cost, cost);
                cost
            });
        }
        let mut total = 0;
        while let Some(r) = tasks.join_next().await {
            total += r.unwrap();
        }
        let check = first.check().await.unwrap();
        assert!(check.ok(), "{url}: {check:?}");
        assert_eq!(check.open_holds, 0);
        let mut spent = 0;
        for a in &accounts {
            spent += first.account(a).await.unwrap().unwrap().spent;
        }
        assert_eq!(spent, total as i64, "{url}: charges lost or doubled");
        let mut earned = 0;
        for p in ["p0", "p1", "p2"] {
            earned += first
                .account(&format!("provider:{p}"))
                .await
                .unwrap()
                .unwrap()
                .balance;
        }
        let fees = first
            .account(tessera_ledger::FEES)
            .await
            .unwrap()
            .unwrap()
            .balance;
        assert_eq!(earned + fees, total as i64, "{url}");
    }
}

/// A job's lifecycle is sequenced by the writer: a failed audit's verdict
/// that arrives before the answer is settled waits in the ledger and
/// refunds it right after the settlement; a forfeit asked for meanwhile
/// waits for that refund; a verdict on a request released without charge
/// refunds nothing; a passed verdict only marks the receipt.
#[tokio::test(flavor = "multi_thread")]
async fn an_audit_verdict_before_settlement_waits_for_it_and_the_forfeit_follows() {
    use tessera_core::AuditStatus;
    for (ledger, url, _store) in ledgers().await {
        let (client, _) = ledger
            .create_account("carol", 10 * MICRO, Limits::default())
            .await
            .unwrap();
        let provider = "ab".repeat(32);
        // Earlier honest work left the provider a balance (its bond).
        let earlier = new_hold(ledger.hold(&client.id, 100_000, "gw", None).await.unwrap());
        ledger
            .settle(
                &earlier,
                "job-0",
                vec![charge(&provider, 10, 100, 100, 900)],
                0,
            )
            .await
            .unwrap();
        let bond = ledger
            .account(&format!("provider:{provider}"))
            .await
            .unwrap()
            .unwrap()
            .balance;
        assert!(bond > 0, "{url}");

        // The verdict and the forfeit come first…
        let hold = new_hold(ledger.hold(&client.id, 50_000, "gw", None).await.unwrap());
        let verdict = {
            let (l, p) = (ledger.clone(), provider.clone());
            tokio::spawn(async move { l.audit_verdict("job-1", &p, AuditStatus::Failed).await })
        };
        let forfeit = {
            let (l, p) = (ledger.clone(), provider.clone());
            tokio::spawn(async move {
                // Queued after the verdict.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                l.forfeit(&p).await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !verdict.is_finished(),
            "the verdict waits for the settlement ({url})"
        );
        assert!(
            !forfeit.is_finished(),
            "the forfeit waits for the refund ({url})"
        );
        // …then the answer is settled.
        let settled = ledger
            .settle(
                &hold,
                "job-1",
                vec![charge(&provider, 10, 20, 100, 900)],
                500,
            )
            .await
            .unwrap();
        let refund = verdict.await.unwrap().unwrap().expect("a refund");
        assert_eq!(refund.amount, settled.cost, "{url}");
        let forfeited = forfeit.await.unwrap().unwrap();
        // The forfeit took the bond as it stood after the refund took back
        // this answer's earnings.
        assert_eq!(forfeited.amount, bond as u64, "{url}");
        let c = ledger.account(&client.id).await.unwrap().unwrap();
        assert_eq!(c.held, 0);
        let receipts = ledger.provider_receipts(&provider).await.unwrap();
        let audit_of = |job: &str| {
            receipts
                .iter()
                .find(|r| r["job"] == job)
                .map(|r| r["audit"].clone())
        };
        assert_eq!(audit_of("job-1"), Some("failed".into()), "{url}");
        assert!(ledger.check().await.unwrap().ok(), "{url}");

        // Released without a charge: a verdict refunds nothing.
        let released = new_hold(ledger.hold(&client.id, 1_000, "gw", None).await.unwrap());
        ledger.settle(&released, "job-2", vec![], 0).await.unwrap();
        let none = ledger
            .audit_verdict("job-2", &provider, AuditStatus::Failed)
            .await
            .unwrap();
        assert!(none.is_none(), "{url}");

        // Passed: only the mark.
        let h = new_hold(ledger.hold(&client.id, 50_000, "gw", None).await.unwrap());
        ledger
            .settle(&h, "job-3", vec![charge(&provider, 1, 1, 100, 900)], 0)
            .await
            .unwrap();
        let none = ledger
            .audit_verdict("job-3", &provider, AuditStatus::Passed)
            .await
            .unwrap();
        assert!(none.is_none());
        let receipts = ledger.provider_receipts(&provider).await.unwrap();
        let job3 = receipts.iter().find(|r| r["job"] == "job-3").unwrap();
        assert_eq!(job3["audit"], "passed", "{url}");
        assert!(ledger.check().await.unwrap().ok(), "{url}");
    }
}

/// Providers' standings outlive a gateway and are shared: a save keeps the
/// worst of what is stored and what is saved (a quarantine is never
/// undone, counts never go down), a second ledger handle on the same
/// database reads it, and `standings_since` returns only later changes.
#[tokio::test(flavor = "multi_thread")]
async fn standings_keep_the_worst_and_are_shared() {
    use tessera_ledger::Standing;
    for (ledger, url, _store) in ledgers().await {
        let node = "cd".repeat(32);
        let caught = Standing {
            provider: node.clone(),
            audits_passed: 5,
            audits_failed: 2,
            on_watch: 10,
            quarantined: true,
            updated_ms: 0,
        };
        ledger.save_standing(&caught).await.unwrap();
        // Another gateway that saw less saves after it.
        let other = Ledger::open(&url).await.unwrap();
        let naive = Standing {
            provider: node.clone(),
            audits_passed: 1,
            audits_failed: 0,
            on_watch: 0,
            quarantined: false,
            updated_ms: 0,
        };
        other.save_standing(&naive).await.unwrap();
        let all = other.standings_since(0).await.unwrap();
        assert_eq!(all.len(), 1, "{url}");
        let s = &all[0];
        assert!(s.quarantined, "{url}: a quarantine was undone");
        assert_eq!((s.audits_passed, s.audits_failed), (5, 2), "{url}");
        assert!(s.updated_ms > 0);
        assert!(other
            .standings_since(s.updated_ms + 1)
            .await
            .unwrap()
            .is_empty());
    }
}

/// A slash takes at most its amount from the provider's account (never
/// below zero) to `system:forfeits`, and the books still balance.
#[tokio::test(flavor = "multi_thread")]
async fn a_slash_takes_at_most_its_amount_and_never_below_zero() {
    for (ledger, url, _store) in ledgers().await {
        let (client, _) = ledger
            .create_account("dave", 10 * MICRO, Limits::default())
            .await
            .unwrap();
        let provider = "ef".repeat(32);
        let hold = new_hold(ledger.hold(&client.id, 100_000, "gw", None).await.unwrap());
        ledger
            .settle(
                &hold,
                "job-0",
                vec![charge(&provider, 10, 100, 100, 900)],
                0,
            )
            .await
            .unwrap();
        let balance = |l: Ledger| async move {
            l.account(&format!("provider:{}", "ef".repeat(32)))
                .await
                .unwrap()
                .unwrap()
                .balance
        };
        let before = balance(ledger.clone()).await;
        assert_eq!(before, 91_000, "{url}");
        let s = ledger.slash(&provider, 1_000).await.unwrap();
        assert_eq!(s.amount, 1_000, "{url}");
        assert_eq!(balance(ledger.clone()).await, before - 1_000, "{url}");
        // More than it holds: it is emptied, not overdrawn.
        let s = ledger.slash(&provider, 10 * MICRO).await.unwrap();
        assert_eq!(s.amount as i64, before - 1_000, "{url}");
        assert_eq!(balance(ledger.clone()).await, 0, "{url}");
        assert_eq!(ledger.slash(&provider, 5).await.unwrap().amount, 0, "{url}");
        let check = ledger.check().await.unwrap();
        assert_eq!(check.unbalanced_entries, 0, "{url}");
        assert_eq!(check.mismatched_accounts, 0, "{url}");
        assert_eq!(check.total, 0, "{url}");
        assert_eq!(ledger.totals().await.unwrap().forfeited, before, "{url}");
    }
}

/// A new ledger file holds key hashes and everyone's money: only its owner
/// may read it, from the moment it exists, whatever the umask.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_new_sqlite_ledger_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let ledger = Ledger::open_file(&path).await.unwrap();
    ledger
        .create_account("a", MICRO, Limits::default())
        .await
        .unwrap();
    for name in ["ledger.db", "ledger.db-wal", "ledger.db-shm"] {
        let p = dir.path().join(name);
        if let Ok(meta) = std::fs::metadata(&p) {
            assert_eq!(
                meta.permissions().mode() & 0o077,
                0,
                "{name} is readable by others"
            );
        }
    }
    assert!(path.exists());
}

/// Rate windows: gateways taking a key's requests at once, in batches,
/// never get more than its limit in a minute, on both stores; a new minute
/// starts afresh.
#[tokio::test(flavor = "multi_thread")]
async fn rate_leases_never_grant_beyond_the_limit() {
    for (ledger, url, _store) in ledgers().await {
        let window = 1_000 * 60_000;
        let takes: Vec<_> = (0..8)
            .map(|_| {
                let ledger = ledger.clone();
                tokio::spawn(async move { ledger.take_rate("acct", window, 3, 10).await })
            })
            .collect();
        let mut granted = 0;
        for t in takes {
            granted += t.await.unwrap().unwrap();
        }
        assert_eq!(granted, 10, "{url}: all ten and no more");
        assert_eq!(ledger.take_rate("acct", window, 3, 10).await.unwrap(), 0);
        assert_eq!(
            ledger
                .take_rate("acct", window + 60_000, 3, 10)
                .await
                .unwrap(),
            3,
            "{url}: the next minute"
        );
    }
}
