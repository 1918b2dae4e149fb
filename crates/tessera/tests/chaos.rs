//! Chaos: providers are killed with SIGKILL while streamed requests run
//! concurrently — restarted with the same key, or replaced by fresh
//! providers with new keys. Every request must end with a complete,
//! well-formed answer, charged usage × price (a continued answer: only its
//! proven parts), and afterwards the books balance, nothing left in escrow.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use util::{chat, Devnet};

const REQUESTS: usize = 200;
const CONCURRENCY: usize = 16;
const MAX_TOKENS: u64 = 24;

/// Default provider prices (micro-credits per prompt / generated token).
const INPUT_PRICE: u64 = 20;
const OUTPUT_PRICE: u64 = 80;

/// Check one streamed answer; returns its finish reason.
fn check_stream(text: &str, ignore_eos: bool) -> String {
    let events = util::sse_data(text);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "stream did not end with [DONE]; it ended with {:?}",
        &events[events.len().saturating_sub(3)..]
    );
    let mut finish = None;
    let mut usage = None;
    let mut cost = None;
    let mut providers = 0;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|_| panic!("bad chunk {e}"));
        assert!(v.get("error").is_none(), "error event: {v}");
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            assert!(finish.is_none(), "two finish reasons");
            finish = Some(f.to_string());
        }
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
        if let Some(c) = v["tessera"]["cost"].as_u64() {
            cost = Some(c);
        }
        if let Some(p) = v["tessera"]["providers"].as_array() {
            providers = providers.max(p.len());
        }
    }
    let finish = finish.expect("a finish reason");
    let usage = usage.expect("a usage chunk");
    let completion = usage["completion_tokens"].as_u64().unwrap();
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    // Every provider charges the default price. An answer served whole is
    // charged usage × price — or nothing, when its provider was killed
    // after its last token but before its proof. One continued after its
    // provider was killed is charged the prompt once and each token of its
    // proven parts once: the killed provider's tokens (no proof) are free.
    let full = prompt * INPUT_PRICE + completion * OUTPUT_PRICE;
    let cost = cost.expect("a cost");
    if providers <= 1 {
        assert!(
            cost == full || cost == 0,
            "the charge {cost} is neither usage × price ({full}) nor nothing"
        );
    } else {
        assert!(
            cost <= full && (cost == 0 || (full - cost).is_multiple_of(OUTPUT_PRICE)),
            "a continued answer charged {cost}, usage × price is {full}"
        );
    }
    match finish.as_str() {
        // Cut at max_tokens, never short of it.
        "length" => assert_eq!(completion, MAX_TOKENS),
        "stop" => assert!(
            !ignore_eos && completion <= MAX_TOKENS,
            "stop with ignore_eos or too long"
        ),
        other => panic!("unexpected finish reason {other}"),
    }
    finish
}

#[test]
fn every_request_completes_while_providers_are_killed_and_restarted() {
    let net = Arc::new(Devnet::start(4));
    let done = Arc::new(AtomicBool::new(false));
    let restarted: Arc<Mutex<Vec<Child>>> = Arc::default();
    let kills = Arc::new(AtomicUsize::new(0));

    // Every 3 s kill one provider (round robin) and start it again.
    let chaos = {
        let (net, done, restarted, kills) =
            (net.clone(), done.clone(), restarted.clone(), kills.clone());
        std::thread::spawn(move || {
            let mut pids: Vec<u32> = net.providers.iter().map(|(pid, _)| *pid).collect();
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(3));
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let k = i % pids.len();
                util::signal(pids[k], "-KILL");
                kills.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(500));
                let child = util::spawn_provider(&net.ticket, &net.provider_homes[k], 4);
                pids[k] = child.id();
                restarted.lock().unwrap().push(child);
                i += 1;
            }
        })
    };

    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (net, next) = (net.clone(), next.clone());
            std::thread::spawn(move || {
                let mut finishes = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= REQUESTS {
                        return finishes;
                    }
                    let ignore_eos = i % 2 == 0;
                    let body = chat(&format!("Tell me about the number {i}."), json!({
                        "max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": i, "ignore_eos": ignore_eos,
                        "stream": true, "stream_options": {"include_usage": true}
                    }));
                    let outcome = std::panic::catch_unwind(|| {
                        let resp = net.client().post(net.url("/v1/chat/completions")).json(&body).send().unwrap();
                        let status = resp.status().as_u16();
                        let text = resp.text().unwrap();
                        assert_eq!(status, 200, "request {i} failed: {text}");
                        check_stream(&text, ignore_eos)
                    });
                    // Keep going after a failure so the harness can clean up;
                    // the failure is reported at the end.
                    finishes.push(outcome.map_err(|e| {
                        e.downcast_ref::<String>().cloned().unwrap_or_else(|| "panic".into())
                    }));
                }
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.join().expect("worker thread"));
    }
    done.store(true, Ordering::Relaxed);
    chaos.join().unwrap();
    for mut c in restarted.lock().unwrap().drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {REQUESTS} requests failed; first: {}",
        failures.len(),
        failures[0]
    );
    assert_eq!(outcomes.len(), REQUESTS);
    assert!(
        kills.load(Ordering::Relaxed) >= 2,
        "the run was too short to kill anything"
    );
    books_balance(&net);
}

