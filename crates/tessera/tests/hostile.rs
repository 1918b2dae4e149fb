//! Hostile peers on a real gateway (issue 14's suite, growing): each attack
//! is made by a real process on loopback, and honest clients keep being
//! served while the attacker gains nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::time::Duration;

use serde_json::json;
use util::{chat, spawn_provider, spawn_provider_with, KillOnDrop};

/// A provider announcing an absurd price is refused at its Hello, so the
/// hold of a request that names no price cap is not sized at its price:
/// clients keep being served by the honest provider at its price.
#[test]
fn a_price_gouger_is_refused_and_clients_keep_being_served() {
    let gw = util::Gateway::start(&[]);
    let (honest_home, gouger_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _children = KillOnDrop(vec![
        spawn_provider(&gw.ticket, honest_home.path(), 2),
        spawn_provider_with(
            &gw.ticket,
            gouger_home.path(),
            64,
            &[
                "--output-price",
                "1000000000",
                "--input-price",
                "1000000000",
            ],
        ),
    ]);
    assert!(util::wait_listed(
        &gw.url("/health"),
        1,
        Duration::from_secs(60)
    ));
    // The gouger has loaded its model and dialled (it writes provider.json
    // just before), and had time for its Hello.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !gouger_home.path().join("provider.json").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the gouger never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        util::listed(&gw.url("/health")).len(),
        1,
        "only the honest provider is listed"
    );
    for i in 0..3 {
        let resp = gw
            .client()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat(&format!("Say {i}."), json!({"max_tokens": 8})))
            .send()
            .unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().unwrap();
        assert_eq!(status, 200, "request {i}: {body}");
        // Billed at the honest provider's default prices (20/80 per token).
        let usage = &body["usage"];
        let expected = 20 * usage["prompt_tokens"].as_u64().unwrap()
            + 80 * usage["completion_tokens"].as_u64().unwrap();
        assert_eq!(body["tessera"]["cost"].as_u64(), Some(expected), "{body}");
    }
}

