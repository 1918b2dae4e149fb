//! Federated training with real provider processes over iroh: the devnet's
//! training demo, SecAgg+ with a provider SIGKILLed after sharing its keys,
//! and the training API and CLI a task owner uses (curl-style HTTP, `tessera
//! train`, the dashboard in headless Chromium).
//!
//! Short versions (4 providers, at most 20 rounds); the 10-provider runs
//! are the demo's and BENCHMARKS.md's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use util::{binary, tessera, Devnet};

/// `tessera devnet --train-demo --json …` to completion: its JSON line,
/// and the home it ran in.
fn train_demo(extra: &[&str]) -> (Value, tempfile::TempDir) {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args([
            "devnet",
            "--listen",
            "127.0.0.1:0",
            "--providers",
            "4",
            "--train-demo",
            "--json",
            "--model",
        ])
        .arg(util::model_path())
        .args(extra)
        .env("TESSERA_HOME", home.path())
        .env("TESSERA_LOG", "error")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "devnet --train-demo failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    (
        serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {text}")),
        home,
    )
}

/// The devnet's ledger balances (`tessera account check` on it).
fn books_balance(home: &std::path::Path) {
    let gw = home.join("devnet/gateway");
    let check: Value =
        serde_json::from_str(&tessera(&gw, &["account", "check", "--json"])).unwrap();
    for (field, want) in [
        ("unbalanced_entries", 0),
        ("mismatched_accounts", 0),
        ("total", 0),
        ("open_holds", 0),
        ("escrow", 0),
    ] {
        assert_eq!(check[field], want, "{field}: {check:#}");
    }
}

#[test]
fn four_provider_processes_train_the_digits_model_nearly_as_well_as_one_machine() {
    let (run, home) = train_demo(&["--rounds", "20"]);
    assert_eq!(run["status"], "completed", "{run:#}");
    assert_eq!(run["rounds"], 20);
    assert_eq!(run["rounds_completed"], 20);
    let (fed, central) = (
        run["accuracy"].as_f64().unwrap(),
        run["centralized_accuracy"].as_f64().unwrap(),
    );
    println!("federated {fed:.4}, centralized {central:.4} after 20 rounds of 2 epochs");
    assert!(fed > 0.9 && fed > central - 0.04, "{run:#}");
    // The global model out and each update back, base64: ~2 × 5.33 bytes a
    // parameter (64-64-10: 4,874).
    let bytes = run["bytes_per_client_round"].as_u64().unwrap();
    assert!((2 * 4874 * 4..2 * 4874 * 6).contains(&bytes), "{bytes}");
    // Every provider paid every round; nothing left in escrow.
    let e = &run["escrow"];
    assert_eq!(e["spent"], 20 * 4 * 1_000, "{run:#}");
    assert_eq!(
        e["held"],
        e["spent"].as_u64().unwrap() + e["refunded"].as_u64().unwrap()
    );
    books_balance(home.path());
}

#[test]
fn a_secagg_round_completes_when_a_provider_is_sigkilled_after_sharing_its_keys() {
    let (run, home) = train_demo(&["--secagg", "--vanish", "1", "--rounds", "6"]);
    assert_eq!(run["status"], "completed", "{run:#}");
    assert_eq!(run["rounds_completed"], 6, "every round unmasked: {run:#}");
    assert!(run["dropped"].as_u64().unwrap() >= 1, "{run:#}");
    assert!(run["accuracy"].as_f64().unwrap() > 0.8, "{run:#}");
    // The killed provider was paid for no round; the three others for all.
    let e = &run["escrow"];
    assert_eq!(e["spent"], 6 * 3 * 1_000, "{run:#}");
    books_balance(home.path());
}

