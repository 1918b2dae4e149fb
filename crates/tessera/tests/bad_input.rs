//! A client's mistakes get a clear 4xx in OpenAI's shape, never a 500, and
//! the server keeps serving afterwards — on `tessera serve` and on the
//! gateway of a devnet (where the request crosses the network).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use serde_json::json;
use util::{assert_openai_error, chat, Devnet, Server, Target, MODEL};

#[test]
fn every_mistake_gets_the_right_status_and_the_server_keeps_serving() {
    // A small context and body limit make "too long" and "too large" cheap.
    let server = Server::start(&["--slots", "2", "--context", "256", "--body-limit", "65536"]);
    suite(&server, 256, 65536);
    let (_, h) = server.get_json("/health");
    assert_eq!(h["backend"]["active"], 0);
}

#[test]
fn every_mistake_gets_the_right_status_from_a_devnet_gateway() {
    // Providers hold 2048 tokens per request; the gateway's body limit is
    // the default 4 MiB.
    let net = Devnet::start(1);
    suite(&net, 2048, 4 * 1024 * 1024);
}

/// The mistakes, against `target` whose requests hold `context` tokens and
/// whose body limit is `body_limit` bytes.
fn suite(target: &dyn Target, context: usize, body_limit: usize) {
    let too_long = "lorem ipsum dolor ".repeat(context);
    let too_large = "a".repeat(body_limit + 1000);
    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
        ("malformed JSON", b"{\"model\": \"x\", ".to_vec(), 400, None),
        ("garbage bytes", vec![0xff, 0x00, 0x13, 0x37], 400, None),
        ("empty body", Vec::new(), 400, None),
        ("JSON array", b"[1,2,3]".to_vec(), 400, None),
        (
            "missing model",
            json!({"messages": [{"role": "user", "content": "hi"}]})
                .to_string()
                .into_bytes(),
            400,
            None,
        ),
        (
            "wrong type: max_tokens",
            chat("hi", json!({"max_tokens": "ten"}))
                .to_string()
                .into_bytes(),
            400,
            Some("max_tokens"),
        ),
        (
            "wrong type: messages",
            json!({"model": MODEL, "messages": "hi"})
                .to_string()
                .into_bytes(),
            400,
            Some("messages"),
        ),
        (
            "wrong type: temperature",
            chat("hi", json!({"temperature": [1]}))
                .to_string()
                .into_bytes(),
            400,
            Some("temperature"),
        ),
        (
            "wrong type: content",
            json!({"model": MODEL, "messages": [{"role": "user", "content": 42}]})
                .to_string()
                .into_bytes(),
            400,
            Some("messages[0].content"),
        ),
        (
            "empty messages",
            json!({"model": MODEL, "messages": []})
                .to_string()
                .into_bytes(),
            400,
            Some("messages"),
        ),
        (
            "unknown role",
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]})
                .to_string()
                .into_bytes(),
            400,
            Some("messages[0].role"),
        ),
        (
            "unknown model",
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
                .to_string()
                .into_bytes(),
            404,
            Some("model"),
        ),
        (
            "negative max_tokens",
            chat("hi", json!({"max_tokens": -5}))
                .to_string()
                .into_bytes(),
            400,
            Some("max_tokens"),
        ),
        (
            "zero max_tokens",
            chat("hi", json!({"max_tokens": 0}))
                .to_string()
                .into_bytes(),
            400,
            Some("max_tokens"),
        ),
        (
            "absurd max_tokens",
            chat("hi", json!({"max_tokens": 1_000_000_000_000i64}))
                .to_string()
                .into_bytes(),
            400,
            Some("max_tokens"),
        ),
        (
            "temperature out of range",
            chat("hi", json!({"temperature": 7}))
                .to_string()
                .into_bytes(),
            400,
            Some("temperature"),
        ),
        (
            "a stop sequence of 10,000 bytes",
            chat("hi", json!({"stop": ["x".repeat(10_000)]}))
                .to_string()
                .into_bytes(),
            400,
            Some("stop"),
        ),
        (
            "17 stop sequences",
            chat("hi", json!({"stop": vec!["a"; 17]}))
                .to_string()
                .into_bytes(),
            400,
            Some("stop"),
        ),
        (
            "n = 3",
            chat("hi", json!({"n": 3})).to_string().into_bytes(),
            400,
            Some("n"),
        ),
        (
            "top_logprobs without logprobs",
            chat("hi", json!({"top_logprobs": 2}))
                .to_string()
                .into_bytes(),
            400,
            Some("top_logprobs"),
        ),
        (
            "prompt longer than the context",
            chat(&too_long, json!({})).to_string().into_bytes(),
            400,
            Some("messages"),
        ),
        (
            "body over the limit",
            chat(&too_large, json!({})).to_string().into_bytes(),
            413,
            None,
        ),
    ];
    for (name, body, status, param) in cases {
        let (got, v) = target.post_bytes("/v1/chat/completions", body);
        assert_eq!(got, status, "{name}: {v}");
        let e = assert_openai_error(&v);
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{name}: {v}");
        }
        if name == "prompt longer than the context" {
            assert_eq!(e["code"], "context_length_exceeded");
        }
    }

    // Legacy completions share the checks.
    let (s, v) = target.post_json("/v1/completions", &json!({"model": MODEL, "prompt": ""}));
    assert_eq!(s, 400, "{v}");
    let (s, v) = target.post_json("/v1/completions", &json!({"model": MODEL, "prompt": 12}));
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "prompt");

    // Unknown routes and methods.
    let (s, v) = target.get_json("/v1/nothing-here");
    assert_eq!(s, 404);
    assert_openai_error(&v);
    let (s, v) = target.get_json("/v1/chat/completions");
    assert_eq!(s, 405);
    assert_openai_error(&v);

    // Unknown fields are ignored, and after all that the server still answers.
    let (s, v) = target.post_json("/v1/chat/completions", &chat("Say hi.", json!({
        "max_tokens": 8, "frequency_penalty": 0.1, "user": "u1", "some_future_field": {"x": 1}
    })));
    assert_eq!(s, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string());
}
