//! Federated training over real iroh connections on loopback, in one
//! process: a gateway's coordinator and providers that each hold a shard
//! of the digits set, with a real SQLite ledger paying them. (The `tessera`
//! binary's tests run the same with provider processes.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use iroh::SecretKey;
use serde_json::{json, Value};
use tessera_backend::{Training, TrainingError};
use tessera_ledger::{Ledger, Limits, MICRO};
use tessera_net::directory::Directory;
use tessera_net::federated::client::TrainingData;
use tessera_net::federated::Coordinator;
use tessera_net::node::{self, node_id, Ticket};
use tessera_net::provider::NoInference;
use tessera_net::Gateway;
use tessera_protocol::ALPN;
use tessera_train::data::{digits_split, partition, Split};
use tessera_train::simulate::{federate, Federation};
use tessera_train::{Aggregation, CandleTrainer, Dataset, Recipe, Strategy};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const PRICE: u64 = 1_000;
const FEE_BPS: u64 = 500;

struct Net {
    gateway: Gateway,
    ticket: Ticket,
    ledger: Ledger,
    coordinator: Coordinator,
    account: String,
    providers: Vec<(SecretKey, tokio::task::JoinHandle<()>)>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn network() -> Net {
    let dir = std::env::temp_dir().join(format!("tessera-fed-{}", tessera_core::unique_u64()));
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
    let coordinator = Coordinator::new(
        gateway.trainers().clone(),
        ledger.clone(),
        gateway.node().to_string(),
        FEE_BPS,
        CancellationToken::new(),
        TaskTracker::new(),
    );
    Net {
        gateway,
        ticket,
        ledger,
        coordinator,
        account: account.id,
        providers: Vec::new(),
        _dir: TempDir(dir),
    }
}

/// Node keys in node-id order, so that shard k goes to the k-th provider
/// the coordinator numbers (and the run can be replayed in one process).
fn keys(n: usize) -> Vec<SecretKey> {
    let mut k: Vec<SecretKey> = (0..n).map(|_| SecretKey::generate()).collect();
    k.sort_by_key(|k| node_id(&k.public()));
    k
}

impl Net {
    async fn provider(
        &mut self,
        key: SecretKey,
        data: Dataset,
        tamper: impl FnOnce(&mut TrainingData),
    ) {
        let mut training = TrainingData::new(data, PRICE, 1);
        tamper(&mut training);
        let endpoint = node::bind(key.clone(), "127.0.0.1:0".parse().unwrap(), vec![])
            .await
            .unwrap();
        let config = tessera_net::ProviderConfig {
            gateways: vec![self.ticket.clone()],
            offers: Vec::new(),
            hardware: "test".into(),
            max_gateways: 1,
            admission: None,
            training: Some(Arc::new(training)),
            compute: None,
        };
        let run = tokio::spawn(tessera_net::provider::run(
            endpoint,
            Arc::new(NoInference),
            config,
            None,
        ));
        self.providers.push((key, run));
    }

