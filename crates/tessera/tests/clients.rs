//! Real clients against `tessera serve`: the official `openai` Python
//! package and `curl`.
//!
//! The Python used is `$TESSERA_TEST_PYTHON` (`make test` points it at a
//! virtual environment where it installed `openai` from PyPI), else `python3`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::process::Command;

use serde_json::Value;
use util::{Devnet, Server, MODEL};

#[test]
fn the_official_openai_python_package_works_stream_and_non_stream() {
    let server = Server::start(&["--slots", "4", "--context", "1024"]);
    openai_checks(&server.api_base, &server.key);
}

#[test]
fn the_openai_package_works_against_a_devnet_gateway() {
    let net = Devnet::start(2);
    openai_checks(&net.api_base, &net.key);
}

/// Run `clients/openai_check.py` (the SDK with retries off) against `api`.
fn openai_checks(api_base: &str, key: &str) {
    let python = std::env::var("TESSERA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/openai_check.py");
    let out = Command::new(&python)
        .arg(script)
        .args([api_base, MODEL, key])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client checks failed (is the `openai` package installed for {python}? `make test` installs it)\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("openai client checks passed"));
}

fn curl(key: &str, args: &[&str]) -> (String, String) {
    let auth = format!("Authorization: Bearer {key}");
    let out = Command::new("curl")
        .args(["-sS", "-N", "-H", &auth])
        .args(args)
        .output()
        .expect("curl is installed");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn curl_non_stream_stream_and_errors() {
    let server = Server::start(&["--slots", "2", "--context", "1024"]);
    let url = format!("{}/chat/completions", server.api_base);
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Say hello."}}],"max_tokens":16,"temperature":0}}"#
    );
    let (out, err) = curl(
        &server.key,
        &[&url, "-H", "Content-Type: application/json", "-d", &body],
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("not JSON: {out} {err}"));
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{v}"
    );

    // curl -d without a JSON content type still works.
    let stream_body = body.replacen("\"temperature\":0", "\"temperature\":0,\"stream\":true", 1);
    let (out, _) = curl(&server.key, &[&url, "-d", &stream_body]);
    let events = util::sse_data(&out);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{out}");
    let text: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        text,
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // Status codes as curl sees them.
    let (code, _) = curl(
        &server.key,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
            "-d",
            "{not json",
        ],
    );
    assert_eq!(code, "400");
    let (code, _) = curl(
        &server.key,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{}/models", server.api_base),
        ],
    );
    assert_eq!(code, "200");
    let (code, _) = curl(
        "tsk_wrong",
        &["-o", "/dev/null", "-w", "%{http_code}", &url, "-d", &body],
    );
    assert_eq!(code, "401");
}