#[test]
fn a_task_owner_creates_watches_and_fetches_a_task_and_the_dashboard_draws_it() {
    let net = Devnet::start_with(3, &["--train-demo", "--rounds", "3"]);
    let http = reqwest::blocking::Client::new();
    let url = |p: &str| format!("{}{p}", net.api_base);
    // Mistakes are clear 4xx errors that hold nothing.
    let bad = |r: reqwest::blocking::Response, status: u16| {
        assert_eq!(r.status().as_u16(), status);
        let body: Value = r.json().unwrap();
        assert!(body["error"]["message"].as_str().is_some(), "{body}");
    };
    bad(
        http.post(url("/training/tasks"))
            .bearer_auth(&net.key)
            .body("{not json")
            .send()
            .unwrap(),
        400,
    );
    bad(
        http.post(url("/training/tasks"))
            .bearer_auth(&net.key)
            .json(&json!({"model": {"kind": "mlp", "inputs": 64, "hidden": 8, "classes": 10}, "rounds": "many"}))
            .send()
            .unwrap(),
        400,
    );
    bad(
        http.post(url("/training/tasks"))
            .bearer_auth("tsk_wrong")
            .json(&json!({}))
            .send()
            .unwrap(),
        401,
    );
    bad(
        http.get(url("/training/tasks/train-nope"))
            .bearer_auth(&net.key)
            .send()
            .unwrap(),
        404,
    );
    bad(
        http.post(url("/training/tasks"))
            .bearer_auth(&net.key)
            .json(
                &json!({"model": {"kind": "logistic", "inputs": 64, "classes": 10},
                          "rounds": 10000, "max_price_per_round": 1000000}),
            )
            .send()
            .unwrap(),
        402,
    );
    // The CLI: create (escrow held), watch to the end, fetch the model.
    let home = net.home.path();
    let id = tessera(
        home,
        &[
            "train",
            "create",
            "--rounds",
            "4",
            "--clients-per-round",
            "3",
            "--min-clients",
            "3",
            "--hidden",
            "16",
            "--epochs",
            "2",
            "--test",
            "digits",
            "--max-price-per-round",
            "1000",
            "--detach",
        ],
    )
    .trim()
    .to_string();
    assert!(id.starts_with("train-"), "{id}");
    let watched = tessera(home, &["train", "watch", &id]);
    assert!(watched.contains("round 4/4"), "{watched}");
    assert!(watched.contains("completed after 4 rounds"), "{watched}");
    let out = home.join("model.safetensors");
    tessera(
        home,
        &["train", "fetch", &id, "--out", out.to_str().unwrap()],
    );
    // Read it back as safetensors, independently of the writer.
    let py = "import json,struct,sys\nb=open(sys.argv[1],'rb').read()\nn=struct.unpack('<Q',b[:8])[0]\nh=json.loads(b[8:8+n])\nw=h['layer0.weight']\nprint(json.dumps({'shape':w['shape'],'bytes':len(b)-8-n,'task':h['__metadata__']['task']}))";
    let python = std::env::var("TESSERA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let read = Command::new(python)
        .args(["-c", py])
        .arg(&out)
        .output()
        .unwrap();
    let read: Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(read["shape"], json!([64, 16]));
    assert_eq!(read["bytes"], (64 * 16 + 16 + 16 * 10 + 10) * 4);
    assert_eq!(read["task"], id.as_str());
    // Cancelling a finished task is refused; the list shows both tasks.
    bad(
        http.post(url(&format!("/training/tasks/{id}/cancel")))
            .bearer_auth(&net.key)
            .send()
            .unwrap(),
        409,
    );
    let list: Value = http
        .get(url("/training/tasks"))
        .bearer_auth(&net.key)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list:#}");
    // The dashboard draws each task's accuracy and loss over its rounds.
    let deadline = Instant::now() + Duration::from_secs(60);
    let all_done = || {
        let s = net.operator_status();
        let tasks = s["training"]["tasks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        tasks.len() == 2 && tasks.iter().all(|t| t["status"] == "completed")
    };
    while !all_done() {
        assert!(Instant::now() < deadline, "the demo's task did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
    let dom = util::headless_dom(&net.url("/dashboard"));
    let task = dom
        .split("data-task=\"")
        .find(|t| t.starts_with(&id))
        .unwrap_or_else(|| panic!("task {id} not on the dashboard"));
    assert!(task.contains("data-status=\"completed\""), "{task}");
    assert!(
        task.contains("data-series=\"accuracy\" data-points=\"4\""),
        "{task}"
    );
    assert!(
        task.contains("data-series=\"loss\" data-points=\"4\""),
        "{task}"
    );
}
