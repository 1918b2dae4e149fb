//! Cheating providers are caught: for each misbehaviour mode, a devnet whose
//! gateway audits (`--audit`) with one honest provider gets a cheating one;
//! the cheater's answers fail their audits, their clients are refunded, the
//! second failure quarantines it (never routed to again), and the honest
//! provider keeps serving. Protocol cheats (no proof, a bad token, past
//! max_tokens, silence, a reset) are never paid nor charged, and a client
//! that leaves mid-answer pays for what the provider proved. Needs the `adversary` feature (test builds only;
//! `make test` turns it on).

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "adversary")]

mod util;

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use util::{chat, Devnet, KillOnDrop};

/// Poll `GET /v1/jobs/{id}` until its audit is final.
fn verdict(net: &Devnet, id: &str) -> Value {
    util::final_audit(&net.client(), &net.url(&format!("/v1/jobs/{id}")))
}

/// The status as the operator sees it (audit figures are not public).
fn status(net: &Devnet) -> Value {
    net.operator_status()
}

fn spent(net: &Devnet) -> u64 {
    let (_, v) = {
        let resp = net.client().get(net.url("/v1/account")).send().unwrap();
        ((), resp.json::<Value>().unwrap())
    };
    v["spent"]
        .as_u64()
        .unwrap_or_else(|| panic!("no spent in {v}"))
}

