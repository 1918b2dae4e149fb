//! DiLoCo over real iroh connections on loopback, in one process: a
//! gateway's coordinator and workers that each hold Debian's `fortunes`
//! text, with a real SQLite ledger paying them per verified inner step.
//! (The `tessera` binary's tests and `tessera bench diloco` run the same
//! with worker processes.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use iroh::SecretKey;
use serde_json::{json, Value};
use tessera_backend::{Training, TrainingError};
use tessera_ledger::{Ledger, Limits, MICRO};
use tessera_net::diloco::worker::{Cheat, Compute};
use tessera_net::diloco::Store;
use tessera_net::directory::Directory;
use tessera_net::federated::Coordinator;
use tessera_net::node::{self, node_id, Ticket};
use tessera_net::provider::NoInference;
use tessera_net::Gateway;
use tessera_protocol::ALPN;
use tessera_train::corpus::{Corpus, FORTUNES_DIR, VAL_SHARE};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const PRICE: u64 = 3;
const FEE_BPS: u64 = 500;

struct Net {
    gateway: Gateway,
    ticket: Ticket,
    ledger: Ledger,
    coordinator: Coordinator,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    store: std::path::PathBuf,
    account: String,
    corpus: Corpus,
    workers: Vec<(SecretKey, tokio::task::JoinHandle<()>)>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn network() -> Net {
    let dir = std::env::temp_dir().join(format!("tessera-diloco-{}", tessera_core::unique_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let ledger = Ledger::open_file(&dir.join("ledger.db")).await.unwrap();
    let (account, _key) = ledger
        .create_account("owner", 10 * MICRO, Limits::default())
        .await
        .unwrap();
    let endpoint = node::bind_gateway(
        SecretKey::generate(),
        "127.0.0.1:0".parse().unwrap(),
        vec![ALPN.to_vec()],
    )
    .await
    .unwrap();
    let ticket = Ticket::of(&endpoint, None);
    let gateway = Gateway::new(endpoint, vec![], Arc::new(Directory::default()));
    tokio::spawn(gateway.clone().accept());
    let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
    let store = dir.join("diloco");
    let coordinator = coordinator(&gateway, &ledger, &shutdown, &tracker, &store);
    let corpus = Corpus::fortunes(std::path::Path::new(FORTUNES_DIR), VAL_SHARE)
        .expect("Debian's fortunes package (scripts/deps.sh installs it)");
    Net {
        gateway,
        ticket,
        ledger,
        coordinator,
        shutdown,
        tracker,
        store,
        account: account.id,
        corpus,
        workers: Vec::new(),
        _dir: TempDir(dir),
    }
}

fn coordinator(
    gateway: &Gateway,
    ledger: &Ledger,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    store: &std::path::Path,
) -> Coordinator {
    Coordinator::new(
        gateway.trainers().clone(),
        ledger.clone(),
        gateway.node().to_string(),
        FEE_BPS,
        shutdown.clone(),
        tracker.clone(),
    )
    .with_workers(gateway.workers().clone())
    .with_store(Store::new(store))
}

impl Net {
    /// Stop the coordinator as a gateway shutting down does (its tasks'
    /// runners end, unspent escrow released), release what the ledger
    /// still holds for this gateway (what a restarted gateway does first),
    /// and start a new coordinator on the same store, which resumes.
    async fn restart_coordinator(&mut self) -> usize {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        self.ledger
            .release_open_holds(&self.gateway.node().to_string())
            .await
            .unwrap();
        self.shutdown = CancellationToken::new();
        self.tracker = TaskTracker::new();
        self.coordinator = coordinator(
            &self.gateway,
            &self.ledger,
            &self.shutdown,
            &self.tracker,
            &self.store,
        );
        self.coordinator.resume().await
    }

    async fn worker(&mut self, cheat: Option<Cheat>) -> SecretKey {
        let key = SecretKey::generate();
        let mut compute = Compute::new(self.corpus.clone(), PRICE, 1);
        compute.cheat = cheat;
        let endpoint = node::bind(key.clone(), "127.0.0.1:0".parse().unwrap(), vec![])
            .await
            .unwrap();
        let config = tessera_net::ProviderConfig {
            gateways: vec![self.ticket.clone()],
            offers: Vec::new(),
            hardware: "test".into(),
            max_gateways: 1,
            admission: None,
            training: None,
            compute: Some(Arc::new(compute)),
        };
        let run = tokio::spawn(tessera_net::provider::run(
            endpoint,
            Arc::new(NoInference),
            config,
            None,
        ));
        self.workers.push((key.clone(), run));
        key
    }

    async fn wait_for_workers(&self, n: usize) {
        for _ in 0..200 {
            if self.gateway.workers().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{n} workers did not join");
    }

    async fn finish(&self, id: &str) -> Value {
        for _ in 0..3000 {
            let s = self.coordinator.status(&self.account, id).unwrap();
            if !matches!(s["status"].as_str(), Some("waiting" | "running")) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("task {id} did not finish");
    }

    async fn earned(&self, key: &SecretKey) -> i64 {
        let id = format!("provider:{}", node_id(&key.public()));
        self.ledger
            .account(&id)
            .await
            .unwrap()
            .map_or(0, |a| a.balance)
    }
}

fn task(outer_steps: u32, workers: usize, audit_rate: f64) -> Value {
    json!({
        "kind": "diloco",
        "model": {"vocab": 256, "context": 16, "width": 16, "layers": 1, "heads": 2},
        "outer_steps": outer_steps,
        "inner_steps": 8,
        "batch": 2,
        "workers": workers,
        "min_workers": 1,
        "optimizer": {"lr": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
                      "warmup": 2, "total_steps": 0, "min_lr_ratio": 0.1},
        "seed": 4,
        "max_price_per_step": 2 * PRICE,
        "audit_rate": audit_rate,
        "checkpoint_every": 2,
        "val_windows": 32,
    })
}

/// Three honest workers and one worker for each way of cheating, every
/// (worker, outer step) audited: the cheaters are caught in the first
/// step, named with the first divergent steps, struck, never paid and their
/// pseudo-gradients taken back out; the honest pass every audit and are
/// paid steps × price; the escrow balances to the micro-credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_cheat_is_caught_unpaid_and_removed_while_honest_workers_are_paid_per_step() {
    let mut net = network().await;
    let mut honest = Vec::new();
    for _ in 0..3 {
        honest.push(net.worker(None).await);
    }
    let cheats = [
        Cheat::Lazy,
        Cheat::Random,
        Cheat::Replay,
        Cheat::Scale,
        Cheat::Flip,
        Cheat::Poison,
    ];
    let mut cheaters = Vec::new();
    for c in cheats {
        cheaters.push((c, net.worker(Some(c)).await));
    }
    net.wait_for_workers(9).await;
    let outer_steps = 3;
    let status = net
        .coordinator
        .create(&net.account, task(outer_steps, 9, 1.0))
        .await
        .unwrap();
    let id = status["id"].as_str().unwrap().to_string();
    let held = u64::from(outer_steps) * 9 * 8 * 2 * PRICE;
    assert_eq!(status["escrow"]["held"], held);
    let s = net.finish(&id).await;
    assert_eq!(s["status"], "completed", "{s:#}");
    // Replay sends its own first step honestly (and is paid for it), so
    // it is caught at the second; everyone else at the first.
    let struck = s["struck"].as_object().unwrap();
    let history = s["history"].as_array().unwrap();
    for (cheat, key) in &cheaters {
        let node = node_id(&key.public()).to_string();
        assert!(
            struck.contains_key(&node),
            "{cheat:?} was not struck: {s:#}"
        );
        let honest_first = if *cheat == Cheat::Replay {
            8 * PRICE
        } else {
            0
        };
        assert_eq!(
            net.earned(key).await as u64,
            honest_first - honest_first * FEE_BPS / 10_000,
            "{cheat:?} was paid for cheating"
        );
        if *cheat == Cheat::Replay {
            // Its replayed step is caught at the second outer step: by its
            // size (more than the steps it was given can move) or by the
            // audit; either way unpaid and out of the average.
            let second = &history[1];
            let rejected = second["rejected"].get(&node).is_some();
            let removed = second["removed"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == &json!(node));
            assert!(rejected || removed, "{second:#}");
            assert_ne!(
                second["workers"][&node]["paid"].as_u64().unwrap_or(0),
                8 * PRICE
            );
        }
    }
    assert_eq!(
        struck.len(),
        cheats.len(),
        "only cheaters are struck: {struck:?}"
    );
    // Each was caught in the step it cheated: left out at the reveal for a
    // size no honest step reaches, or audited and taken back out.
    for (cheat, key) in &cheaters {
        let node = node_id(&key.public()).to_string();
        let step = &history[usize::from(*cheat == Cheat::Replay)];
        let rejected = step["rejected"].get(&node).is_some();
        let removed = step["removed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == &json!(node));
        assert!(rejected || removed, "{cheat:?}: {step:#}");
        if removed {
            // Unpaid; its audit failed, or (when a later part of it was
            // rejected first) it was taken out unaudited.
            assert_eq!(step["workers"][&node]["paid"], 0, "{cheat:?}");
            let passed = &step["workers"][&node]["audit"]["report"]["passed"];
            assert!(
                passed == &json!(false) || passed.is_null(),
                "{cheat:?}: {step:#}"
            );
        }
        // Lazy and poisoned traces leave the honest one inside the step:
        // the bisection names the segment, re-executing one.
        if matches!(cheat, Cheat::Lazy | Cheat::Poison) {
            assert!(removed, "{cheat:?}: {step:#}");
            let d = &step["workers"][&node]["audit"]["divergence"];
            assert!(
                d["segments_reexecuted"].as_u64().unwrap() <= 1,
                "{cheat:?}: {d:#}"
            );
            if *cheat == Cheat::Poison {
                assert_eq!(
                    (d["from"].as_u64(), d["to"].as_u64()),
                    (Some(0), Some(2)),
                    "{d:#}"
                );
                assert_eq!(d["segments_reexecuted"], 1);
            }
        }
    }
    // Honest workers: every audit passed, every step paid at its price.
    let mut paid_total = 0u64;
    for key in &honest {
        let node = node_id(&key.public()).to_string();
        let (mut steps, mut net_of_fees) = (0u64, 0u64);
        for h in history {
            let w = &h["workers"][&node];
            assert_eq!(w["audit"]["report"]["passed"], true, "{w:#}");
            steps += w["steps"].as_u64().unwrap();
            let paid = w["paid"].as_u64().unwrap();
            assert_eq!(paid, w["steps"].as_u64().unwrap() * PRICE);
            // The fee is taken per settlement (one per outer step).
            net_of_fees += paid - paid * FEE_BPS / 10_000;
        }
        assert_eq!(s["providers"][&node]["steps_paid"], steps);
        paid_total += steps * PRICE;
        assert_eq!(net.earned(key).await as u64, net_of_fees);
    }
    paid_total += 8 * PRICE; // the replayer's honest first step
    assert_eq!(s["escrow"]["spent"].as_u64().unwrap(), paid_total);
    assert_eq!(
        s["escrow"]["spent"].as_u64().unwrap() + s["escrow"]["refunded"].as_u64().unwrap(),
        held
    );
    let owner = net.ledger.account(&net.account).await.unwrap().unwrap();
    assert_eq!(owner.held, 0, "no escrow left held");
    assert_eq!(owner.balance as u64, 10 * MICRO - paid_total);
    assert!(net.ledger.check().await.unwrap().ok(), "the books balance");
    // Bytes both ways are counted, and the model learns.
    assert!(s["totals"]["bytes"].as_u64().unwrap() > 0);
    let losses: Vec<f64> = history
        .iter()
        .map(|h| h["val_loss"].as_f64().unwrap())
        .collect();
    assert!(losses[2] < losses[0], "{losses:?}");
    // The model comes back as safetensors.
    let file = net.coordinator.model(&net.account, &id).unwrap();
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    assert!(header.get("block0.attn.w_qkv").is_some());
}

/// Bad tasks are refused before any escrow is held, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_diloco_tasks_hold_nothing() {
    let net = network().await;
    let bad = [
        (json!({"kind": "diloco"}), "outer_steps"),
        (json!({"kind": "diloco", "outer_steps": 0}), "outer_steps"),
        (
            json!({"kind": "diloco", "outer_steps": 2, "inner_steps": 0}),
            "inner_steps",
        ),
        (
            json!({"kind": "diloco", "outer_steps": 2, "audit_rate": 2.0}),
            "audit_rate",
        ),
        (
            json!({"kind": "diloco", "outer_steps": 2, "outer_momentum": 1.0}),
            "outer_momentum",
        ),
        (
            json!({"kind": "diloco", "outer_steps": 2, "model": {"vocab": 256, "context": 16, "width": 15, "layers": 1, "heads": 2}}),
            "width",
        ),
        (
            json!({"kind": "diloco", "outer_steps": 2, "surprise": 1}),
            "surprise",
        ),
        (
            json!({"kind": "diloco", "outer_steps": "two"}),
            "invalid type",
        ),
    ];
    for (body, field) in bad {
        match net.coordinator.create(&net.account, body.clone()).await {
            Err(TrainingError::Invalid(m)) => assert!(m.contains(field), "{body}: {m}"),
            other => panic!("{body}: {other:?}"),
        }
    }
    // More than the account holds.
    let mut big = task(1000, 1000, 0.1);
    big["max_price_per_step"] = json!(1_000_000);
    assert!(matches!(
        net.coordinator.create(&net.account, big).await,
        Err(TrainingError::Insufficient(_))
    ));
    let owner = net.ledger.account(&net.account).await.unwrap().unwrap();
    assert_eq!(owner.held, 0);
}

/// A gateway that stops mid-task resumes it from the file of its last
/// settled outer step: the task completes with every step once, a worker
/// caught before the stop stays struck, nobody is paid twice for a step
/// and the escrow (held again after the restart) balances.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_gateway_resumes_its_diloco_task_paying_each_step_once() {
    let mut net = network().await;
    let honest = [net.worker(None).await, net.worker(None).await];
    let lazy = net.worker(Some(Cheat::Lazy)).await;
    net.wait_for_workers(3).await;
    let outer_steps = 12u32;
    let mut body = task(outer_steps, 3, 1.0);
    body["inner_steps"] = json!(40);
    body["checkpoint_every"] = json!(10);
    let status = net.coordinator.create(&net.account, body).await.unwrap();
    let id = status["id"].as_str().unwrap().to_string();
    let per_step = 3 * 40 * 2 * PRICE;
    // Stop once two steps are settled (and the cheater caught).
    let mut at_stop = Value::Null;
    for _ in 0..3000 {
        at_stop = net.coordinator.status(&net.account, &id).unwrap();
        if at_stop["outer_steps_settled"].as_u64().unwrap() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let settled = at_stop["outer_steps_settled"].as_u64().unwrap();
    assert!(
        (2..u64::from(outer_steps) - 2).contains(&settled),
        "the stop should come mid-task: {at_stop:#}"
    );
    let lazy_node = node_id(&lazy.public()).to_string();
    assert!(at_stop["struck"].get(&lazy_node).is_some(), "{at_stop:#}");
    eprintln!(
        "stopping at {settled} settled, {} done",
        at_stop["outer_steps_done"]
    );
    assert_eq!(net.restart_coordinator().await, 1, "the task resumes");
    let resumed = net.coordinator.status(&net.account, &id).unwrap();
    assert_eq!(resumed["resumed"], 1);
    let from = resumed["outer_steps_done"].as_u64().unwrap();
    assert!(
        from >= settled && from < u64::from(outer_steps),
        "{resumed:#}"
    );
    assert!(resumed["struck"].get(&lazy_node).is_some(), "still struck");

    let s = net.finish(&id).await;
    assert_eq!(s["status"], "completed", "{s:#}");
    let history = s["history"].as_array().unwrap();
    let steps: Vec<u64> = history
        .iter()
        .map(|h| h["outer_step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=u64::from(outer_steps)).collect::<Vec<_>>());
    // The struck cheater got no part after the restart, and no pay.
    for h in &history[from as usize..] {
        assert!(h["workers"].get(&lazy_node).is_none(), "{h:#}");
    }
    assert_eq!(net.earned(&lazy).await, 0);
    // Each honest worker's ledger balance is what the history says it was
    // paid, once per step (fees per settlement).
    let mut spent = 0u64;
    for key in &honest {
        let node = node_id(&key.public()).to_string();
        let (mut steps, mut net_of_fees) = (0u64, 0u64);
        for h in history {
            let w = &h["workers"][&node];
            assert_eq!(w["audit"]["passed"], true, "{w:#}");
            let paid = w["paid"].as_u64().unwrap();
            assert_eq!(paid, w["steps"].as_u64().unwrap() * PRICE);
            steps += w["steps"].as_u64().unwrap();
            net_of_fees += paid - paid * FEE_BPS / 10_000;
            spent += paid;
        }
        assert_eq!(s["providers"][&node]["steps_paid"], steps);
        assert_eq!(
            net.earned(key).await as u64,
            net_of_fees,
            "paid once a step"
        );
    }
    let escrow = &s["escrow"];
    assert_eq!(escrow["spent"].as_u64().unwrap(), spent);
    // Held: every step once, and again for the steps left at the restart.
    assert_eq!(
        escrow["held"].as_u64().unwrap(),
        (u64::from(outer_steps) + u64::from(outer_steps) - from) * per_step
    );
    assert_eq!(
        escrow["spent"].as_u64().unwrap() + escrow["refunded"].as_u64().unwrap(),
        escrow["held"].as_u64().unwrap()
    );
    let owner = net.ledger.account(&net.account).await.unwrap().unwrap();
    assert_eq!(owner.held, 0, "no escrow left held");
    assert_eq!(owner.balance as u64, 10 * MICRO - spent);
    assert!(net.ledger.check().await.unwrap().ok(), "the books balance");
    let losses: Vec<f64> = history
        .iter()
        .map(|h| h["val_loss"].as_f64().unwrap())
        .collect();
    assert!(losses[losses.len() - 1] < losses[0], "{losses:?}");

    // A finished task is still there after another restart, model and all.
    assert_eq!(net.restart_coordinator().await, 0, "nothing left to resume");
    let again = net.coordinator.status(&net.account, &id).unwrap();
    assert_eq!(again["status"], "completed");
    assert_eq!(again["escrow"], s["escrow"]);
    assert_eq!(again["val_loss"], s["val_loss"]);
    assert!(net.coordinator.model(&net.account, &id).is_ok());
}

/// A worker that claims each of its steps took a millisecond is given no
/// more inner steps than its speed on the gateway's clock earns: were its
/// claim believed, it would be given H and every honest worker one step.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_boasting_of_its_speed_does_not_starve_the_others() {
    let mut net = network().await;
    let honest = [net.worker(None).await, net.worker(None).await];
    let boaster = net.worker(Some(Cheat::Boast)).await;
    net.wait_for_workers(3).await;
    let mut body = task(4, 3, 0.0);
    body["inner_steps"] = json!(40);
    body["checkpoint_every"] = json!(10);
    let status = net.coordinator.create(&net.account, body).await.unwrap();
    let id = status["id"].as_str().unwrap().to_string();
    let s = net.finish(&id).await;
    assert_eq!(s["status"], "completed", "{s:#}");
    let history = s["history"].as_array().unwrap();
    let boaster = node_id(&boaster.public()).to_string();
    for h in &history[1..] {
        // Its claim is cut to what the gateway waited for.
        assert!(h["workers"][&boaster]["compute_ms"].as_u64().unwrap() <= 1);
        for key in &honest {
            let node = node_id(&key.public()).to_string();
            let steps = h["workers"][&node]["steps"].as_u64().unwrap();
            // Believed, the claim leaves it one step; measured on the
            // gateway's clock, such tiny steps still vary a few-fold.
            assert!(
                steps >= 5,
                "an honest worker starved to {steps} of 40: {h:#}"
            );
        }
    }
}