/// `tessera account check` on the devnet's ledger: every entry balances,
/// every balance is its postings, and no credit is left in escrow.
fn books_balance(net: &Devnet) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let check = util::tessera_json(net.home.path(), &["account", "check"]);
        let settled = check["open_holds"] == 0 && check["escrow"] == 0;
        if settled || std::time::Instant::now() > deadline {
            assert_eq!(check["unbalanced_entries"], 0, "{check}");
            assert_eq!(check["mismatched_accounts"], 0, "{check}");
            assert_eq!(check["total"], 0, "{check}");
            assert_eq!(check["open_holds"], 0, "a hold is still open: {check}");
            assert_eq!(check["escrow"], 0, "credits left in escrow: {check}");
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Providers come and go for good: every 4 s one of them is SIGKILLed and
/// a fresh provider (new home, new node key) joins instead. Requests keep
/// trying until the failover deadline while any provider is or becomes
/// available, so all of them complete.
#[test]
fn every_request_completes_while_providers_are_replaced_by_fresh_ones() {
    const CHURN_REQUESTS: usize = 60;
    let net = Arc::new(Devnet::start(3));
    let done = Arc::new(AtomicBool::new(false));
    let joiners: Arc<Mutex<Vec<(Child, tempfile::TempDir)>>> = Arc::default();
    let replaced = Arc::new(AtomicUsize::new(0));
    let churn = {
        let (net, done, joiners, replaced) =
            (net.clone(), done.clone(), joiners.clone(), replaced.clone());
        std::thread::spawn(move || {
            let mut pids: Vec<u32> = net.providers.iter().map(|(pid, _)| *pid).collect();
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(4));
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let k = i % pids.len();
                util::signal(pids[k], "-KILL");
                let home = tempfile::tempdir().unwrap();
                let child = util::spawn_provider(&net.ticket, home.path(), 4);
                pids[k] = child.id();
                joiners.lock().unwrap().push((child, home));
                replaced.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (net, next) = (net.clone(), next.clone());
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= CHURN_REQUESTS {
                        return outcomes;
                    }
                    let body = chat(&format!("Write a line about the number {i}."), json!({
                        "max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": i, "ignore_eos": true,
                        "stream": true, "stream_options": {"include_usage": true}
                    }));
                    let outcome = std::panic::catch_unwind(|| {
                        let resp = net.client().post(net.url("/v1/chat/completions")).json(&body).send().unwrap();
                        let status = resp.status().as_u16();
                        let text = resp.text().unwrap();
                        assert_eq!(status, 200, "request {i} failed: {text}");
                        check_stream(&text, true)
                    });
                    outcomes.push(outcome.map_err(|e| {
                        e.downcast_ref::<String>().cloned().unwrap_or_else(|| "panic".into())
                    }));
                }
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.join().expect("worker thread"));
    }
    done.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    let replaced = replaced.load(Ordering::Relaxed);
    books_balance(&net);
    for (mut c, _home) in joiners.lock().unwrap().drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert!(
        failures.is_empty(),
        "{} of {CHURN_REQUESTS} requests failed; first: {}",
        failures.len(),
        failures[0]
    );
    assert_eq!(outcomes.len(), CHURN_REQUESTS);
    assert!(replaced >= 2, "the run was too short to replace anything");
}
