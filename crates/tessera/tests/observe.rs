//! Seeing the network, end to end on a devnet with the real model:
//! `/metrics` parsed by the Prometheus project's own OpenMetrics parser
//! (the `prometheus_client` package from PyPI) with counters that move by
//! exactly the traffic sent; `/api/status`, `tessera status` and `tessera
//! provider status` agreeing with the ledger; and the dashboard rendered in
//! headless Chromium (Debian's `chromium`, which `make test` installs),
//! every provider's row and every chart checked in the rendered page, with
//! a screenshot saved as a test artifact.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use util::{chat, sse_data, Devnet};

/// A word that must never appear in metrics or status (prompts are private).
const SECRET: &str = "zebracornpaperclip";

fn python() -> String {
    std::env::var("TESSERA_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `/metrics`, parsed by `prometheus_client`'s strict OpenMetrics parser.
fn scrape(net: &Devnet) -> (String, Vec<Value>) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/metrics_parse.py");
    let out = Command::new(python())
        .arg(script)
        .arg(net.url("/metrics"))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "the Prometheus parser rejected /metrics (is prometheus_client installed for {}? \
         `make test` installs it): {}",
        python(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("parser output");
    (
        v["content_type"].as_str().unwrap_or("").to_string(),
        v["samples"].as_array().cloned().unwrap_or_default(),
    )
}

/// Sum of the samples named `name` whose labels include `labels`.
fn value(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap_or(0.0))
        .sum()
}

/// The opening tag of the element with `id` in `html`.
fn open_tag<'a>(html: &'a str, id: &str) -> &'a str {
    let at = html
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the rendered page"));
    let start = html[..at].rfind('<').expect("tag start");
    let end = at + html[at..].find('>').expect("tag end");
    &html[start..=end]
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let at = tag.find(&key)? + key.len();
    Some(tag[at..at + tag[at..].find('"')?].to_string())
}

/// The text of the cell `data-field="field"` in `row`.
fn cell(row: &str, field: &str) -> String {
    let key = format!("data-field=\"{field}\"");
    let at = row
        .find(&key)
        .unwrap_or_else(|| panic!("no {field} cell in {row}"));
    let from = at + row[at..].find('>').expect("cell") + 1;
    row[from..from + row[from..].find('<').expect("cell end")].to_string()
}

/// Where test artifacts go: `$TESSERA_TEST_ARTIFACTS`, else
/// `$CARGO_TARGET_DIR/test-artifacts`, else `target/test-artifacts`.
fn artifacts() -> PathBuf {
    let dir = std::env::var_os("TESSERA_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("test-artifacts"))
        })
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts")
        });
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