/// Start a cheating provider; returns it and its node id once listed.
fn cheater(net: &Devnet, home: &std::path::Path, extra: &[&str]) -> (KillOnDrop, String) {
    let child: Child = util::spawn_provider_with(&net.ticket, home, 2, extra);
    let guard = KillOnDrop(vec![child]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let node = loop {
        if let Some(n) = std::fs::read(home.join("provider.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["node"].as_str().map(str::to_string))
        {
            if net.listed().contains(&n) {
                break n;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the cheating provider did not join"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    (guard, node)
}

fn ask(net: &Devnet, only: Option<&str>, seed: u64) -> (u16, Value) {
    let mut extra = json!({"max_tokens": 40, "temperature": 0.8, "seed": seed});
    if let Some(node) = only {
        extra["provider"] = json!({"only": [node], "allow_fallbacks": false});
    }
    net.post(
        "/v1/chat/completions",
        &chat(
            "Write a long story about a dragon who learns to bake bread.",
            extra,
        ),
    )
}

#[test]
fn every_kind_of_cheating_is_caught_refunded_and_quarantined() {
    let model = util::model_path();
    let files = tempfile::tempdir().unwrap();
    let skipped = files.path().join("skipped.gguf");
    tessera_models::gguf::skip_layers(&model, &skipped, &[15]).unwrap();
    let substitute = files.path().join("substitute.gguf");
    tessera_models::gguf::reverse_layers(&model, &substitute).unwrap();
    let requantized = files.path().join("q4_0.gguf");
    tessera_llama::requantize(&model, &requantized, tessera_llama::Quantization::Q4_0, 2).unwrap();
    let path = |p: &PathBuf| p.display().to_string();
    let modes: Vec<(&str, Vec<String>)> = vec![
        ("garbage", vec!["--misbehave".into(), "garbage".into()]),
        (
            "forged commitments",
            vec!["--misbehave".into(), "forged-commitments".into()],
        ),
        (
            "early stop",
            vec!["--misbehave".into(), "early-stop".into()],
        ),
        (
            "inflated usage",
            vec!["--misbehave".into(), "inflated-usage".into()],
        ),
        (
            "skipped layers",
            vec!["--misbehave-model".into(), path(&skipped)],
        ),
        (
            "substituted model",
            vec!["--misbehave-model".into(), path(&substitute)],
        ),
        (
            "requantized model",
            vec!["--misbehave-model".into(), path(&requantized)],
        ),
    ];

    // No canaries: each cheater meets exactly the two client requests below
    // (a newcomer's first canary would otherwise catch it first).
    let net = Devnet::start_env(1, &["--audit"], &[("TESSERA_CANARY_INTERVAL", "0")]);
    assert!(net.wait_listed(1, Duration::from_secs(60)));
    let honest = net.providers[0].1.clone();
    let mut seed = 0;
    for (mode, extra) in &modes {
        let home = tempfile::tempdir().unwrap();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (_guard, node) = cheater(&net, home.path(), &extra);
        let before = spent(&net);
        for round in 0..2 {
            seed += 1;
            let (code, v) = ask(&net, Some(&node), seed);
            assert_eq!(code, 200, "{mode}: {v}");
            assert_eq!(v["tessera"]["provider"], node.as_str());
            let id = v["id"].as_str().unwrap();
            let report = verdict(&net, id);
            assert_eq!(
                report["audit"], "failed",
                "{mode} was not caught (round {round}): {report:#}"
            );
            let failures = &report["parts"][0]["evidence"]["failures"];
            assert!(
                failures.as_array().is_some_and(|f| !f.is_empty()),
                "{report}"
            );
            eprintln!("{mode}: {failures}");
        }
        // Both answers refunded: what the client spent is back where it was.
        let deadline = Instant::now() + Duration::from_secs(60);
        while spent(&net) != before {
            assert!(
                Instant::now() < deadline,
                "{mode}: not refunded ({} vs {before})",
                spent(&net)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // Quarantined: listed as such and never routed to again.
        let s = status(&net);
        let p = s["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"] == node.as_str())
            .cloned()
            .unwrap();
        assert_eq!(p["state"], "quarantined", "{mode}: {p}");
        assert_eq!(p["audits_failed"], 2);
        // Refunded, slashed, its bond forfeited: cheating left it nothing.
        let deadline = Instant::now() + Duration::from_secs(30);
        while earnings(&net, &node) > 0 {
            assert!(
                Instant::now() < deadline,
                "{mode}: the cheater kept {}",
                earnings(&net, &node)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        seed += 1;
        let (code, v) = ask(&net, Some(&node), seed);
        assert_eq!(code, 503, "{mode}: a quarantined provider was used: {v}");
        // The honest provider keeps serving, and passes its audits.
        seed += 1;
        let (code, v) = ask(&net, None, seed);
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["tessera"]["provider"], honest.as_str());
        let report = verdict(&net, v["id"].as_str().unwrap());
        assert_eq!(
            report["audit"], "passed",
            "the honest provider failed: {report:#}"
        );
    }
    // Inflated usage is refused at the receipt (a protocol violation):
    // never charged, so nothing to refund; every other cheat was paid at
    // first and refunded.
    let s = status(&net);
    assert_eq!(
        s["summary"]["refunded_requests"].as_u64(),
        Some(2 * (modes.len() as u64 - 1))
    );
}

/// What the provider `node`'s account holds at the gateway's ledger.
fn earnings(net: &Devnet, node: &str) -> i64 {
    status(net)["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == node)
        .map_or(0, |p| p["earnings"].as_i64().unwrap_or(0))
}

/// Wait until no provider has a job in flight, and a moment for the
/// settlements that follow.
fn settle_down(net: &Devnet) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(net);
        let busy: u64 = s["providers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["inflight"].as_u64().unwrap_or(0))
            .sum();
        if busy == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still busy: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1000));
}

/// Proof or nothing: a provider that breaks the protocol or ends without a
/// proof is never paid, its tokens cost the client nothing, none of its
/// answers is reported `passed`, provable cheats fail their audits, and
/// the answer is finished by an honest provider where it can be.
#[test]
fn protocol_cheats_earn_nothing_and_never_pass() {
    // A short silence limit, so the silent cheater is given up on quickly.
    let net = Devnet::start_env(1, &["--audit"], &[("TESSERA_FRAME_DEADLINE", "3")]);
    assert!(net.wait_listed(1, Duration::from_secs(60)));
    let honest = net.providers[0].1.clone();
    // (mode, whether the audit fails outright rather than `unverified`)
    let modes = [
        ("no-proof", "failed"),
        ("bad-token", "failed"),
        ("overrun", "failed"),
        ("silent", "unverified"),
        ("reset-after-max", "unverified"),
    ];
    for (seed, (mode, expected)) in modes.into_iter().enumerate() {
        let home = tempfile::tempdir().unwrap();
        let (_guard, node) = cheater(&net, home.path(), &["--misbehave", mode]);
        let spent_before = spent(&net);
        let honest_before = earnings(&net, &honest);
        let body = chat(
            "Write a long story about a dragon who learns to bake bread.",
            json!({
                "max_tokens": 40, "temperature": 0.8, "seed": seed,
                "provider": {"order": [node], "allow_fallbacks": true},
            }),
        );
        let (code, v) = net.post("/v1/chat/completions", &body);
        assert_eq!(code, 200, "{mode}: {v}");
        let providers: Vec<&str> = v["tessera"]["providers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(
            providers[0], node,
            "{mode}: the cheater was not asked first: {v}"
        );
        assert!(
            v["usage"]["completion_tokens"].as_u64().unwrap() <= 40,
            "{mode}: more than max_tokens delivered: {v}"
        );
        let report = verdict(&net, v["id"].as_str().unwrap());
        eprintln!("{mode}: {}", report["parts"]);
        let cheat = report["parts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["provider"] == node.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{mode}: the cheater's part was not checked: {report:#}"));
        assert_eq!(cheat["status"], expected, "{mode}: {report:#}");
        assert_ne!(report["audit"], "passed", "{mode}: {report:#}");
        settle_down(&net);
        // Never paid; the client paid only for the honest provider's part.
        assert_eq!(earnings(&net, &node), 0, "{mode}: the cheater was paid");
        let cost = v["tessera"]["cost"].as_u64().unwrap();
        let honest_got = (earnings(&net, &honest) - honest_before) as u64;
        assert_eq!(spent(&net) - spent_before, cost, "{mode}");
        if providers.len() == 1 {
            assert_eq!(cost, 0, "{mode}: charged for unverifiable tokens: {v}");
        } else {
            assert_eq!(providers[1], honest, "{mode}: {v}");
            assert!(
                cost > 0 && honest_got > 0 && honest_got <= cost,
                "{mode}: {v}"
            );
        }
    }
    // The honest provider still serves, and passes.
    let (code, v) = ask(&net, None, 99);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["tessera"]["provider"], honest.as_str());
    assert_eq!(verdict(&net, v["id"].as_str().unwrap())["audit"], "passed");
}

/// A client that leaves mid-stream: the gateway asks the provider to wrap
/// up, its proof still comes, the provider is paid for the tokens it
/// generated and the client charged for them (not more than it asked for).
#[test]
fn a_client_that_leaves_mid_answer_pays_for_what_was_proven() {
    use std::io::Read;
    let net = Devnet::start_with(1, &["--audit"]);
    assert!(net.wait_listed(1, Duration::from_secs(60)));
    let provider = net.providers[0].1.clone();
    let before = spent(&net);
    let body = chat(
        "Write a long story about a dragon who learns to bake bread.",
        json!({"max_tokens": 400, "stream": true, "seed": 5, "ignore_eos": true}),
    );
    let mut resp = net
        .client()
        .post(net.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // Read a few chunks, then hang up.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.iter().filter(|&&b| b == b'\n').count() < 20 {
        let n = resp.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let id = text
        .split("\"id\":\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    drop(resp);
    settle_down(&net);
    let deadline = Instant::now() + Duration::from_secs(30);
    while spent(&net) == before {
        assert!(Instant::now() < deadline, "the cut answer was never billed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let charged = spent(&net) - before;
    let paid = earnings(&net, &provider);
    assert!(
        paid > 0 && paid as u64 <= charged,
        "provider got {paid}, client paid {charged}"
    );
    // Charged for what was generated until the provider stopped, not for
    // the 400 tokens asked.
    let account: Value = net
        .client()
        .get(net.url("/v1/account"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let tokens = account["usage"]["completion_tokens"].as_u64().unwrap();
    eprintln!("cut answer: {tokens} tokens, charged {charged}, provider earned {paid}");
    assert!((1..400).contains(&tokens), "{account}");
    let report = verdict(&net, &id);
    assert_ne!(
        report["audit"], "failed",
        "an honest cut part failed: {report:#}"
    );
    assert_ne!(report["parts"][0]["status"], "unverified", "{report:#}");
}

/// What `/api/status` of `url` says of `node`'s state ("" if not listed).
fn state_at(status_url: &str, node: &str) -> String {
    let s: Value = util::client()
        .get(status_url)
        .send()
        .unwrap()
        .json()
        .unwrap();
    s["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == node)
        .map_or(String::new(), |p| {
            p["state"].as_str().unwrap_or("").to_string()
        })
}

/// Verdicts last: a provider quarantined by one gateway stays quarantined
/// when that gateway restarts, and on a second gateway sharing its
/// PostgreSQL ledger (which does not audit at all).
#[test]
fn a_quarantine_survives_a_restart_and_holds_on_a_second_gateway() {
    use util::Gateway;
    let pg = tessera_ledger::pg::TempPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    let url = pg.url();
    let mut first = Gateway::start(&["--audit", "--canary-interval", "0", "--database-url", &url]);
    let second = Gateway::start(&[
        "--canary-interval",
        "0",
        "--database-url",
        &url,
        "--join",
        &first.ticket,
    ]);
    let home = tempfile::tempdir().unwrap();
    let child =
        util::spawn_provider_with(&first.ticket, home.path(), 2, &["--misbehave", "garbage"]);
    let _guard = KillOnDrop(vec![child]);
    let within = Duration::from_secs(90);
    assert!(util::wait_listed(&first.url("/health"), 1, within));
    assert!(
        util::wait_listed(&second.url("/health"), 1, within),
        "the provider did not find the second gateway"
    );
    let node = util::listed(&first.url("/health"))[0].clone();
    let ask = |gw: &Gateway, seed: u64| -> (u16, Value) {
        let body = chat(
            "Write a long story about a dragon who learns to bake bread.",
            json!({"max_tokens": 24, "temperature": 0.8, "seed": seed,
                   "provider": {"only": [node], "allow_fallbacks": false}}),
        );
        let resp = gw
            .client()
            .post(gw.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.json().unwrap())
    };
    // Two failed audits at the first gateway quarantine it there.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seed = 0;
    while state_at(&first.url("/api/status"), &node) != "quarantined" {
        assert!(
            Instant::now() < deadline,
            "the cheater was never quarantined"
        );
        seed += 1;
        let (code, v) = ask(&first, seed);
        assert!(code == 200 || code == 503, "{v}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // The second gateway, which audits nothing, learns it from the ledger.
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_at(&second.url("/api/status"), &node) != "quarantined" {
        assert!(
            Instant::now() < deadline,
            "the second gateway still routes to the cheater"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, v) = ask(&second, 100);
    assert_eq!(
        code, 503,
        "the second gateway used a quarantined provider: {v}"
    );
    // A restart forgets nothing.
    first.crash_and_restart();
    assert!(
        util::wait_listed(&first.url("/health"), 1, within),
        "the provider did not come back"
    );
    assert_eq!(state_at(&first.url("/api/status"), &node), "quarantined");
    let (code, v) = ask(&first, 101);
    assert_eq!(
        code, 503,
        "the restarted gateway used a quarantined provider: {v}"
    );
}

/// A cheater that read the canary generator's source: honest on every
/// prompt the generator could produce, garbage for everyone else. Its
/// canaries pass; the first client answers audited (every one, on
/// probation) catch it, and it ends quarantined with nothing earned.
#[test]
fn a_cheater_honest_only_on_canaries_is_caught_on_client_traffic() {
    let net = Devnet::start_env(
        1,
        &["--audit"],
        &[
            ("TESSERA_CANARY_INTERVAL", "0.5"),
            ("TESSERA_CANARY_TOKENS", "16"),
        ],
    );
    assert!(net.wait_listed(1, Duration::from_secs(60)));
    let home = tempfile::tempdir().unwrap();
    let (_guard, node) = cheater(&net, home.path(), &["--misbehave", "canary-aware"]);
    let entry = |net: &Devnet| -> Value {
        status(net)["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"] == node.as_str())
            .cloned()
            .unwrap()
    };
    // Canaries alone: it answers them honestly and passes them (listed
    // among the recent audits; a passed canary earns no credit).
    let canaries_passed = |net: &Devnet| {
        status(net)["audits"].as_array().map_or(0, |a| {
            a.iter()
                .filter(|x| {
                    x["provider"] == node.as_str()
                        && x["verdict"] == "passed"
                        && x["job"].as_str().is_some_and(|j| j.starts_with("canary-"))
                })
                .count()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while canaries_passed(&net) < 3 {
        assert!(
            Instant::now() < deadline,
            "no canary passed: {}",
            entry(&net)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(entry(&net)["audits_failed"], 0, "{}", entry(&net));
    // Clients' requests do not look like canaries: caught.
    let (code, v) = ask(&net, Some(&node), 7);
    assert_eq!(code, 200, "{v}");
    assert_eq!(verdict(&net, v["id"].as_str().unwrap())["audit"], "failed");
    let (code, v) = ask(&net, Some(&node), 8);
    if code == 200 {
        assert_eq!(verdict(&net, v["id"].as_str().unwrap())["audit"], "failed");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while entry(&net)["state"] != "quarantined" || earnings(&net, &node) > 0 {
        assert!(
            Instant::now() < deadline,
            "not quarantined or kept earnings: {}",
            entry(&net)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