    async fn wait_for_trainers(&self, n: usize) {
        for _ in 0..200 {
            if self.gateway.trainers().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{n} trainers did not join");
    }

    async fn finish(&self, id: &str) -> Value {
        for _ in 0..1200 {
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

fn shards(n: usize, split: Split) -> (Vec<Dataset>, Dataset, Dataset) {
    let (train, test) = digits_split().unwrap();
    let parts = partition(&train, n, split, 7);
    (parts.iter().map(|p| train.subset(p)).collect(), train, test)
}

const MLP: tessera_train::ModelSpec = tessera_train::ModelSpec::Mlp {
    inputs: 64,
    hidden: 32,
    classes: 10,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_over_the_network_trains_exactly_as_in_one_process_and_pays_each_verified_round() {
    let mut net = network().await;
    let (shards, _, test) = shards(4, Split::Iid);
    for (key, shard) in keys(4).into_iter().zip(shards.clone()) {
        net.provider(key, shard, |_| {}).await;
    }
    net.wait_for_trainers(4).await;
    let before = net.ledger.account(&net.account).await.unwrap().unwrap();
    let rounds = 8;
    let status = net
        .coordinator
        .create(
            &net.account,
            json!({
                "model": {"kind": "mlp", "inputs": 64, "hidden": 32, "classes": 10},
                "rounds": rounds,
                "clients_per_round": 4,
                "min_clients": 4,
                "recipe": {"epochs": 2, "batch_size": 32, "learning_rate": 0.1},
                "seed": 3,
                "max_price_per_round": 2 * PRICE,
                "test": "digits",
            }),
        )
        .await
        .unwrap();
    let id = status["id"].as_str().unwrap().to_string();
    // The whole escrow is held before the first round.
    assert_eq!(status["escrow"]["held"], rounds * 4 * 2 * PRICE);
    let held = net.ledger.account(&net.account).await.unwrap().unwrap();
    assert_eq!(
        held.held,
        (rounds * 4 * 2 * PRICE) as i64,
        "escrow held up front"
    );
    let done = net.finish(&id).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["rounds_done"], rounds);

    // The same task in one process: the same accuracy, to the last bit.
    let trainer = CandleTrainer::new(MLP, 1).unwrap();
    let fed = Federation {
        spec: MLP,
        strategy: Strategy::FedAvg,
        aggregation: Aggregation::WeightedMean,
        rounds: rounds as u32,
        clients_per_round: 4,
        recipe: Recipe {
            epochs: 2,
            batch_size: 32,
            learning_rate: 0.1,
            proximal: 0.0,
            seed: 0,
        },
        seed: 3,
        privacy: None,
    };
    let (_, reports) = federate(&trainer, &shards, &test, &fed).unwrap();
    let history = done["history"].as_array().unwrap();
    for (net_round, sim) in history.iter().zip(&reports) {
        assert_eq!(
            net_round["accuracy"].as_f64().unwrap(),
            sim.eval.accuracy,
            "round {}: over the network as in one process",
            sim.round
        );
        assert_eq!(net_round["aggregated"], 4);
        assert_eq!(net_round["paid"].as_object().unwrap().len(), 4);
    }
    let accuracy = done["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.85, "accuracy {accuracy} after {rounds} rounds");
    // Bytes: the global model out and the update back, as base64, per
    // provider and round (plus the frames' few hundred bytes).
    let update = (MLP.parameters() * 4) as u64;
    let per_client = done["bytes_per_client_round"].as_u64().unwrap();
    assert!(
        per_client > 2 * update && per_client < 2 * update * 4 / 3 + 2_000,
        "{per_client} bytes per client and round for an update of {update}"
    );

    // Each provider was paid for each round, less the gateway's fee; the
    // owner paid exactly that and got the rest of the escrow back.
    let paid = rounds * 4 * PRICE;
    for (key, _) in &net.providers {
        let earned = net.earned(key).await;
        assert_eq!(earned as u64, rounds * PRICE * (10_000 - FEE_BPS) / 10_000);
    }
    let after = net.ledger.account(&net.account).await.unwrap().unwrap();
    assert_eq!(after.held, 0, "nothing left held");
    assert_eq!(before.balance - after.balance, paid as i64);
    assert_eq!(done["escrow"]["spent"], paid);
    assert_eq!(done["escrow"]["refunded"], rounds * 4 * 2 * PRICE - paid);
    assert!(net.ledger.check().await.unwrap().ok(), "the books balance");

    // The model comes back as safetensors.
    let bytes = net.coordinator.model(&net.account, &id).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["layer0.weight"]["shape"], json!([64, 32]));
    assert_eq!(bytes.len() - 8 - n, MLP.parameters() * 4);
    // Another account sees none of it.
    assert_eq!(
        net.coordinator.status("acct_other", &id),
        Err(TrainingError::NotFound(id.clone()))
    );
}

#[cfg(feature = "adversary")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poisoning_provider_is_named_left_out_and_never_paid() {
    use tessera_net::federated::client::Poison;
    for (poison, rule) in [
        (Poison::Flip, json!({"rule": "weighted_mean"})),
        (Poison::Scale, json!({"rule": "krum", "byzantine": 1})),
        (Poison::Random, json!({"rule": "trimmed_mean", "trim": 0.2})),
    ] {
        let mut net = network().await;
        let (shards, _, _) = shards(6, Split::Iid);
        let keys = keys(6);
        for (k, (key, shard)) in keys.iter().zip(shards).enumerate() {
            net.provider(key.clone(), shard, |t| {
                if k == 2 {
                    t.poison = Some(poison);
                }
            })
            .await;
        }
        net.wait_for_trainers(6).await;
        let status = net
            .coordinator
            .create(
                &net.account,
                json!({
                    "model": {"kind": "mlp", "inputs": 64, "hidden": 32, "classes": 10},
                    "aggregation": rule,
                    "rounds": 4,
                    "clients_per_round": 6,
                    "min_clients": 5,
                    "recipe": {"epochs": 2, "batch_size": 32, "learning_rate": 0.1},
                    "max_price_per_round": PRICE,
                    "test": "digits",
                }),
            )
            .await
            .unwrap();
        let done = net.finish(status["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "completed", "{poison:?}: {done:#}");
        let cheater = node_id(&keys[2].public()).to_string();
        let history = done["history"].as_array().unwrap();
        // Named in the first round (struck when implausible, merely left out
        // when only an outlier), and never paid.
        let first = &history[0];
        assert!(
            first["rejected"][&cheater].is_string(),
            "{poison:?}: the poisoner is named: {first:#}"
        );
        assert_eq!(first["rejected"].as_object().unwrap().len(), 1, "{first:#}");
        for r in history {
            assert!(r["paid"].get(&cheater).is_none(), "{poison:?}: {r:#}");
            assert_eq!(r["paid"].as_object().unwrap().len(), 5, "{r:#}");
        }
        assert_eq!(
            net.earned(&keys[2]).await,
            0,
            "{poison:?}: the poisoner earns nothing"
        );
        for (k, key) in keys.iter().enumerate().filter(|(k, _)| *k != 2) {
            assert!(net.earned(key).await > 0, "honest provider {k} paid");
        }
        let accuracy = done["accuracy"].as_f64().unwrap();
        assert!(
            accuracy > 0.7,
            "{poison:?}: the model still learns: {accuracy}"
        );
        assert!(net.ledger.check().await.unwrap().ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_that_vanishes_mid_task_is_not_paid_for_the_rounds_it_missed_and_cancel_refunds_the_rest(
) {
    let mut net = network().await;
    let (shards, _, _) = shards(3, Split::Iid);
    for (key, shard) in keys(3).into_iter().zip(shards) {
        net.provider(key, shard, |_| {}).await;
    }
    net.wait_for_trainers(3).await;
    let status = net
        .coordinator
        .create(
            &net.account,
            json!({
                "model": {"kind": "logistic", "inputs": 64, "classes": 10},
                "rounds": 400,
                "clients_per_round": 3,
                "min_clients": 2,
                "max_price_per_round": PRICE,
                "round_deadline_s": 5,
            }),
        )
        .await
        .unwrap();
    let id = status["id"].as_str().unwrap().to_string();
    let rounds_done = |s: &Value| s["rounds_done"].as_u64().unwrap();
    while rounds_done(&net.coordinator.status(&net.account, &id).unwrap()) < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One provider vanishes (its process gone: the task aborted, its
    // endpoint dropped with it).
    let (gone, run) = net.providers.remove(0);
    run.abort();
    let at_abort = rounds_done(&net.coordinator.status(&net.account, &id).unwrap());
    while rounds_done(&net.coordinator.status(&net.account, &id).unwrap()) < at_abort + 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled = net.coordinator.cancel(&net.account, &id).await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    let done = net.coordinator.status(&net.account, &id).unwrap();
    let gone_id = node_id(&gone.public()).to_string();
    let history = done["history"].as_array().unwrap();
    let paid_gone = history
        .iter()
        .filter(|r| r["paid"].get(&gone_id).is_some())
        .count() as u64;
    assert!(
        paid_gone <= at_abort + 1,
        "paid only for rounds before it left"
    );
    assert!(
        history
            .iter()
            .skip(at_abort as usize + 1)
            .all(|r| r["aggregated"] == 2),
        "the later rounds went on with the two left"
    );
    let earned = net.earned(&gone).await as u64;
    assert_eq!(earned, paid_gone * PRICE * (10_000 - FEE_BPS) / 10_000);
    // The rounds not run are refunded; nothing stays held.
    let owner = net.ledger.account(&net.account).await.unwrap().unwrap();
    assert_eq!(owner.held, 0);
    let spent = done["escrow"]["spent"].as_u64().unwrap();
    assert_eq!(owner.balance as u64, 10 * MICRO - spent);
    assert_eq!(
        done["escrow"]["spent"].as_u64().unwrap() + done["escrow"]["refunded"].as_u64().unwrap(),
        done["escrow"]["held"].as_u64().unwrap()
    );
    assert!(net.ledger.check().await.unwrap().ok());
    // A cancelled task cannot be cancelled again.
    assert!(matches!(
        net.coordinator.cancel(&net.account, &id).await,
        Err(TrainingError::Conflict(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_and_unaffordable_tasks_are_refused_and_hold_nothing() {
    let net = network().await;
    let create = |body: Value| net.coordinator.create(&net.account, body);
    for (body, needle) in [
        (json!({"rounds": 2}), "model"),
        (
            json!({"model": {"kind": "mlp", "inputs": 64, "hidden": 8, "classes": 10}, "rounds": 0}),
            "rounds",
        ),
        (
            json!({"model": {"kind": "mlp", "inputs": 64, "hidden": 8, "classes": 10}, "rounds": 2, "recipe": {"epochs": 1, "batch_size": 32, "learning_rate": -1.0}}),
            "learning_rate",
        ),
        (
            json!({"model": {"kind": "mlp", "inputs": 64, "hidden": 8, "classes": 10}, "rounds": 2, "test": "imagenet"}),
            "imagenet",
        ),
        (
            json!({"model": {"kind": "mlp", "inputs": 64, "hidden": 8, "classes": 10}, "rounds": 2, "test": {"csv": "1,2,3\n"}}),
            "test",
        ),
        (
            json!({"model": {"kind": "mlp", "inputs": 64, "hidden": 8, "classes": 10}, "rounds": 2, "min_clients": 3, "aggregation": {"rule": "krum", "byzantine": 1}}),
            "Krum",
        ),
        (
            json!({"model": {"kind": "mlp", "inputs": 64, "hidden": 100000, "classes": 10}, "rounds": 2}),
            "parameters",
        ),
        (
            json!({"model": {"kind": "mlp", "inputs": 64, "hidden": 8, "classes": 10}, "rounds": 2, "max_price_per_round": u64::MAX}),
            "overflows",
        ),
        (
            json!({"model": {"kind": "mlp", "inputs": 64, "hidden": 8, "classes": 10}, "rounds": 2, "colour": "blue"}),
            "colour",
        ),
    ] {
        match create(body.clone()).await {
            Err(TrainingError::Invalid(m)) => assert!(m.contains(needle), "{body}: {m}"),
            other => panic!("{body}: {other:?}"),
        }
    }
    // 10 credits cannot hold 1,000 rounds of 10 clients at 0.01 each.
    let too_dear = json!({
        "model": {"kind": "logistic", "inputs": 64, "classes": 10},
        "rounds": 1000, "max_price_per_round": 10_000,
    });
    assert!(matches!(
        create(too_dear).await,
        Err(TrainingError::Insufficient(_))
    ));
    let owner = net.ledger.account(&net.account).await.unwrap().unwrap();
    assert_eq!(
        (owner.balance, owner.held),
        (10 * MICRO as i64, 0),
        "nothing held"
    );
    assert!(net.ledger.check().await.unwrap().ok());
}

/// The parameters in a safetensors file (in the flat vector's order).
fn parameters_of(bytes: &[u8]) -> Vec<f32> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + n..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[cfg(feature = "adversary")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secagg_over_the_network_sums_exactly_what_plain_fedavg_would_and_survives_a_third_vanishing(
) {
    let (shards, _, test) = shards(10, Split::Iid);
    let task = |rounds: u32| {
        json!({
            "model": {"kind": "mlp", "inputs": 64, "hidden": 32, "classes": 10},
            "rounds": rounds,
            "clients_per_round": 10,
            "min_clients": 5,
            "recipe": {"epochs": 1, "batch_size": 32, "learning_rate": 0.1},
            "seed": 5,
            "secagg": true,
            "max_price_per_round": PRICE,
            "test": "digits",
        })
    };
    // 1. One round, everyone present: the unmasked sum is plain FedAvg's
    // to quantization precision.
    let mut net = network().await;
    for (key, shard) in keys(10).into_iter().zip(shards.clone()) {
        net.provider(key, shard, |_| {}).await;
    }
    net.wait_for_trainers(10).await;
    let status = net.coordinator.create(&net.account, task(1)).await.unwrap();
    let id = status["id"].as_str().unwrap().to_string();
    let done = net.finish(&id).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let secure = parameters_of(&net.coordinator.model(&net.account, &id).unwrap());
    let trainer = CandleTrainer::new(MLP, 1).unwrap();
    let fed = Federation {
        spec: MLP,
        strategy: Strategy::FedAvg,
        aggregation: Aggregation::WeightedMean,
        rounds: 1,
        clients_per_round: 10,
        recipe: Recipe {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.1,
            proximal: 0.0,
            seed: 0,
        },
        seed: 5,
        privacy: None,
    };
    let (plain, _) = federate(&trainer, &shards, &test, &fed).unwrap();
    let worst = secure
        .iter()
        .zip(&plain)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-5,
        "SecAgg's aggregate is off plain FedAvg's by {worst}"
    );
    // The gateway never held t shares of both secrets of any provider.
    let round = &done["history"][0];
    let t = round["secagg"]["threshold"].as_u64().unwrap();
    let held = round["secagg"]["shares_held"].as_object().unwrap();
    assert_eq!(held.len(), 10, "{round:#}");
    for (node, counts) in held {
        let (seed, key) = (counts[0].as_u64().unwrap(), counts[1].as_u64().unwrap());
        assert!(
            seed >= t && key == 0,
            "{node}: {seed} seed and {key} key shares, t = {t}"
        );
    }
    // Canaries before the first paid round: everyone passed.
    assert_eq!(round["rejected"], json!({}), "{round:#}");
    assert_eq!(round["paid"].as_object().unwrap().len(), 10);
    // The global model out and the masked step back (base64, 5.33 bytes a
    // value each way), the keys and shares, and this first round's canary
    // (a plain round on 48 supplied samples, ~16 KB of CSV) for every
    // provider: about 8 raw updates.
    assert!(
        round["bytes_per_client"].as_u64().unwrap() < 10 * (MLP.parameters() as u64 * 4),
        "{round:#}"
    );

    // 2. Eight rounds, with and without three of the ten vanishing right
    // after sharing their keys in every round.
    let mut accuracy = Vec::new();
    for vanishing in [0, 3] {
        let mut net = network().await;
        let keys = keys(10);
        for (k, (key, shard)) in keys.iter().zip(shards.clone()).enumerate() {
            net.provider(key.clone(), shard, |t| {
                if k < vanishing {
                    t.vanish = Some(Arc::new(|| {}));
                }
            })
            .await;
        }
        net.wait_for_trainers(10).await;
        let status = net.coordinator.create(&net.account, task(8)).await.unwrap();
        let done = net.finish(status["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "completed", "{done:#}");
        for r in done["history"].as_array().unwrap() {
            assert_eq!(
                r["aggregated"],
                10 - vanishing,
                "every round completes: {r:#}"
            );
            assert_eq!(r["dropped"].as_object().unwrap().len(), vanishing);
            let held = r["secagg"]["shares_held"].as_object().unwrap();
            let t = r["secagg"]["threshold"].as_u64().unwrap();
            for counts in held.values() {
                let (seed, key) = (counts[0].as_u64().unwrap(), counts[1].as_u64().unwrap());
                assert!(
                    !(seed >= t && key >= t),
                    "both secrets of one provider: {r:#}"
                );
            }
        }
        for (k, key) in keys.iter().enumerate() {
            let earned = net.earned(key).await;
            assert_eq!(earned > 0, k >= vanishing, "provider {k} earned {earned}");
        }
        assert!(net.ledger.check().await.unwrap().ok());
        accuracy.push(done["accuracy"].as_f64().unwrap());
    }
    assert!(
        accuracy[1] > accuracy[0] - 0.01,
        "30% dropout costs less than a point: {accuracy:?}"
    );
}

#[cfg(feature = "adversary")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_secagg_task_a_provider_that_does_not_train_honestly_fails_its_canary_and_is_not_paid()
{
    use tessera_net::federated::client::Poison;
    let mut net = network().await;
    let (shards, _, _) = shards(4, Split::Iid);
    let keys = keys(4);
    for (k, (key, shard)) in keys.iter().zip(shards).enumerate() {
        net.provider(key.clone(), shard, |t| {
            if k == 1 {
                t.poison = Some(Poison::Random);
            }
        })
        .await;
    }
    net.wait_for_trainers(4).await;
    let status = net
        .coordinator
        .create(
            &net.account,
            json!({
                "model": {"kind": "logistic", "inputs": 64, "classes": 10},
                "rounds": 3,
                "clients_per_round": 4,
                "min_clients": 3,
                "secagg": true,
                "max_price_per_round": PRICE,
            }),
        )
        .await
        .unwrap();
    let done = net.finish(status["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let cheater = node_id(&keys[1].public()).to_string();
    let first = &done["history"][0];
    let why = first["rejected"][&cheater].as_str().unwrap_or_default();
    assert!(why.starts_with("canary:"), "{first:#}");
    for r in done["history"].as_array().unwrap() {
        assert!(r["paid"].get(&cheater).is_none(), "{r:#}");
        assert_eq!(r["aggregated"], 3, "{r:#}");
    }
    assert_eq!(net.earned(&keys[1]).await, 0);
    assert!(net.ledger.check().await.unwrap().ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_with_a_privacy_budget_reports_epsilon_each_round_and_stops_at_the_budget() {
    let mut net = network().await;
    let (shards, _, _) = shards(4, Split::Iid);
    for (key, shard) in keys(4).into_iter().zip(shards) {
        net.provider(key, shard, |_| {}).await;
    }
    net.wait_for_trainers(4).await;
    let dp = json!({"clip": 1.0, "noise_multiplier": 1.0, "noise_at": "distributed",
                    "delta": 1e-5, "budget": 6.0});
    let status = net
        .coordinator
        .create(
            &net.account,
            json!({
                "model": {"kind": "logistic", "inputs": 64, "classes": 10},
                "rounds": 50,
                "clients_per_round": 2,
                "min_clients": 2,
                "dp": dp,
                "max_price_per_round": PRICE,
            }),
        )
        .await
        .unwrap();
    let done = net.finish(status["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let history = done["history"].as_array().unwrap();
    let eps: Vec<f64> = history
        .iter()
        .map(|r| r["epsilon"].as_f64().unwrap())
        .collect();
    assert!(
        eps.windows(2).all(|w| w[1] > w[0]),
        "ε grows each round: {eps:?}"
    );
    // The accountant's figure for this many rounds at q = 1/2, σ = 1.
    let mut a = tessera_train::privacy::Accountant::default();
    a.compose(0.5, 1.0, eps.len() as u32);
    assert!((a.epsilon(1e-5).0 - eps[eps.len() - 1]).abs() < 1e-9);
    assert!(
        eps.len() < 50 && *eps.last().unwrap() <= 6.0,
        "stopped at the budget: {eps:?}"
    );
    assert!(
        done["error"].as_str().unwrap().contains("budget"),
        "{done:#}"
    );
    // The rounds not run are refunded.
    let owner = net.ledger.account(&net.account).await.unwrap().unwrap();
    assert_eq!(owner.held, 0);
    assert!(net.ledger.check().await.unwrap().ok());
}

#[cfg(feature = "adversary")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn where_the_owner_shipped_the_data_a_lazy_trainer_is_caught_by_re_execution_and_not_paid() {
    use tessera_net::federated::client::Poison;
    let mut net = network().await;
    let (shards, _, _) = shards(4, Split::Iid);
    let keys = keys(4);
    let mut shipped = serde_json::Map::new();
    for (k, (key, shard)) in keys.iter().zip(shards).enumerate() {
        shipped.insert(
            node_id(&key.public()).to_string(),
            json!(tessera_train::data::to_csv(&shard)),
        );
        net.provider(key.clone(), shard, |t| {
            if k == 3 {
                t.poison = Some(Poison::Half);
            }
        })
        .await;
    }
    net.wait_for_trainers(4).await;
    let status = net
        .coordinator
        .create(
            &net.account,
            json!({
                "model": {"kind": "mlp", "inputs": 64, "hidden": 32, "classes": 10},
                "rounds": 3,
                "clients_per_round": 4,
                "min_clients": 3,
                "recipe": {"epochs": 2, "batch_size": 32, "learning_rate": 0.1},
                "max_price_per_round": PRICE,
                "audit_data": shipped,
                "reexecute_rate": 1.0,
            }),
        )
        .await
        .unwrap();
    let done = net.finish(status["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let lazy = node_id(&keys[3].public()).to_string();
    let first = &done["history"][0];
    // Half a step is no outlier, but it is not the round it was asked for.
    let why = first["rejected"][&lazy].as_str().unwrap_or_default();
    assert!(why.starts_with("re-execution"), "{first:#}");
    assert_eq!(
        first["rejected"].as_object().unwrap().len(),
        1,
        "honest rounds re-execute exactly: {first:#}"
    );
    for r in done["history"].as_array().unwrap() {
        assert!(r["paid"].get(&lazy).is_none(), "{r:#}");
        assert_eq!(r["paid"].as_object().unwrap().len(), 3, "{r:#}");
    }
    assert_eq!(net.earned(&keys[3]).await, 0);
    assert!(net.ledger.check().await.unwrap().ok());
}