#[test]
fn metrics_status_and_the_dashboard_show_the_traffic_that_flowed() {
    let net = Devnet::start(2);
    assert!(
        net.wait_listed(2, Duration::from_secs(60)),
        "providers did not join"
    );
    let (_, before) = scrape(&net);
    // Jobs before the traffic: each provider's first canary (the devnet
    // waits for them).
    let jobs_before: u64 = util::client()
        .get(net.url("/api/status"))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap()["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["jobs_done"].as_u64().unwrap())
        .sum();

    // Traffic: 6 blocking and 2 streamed answers at once (so both
    // providers get work), and one client mistake.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let client = net.client();
            let url = net.url("/v1/chat/completions");
            std::thread::spawn(move || {
                let stream = i >= 6;
                let mut extra = json!({"max_tokens": 24, "stream": stream, "temperature": 0});
                if stream {
                    extra["stream_options"] = json!({"include_usage": true});
                }
                let body = chat(&format!("{SECRET} {i}: name three colours."), extra);
                let resp = client.post(url).json(&body).send().expect("request");
                assert_eq!(resp.status(), 200);
                if !stream {
                    let v: Value = resp.json().expect("JSON");
                    return (
                        v["usage"]["prompt_tokens"].as_u64().unwrap(),
                        v["usage"]["completion_tokens"].as_u64().unwrap(),
                        v["tessera"]["cost"].as_u64().unwrap(),
                    );
                }
                let chunks: Vec<Value> = sse_data(&resp.text().expect("SSE"))
                    .iter()
                    .filter(|d| *d != "[DONE]")
                    .map(|d| serde_json::from_str(d).expect("chunk"))
                    .collect();
                let usage = chunks
                    .iter()
                    .find(|c| c["usage"].is_object())
                    .expect("usage chunk");
                let cost = chunks
                    .iter()
                    .find_map(|c| c["tessera"]["cost"].as_u64())
                    .expect("cost");
                (
                    usage["usage"]["prompt_tokens"].as_u64().unwrap(),
                    usage["usage"]["completion_tokens"].as_u64().unwrap(),
                    cost,
                )
            })
        })
        .collect();
    let done: Vec<(u64, u64, u64)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let (status, _) = net.post(
        "/v1/chat/completions",
        &chat("hi", json!({"max_tokens": "ten"})),
    );
    assert_eq!(status, 400);
    let prompt: u64 = done.iter().map(|d| d.0).sum();
    let completion: u64 = done.iter().map(|d| d.1).sum();
    let paid: u64 = done.iter().map(|d| d.2).sum();

    // /metrics moved by exactly that.
    let raw = util::client()
        .get(net.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(!raw.contains(SECRET), "prompt text leaked into /metrics");
    let (content_type, after) = scrape(&net);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let chat_route = ("route", "/v1/chat/completions");
    assert_eq!(
        delta(
            "tessera_http_requests_total",
            &[chat_route, ("status", "200")]
        ),
        8.0
    );
    assert_eq!(
        delta(
            "tessera_http_requests_total",
            &[chat_route, ("status", "400")]
        ),
        1.0
    );
    assert_eq!(
        delta("tessera_generations_total", &[("outcome", "completed")]),
        8.0
    );
    assert_eq!(
        delta("tessera_tokens_total", &[("kind", "prompt")]),
        prompt as f64
    );
    assert_eq!(
        delta("tessera_tokens_total", &[("kind", "completion")]),
        completion as f64
    );
    assert_eq!(delta("tessera_time_to_first_token_seconds_count", &[]), 8.0);
    assert_eq!(delta("tessera_generation_duration_seconds_count", &[]), 8.0);
    assert!(delta("tessera_generation_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(value(&after, "tessera_active_generations", &[]), 0.0);
    assert_eq!(
        delta("tessera_audits_total", &[("verdict", "not_audited")]),
        8.0
    );
    assert_eq!(
        delta("tessera_provider_jobs_total", &[("outcome", "done")]),
        8.0
    );
    // Providers stream every token but a final end-of-generation one.
    let streamed = delta("tessera_provider_tokens_total", &[]);
    assert!(
        streamed <= completion as f64 && streamed >= (completion - 8) as f64,
        "{streamed} streamed of {completion}"
    );
    for (_, node) in &net.providers {
        assert!(
            value(
                &after,
                "tessera_provider_tokens_per_second",
                &[("provider", node)]
            ) > 0.0,
            "no measured tok/s for {node}"
        );
    }
    assert_eq!(
        delta("tessera_ledger_micro_credits", &[("account", "revenue")]),
        paid as f64
    );
    assert_eq!(
        value(
            &after,
            "tessera_ledger_micro_credits",
            &[("account", "escrow")]
        ),
        0.0
    );

    // /api/status agrees with the ledger and names every provider.
    let status: Value = util::client()
        .get(net.url("/api/status"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(!status.to_string().contains(SECRET));
    let sum = &status["summary"];
    assert_eq!(sum["providers_online"], 2);
    assert_eq!(sum["revenue"], paid);
    assert_eq!(sum["settled_requests"], 8);
    assert!(sum["tokens_per_minute"].as_u64().unwrap() >= completion - 8);
    let providers = status["providers"].as_array().unwrap();
    let mut jobs = 0;
    for (i, (_, node)) in net.providers.iter().enumerate() {
        let p = providers
            .iter()
            .find(|p| p["node"] == node.as_str())
            .expect("provider listed");
        assert_eq!(p["state"], "online");
        assert!(p["uptime"].as_f64().unwrap() > 0.9, "{p}");
        jobs += p["jobs_done"].as_u64().unwrap();
        // The provider's own view: `provider status`, and `provider
        // earnings`, which checks every receipt's signatures.
        let home = &net.provider_homes[i];
        let mine = util::tessera_json(home, &["provider", "status", "--api", &net.api_base]);
        assert_eq!(mine["node"], node.as_str());
        assert_eq!(mine["jobs_done"], p["jobs_done"]);
        let earned = util::tessera_json(home, &["provider", "earnings", "--api", &net.api_base]);
        assert_eq!(p["earnings"], earned["totals"]["earned"], "{node}");
        assert_eq!(earned["verified_earned"], earned["totals"]["earned"]);
    }
    assert_eq!(jobs - jobs_before, 8);
    let text = util::tessera(net.home.path(), &["status", "--api", &net.api_base]);
    for (_, node) in &net.providers {
        assert!(
            text.contains(&node[..12]),
            "{node} missing from `tessera status`:\n{text}"
        );
    }
    assert!(text.contains("2 online"), "{text}");

    // The dashboard, rendered by Chromium.
    let dom = util::headless(&net.url("/dashboard"), &["--dump-dom"]);
    assert!(
        dom.contains("data-ready=\"1\""),
        "the dashboard never rendered its data:\n{dom}"
    );
    assert!(!dom.contains(SECRET));
    for p in providers {
        let node = p["node"].as_str().unwrap();
        let at = dom
            .find(&format!("data-node=\"{node}\""))
            .unwrap_or_else(|| panic!("provider {node} missing from the dashboard"));
        let row = &dom[at..at + dom[at..].find("</tr>").expect("row end")];
        assert_eq!(cell(row, "state"), "online");
        assert_eq!(cell(row, "jobs"), p["jobs_done"].to_string());
        assert_eq!(cell(row, "tokens"), p["tokens"].to_string());
        let tok_s: f64 = cell(row, "tok_s").parse().expect("tok/s figure");
        assert!((tok_s - p["tok_s"].as_f64().unwrap()).abs() < 0.06, "{row}");
        let earned: f64 = cell(row, "earnings").parse().expect("earnings figure");
        let expected = p["earnings"].as_f64().unwrap() / 1e6;
        assert!(
            expected > 0.0 && (earned - expected).abs() <= expected * 0.01,
            "{row}"
        );
        assert_eq!(cell(row, "price"), "20/80");
    }
    for chart in ["chart-tokens", "chart-requests", "chart-latency"] {
        let tag = open_tag(&dom, chart);
        let points: usize = attr(tag, "data-points")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        assert!(points > 0, "{chart} drew nothing: {tag}");
        let max: f64 = attr(tag, "data-max")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0.0);
        assert!(max > 1.0, "{chart} shows no traffic: {tag}");
    }
    let svg = &dom[dom.find("id=\"chart-tokens\"").unwrap()..];
    let svg = &svg[..svg.find("</svg>").unwrap()];
    assert!(
        svg.contains("class=\"series\""),
        "no line in the tokens chart"
    );

    let shot = artifacts().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    util::headless(
        &net.url("/dashboard"),
        &[&format!("--screenshot={}", shot.display())],
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}

#[test]
fn metrics_and_status_need_no_key_and_reject_nothing_they_should_not() {
    let net = Devnet::start(1);
    // Open routes: no key needed, never a 5xx.
    for path in ["/metrics", "/api/status", "/dashboard"] {
        let resp = util::client().get(net.url(path)).send().unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let page = util::client().get(net.url("/dashboard")).send().unwrap();
    let ct = page.headers()["content-type"].to_str().unwrap().to_string();
    let html = page.text().unwrap();
    assert!(ct.starts_with("text/html"), "{ct}");
    // Self-contained: nothing is loaded from another origin.
    for needle in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "@import",
    ] {
        assert!(!html.contains(needle), "the dashboard loads {needle}…");
    }
    let resp = util::client().post(net.url("/api/status")).send().unwrap();
    assert_eq!(resp.status(), 405);
    let resp = util::client().get(net.url("/api/nothing")).send().unwrap();
    assert_eq!(resp.status(), 404);
}

#[test]
fn serve_counts_its_own_traffic_on_metrics() {
    let server = util::Server::start(&["--slots", "2"]);
    let (status, v) = server.post(
        "/v1/chat/completions",
        &chat("Say hi", json!({"max_tokens": 8})),
    );
    assert_eq!(status, 200, "{v}");
    let text = util::client()
        .get(format!("{}/metrics", server.root))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(
        line("tessera_generations_total{outcome=\"completed\"}"),
        1.0
    );
    assert_eq!(
        line("tessera_tokens_total{kind=\"completion\"}"),
        v["usage"]["completion_tokens"].as_f64().unwrap()
    );
    assert_eq!(
        line("tessera_ledger_micro_credits{account=\"revenue\"}"),
        v["tessera"]["cost"].as_f64().unwrap()
    );
    assert!(text.trim_end().ends_with("# EOF"));
}
