//! The network on loopback: a gateway and providers as separate processes
//! joined over real iroh connections (relays and discovery off).

mod util;

use std::collections::HashSet;
use std::process::{Command, Stdio};
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
    let resp = util::client()
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
    let mut late = Command::new(util::binary())
        .args([
            "provider",
            "--gateway",
            &net.ticket,
            "--bind",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--slots",
            "2",
            "--model",
        ])
        .arg(util::model_path())
        .env("TESSERA_HOME", home.path())
        .env("TESSERA_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
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
