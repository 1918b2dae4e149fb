//! The network on loopback: a gateway and providers as separate processes
//! joined over real iroh connections (relays and discovery off).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use util::{chat, Devnet, Gateway};

fn ask(net: &Devnet, content: &str) -> Value {
    let (status, v) = net.post(
        "/v1/chat/completions",
        &chat(content, json!({"max_tokens": 8, "temperature": 0})),
    );
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    v
}

fn provider_of(v: &Value) -> String {
    v["tessera"]["provider"]
        .as_str()
        .expect("tessera.provider")
        .to_string()
}

#[test]
fn requests_spread_over_providers_and_a_killed_provider_stops_receiving_work() {
    let net = Devnet::start(2);
    let nodes: HashSet<String> = net.providers.iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(nodes.len(), 2);
    let served: HashSet<String> = (0..6)
        .map(|i| provider_of(&ask(&net, &format!("Say {i}."))))
        .collect();
    assert_eq!(served, nodes, "work should reach every provider");

    // Streams carry the serving provider on their first chunk.
    let resp = net
        .client()
        .post(net.url("/v1/chat/completions"))
        .json(&chat("Say hi.", json!({"max_tokens": 6, "stream": true})))
        .send()
        .unwrap();
    let events = util::sse_data(&resp.text().unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert!(nodes.contains(first["tessera"]["provider"].as_str().unwrap()));

    // Kill one provider outright: every request still succeeds, on the other.
    let (dead_pid, dead_node) = net.providers[0].clone();
    util::signal(dead_pid, "-KILL");
    for i in 0..6 {
        let v = ask(&net, &format!("Count to {i}."));
        assert_ne!(provider_of(&v), dead_node, "routed to a dead provider");
    }
    assert!(
        net.wait_listed(1, Duration::from_secs(15)),
        "the dead provider is still listed: {:?}",
        net.listed()
    );
}

#[test]
fn a_provider_that_joins_later_receives_work() {
    let net = Devnet::start(1);
    let home = tempfile::tempdir().unwrap();
    // Killed if the test fails before it stops it.
    let mut late = util::KillOnDrop(vec![util::spawn_provider(&net.ticket, home.path(), 2)]);
    assert!(
        net.wait_listed(2, Duration::from_secs(60)),
        "the late provider never joined"
    );
    let late_node = net
        .listed()
        .into_iter()
        .find(|n| *n != net.providers[0].1)
        .unwrap();
    // Its first canary proves it answers (until then it ranks like a full
    // provider).
    if let Err(status) = util::wait_proven(
        || net.operator_status(),
        std::slice::from_ref(&late_node),
        Duration::from_secs(60),
    ) {
        panic!("the late provider never answered its first canary: {status}");
    }
    let served: Vec<String> = (0..6)
        .map(|i| provider_of(&ask(&net, &format!("Name {i} colors."))))
        .collect();
    assert!(
        served.contains(&late_node),
        "the late provider got no work: {served:?}"
    );

    // And when it leaves cleanly it stops receiving work at once.
    util::signal(late.0[0].id(), "-TERM");
    let _ = late.0[0].wait();
    assert!(net.wait_listed(1, Duration::from_secs(15)));
    for i in 0..3 {
        assert_ne!(provider_of(&ask(&net, &format!("Say {i}."))), late_node);
    }
}

/// Stream `body` from `gw`; after `kill_after` chunks, SIGKILL the provider
/// named in the first chunk (looked up in `pids`). Returns every `data:`
/// payload and the killed provider's node id.
fn stream_and_kill(
    gw: &Gateway,
    body: &Value,
    kill_after: Option<usize>,
    pids: &[(u32, String)],
) -> (Vec<String>, Option<String>) {
    use std::io::{BufRead, BufReader};
    let resp = gw
        .client()
        .post(gw.url("/v1/chat/completions"))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut reader = BufReader::new(resp);
    let mut events: Vec<String> = Vec::new();
    let mut killed = None;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        events.push(data.to_string());
        if data == "[DONE]" {
            break;
        }
        if killed.is_none() && Some(events.len()) == kill_after {
            let first: Value = serde_json::from_str(&events[0]).unwrap();
            let node = first["tessera"]["provider"].as_str().unwrap().to_string();
            let (pid, _) = pids.iter().find(|(_, n)| *n == node).unwrap().clone();
            util::signal(pid, "-KILL");
            killed = Some(node);
        }
    }
    (events, killed)
}

