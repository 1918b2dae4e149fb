//! Audits end to end on a devnet whose gateway audits (the default), with the
//! real model: honest providers' answers pass under every sampling setting,
//! the verdict and its evidence are the paying account's only, and the
//! dashboard's figures follow.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use util::{chat, client_for, tessera_json, Devnet};

/// Poll `GET /v1/jobs/{id}` until its audit is no longer pending.
fn verdict(net: &Devnet, id: &str) -> Value {
    util::final_audit(&net.client(), &net.url(&format!("/v1/jobs/{id}")))
}

#[test]
fn honest_providers_pass_every_audit_and_verdicts_are_private() {
    // A plain devnet, as a user starts it: audits are on by default.
    let net = Devnet::start_with(2, &["--default-audit"]);
    assert!(net.wait_listed(2, Duration::from_secs(60)));
    let settings = [
        json!({"temperature": 0, "max_tokens": 64}),
        json!({"temperature": 0.8, "top_p": 0.9, "seed": 11, "max_tokens": 96}),
        json!({"temperature": 1.2, "seed": 12, "max_tokens": 96}),
        json!({"temperature": 0.7, "seed": 13, "stop": ["."], "max_tokens": 96}),
        json!({"temperature": 0.9, "min_p": 0.05, "seed": 14, "max_tokens": 128}),
        json!({"temperature": 1.0, "top_k": 20, "seed": 15, "max_tokens": 64}),
        json!({"temperature": 0.6, "seed": 16, "max_tokens": 300}),
        json!({"temperature": 0, "stream": true, "max_tokens": 48}),
    ];
    // 16 at once: two rounds of every setting.
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let client = net.client();
            let url = net.url("/v1/chat/completions");
            let mut extra = settings[i % settings.len()].clone();
            if let Some(seed) = extra.get("seed").and_then(Value::as_u64) {
                extra["seed"] = json!(seed + i as u64);
            }
            std::thread::spawn(move || {
                let body = chat(
                    &format!("Tell me something about the number {i}."),
                    extra.clone(),
                );
                let resp = client.post(url).json(&body).send().unwrap();
                assert_eq!(resp.status(), 200);
                if extra["stream"] == true {
                    let text = resp.text().unwrap();
                    let chunks: Vec<Value> = util::sse_data(&text)
                        .iter()
                        .filter(|d| *d != "[DONE]")
                        .map(|d| serde_json::from_str(d).unwrap())
                        .collect();
                    let last = chunks
                        .iter()
                        .rev()
                        .find(|c| c["tessera"].is_object())
                        .unwrap();
                    (
                        last["id"].as_str().unwrap().to_string(),
                        last["tessera"]["audit"].clone(),
                        extra,
                    )
                } else {
                    let v: Value = resp.json().unwrap();
                    (
                        v["id"].as_str().unwrap().to_string(),
                        v["tessera"]["audit"].clone(),
                        extra,
                    )
                }
            })
        })
        .collect();
    let answers: Vec<(String, Value, Value)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut audited = 0;
    for (id, at_answer, extra) in &answers {
        // New providers are on probation: every answer is audited.
        assert!(
            at_answer == "pending" || at_answer == "passed",
            "{id}: {at_answer} in the answer"
        );
        let v = verdict(&net, id);
        assert_eq!(
            v["audit"], "passed",
            "an honest answer ({extra}) failed its audit: {v:#}"
        );
        for part in v["parts"].as_array().unwrap() {
            let ev = &part["evidence"];
            assert_eq!(ev["failures"], json!([]), "{ev}");
            assert!(ev["tokens"].as_u64().unwrap() > 0);
            audited += 1;
        }
    }
    assert!(audited >= 16);

    // Another account cannot read the verdicts.
    let gw_home = net.home.path().join("devnet/gateway");
    let bob = tessera_json(&gw_home, &["account", "create", "bob", "--credits", "1"]);
    let key = bob["api_key"].as_str().expect("api_key");
    let resp = client_for(key)
        .get(net.url(&format!("/v1/jobs/{}", answers[0].0)))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 404);

    // The public status shows nothing that moves with audits: a provider
    // must not tell audited answers (or canaries) from the rest.
    let public: Value = util::client()
        .get(net.url("/api/status"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(public["view"], "public");
    assert!(public.get("audits").is_none(), "{public}");
    assert!(public["summary"].get("audits").is_none(), "{public}");
    for p in public["providers"].as_array().unwrap() {
        for field in [
            "audits_passed",
            "audits_failed",
            "reputation",
            "verified_tok_s",
            "canary_misses",
        ] {
            assert!(p.get(field).is_none(), "{field} is public: {p}");
        }
    }
    // A wrong operator token is refused, not silently downgraded.
    let resp = util::client()
        .get(net.url("/api/status"))
        .bearer_auth("op_not-the-token")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
    // A provider signing with its node key sees its own figures only.
    let mine = util::tessera_json(
        &net.provider_homes[0],
        &["provider", "status", "--api", &net.api_base],
    );
    assert!(mine["audits_passed"].as_u64().is_some(), "{mine}");
    // The operator's view counts the audits; reputations are perfect.
    let status: Value = net.operator_status();
    assert_eq!(status["summary"]["audits"]["failed"], 0, "{status}");
    assert!(status["summary"]["audits"]["passed"].as_u64().unwrap() >= 16);
    assert_eq!(status["summary"]["audit_pass_rate"], 1.0);
    assert_eq!(status["summary"]["refunded_requests"], 0);
    for p in status["providers"].as_array().unwrap() {
        if p["audits_passed"].as_u64().unwrap() > 0 {
            assert_eq!(p["reputation"], 1.0, "{p}");
        }
        assert_eq!(p["state"], "online");
    }
    assert!(
        !status["audits"].as_array().unwrap().is_empty(),
        "recent audits listed"
    );
}

/// The gateway's `/api/status`, as its operator sees it.
fn status(gw: &util::Gateway) -> Value {
    gw.operator_status()
}

/// The gateway's view of one provider.
fn provider_status(gw: &util::Gateway, node: &str) -> Value {
    status(gw)["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == node)
        .cloned()
        .unwrap_or(Value::Null)
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Needs the `adversary` feature for `--misbehave stall` (a provider whose
/// jobs hang while its connection stays up; `make test` turns it on).
#[cfg(feature = "adversary")]
#[test]
fn canaries_verify_throughput_and_bar_a_stalled_provider_until_it_answers() {
    let gw = util::Gateway::start(&[
        "--audit",
        "--canary-interval",
        "1",
        "--canary-deadline",
        "5",
        "--canary-tokens",
        "8",
    ]);
    let homes = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let children = vec![
        util::spawn_provider(&gw.ticket, homes[0].path(), 2),
        util::spawn_provider_with(&gw.ticket, homes[1].path(), 2, &["--misbehave", "stall"]),
    ];
    let _guard = util::KillOnDrop(children);
    let health = gw.url("/health");
    assert!(util::wait_listed(&health, 2, Duration::from_secs(60)));
    let nodes: Vec<String> = homes
        .iter()
        .map(|h| util::provider_node(h.path()))
        .collect();
    // Canaries verify each provider's throughput, and are audited (a
    // passed canary is listed among the recent audits, but earns no
    // credit toward probation: only failures count).
    for node in &nodes {
        wait_for("a verified throughput", Duration::from_secs(60), || {
            let p = provider_status(&gw, node);
            let audited = status(&gw)["audits"].as_array().is_some_and(|a| {
                a.iter().any(|x| {
                    x["provider"] == node.as_str()
                        && x["verdict"] == "passed"
                        && x["job"].as_str().is_some_and(|j| j.starts_with("canary-"))
                })
            });
            p["verified_tok_s"].as_f64().is_some_and(|t| t > 0.0) && audited
        });
    }
    // Ask for an answer from `node` only: 200 and its id, or the status.
    let ask_only = |node: &str| {
        let resp = gw
            .client()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat(
                "Say hi",
                json!({"max_tokens": 4, "provider": {"only": [node]}}),
            ))
            .send()
            .unwrap();
        let code = resp.status().as_u16();
        let v: Value = resp.json().unwrap();
        (code, v["tessera"]["provider"].as_str().map(str::to_string))
    };
    // A provider whose jobs hang behind a live connection misses canaries
    // and is barred: clients cannot reach it, even by asking for it...
    let stall = homes[1].path().join("stall");
    std::fs::write(&stall, b"").unwrap();
    // ...and never holds more than one canary at a time: a draw (one a
    // second here) that falls while its last canary hangs (5 s) is
    // skipped, rather than piling canaries up in its queue.
    let mut most_in_flight = 0;
    let mut in_flight = |gw: &util::Gateway| {
        let p = provider_status(gw, &nodes[1]);
        most_in_flight = most_in_flight.max(p["inflight"].as_u64().unwrap());
        p
    };
    wait_for(
        "the stalled provider to be unroutable",
        Duration::from_secs(60),
        || in_flight(&gw)["state"] == "unroutable",
    );
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(6) {
        in_flight(&gw);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        most_in_flight, 1,
        "canaries in flight at once on a stalled provider"
    );
    let (code, _) = ask_only(&nodes[1]);
    assert_eq!(code, 503, "a request reached the unroutable provider");
    for _ in 0..3 {
        let (code, served) = ask_only(&nodes[0]);
        assert_eq!((code, served.as_deref()), (200, Some(nodes[0].as_str())));
    }
    // ...until it answers a canary again; then it serves clients again.
    std::fs::remove_file(&stall).unwrap();
    wait_for(
        "the provider to be routable again",
        Duration::from_secs(60),
        || {
            let p = provider_status(&gw, &nodes[1]);
            p["state"] != "unroutable" && p["canary_misses"] == 0
        },
    );
    let (code, served) = ask_only(&nodes[1]);
    assert_eq!(
        (code, served.as_deref()),
        (200, Some(nodes[1].as_str())),
        "the recovered provider is routed to again"
    );
    let status = status(&gw);
    for p in status["providers"].as_array().unwrap() {
        assert_eq!(
            p["audits_failed"], 0,
            "recent audits: {:#}",
            status["audits"]
        );
    }
}
