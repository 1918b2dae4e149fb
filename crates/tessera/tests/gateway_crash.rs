//! The books survive a gateway killed mid-traffic: 500 concurrent paid
//! requests, SIGKILL, restart. Every entry balances, credits are conserved
//! to the micro-credit, no hold is left open, and retrying every request
//! with its Idempotency-Key charges each exactly once: an answer that was
//! charged is given again (also one whose response the crash cut off), one
//! that was not runs now. In the end every client got its answer, and what
//! was charged is exactly what was delivered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde_json::{json, Value};
use util::{chat, spawn_provider, tessera_json, Gateway, KillOnDrop};

const REQUESTS: usize = 500;

/// What a 200 answer said: its cost, whether it was a replay, its text.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    cost: u64,
    replayed: bool,
    text: String,
}

/// One request with its idempotency key: Ok(answer) on 200, Err(status or
/// transport error) otherwise.
fn paid(root: &str, key: &str, i: usize) -> Result<Answer, String> {
    let body = chat(
        &format!("Give me a word for the number {i}."),
        json!({"max_tokens": 6, "temperature": 0}),
    );
    let resp = util::client_for(key)
        .post(format!("{root}/v1/chat/completions"))
        .header("Idempotency-Key", format!("crash-test-{i}"))
        .json(&body)
        .send()
        .map_err(|e| format!("transport: {e}"))?;
    let status = resp.status().as_u16();
    let v: Value = resp.json().map_err(|e| format!("{status}: {e}"))?;
    if status == 200 {
        Ok(Answer {
            cost: v["tessera"]["cost"].as_u64().expect("cost"),
            replayed: v["tessera"]["replayed"] == true,
            text: v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
    } else {
        Err(format!("{status} {}", v["error"]["code"]))
    }
}

#[test]
fn a_gateway_killed_mid_traffic_loses_and_doubles_no_credit() {
    let mut gw = Gateway::start(&[]);
    let homes = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let _providers = KillOnDrop(
        homes
            .iter()
            .map(|h| spawn_provider(&gw.ticket, h.path(), 4))
            .collect(),
    );
    assert!(util::wait_listed(
        &gw.url("/health"),
        2,
        Duration::from_secs(90)
    ));
    let home = gw.home.path().to_path_buf();
    let start = tessera_json(&home, &["account", "show", "demo"]);
    let initial = start["balance"].as_i64().unwrap();
    assert_eq!(start["spent"], 0);

    // 500 requests at once; the gateway dies while most are in flight.
    let root = gw.url("");
    let barrier = Arc::new(Barrier::new(REQUESTS + 1));
    let threads: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let (root, key, barrier) = (root.clone(), gw.key.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (i, paid(&root, &key, i))
            })
        })
        .collect();
    barrier.wait();
    // Kill it once some requests are settled and most are still in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while tessera_json(&home, &["account", "show", "demo"])["usage"]["requests"]
        .as_u64()
        .unwrap_or(0)
        < 20
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no request settled in 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    gw.crash_and_restart();
    let first: HashMap<usize, Result<Answer, String>> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let done = first.values().filter(|r| r.is_ok()).count();
    assert!(done > 0, "nothing completed before the kill");
    assert!(done < REQUESTS, "the kill came after everything finished");

    // After the restart: books balance, nothing is held, nothing was lost.
    let check = tessera_json(&home, &["account", "check"]);
    assert_eq!(check["unbalanced_entries"], 0, "{check}");
    assert_eq!(check["mismatched_accounts"], 0, "{check}");
    assert_eq!(check["total"], 0, "{check}");
    assert_eq!(check["open_holds"], 0, "a hold was left dangling: {check}");
    assert_eq!(check["escrow"], 0, "{check}");
    let demo = tessera_json(&home, &["account", "show", "demo"]);
    let spent = demo["spent"].as_i64().unwrap();
    assert_eq!(demo["held"], 0);
    assert_eq!(
        demo["balance"].as_i64().unwrap() + spent,
        initial,
        "credits not conserved"
    );
    let delivered_before: u64 = first
        .values()
        .filter_map(|r| r.as_ref().ok())
        .map(|a| a.cost)
        .sum();
    // Every answer a client received was charged; anything charged beyond
    // that is an answer the crash kept from its client (given back below).
    assert!(
        spent as u64 >= delivered_before,
        "answers the clients received were not all charged"
    );

    // Retry everything with the same keys: a charged answer comes again
    // (the same answer, not charged again), the rest run now.
    assert!(util::wait_listed(
        &gw.url("/health"),
        2,
        Duration::from_secs(60)
    ));
    let root = gw.url("");
    let retries: Vec<(usize, Result<Answer, String>)> = std::thread::scope(|s| {
        let chunks: Vec<Vec<usize>> = (0..16)
            .map(|t| (0..REQUESTS).filter(|i| i % 16 == t).collect())
            .collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|ids| {
                let (root, key) = (&root, &gw.key);
                s.spawn(move || {
                    ids.into_iter()
                        .map(|i| (i, paid(root, key, i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut retried_cost = 0;
    let mut delivered = 0;
    let mut cut_off = 0;
    for (i, r) in &retries {
        let again = r
            .as_ref()
            .unwrap_or_else(|e| panic!("request {i} got no answer on retry: {e}"));
        match &first[i] {
            Ok(before) => {
                assert!(again.replayed, "request {i} ran twice");
                assert_eq!(
                    again,
                    &Answer {
                        replayed: true,
                        ..before.clone()
                    },
                    "request {i}: not the same answer"
                );
            }
            // Charged before the crash, but its answer never reached the
            // client: it gets it now, for the price it already paid.
            Err(_) if again.replayed => cut_off += 1,
            Err(_) => retried_cost += again.cost,
        }
        delivered += again.cost;
    }
    let demo = tessera_json(&home, &["account", "show", "demo"]);
    assert_eq!(
        demo["usage"]["requests"].as_u64(),
        Some(REQUESTS as u64),
        "every request charged exactly once"
    );
    assert_eq!(
        demo["spent"].as_i64().unwrap(),
        spent + retried_cost as i64,
        "the retries charged only the requests that had not been charged"
    );
    assert_eq!(
        demo["spent"].as_u64(),
        Some(delivered),
        "charged = delivered, to the micro-credit"
    );
    eprintln!(
        "{done} answered before the kill, {cut_off} charged but cut off by it (given on retry)"
    );
    let check = tessera_json(&home, &["account", "check"]);
    assert_eq!(
        (check["total"].as_i64(), check["open_holds"].as_i64()),
        (Some(0), Some(0)),
        "{check}"
    );
}
