//! Cheating providers are caught: for each misbehaviour mode, a devnet whose
//! gateway audits (`--audit`) with one honest provider gets a cheating one;
//! the cheater's answers fail their audits, their clients are refunded, the
//! second failure quarantines it (never routed to again), and the honest
//! provider keeps serving. Needs the `adversary` feature (test builds only;
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
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v: Value = net
            .client()
            .get(net.url(&format!("/v1/jobs/{id}")))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if v["audit"] != "pending" {
            return v;
        }
        assert!(Instant::now() < deadline, "still pending: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn status(net: &Devnet) -> Value {
    util::client()
        .get(net.url("/api/status"))
        .send()
        .unwrap()
        .json()
        .unwrap()
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

    let net = Devnet::start_with(1, &["--audit"]);
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
    let s = status(&net);
    assert_eq!(
        s["summary"]["refunded_requests"].as_u64(),
        Some(2 * modes.len() as u64)
    );
}