/// What a streamed answer said: its text, the providers it named in order,
/// its finish reason, usage, cost and id.
struct Streamed {
    text: String,
    providers: Vec<String>,
    finish: Option<String>,
    usage: Value,
    cost: u64,
    id: String,
}

fn read_stream(events: &[String]) -> Streamed {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "the stream must end normally"
    );
    let mut out = Streamed {
        text: String::new(),
        providers: vec![],
        finish: None,
        usage: Value::Null,
        cost: 0,
        id: String::new(),
    };
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "error in the stream: {v}");
        out.id = v["id"].as_str().unwrap_or_default().to_string();
        if let Some(p) = v["tessera"]["provider"].as_str() {
            if out.providers.last().map(String::as_str) != Some(p) {
                out.providers.push(p.to_string());
            }
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            out.finish = Some(f.to_string());
        }
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            out.text.push_str(c);
        }
        if !v["usage"].is_null() {
            out.usage = v["usage"].clone();
        }
        if let Some(c) = v["tessera"]["cost"].as_u64() {
            out.cost = c;
        }
    }
    out
}

/// A provider dies mid-answer and another continues it from the tokens
/// already sent, at the same seed and absolute positions: the client gets
/// the same answer the first provider would have given (any token that
/// differs can only be a near-tie the auditor tolerates). Proof or nothing:
/// the killed provider's part ended without a proof, so it is checked by
/// seeded sampling alone, reported `unverified` (and so is the answer), and
/// neither paid nor charged; the client pays the survivor's part, at its
/// price, with the prompt charged once there. The survivor's receipt
/// carries both signatures.
#[test]
fn an_answer_continues_on_another_provider_when_its_provider_is_killed() {
    let gw = Gateway::start(&["--audit", "--canary-interval", "0", "--fee-bps", "0"]);
    let homes = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let prices = [("20", "80"), ("30", "120")];
    let mut children: Vec<std::process::Child> = homes
        .iter()
        .zip(prices)
        .map(|(h, (i, o))| {
            util::spawn_provider_with(
                &gw.ticket,
                h.path(),
                4,
                &["--input-price", i, "--output-price", o],
            )
        })
        .collect();
    assert!(util::wait_listed(
        &gw.url("/health"),
        2,
        Duration::from_secs(90)
    ));
    let nodes: Vec<String> = homes
        .iter()
        .map(|h| util::provider_node(h.path()))
        .collect();
    let pids: Vec<(u32, String)> = children.iter().map(|c| c.id()).zip(nodes.clone()).collect();
    let body = chat(
        "Write a long story about a lighthouse.",
        json!({
            "max_tokens": 160, "ignore_eos": true, "temperature": 0.8, "seed": 42, "stream": true,
            "stream_options": {"include_usage": true}
        }),
    );
    // The answer as one provider gives it, uninterrupted.
    let (events, _) = stream_and_kill(&gw, &body, None, &pids);
    let whole = read_stream(&events);
    assert_eq!(whole.providers.len(), 1);

    // The same request; its provider is killed after a dozen chunks.
    let (events, killed) = stream_and_kill(&gw, &body, Some(12), &pids);
    let killed = killed.expect("the stream was long enough to kill its provider");
    let cut = read_stream(&events);
    assert_eq!(cut.finish.as_deref(), Some("length"), "not cut short");
    assert_eq!(cut.usage["completion_tokens"], 160);
    // The chunk that starts the second provider's part names it.
    assert_eq!(
        cut.providers.len(),
        2,
        "providers named: {:?}",
        cut.providers
    );
    assert_eq!(cut.providers[0], killed);
    let survivor = cut.providers[1].clone();
    assert_ne!(survivor, killed);

    // Both parts were checked (new providers are audited on every part;
    // an unverifiable part always).
    let report = |id: &str| -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let r: Value = gw
                .client()
                .get(gw.url(&format!("/v1/jobs/{id}")))
                .send()
                .unwrap()
                .json()
                .unwrap();
            if r["audit"] != "pending" || std::time::Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let r = report(&cut.id);
    assert_eq!(r["audit"], "unverified", "{r:#}");
    let parts = r["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{r:#}");
    let status_of = |node: &str| {
        parts
            .iter()
            .find(|p| p["provider"] == node)
            .map(|p| p["status"].clone())
    };
    assert_eq!(status_of(&killed), Some(json!("unverified")), "{r:#}");
    assert_eq!(status_of(&survivor), Some(json!("passed")), "{r:#}");
    if cut.text != whole.text {
        // Only a near-tie the auditor tolerates may differ: the parts
        // passed, and at least one near-tie was recorded.
        let tolerated: u64 = r["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["evidence"]["tolerated"].as_u64().unwrap_or(0))
            .sum();
        assert!(
            tolerated > 0,
            "the continued answer differs without a near-tie:\n{}\n---\n{}",
            cut.text,
            whole.text
        );
    }

    // The bill: the survivor's part at its own price with the prompt; the
    // killed provider's part is not on it.
    let price_of = |node: &str| {
        let i = nodes.iter().position(|n| n == node).unwrap();
        let (pi, po) = prices[i];
        (pi.parse::<u64>().unwrap(), po.parse::<u64>().unwrap())
    };
    let mut total = 0;
    for (node, home) in nodes.iter().zip(&homes) {
        if node == &killed {
            continue; // its process is gone; its receipt is checked below
        }
        let e = util::tessera_json(
            home.path(),
            &["provider", "earnings", "--api", &gw.api_base],
        );
        assert!(e["unverified"].as_array().unwrap().is_empty(), "{e:#}");
        let part = e["receipts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["job"] == cut.id.as_str())
            .unwrap_or_else(|| panic!("no receipt of the continued part: {e:#}"))
            .clone();
        let (pi, po) = price_of(node);
        let prompt = cut.usage["prompt_tokens"].as_u64().unwrap();
        assert_eq!(
            part["prompt_tokens"].as_u64(),
            Some(prompt),
            "the prompt is charged once, here"
        );
        assert_eq!(
            part["cost"].as_u64().unwrap(),
            prompt * pi + part["completion_tokens"].as_u64().unwrap() * po
        );
        assert!(part["completion_tokens"].as_u64().unwrap() < 160);
        total += part["cost"].as_u64().unwrap();
    }
    // The killed provider, asking with its key (its process is gone, its
    // home is not), has no receipt of the answer: it was not paid.
    let k = nodes.iter().position(|n| *n == killed).unwrap();
    let e = util::tessera_json(
        homes[k].path(),
        &["provider", "earnings", "--api", &gw.api_base],
    );
    assert!(
        e["receipts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["job"] != cut.id.as_str()),
        "the killed provider was paid for an unproven part: {e:#}"
    );
    assert_eq!(total, cut.cost, "the client paid exactly its parts");
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A request's hold is sized by the route the router takes, not by the
/// dearest provider: a client whose credits cover the cheap provider's
/// price but not the dear one's ten times higher is served by the cheap one
/// (with the hold at the dearest price it got 402). When the cheap provider dies
/// mid-answer, the answer continues on the dear one only for a client whose
/// hold can be raised to that price; the other's answer ends with an error
/// and costs it nothing, and the books balance.
#[test]
fn a_hold_follows_the_route_taken_and_is_raised_only_for_a_client_who_can_pay() {
    use std::io::{BufRead, BufReader};
    let gw = Gateway::start(&["--fee-bps", "0"]);
    let homes = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let prices = [("20", "80"), ("200", "800")];
    let children = util::KillOnDrop(
        homes
            .iter()
            .zip(prices)
            .map(|(h, (i, o))| {
                util::spawn_provider_with(
                    &gw.ticket,
                    h.path(),
                    2,
                    &["--input-price", i, "--output-price", o],
                )
            })
            .collect(),
    );
    assert!(util::wait_listed(
        &gw.url("/health"),
        2,
        Duration::from_secs(90)
    ));
    let (cheap, dear) = (
        util::provider_node(homes[0].path()),
        util::provider_node(homes[1].path()),
    );
    // The cheap one finishes a job first, so neither request below finds it
    // on trial (where it would rank like a full provider).
    let resp = gw
        .client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(
            "Say hi.",
            json!({"max_tokens": 4, "provider": {"only": [&cheap]}}),
        ))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // Its slot is given back once the part's receipt is countersigned,
    // which may come just after the answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = gw.operator_status();
        let idle = status["providers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["node"] == cheap.as_str()))
            .is_some_and(|p| p["inflight"] == 0 && p["jobs_done"].as_u64() >= Some(1));
        if idle {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cheap provider's first job never ended: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // 0.05 credits: this answer's most at the cheap price (about 13,500
    // micro-credits) fits, at the dear price (about 135,000) it does not.
    let created = util::tessera_json(
        gw.home.path(),
        &["account", "create", "thrifty", "--credits", "0.05"],
    );
    let thrifty = created["api_key"].as_str().unwrap().to_string();
    let body = |extra: Value| {
        let mut options = json!({
            "max_tokens": 160, "ignore_eos": true, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}
        });
        options
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        chat("Write a long story about a lighthouse.", options)
    };
    let open = |client: reqwest::blocking::Client, body: Value| {
        let resp = client
            .post(gw.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .unwrap();
        let status = resp.status().as_u16();
        assert_eq!(status, 200, "{}", resp.text().unwrap_or_default());
        BufReader::new(resp)
    };
    // Events of a stream until `until` of them came (or it ended).
    let read = |r: &mut BufReader<reqwest::blocking::Response>, out: &mut Vec<String>, until| {
        let mut line = String::new();
        while out.len() < until && out.last().map(String::as_str) != Some("[DONE]") {
            line.clear();
            if r.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                out.push(data.to_string());
            }
        }
    };
    // The client who can pay asks for the cheap provider first (it may
    // continue elsewhere); the other names none: the router may prefer the
    // dear one (the cheap one is loaded, and its first answer's latency
    // counts against it), and then keeps to the cheap one the hold covers.
    let mut rich = open(gw.client(), body(json!({"provider": {"order": [&cheap]}})));
    let mut poor = open(util::client_for(&thrifty), body(json!({})));
    let (mut rich_events, mut poor_events) = (Vec::new(), Vec::new());
    read(&mut rich, &mut rich_events, 2);
    read(&mut poor, &mut poor_events, 2);
    for events in [&rich_events, &poor_events] {
        let first: Value = serde_json::from_str(&events[0]).unwrap();
        assert_eq!(
            first["tessera"]["provider"], cheap,
            "both answers start on the cheap provider (dear is {dear})"
        );
    }
    util::signal(children.0[0].id(), "-KILL");
    read(&mut rich, &mut rich_events, usize::MAX);
    read(&mut poor, &mut poor_events, usize::MAX);

    // The client who can pay: continued on the dear provider, whose part
    // (and the prompt) it pays at the dear price; the killed part is free.
    let cut = read_stream(&rich_events);
    assert_eq!(cut.providers, vec![cheap.clone(), dear.clone()]);
    assert_eq!(cut.usage["completion_tokens"], 160);
    let prompt = cut.usage["prompt_tokens"].as_u64().unwrap();
    let continued = cut.cost.checked_sub(200 * prompt).unwrap_or_else(|| {
        panic!(
            "cost {} does not include the prompt at the dear price",
            cut.cost
        )
    });
    assert!(
        continued.is_multiple_of(800) && continued > 0 && continued < 800 * 160,
        "the continued part at 800 per token: cost {}",
        cut.cost
    );

    // The client who cannot: no dear part, an error, nothing charged.
    let errors: Vec<Value> = poor_events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v.get("error").is_some())
        .collect();
    assert_eq!(errors.len(), 1, "{poor_events:?}");
    assert!(
        poor_events.iter().all(|e| !e.contains(&dear)),
        "the dear provider served a client who could not pay it"
    );
    let account: Value = util::client_for(&thrifty)
        .get(gw.url("/v1/account"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        (account["balance"].as_u64(), account["held"].as_u64()),
        (Some(50_000), Some(0)),
        "{account}"
    );
    let check = util::tessera_json(gw.home.path(), &["account", "check"]);
    assert_eq!(check["unbalanced_entries"], 0, "{check}");
    assert_eq!(check["mismatched_accounts"], 0, "{check}");
    assert_eq!(check["escrow"], check["open_held"], "{check}");
}

#[test]
fn provider_preferences_steer_routing() {
    let net = Devnet::start(2);
    let (a, b) = (net.providers[0].1.clone(), net.providers[1].1.clone());
    let with = |prefs: Value| {
        net.post(
            "/v1/chat/completions",
            &chat(
                "Say hi.",
                json!({"max_tokens": 4, "temperature": 0, "provider": prefs}),
            ),
        )
    };
    for _ in 0..3 {
        // A prefix of the node id is enough to name a provider.
        let (s, v) = with(json!({"order": [&b[..10]]}));
        assert_eq!((s, provider_of(&v)), (200, b.clone()), "order");
        let (s, v) = with(json!({"only": [&a]}));
        assert_eq!((s, provider_of(&v)), (200, a.clone()), "only");
        let (s, v) = with(json!({"ignore": [&a[..8]]}));
        assert_eq!((s, provider_of(&v)), (200, b.clone()), "ignore");
    }
    let (s, v) = with(json!({"sort": "throughput"}));
    assert_eq!(s, 200, "{v}");
    // Nobody matches: a clear 503, not a hang.
    let (s, v) = with(json!({"only": ["ffff0000"]}));
    assert_eq!(s, 503, "{v}");
    util::assert_openai_error(&v);
    let (s, v) = with(json!({"order": ["ffff0000"], "allow_fallbacks": false}));
    assert_eq!(s, 503, "{v}");
    // A bad preference is the client's mistake.
    let (s, v) = with(json!({"sort": "vibes"}));
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "provider.sort");
    let (s, v) = with(json!({"only": "not-a-list"}));
    assert_eq!(s, 400, "{v}");
}

#[test]
fn providers_discover_a_second_gateway_and_survive_losing_the_first() {
    use util::{spawn_provider, Gateway, KillOnDrop};
    let mut first = Gateway::start(&[]);
    // The second gateway knows only the first; the providers know only the
    // first too. Everything else they learn through gossip.
    // The second one audits, so its canaries prove each provider there.
    let second = Gateway::start(&[
        "--audit",
        "--join",
        &first.ticket,
        "--database-url",
        &first.database_url(),
    ]);
    let homes = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let _providers = KillOnDrop(
        homes
            .iter()
            .map(|h| spawn_provider(&first.ticket, h.path(), 2))
            .collect(),
    );
    let within = Duration::from_secs(90);
    assert!(
        util::wait_listed(&first.url("/health"), 2, within),
        "providers did not join the gateway they were given"
    );
    assert!(
        util::wait_listed(&second.url("/health"), 2, within),
        "providers did not discover the second gateway: {:?}",
        util::listed(&second.url("/health"))
    );
    let providers: HashSet<String> = util::listed(&second.url("/health")).into_iter().collect();
    let health: Value = util::client()
        .get(second.url("/health"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let gateways = &health["backend"]["discovered"]["gateways"];
    assert!(
        gateways.as_array().is_some_and(|g| g
            .iter()
            .any(|g| first.ticket.starts_with(g["node"].as_str().unwrap()))),
        "the second gateway did not hear the first: {health}"
    );

    // Both have answered the second gateway's first canary, so neither is
    // on trial there (a provider on trial ranks like a full one, and these
    // requests come one at a time).
    let nodes: Vec<String> = providers.iter().cloned().collect();
    if let Err(status) = util::wait_proven(|| second.operator_status(), &nodes, within) {
        panic!("the providers never answered the second gateway's canaries: {status}");
    }

    util::signal(first.child.id(), "-KILL");
    let _ = first.child.wait();
    let ask = |i: usize| {
        let resp = second
            .client()
            .post(second.url("/v1/chat/completions"))
            .json(&chat(
                &format!("Say {i}."),
                json!({"max_tokens": 8, "temperature": 0}),
            ))
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        provider_of(&resp.json().unwrap())
    };
    // Eight at once: more than one provider's slots, so the router must
    // use every provider it still has (one at a time, the better-ranked
    // one may rightly take them all).
    let at_once = |range: std::ops::Range<usize>| -> HashSet<String> {
        std::thread::scope(|s| {
            let asks: Vec<_> = range.map(|i| s.spawn(move || ask(i))).collect();
            asks.into_iter().map(|a| a.join().unwrap()).collect()
        })
    };
    let served = at_once(0..8);
    assert_eq!(
        served, providers,
        "all providers keep serving the second gateway"
    );
    // Some seconds later, they are all still there.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        util::listed(&second.url("/health")).len(),
        2,
        "providers dropped off the surviving gateway"
    );
    let served = at_once(8..16);
    assert_eq!(served, providers);
}

/// A conversation's next turn goes to the provider that keeps its history
/// (prefix-aware routing; with three idle providers the router would
/// otherwise take turns), every turn is audited and passes, and the
/// provider reports serving the history from its cache.
#[test]
fn a_conversation_stays_with_the_provider_that_keeps_its_history() {
    let net = Devnet::start_with(3, &["--audit"]);
    let system = "You are the help desk of a small coastal town. You answer questions about the \
                  harbour, the ferry, the lighthouse, the market, the library and the museum. \
                  Keep answers short, friendly and practical, and never invent opening hours.";
    let mut messages = vec![json!({"role": "system", "content": system})];
    let mut served = Vec::new();
    let mut ids = Vec::new();
    for q in [
        "When does the first ferry leave?",
        "Can I park near the harbour?",
        "Is the lighthouse open to visitors?",
        "What is in the museum?",
    ] {
        messages.push(json!({"role": "user", "content": q}));
        let (s, v) = net.post(
            "/v1/chat/completions",
            &json!({"model": util::MODEL, "messages": messages, "max_tokens": 24, "temperature": 0}),
        );
        assert_eq!(s, 200, "{v}");
        served.push(provider_of(&v));
        ids.push(v["id"].as_str().unwrap().to_string());
        let answer = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    assert!(
        served.iter().all(|p| *p == served[0]),
        "the conversation moved between providers: {served:?}"
    );
    // Answers built on a kept prefix pass their audits.
    for id in &ids {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let r: Value = net
                .client()
                .get(net.url(&format!("/v1/jobs/{id}")))
                .send()
                .unwrap()
                .json()
                .unwrap();
            if r["audit"] == "passed" {
                break;
            }
            assert!(r["audit"] != "failed", "{r:#}");
            assert!(std::time::Instant::now() < deadline, "{r:#}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The provider says the history came from its cache.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status: Value = util::client()
            .get(net.url("/api/status"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let p = status["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"] == served[0].as_str())
            .unwrap()
            .clone();
        if p["prefix_reused_tokens"].as_u64().unwrap_or(0) > 100 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reuse reported: {p:#}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