/// Strangers' gateways join the network's gossip and ask for the providers'
/// work (taking every fee): one with no certificate, one certified by an
/// operator key of its own making. The providers hear of both and serve
/// neither (they serve only gateways this network's operator certified),
/// while the certified gateway keeps serving clients.
#[test]
fn a_rogue_gateway_gets_no_provider() {
    let gw = util::Gateway::start(&[]);
    let rogue = util::Gateway::start_uncertified(&["--join", &gw.ticket, "--fee-bps", "10000"]);
    // The second rogue runs a network of its own and certifies itself.
    let (own_operator, rogue_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    util::tessera(own_operator.path(), &["network", "init"]);
    let node = util::tessera(rogue_home.path(), &["gateway", "--print-id"]);
    let cert = util::tessera(own_operator.path(), &["network", "certify", node.trim()]);
    std::fs::write(rogue_home.path().join("gateway.cert"), cert).unwrap();
    let self_certified =
        util::Gateway::start_in(rogue_home, &["--join", &gw.ticket, "--fee-bps", "10000"]);
    assert!(
        self_certified.ticket.contains('#')
            && !self_certified
                .ticket
                .ends_with(gw.ticket.split('#').nth(1).unwrap()),
        "the self-certified rogue names its own operator: {}",
        self_certified.ticket
    );
    let home = tempfile::tempdir().unwrap();
    let _children = KillOnDrop(vec![spawn_provider(&gw.ticket, home.path(), 2)]);
    assert!(util::wait_listed(
        &gw.url("/health"),
        1,
        Duration::from_secs(90)
    ));
    // Long enough for the provider to hear the rogues' announcements
    // (every 3 s) and dial them, had it wanted to.
    std::thread::sleep(Duration::from_secs(15));
    let health: serde_json::Value = util::client()
        .get(rogue.url("/health"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(
        health["backend"]["discovered"]["providers"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "the rogue is on the network's gossip and hears the provider: {health}"
    );
    assert_eq!(
        util::listed(&rogue.url("/health")),
        Vec::<String>::new(),
        "the rogue gateway got a provider"
    );
    assert_eq!(
        util::listed(&self_certified.url("/health")),
        Vec::<String>::new(),
        "the self-certified rogue gateway got a provider"
    );
    let resp = gw
        .client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("Say hi.", json!({"max_tokens": 8})))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// The operator revokes a certified gateway: the list spreads on gossip
/// from the gateway given it, and providers leave the revoked gateway
/// within seconds while they keep serving the other.
#[test]
fn providers_leave_a_revoked_gateway() {
    let revocations = util::operator_home().join("revocations.json");
    let gw = util::Gateway::start(&["--revocations", revocations.to_str().unwrap()]);
    let other = util::Gateway::start(&["--join", &gw.ticket]);
    let home = tempfile::tempdir().unwrap();
    let _children = KillOnDrop(vec![spawn_provider(&gw.ticket, home.path(), 2)]);
    let within = Duration::from_secs(90);
    assert!(util::wait_listed(&gw.url("/health"), 1, within));
    assert!(
        util::wait_listed(&other.url("/health"), 1, within),
        "the provider did not discover the second certified gateway"
    );
    let node = other.ticket.split('@').next().unwrap();
    util::tessera(util::operator_home(), &["network", "revoke", node]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !util::listed(&other.url("/health")).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the provider still serves the revoked gateway"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // It does not come back, and the first gateway keeps its provider.
    std::thread::sleep(Duration::from_secs(8));
    assert!(util::listed(&other.url("/health")).is_empty());
    assert_eq!(util::listed(&gw.url("/health")).len(), 1);
}

/// A provider fails every job with a message meant for the gateway's
/// clients (a phishing line): clients get the gateway's own error, never
/// the provider's words.
#[test]
fn a_providers_error_text_never_reaches_clients() {
    let gw = util::Gateway::start(&["--failover-deadline", "2"]);
    let home = tempfile::tempdir().unwrap();
    let _children = KillOnDrop(vec![spawn_provider_with(
        &gw.ticket,
        home.path(),
        2,
        &["--misbehave", "error-text"],
    )]);
    assert!(util::wait_listed(
        &gw.url("/health"),
        1,
        Duration::from_secs(90)
    ));
    for stream in [false, true] {
        let resp = gw
            .client()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat("Say hi.", json!({"max_tokens": 8, "stream": stream})))
            .send()
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().unwrap();
        assert!(status >= 400 || stream, "{status} {text}");
        assert!(
            !text.contains("phish") && !text.contains("PROVIDER SAYS"),
            "the provider's words reached the client: {status} {text}"
        );
        assert!(text.contains("error"), "{status} {text}");
    }
}

/// Sybil providers join a network whose one honest provider has already
/// served: they say Hello with valid offers and then let every job hang
/// (the connection kept alive). Honest clients keep being answered by the
/// honest provider, within seconds: a provider that never finished a job
/// ranks behind one that did until the proven ones are busy.
#[test]
fn stalling_sybil_providers_do_not_hang_honest_requests() {
    let gw = util::Gateway::start(&[]);
    let honest = tempfile::tempdir().unwrap();
    let mut children = KillOnDrop(vec![spawn_provider(&gw.ticket, honest.path(), 2)]);
    assert!(util::wait_listed(
        &gw.url("/health"),
        1,
        Duration::from_secs(90)
    ));
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let ask = |i: usize| {
        client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&gw.key)
            .json(&chat(&format!("Say {i}."), json!({"max_tokens": 4})))
            .send()
    };
    assert_eq!(ask(0).unwrap().status().as_u16(), 200);
    let sybils: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for home in &sybils {
        std::fs::write(home.path().join("stall"), b"").unwrap();
        children.0.push(spawn_provider_with(
            &gw.ticket,
            home.path(),
            8,
            &["--misbehave", "stall"],
        ));
    }
    assert!(util::wait_listed(
        &gw.url("/health"),
        4,
        Duration::from_secs(90)
    ));
    for i in 1..=8 {
        let resp = ask(i).unwrap_or_else(|e| panic!("request {i} hung on a stalling sybil: {e}"));
        assert_eq!(resp.status().as_u16(), 200, "request {i}");
    }
}

/// A key's rate limit holds across gateways sharing a ledger: a client
/// spreading its requests over two gateways gets no more than its limit
/// per minute in all.
#[test]
fn a_rate_limit_holds_across_gateways_sharing_a_ledger() {
    let first = util::Gateway::start(&[]);
    let second = util::Gateway::start(&["--database-url", &first.database_url()]);
    let created = util::tessera_json(
        first.home.path(),
        &[
            "account",
            "create",
            "spread",
            "--credits",
            "1",
            "--rate-limit",
            "4",
        ],
    );
    let key = created["api_key"].as_str().unwrap().to_string();
    // All requests within one minute of the clock.
    let in_minute = tessera_core::now_ms() % 60_000;
    if in_minute > 50_000 {
        std::thread::sleep(Duration::from_millis(60_000 - in_minute + 200));
    }
    let client = util::client_for(&key);
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..6 {
        let gw = if i % 2 == 0 { &first } else { &second };
        let resp = client.get(gw.url("/v1/account")).send().unwrap();
        match resp.status().as_u16() {
            200 => ok += 1,
            429 => limited += 1,
            s => panic!("request {i}: {s} {}", resp.text().unwrap()),
        }
    }
    assert_eq!(
        (ok, limited),
        (4, 2),
        "a limit of 4 a minute, spread over two gateways"
    );
}

/// When the proven provider is busy, a request may spill onto a stalling
/// sybil (it never finished a job, so it is on trial): the gateway gives a
/// provider on trial 30 s for its first frame, not 120 s, and the request
/// fails over to the honest provider once it is free.
#[test]
fn a_request_spilled_onto_a_stalling_sybil_fails_over_within_its_trial_deadline() {
    let gw = util::Gateway::start(&["--canary-interval", "0"]);
    let honest = tempfile::tempdir().unwrap();
    let mut children = KillOnDrop(vec![spawn_provider(&gw.ticket, honest.path(), 1)]);
    assert!(util::wait_listed(
        &gw.url("/health"),
        1,
        Duration::from_secs(90)
    ));
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(75))
        .build()
        .unwrap();
    let ask = |content: &str, max_tokens: u32| {
        client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&gw.key)
            .json(&chat(content, json!({"max_tokens": max_tokens})))
            .send()
    };
    assert_eq!(ask("Say hi.", 4).unwrap().status().as_u16(), 200);
    let sybil = tempfile::tempdir().unwrap();
    std::fs::write(sybil.path().join("stall"), b"").unwrap();
    children.0.push(spawn_provider_with(
        &gw.ticket,
        sybil.path(),
        8,
        &["--misbehave", "stall"],
    ));
    assert!(util::wait_listed(
        &gw.url("/health"),
        2,
        Duration::from_secs(90)
    ));
    // The honest provider's one slot is busy with a long answer; the next
    // request goes to the sybil.
    std::thread::scope(|s| {
        let long = s.spawn(|| ask("Write a long story about the sea.", 400));
        std::thread::sleep(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let spilled = ask("Say hello.", 4).unwrap_or_else(|e| {
            panic!(
                "the spilled request hung on the stalling sybil for {:?}: {e}",
                started.elapsed()
            )
        });
        assert_eq!(spilled.status().as_u16(), 200);
        assert_eq!(long.join().unwrap().unwrap().status().as_u16(), 200);
    });
}
