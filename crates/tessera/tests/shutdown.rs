//! SIGTERM while answers are streaming: the server takes no new requests,
//! lets the answers in flight run for a grace period, ends the rest with an
//! error event, and exits with nothing left held in escrow — on `tessera
//! serve` and on a gateway in front of a provider.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::json;
use util::{chat, KillOnDrop};

/// Start `n` long streams against `root`, SIGTERM `pid` once they are all
/// generating, and check each stream ended cleanly: `[DONE]` after a
/// finish reason, or an error event saying the server stopped.
fn streams_then_sigterm(root: &str, key: &str, pid: u32, n: usize) {
    let started = std::sync::Arc::new(std::sync::Barrier::new(n + 1));
    let streams: Vec<_> = (0..n)
        .map(|i| {
            let (root, key, started) = (root.to_string(), key.to_string(), started.clone());
            std::thread::spawn(move || {
                let body = chat(
                    &format!("Tell a very long story, part {i}."),
                    json!({"max_tokens": 1500, "ignore_eos": true, "stream": true}),
                );
                let mut resp = util::client_for(&key)
                    .post(format!("{root}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .unwrap();
                assert_eq!(resp.status().as_u16(), 200);
                // Wait for the first bytes (the answer is running), then let
                // the signal go.
                let mut first = [0u8; 16];
                let got = resp.read(&mut first).unwrap();
                assert!(got > 0);
                started.wait();
                let mut rest = String::new();
                let _ = resp.read_to_string(&mut rest);
                rest
            })
        })
        .collect();
    started.wait();
    std::thread::sleep(Duration::from_millis(500));
    util::signal(pid, "-TERM");
    for s in streams {
        let text = s.join().unwrap();
        let events = util::sse_data(&text);
        let last = events.last().cloned().unwrap_or_default();
        let ended_cleanly = last == "[DONE]"
            || events
                .iter()
                .any(|e| e.contains("\"error\"") && e.contains("shutting down"));
        assert!(
            ended_cleanly,
            "a stream ended without [DONE] or an error event: …{}",
            &text[text.len().saturating_sub(300)..]
        );
    }
}

/// The ledger of `home` after the process stopped: nothing held.
fn nothing_held(home: &std::path::Path) {
    let check = util::tessera_json(home, &["account", "check"]);
    assert_eq!(check["open_holds"], 0, "a hold is still open: {check}");
    assert_eq!(check["escrow"], 0, "{check}");
    assert_eq!(
        (
            check["total"].as_i64(),
            check["unbalanced_entries"].as_i64()
        ),
        (Some(0), Some(0)),
        "{check}"
    );
    let demo = util::tessera_json(home, &["account", "show", "demo"]);
    assert_eq!(demo["held"], 0, "{demo}");
}

fn wait_exit(child: &mut std::process::Child, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(status.success(), "exited with {status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("did not exit within {} s of SIGTERM", within.as_secs());
}

#[test]
fn sigterm_during_streams_on_serve_leaves_nothing_held() {
    let mut server = util::Server::start(&["--slots", "4"]);
    streams_then_sigterm(&server.root, &server.key, server.pid(), 3);
    let status = server.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "serve did not stop cleanly: {status:?}"
    );
    nothing_held(server.home.path());
}

#[test]
fn sigterm_during_streams_on_a_gateway_leaves_nothing_held() {
    let mut gw = util::Gateway::start(&[]);
    let home = tempfile::tempdir().unwrap();
    let _provider = KillOnDrop(vec![util::spawn_provider(&gw.ticket, home.path(), 4)]);
    assert!(util::wait_listed(
        &gw.url("/health"),
        1,
        Duration::from_secs(90)
    ));
    let root = gw.url("");
    streams_then_sigterm(&root, &gw.key, gw.child.id(), 3);
    wait_exit(&mut gw.child, Duration::from_secs(40));
    nothing_held(gw.home.path());
}
