//! Schema fuzzing of the HTTP API **through a gateway** (the request crosses
//! the network to a real provider): a seeded generator mutates valid
//! requests field by field — wrong types, absurd numbers, unknown fields,
//! odd Unicode, huge strings, broken provider preferences, bad keys and
//! content types, truncated bodies — and every answer must be a clean one:
//! a 2xx, or a 4xx/503 error in OpenAI's shape; never a 500, 502 or 504,
//! never a dropped connection. The gateway keeps serving at the end.
//!
//! The cases are deterministic (seed below) and bounded; set
//! `TESSERA_FUZZ_CASES` for a longer run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use serde_json::{json, Map, Value};
use util::{chat, Devnet, MODEL};

/// xorshift64*: small, seeded, enough to draw cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
}

/// A value of any JSON type, some of them hostile.
fn any_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 2 { 9 } else { 11 }) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => json!(rng.pick(&[0i64, -1, 1, 2, 7, i64::MIN, i64::MAX, 4096, 1 << 40])),
        3 => json!(rng.pick(&[0.5f64, -0.0, 1e308, -1e308, 3.25, 1e-300])),
        4 => json!(rng.pick(&[
            "",
            "x",
            "null",
            "NaN",
            "Infinity",
            "-1",
            "🙂🙂",
            "\u{0000}",
            "\u{202e}evil",
            "ß\u{0301}"
        ])),
        5 => json!("z".repeat(rng.pick(&[1usize, 300, 70_000]))),
        6 => json!(rng.pick(&["user", "assistant", "system", "tool", "developer"])),
        7 => json!(MODEL),
        8 => json!(format!("{:x}", rng.next())),
        9 => Value::Array(
            (0..rng.below(4))
                .map(|_| any_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(4) {
                let key = rng.pick(&[
                    "role",
                    "content",
                    "type",
                    "text",
                    "prompt",
                    "completion",
                    "x",
                    "",
                ]);
                m.insert(key.to_string(), any_value(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// A valid request for `endpoint`, then a few of its fields mutated.
fn case(rng: &mut Rng, endpoint: &str) -> Value {
    let mut body = match endpoint {
        "/v1/completions" => json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}),
        _ => chat("Say hi.", json!({"max_tokens": 4})),
    };
    let fields = [
        "model",
        "messages",
        "prompt",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "user",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "provider",
        "max_completion_tokens",
        "unknown_field",
    ];
    let obj = body.as_object_mut().unwrap();
    for _ in 0..1 + rng.below(3) {
        let field = rng.pick(&fields);
        let value = match field {
            "messages" if rng.chance(50) => {
                let msgs: Vec<Value> = (0..rng.below(4))
                    .map(|_| json!({"role": any_value(rng, 1), "content": any_value(rng, 1)}))
                    .collect();
                Value::Array(msgs)
            }
            "stop" if rng.chance(50) => Value::Array(
                (0..rng.pick(&[1usize, 4, 16, 17, 40]))
                    .map(|_| any_value(rng, 2))
                    .collect(),
            ),
            "provider" => {
                let mut p = Map::new();
                for _ in 0..1 + rng.below(3) {
                    let k = rng.pick(&[
                        "only",
                        "ignore",
                        "order",
                        "sort",
                        "max_price",
                        "allow_fallbacks",
                        "other",
                    ]);
                    let v = match (k, rng.below(3)) {
                        ("sort", 0) => json!(rng.pick(&["price", "throughput", "latency"])),
                        ("max_price", 0) => {
                            json!({"prompt": any_value(rng, 2), "completion": any_value(rng, 2)})
                        }
                        ("only" | "ignore" | "order", 0) => json!([any_value(rng, 2)]),
                        _ => any_value(rng, 1),
                    };
                    p.insert(k.to_string(), v);
                }
                Value::Object(p)
            }
            _ => any_value(rng, 0),
        };
        obj.insert(field.to_string(), value);
    }
    // Keep answers short: a valid max_tokens stays small.
    if obj
        .get("max_tokens")
        .is_none_or(|v| v.as_u64().is_some_and(|n| n > 8))
    {
        obj.insert("max_tokens".into(), json!(4));
    }
    if rng.chance(15) {
        obj.insert("max_tokens".into(), any_value(rng, 0));
        if obj["max_tokens"].as_u64().is_some_and(|n| n > 8) || obj["max_tokens"].is_null() {
            obj.insert("max_tokens".into(), json!(-3));
        }
    }
    if obj
        .get("max_completion_tokens")
        .is_some_and(|v| v.as_u64().is_none_or(|n| n > 8))
    {
        obj.remove("max_completion_tokens");
    }
    body
}

#[test]
fn fuzzed_requests_through_a_gateway_never_get_a_server_error() {
    let net = Devnet::start(1);
    let cases: usize = std::env::var("TESSERA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let mut rng = Rng(0x7e55_e4a0_f022_2026);
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap();
    let mut statuses: std::collections::BTreeMap<u16, usize> = Default::default();
    for i in 0..cases {
        let endpoint = rng.pick(&[
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
            "/v1/account",
        ]);
        let body = case(&mut rng, endpoint);
        let mut bytes = serde_json::to_vec(&body).unwrap();
        if rng.chance(5) {
            let cut = rng.below(bytes.len());
            bytes.truncate(cut);
        }
        if rng.chance(3) {
            bytes = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
        }
        let key = match rng.below(10) {
            0 => None,
            1 => Some("sk-garbage".to_string()),
            2 => Some("🙂".to_string()),
            _ => Some(net.key.clone()),
        };
        let get = matches!(endpoint, "/v1/models" | "/v1/account") && rng.chance(80);
        let url = net.url(endpoint);
        let mut req = if get {
            client.get(&url)
        } else {
            client.post(&url)
        };
        if let Some(k) = &key {
            // A key that is not a valid header value is sent as bytes.
            req = req.header(
                "Authorization",
                reqwest::header::HeaderValue::from_bytes(format!("Bearer {k}").as_bytes())
                    .unwrap_or(reqwest::header::HeaderValue::from_static("Bearer x")),
            );
        }
        let content_type = if rng.chance(90) {
            "application/json"
        } else {
            "text/plain"
        };
        if !get {
            req = req.header("Content-Type", content_type).body(bytes.clone());
        }
        let resp = req
            .send()
            .unwrap_or_else(|e| panic!("case {i} ({endpoint}): no answer: {e}\n{body}"));
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .unwrap_or_else(|e| panic!("case {i}: the answer broke off: {e}\n{body}"));
        *statuses.entry(status).or_default() += 1;
        if std::env::var_os("TESSERA_FUZZ_TRACE").is_some() {
            eprintln!(
                "case {i}: {endpoint} get={get} key={key:?} {} bytes -> {status}",
                bytes.len()
            );
        }
        assert!(
            !matches!(status, 500 | 502 | 504) && status < 600,
            "case {i} ({endpoint}, key {key:?}): {status} {text}\nrequest: {}",
            String::from_utf8_lossy(&bytes)
        );
        if status >= 400 {
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("case {i}: a {status} that is not JSON: {text}"));
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "case {i}: a {status} without an OpenAI error: {text}"
            );
        }
        if status == 200 && text.starts_with("data:") {
            assert!(
                text.contains("[DONE]") || text.contains("\"error\""),
                "case {i}: a stream that ended without [DONE] or an error: {text}"
            );
        }
    }
    eprintln!("fuzz statuses: {statuses:?}");
    // Still serving, and nothing left running.
    let (status, v) = net.post(
        "/v1/chat/completions",
        &chat("Say hi.", json!({"max_tokens": 4})),
    );
    assert_eq!(status, 200, "{v}");
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 0,
        "no case was valid: {statuses:?}"
    );
}
