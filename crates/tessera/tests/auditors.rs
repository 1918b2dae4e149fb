//! Auditor processes (`tessera auditor`) on a real gateway: one the operator
//! named takes audits off the gateway's CPU and its verdicts hold; a
//! stranger dialling in as an auditor is refused; when the named one
//! vanishes, audits go on at the gateway.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use util::{binary, chat, model_path, spawn_provider, tessera, KillOnDrop};

/// `tessera auditor` for `ticket` with its key in `home`.
fn spawn_auditor(ticket: &str, home: &std::path::Path) -> Child {
    Command::new(binary())
        .args(["auditor", "--gateway", ticket, "--bind", "127.0.0.1:0"])
        .args(["--threads", "1", "--context", "1024", "--model"])
        .arg(model_path())
        .env("TESSERA_HOME", home)
        .env("TESSERA_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tessera auditor")
}

/// Poll `GET /v1/jobs/{id}` until its audit is no longer pending.
fn verdict(gw: &util::Gateway, id: &str) -> Value {
    util::final_audit(&gw.client(), &gw.url(&format!("/v1/jobs/{id}")))
}

/// The auditors the operator's status lists.
fn auditors(gw: &util::Gateway) -> Vec<Value> {
    gw.operator_status()["auditors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Ask one short question and wait for its verdict.
fn ask(gw: &util::Gateway, i: usize) -> Value {
    let body = chat(
        &format!("Name a colour and a number, {i}."),
        json!({"temperature": 0.8, "seed": i, "max_tokens": 24}),
    );
    let resp = gw
        .client()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().unwrap();
    verdict(gw, answer["id"].as_str().unwrap())
}

#[test]
fn named_auditors_take_audits_and_strangers_are_refused() {
    let (named_home, stranger_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let named = tessera(named_home.path(), &["auditor", "--print-id"])
        .trim()
        .to_string();
    let stranger = tessera(stranger_home.path(), &["auditor", "--print-id"])
        .trim()
        .to_string();
    assert_eq!(named.len(), 64, "a node id: {named}");
    assert_ne!(named, stranger);
    // Every answer is audited (a long probation), on the gateway's engine
    // or the named auditor's.
    let gw = util::Gateway::start(&["--audit", "--audit-probation", "1000", "--auditor", &named]);
    let provider_home = tempfile::tempdir().unwrap();
    let mut children = KillOnDrop(vec![spawn_provider(&gw.ticket, provider_home.path(), 2)]);
    assert!(util::wait_listed(
        &gw.url("/health"),
        1,
        Duration::from_secs(60)
    ));

    // A stranger is refused at the handshake, and says so.
    let mut stranger_proc = spawn_auditor(&gw.ticket, stranger_home.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = stranger_proc.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "a stranger auditor was not refused"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(stranger_proc.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "the refused auditor exits with an error");
    assert!(
        err.contains("was not named by this gateway's operator"),
        "the refusal names its reason: {err}"
    );
    assert!(auditors(&gw).is_empty(), "no stranger among the auditors");

    // The named auditor joins and takes audits; every verdict passes.
    children
        .0
        .push(spawn_auditor(&gw.ticket, named_home.path()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while auditors(&gw).is_empty() {
        assert!(Instant::now() < deadline, "the named auditor never joined");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(auditors(&gw)[0]["node"], named);
    for i in 0..4 {
        let v = ask(&gw, i);
        assert_eq!(v["audit"], "passed", "honest answer {i}: {v}");
    }
    let listed = auditors(&gw);
    assert!(
        listed[0]["done"].as_u64().unwrap() >= 1,
        "the named auditor ran audits: {listed:?}"
    );
    assert_eq!(listed[0]["failed"], 0, "{listed:?}");

    // It vanishes: audits go on at the gateway, nothing stays pending.
    let mut auditor = children.0.pop().unwrap();
    auditor.kill().unwrap();
    auditor.wait().unwrap();
    for i in 4..6 {
        let v = ask(&gw, i);
        assert_eq!(
            v["audit"], "passed",
            "after the auditor left, answer {i}: {v}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !auditors(&gw).is_empty() {
        assert!(Instant::now() < deadline, "a dead auditor stays listed");
        std::thread::sleep(Duration::from_millis(200));
    }
}
