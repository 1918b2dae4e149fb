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
