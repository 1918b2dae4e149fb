//! The network on loopback: a gateway and providers as separate processes
//! joined over real iroh connections (relays and discovery off).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use util::{chat, Devnet};

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
    let mut late = util::spawn_provider(&net.ticket, home.path(), 2);
    assert!(
        net.wait_listed(2, Duration::from_secs(60)),
        "the late provider never joined"
    );
    let late_node = net
        .listed()
        .into_iter()
        .find(|n| *n != net.providers[0].1)
        .unwrap();
    let served: Vec<String> = (0..6)
        .map(|i| provider_of(&ask(&net, &format!("Name {i} colors."))))
        .collect();
    assert!(
        served.contains(&late_node),
        "the late provider got no work: {served:?}"
    );

    // And when it leaves cleanly it stops receiving work at once.
    util::signal(late.id(), "-TERM");
    let _ = late.wait();
    assert!(net.wait_listed(1, Duration::from_secs(15)));
    for i in 0..3 {
        assert_ne!(provider_of(&ask(&net, &format!("Say {i}."))), late_node);
    }
}

#[test]
fn an_answer_continues_on_another_provider_when_its_provider_is_killed() {
    use std::io::{BufRead, BufReader};
    let net = Devnet::start(2);
    let body = chat(
        "Write a long story about a lighthouse.",
        json!({
            "max_tokens": 160, "ignore_eos": true, "temperature": 0.8, "seed": 42, "stream": true,
            "stream_options": {"include_usage": true}
        }),
    );
    let resp = net
        .client()
        .post(net.url("/v1/chat/completions"))
        .json(&body)
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
        // After a dozen tokens, kill the provider serving this answer.
        if killed.is_none() && events.len() == 12 {
            let first: Value = serde_json::from_str(&events[0]).unwrap();
            let node = first["tessera"]["provider"].as_str().unwrap().to_string();
            let (pid, _) = net
                .providers
                .iter()
                .find(|(_, n)| *n == node)
                .unwrap()
                .clone();
            util::signal(pid, "-KILL");
            killed = Some(node);
        }
    }
    let killed = killed.expect("the stream was long enough to kill its provider");
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "the stream must end normally"
    );
    let mut finish = None;
    let mut usage = None;
    let mut tokens = 0;
    let mut named: Vec<String> = Vec::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "error in the stream: {v}");
        if let Some(p) = v["tessera"]["provider"].as_str() {
            if named.last().map(String::as_str) != Some(p) {
                named.push(p.to_string());
            }
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            tokens += 1;
        }
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(
        finish.as_deref(),
        Some("length"),
        "the continued answer is not cut short"
    );
    // The chunk that starts the second provider's part names it.
    assert_eq!(named.len(), 2, "providers named in the stream: {named:?}");
    assert_eq!(named[0], killed);
    assert_ne!(named[1], killed);
    assert_eq!(usage.expect("usage")["completion_tokens"], 160);
    assert!(tokens > 100, "only {tokens} content chunks");
    // The survivor served the rest, and the dead provider gets no new work.
    assert!(net.wait_listed(1, Duration::from_secs(15)));
    assert_ne!(provider_of(&ask(&net, "Say hi.")), killed);
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
    let second = Gateway::start(&[
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
    let served: HashSet<String> = (0..8).map(ask).collect();
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
    let served: HashSet<String> = (8..14).map(ask).collect();
    assert_eq!(served, providers);
}
