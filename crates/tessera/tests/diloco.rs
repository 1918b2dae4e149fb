//! DiLoCo with real worker processes over iroh: `tessera devnet
//! --diloco-demo` with a worker at half speed, one SIGKILLed mid-run, one
//! joining late and one cheating; and the API, CLI and dashboard a task
//! owner uses (`tessera train diloco`, watch, fetch, headless Chromium).
//!
//! Short versions (a 32-wide model, H = 40); `tessera bench diloco` runs
//! the long one (BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use util::{binary, tessera, Devnet};

const SMALL: [&str; 6] = [
    "--checkpoint-every",
    "10",
    "--width",
    "32",
    "--context",
    "16",
];

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

/// Three workers (one at half speed) and a lazy cheater; a worker is
/// SIGKILLed during outer step 3 and a new one joins after step 4; every
/// (worker, step) is audited. The run completes, the killed worker is
/// dropped from the step it died in, the newcomer trains, the cheater is
/// struck and paid nothing, honest audits all pass, the books balance.
#[test]
fn workers_die_join_and_cheat_and_the_run_completes_paying_only_verified_steps() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args([
            "devnet",
            "--listen",
            "127.0.0.1:0",
            "--providers",
            "3",
            "--model",
        ])
        .arg(util::model_path())
        .args(["--diloco-demo", "--json", "--slow-workers", "1", "--churn"])
        .args([
            "--diloco-cheat",
            "lazy",
            "--outer-steps",
            "9",
            "--audit-rate",
            "1",
        ])
        .args(SMALL)
        .args(["--inner-steps", "60"])
        .env("TESSERA_HOME", home.path())
        .env("TESSERA_LOG", "error")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "devnet --diloco-demo failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let run: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_eq!(run["status"], "completed", "{run:#}");
    assert_eq!(run["outer_steps"], 9);
    // 3 honest workers and the cheater in the first average (the audit
    // takes the cheater's part back out); a worker killed a third of the
    // way; a newcomer two thirds of the way.
    let per_step: Vec<u64> = run["workers_per_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(per_step[0], 4, "{run:#}");
    assert!(
        per_step[3..].iter().any(|&k| k <= 2),
        "the killed worker is dropped: {per_step:?}"
    );
    let struck = run["struck"].as_object().unwrap();
    assert_eq!(struck.len(), 1, "{struck:?}");
    let (cheater, why) = struck.iter().next().unwrap();
    assert!(why.as_str().unwrap().contains("audit"), "{why}");
    assert!(
        run["providers"].get(cheater).is_none(),
        "the cheater earned something: {run:#}"
    );
    // Paid: the three first workers (the killed one for the steps before
    // it died) and the newcomer; no honest audit failed.
    assert_eq!(run["providers"].as_object().unwrap().len(), 4, "{run:#}");
    // Its parts are resolved in order: once its first audited part fails,
    // its later parts are unpaid and taken out without an audit.
    assert_eq!(
        run["audits_failed"], 1,
        "only the cheater's audit fails: {run:#}"
    );
    assert!(run["audits_passed"].as_u64().unwrap() >= 18, "{run:#}");
    // Every honest worker is paid for exactly the steps it had averaged;
    // the cheater for none of the steps it had averaged (a full 60 in the
    // first step, then as many as it was given until its audit resolved).
    let averaged = run["averaged_steps"].as_object().unwrap();
    for (node, p) in run["providers"].as_object().unwrap() {
        assert_eq!(&p["steps_paid"], &averaged[node], "{node}: {run:#}");
    }
    let paid: u64 = run["providers"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p["steps_paid"].as_u64().unwrap())
        .sum();
    let cheated = run["train_steps"].as_u64().unwrap() - paid;
    assert_eq!(averaged[cheater].as_u64().unwrap(), cheated, "{run:#}");
    assert!(cheated >= 60, "{cheated}: {run:#}");
    let e = &run["escrow"];
    assert_eq!(
        e["held"],
        e["spent"].as_u64().unwrap() + e["refunded"].as_u64().unwrap()
    );
    let curve: Vec<f64> = run["val_curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(curve[8] < curve[0], "{curve:?}");
    assert!(run["bytes"].as_u64().unwrap() > 0);
    books_balance(home.path());
}

/// The gateway is SIGKILLed halfway through a DiLoCo task and started
/// again on the same home and ports: it resumes the task from its last
/// settled outer step (the workers redial), the task completes with every
/// step, the owner is charged once for each step and no worker is paid
/// more than the task says it earned; the books balance.
#[test]
fn a_gateway_killed_mid_task_resumes_it_and_pays_each_step_once() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args([
            "devnet",
            "--listen",
            "127.0.0.1:0",
            "--providers",
            "2",
            "--model",
        ])
        .arg(util::model_path())
        .args(["--diloco-demo", "--json", "--restart-gateway"])
        .args(["--outer-steps", "8", "--audit-rate", "1"])
        .args(SMALL)
        .args(["--inner-steps", "60"])
        .env("TESSERA_HOME", home.path())
        .env("TESSERA_LOG", "error")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "devnet --diloco-demo --restart-gateway failed"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let run: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_eq!(run["status"], "completed", "{run:#}");
    assert_eq!(run["outer_steps"], 8);
    let restart = &run["gateway_restart"];
    assert_eq!(restart["resumed"], 1, "{run:#}");
    assert!(
        restart["killed_at"]["done"].as_u64().unwrap() >= 4,
        "{run:#}"
    );
    assert_eq!(run["val_curve"].as_array().unwrap().len(), 8);
    assert_eq!(run["audits_failed"], 0, "{run:#}");
    assert!(run["struck"].as_object().unwrap().is_empty(), "{run:#}");
    let e = &run["escrow"];
    let spent = e["spent"].as_u64().unwrap();
    assert_eq!(e["held"], spent + e["refunded"].as_u64().unwrap());
    // Every averaged step was paid once: what the task paid for equals
    // what its workers trained.
    let providers = run["providers"].as_object().unwrap();
    let paid_steps: u64 = providers
        .values()
        .map(|p| p["steps_paid"].as_u64().unwrap())
        .sum();
    assert_eq!(paid_steps, run["train_steps"].as_u64().unwrap(), "{run:#}");
    // The ledger agrees: the owner was charged what the task spent, and
    // no worker holds more than it earned (less the 5% fee per step).
    let gw = home.path().join("devnet/gateway");
    let show = |who: &str| -> Value {
        serde_json::from_str(&tessera(&gw, &["account", "show", who, "--json"])).unwrap()
    };
    let owner = show("demo");
    assert_eq!(
        owner["balance"].as_u64().unwrap(),
        1_000_000_000 - spent,
        "{owner:#}"
    );
    for (node, p) in providers {
        let earned = p["earned"].as_u64().unwrap();
        let balance = show(&format!("provider:{node}"))["balance"]
            .as_u64()
            .unwrap();
        assert!(
            balance <= earned && balance >= earned * 95 / 100 - 8,
            "{node}: {balance} in the ledger, {earned} earned"
        );
    }
    books_balance(home.path());
}

#[test]
fn a_task_owner_creates_watches_and_fetches_a_diloco_task_and_the_dashboard_draws_it() {
    let mut extra = vec![
        "--diloco-demo",
        "--outer-steps",
        "2",
        "--inner-steps",
        "40",
        "--audit-rate",
        "0",
    ];
    extra.extend(SMALL);
    let net = Devnet::start_with(2, &extra);
    let http = reqwest::blocking::Client::new();
    let url = |p: &str| format!("{}{p}", net.api_base);
    let bad = |r: reqwest::blocking::Response, status: u16, says: &str| {
        assert_eq!(r.status().as_u16(), status);
        let body: Value = r.json().unwrap();
        let m = body["error"]["message"].as_str().unwrap();
        assert!(m.contains(says), "{m}");
    };
    for (body, says) in [
        (
            json!({"kind": "diloco", "outer_steps": 2, "inner_steps": "many"}),
            "invalid type",
        ),
        (
            json!({"kind": "diloco", "outer_steps": 2, "workers": 0}),
            "workers",
        ),
        (
            json!({"kind": "diloco", "outer_steps": 2, "model": {"vocab": 100, "context": 16, "width": 32, "layers": 1, "heads": 4}}),
            "vocab",
        ),
    ] {
        bad(
            http.post(url("/training/tasks"))
                .bearer_auth(&net.key)
                .json(&body)
                .send()
                .unwrap(),
            400,
            says,
        );
    }
    bad(
        http.post(url("/training/tasks"))
            .bearer_auth(&net.key)
            .json(&json!({"kind": "diloco", "outer_steps": 100000, "workers": 1000, "max_price_per_step": 1000000}))
            .send()
            .unwrap(),
        402,
        "escrow",
    );
    let home = net.home.path();
    let id = tessera(
        home,
        &[
            "train",
            "diloco",
            "--outer-steps",
            "3",
            "--inner-steps",
            "20",
            "--workers",
            "2",
            "--width",
            "32",
            "--context",
            "16",
            "--layers",
            "1",
            "--checkpoint-every",
            "5",
            "--detach",
        ],
    )
    .trim()
    .to_string();
    assert!(id.starts_with("diloco-"), "{id}");
    let watched = tessera(home, &["train", "watch", &id]);
    assert!(watched.contains("outer step 3/3"), "{watched}");
    assert!(
        watched.contains("completed after 3 outer steps"),
        "{watched}"
    );
    let out = home.join("lm.safetensors");
    tessera(
        home,
        &["train", "fetch", &id, "--out", out.to_str().unwrap()],
    );
    let py = "import json,struct,sys\nb=open(sys.argv[1],'rb').read()\nn=struct.unpack('<Q',b[:8])[0]\nh=json.loads(b[8:8+n])\nw=h['block0.attn.w_qkv']\nprint(json.dumps({'shape':w['shape'],'task':h['__metadata__']['task']}))";
    let python = std::env::var("TESSERA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let read = Command::new(python)
        .args(["-c", py])
        .arg(&out)
        .output()
        .unwrap();
    let read: Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(read["shape"], json!([32, 96]));
    assert_eq!(read["task"], id.as_str());
    // The dashboard draws the validation and train loss of both tasks.
    let deadline = Instant::now() + Duration::from_secs(120);
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
    assert!(task.contains("data-kind=\"diloco\""), "{task}");
    assert!(
        task.contains("data-series=\"val_loss\" data-points=\"3\""),
        "{task}"
    );
    assert!(
        task.contains("data-series=\"train_loss\" data-points=\"3\""),
        "{task}"
    );
}
