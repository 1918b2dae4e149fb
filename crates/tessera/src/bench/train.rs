//! `tessera bench train`: what training costs on this machine, in one
//! process, and (`--network`) over real provider processes.
//!
//! 1. One epoch of the digits MLP (64-64-10, batches of 32) on candle's CPU
//!    backend with 1 and 2 threads: the trainer's thread count is set per
//!    trainer, and on few cores one thread is faster (candle's threads spin).
//! 2. Federated rounds over `--clients` shards of the digits set (IID and
//!    Dirichlet(`--alpha`)), FedAvg, every client every round, against
//!    centralized training on the same data for as many passes over it:
//!    final accuracy on a held-out fifth, bytes per client and round, time.
//! 3. SecAgg+ over the same number of clients in one process: the time of
//!    its four stages for a model-sized vector and the bytes each client
//!    sends against its plain update.
//! 4. Accuracy against ε: the IID federation with half the clients each
//!    round, updates clipped and noised (distributed noise, as through
//!    SecAgg) for each `--dp-sigmas`, ε at δ = 10⁻⁵ after `--dp-rounds`.
//! 5. With `--network`: the same federation as a devnet (`tessera devnet
//!    --train-demo --json`, one provider process per client over iroh),
//!    IID and non-IID, with and without SecAgg+: time per round, bytes per
//!    provider per round, rounds to 95%, accuracy against centralized.

use std::time::Instant;

use clap::Args;
use serde_json::json;
use tessera_train::privacy::{DpSettings, NoiseAt};
use tessera_train::simulate::{centralized, federate, Federation};
use tessera_train::{
    data, train_locally, Aggregation, CandleTrainer, Initialize, ModelSpec, Recipe, Split, Strategy,
};

use super::stats::percentile;

#[derive(Args)]
pub struct TrainBench {
    /// Clients the training data is split over.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Federated rounds.
    #[arg(long, default_value_t = 150)]
    pub rounds: u32,
    /// Passes over its shard each client makes per round.
    #[arg(long, default_value_t = 2)]
    pub local_epochs: u32,
    /// Dirichlet α of the non-IID split.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Timed epochs per thread count.
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Hidden units of the MLP.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Noise multipliers of the differential-privacy runs (IID, half the
    /// clients each round, updates clipped to `--dp-clip`).
    #[arg(long, value_delimiter = ',', default_values_t = vec![0.0, 0.3, 0.5, 1.0, 2.0])]
    pub dp_sigmas: Vec<f64>,
    /// Clipping norm of the differential-privacy runs.
    #[arg(long, default_value_t = 1.0)]
    pub dp_clip: f64,
    /// Rounds of the differential-privacy runs.
    #[arg(long, default_value_t = 50)]
    pub dp_rounds: u32,
    /// Also run the federation over provider processes (devnets on
    /// loopback, port 18080): plain and SecAgg+, IID and non-IID.
    #[arg(long)]
    pub network: bool,
}

pub fn run(home: &std::path::Path, b: TrainBench) -> anyhow::Result<()> {
    let spec = ModelSpec::Mlp {
        inputs: 64,
        hidden: b.hidden.max(1),
        classes: 10,
    };
    let (train, test) = data::digits()?.split(0.2, 42);
    let recipe = Recipe {
        epochs: 1,
        batch_size: 32,
        learning_rate: 0.1,
        proximal: 0.0,
        seed: 0,
    };
    println!(
        "training step: one epoch of the digits MLP ({} parameters, {} samples, batches of 32)",
        spec.parameters(),
        train.len()
    );
    for threads in [1, 2] {
        let trainer = CandleTrainer::new(spec, threads)?;
        let w = spec.init(1);
        let mut ms = Vec::with_capacity(b.epochs);
        for e in 0..=b.epochs {
            let t = Instant::now();
            train_locally(
                &trainer,
                &w,
                &train,
                &Recipe {
                    seed: e as u64,
                    ..recipe
                },
            )?;
            // The first epoch warms up (allocations, pool start).
            if e > 0 {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (p50, p90) = (percentile(ms.clone(), 0.5), percentile(ms, 0.9));
        println!("  {threads} thread(s): p50 {p50:.2} ms, p90 {p90:.2} ms per epoch");
        println!(
            "{}",
            json!({"bench": "train_epoch", "threads": threads, "p50_ms": p50, "p90_ms": p90, "epochs": b.epochs})
        );
    }
    let trainer = CandleTrainer::new(spec, 1)?;
    let clients = b.clients.max(1);
    for split in [Split::Iid, Split::Dirichlet(b.alpha)] {
        let parts = data::partition(&train, clients, split, 7);
        let shards: Vec<_> = parts.iter().map(|p| train.subset(p)).collect();
        let fed = Federation {
            spec,
            strategy: Strategy::FedAvg,
            aggregation: Aggregation::WeightedMean,
            rounds: b.rounds,
            clients_per_round: 0,
            recipe: Recipe {
                epochs: b.local_epochs.max(1),
                ..recipe
            },
            seed: 1,
            privacy: None,
        };
        let t = Instant::now();
        let (_, reports) = federate(&trainer, &shards, &test, &fed)?;
        let secs = t.elapsed().as_secs_f64();
        // As many passes over all the data as the federation made.
        let passes = b.rounds * b.local_epochs.max(1);
        let central = centralized(&trainer, &train, &test, spec, &recipe, passes, 1)?;
        let last = reports.last().map(|r| r.eval.accuracy).unwrap_or(0.0);
        let bytes = reports.first().map(|r| r.bytes_per_client).unwrap_or(0);
        println!(
            "FedAvg, {clients} clients, {split:?}, {} rounds of {} local epochs: accuracy {last:.3} (centralized, {passes} epochs: {:.3}), {bytes} bytes per client and round, {secs:.2} s",
            b.rounds, b.local_epochs, central.accuracy
        );
        println!(
            "{}",
            json!({
                "bench": "federated", "split": format!("{split:?}"), "clients": clients,
                "rounds": b.rounds, "local_epochs": b.local_epochs, "accuracy": last, "centralized_accuracy": central.accuracy,
                "bytes_per_client_round": bytes, "seconds": secs,
            })
        );
    }
    secure_aggregation(spec, clients)?;
    if b.network {
        networked(home, &b)?;
    }
    let parts = data::partition(&train, clients, Split::Iid, 7);
    let shards: Vec<_> = parts.iter().map(|p| train.subset(p)).collect();
    println!(
        "accuracy against ε: {clients} IID clients, {} each round, {} rounds, C = {}, δ = 1e-5",
        (clients / 2).max(1),
        b.dp_rounds,
        b.dp_clip
    );
    for &sigma in &b.dp_sigmas {
        let fed = Federation {
            spec,
            strategy: Strategy::FedAvg,
            aggregation: Aggregation::WeightedMean,
            rounds: b.dp_rounds,
            clients_per_round: (clients / 2).max(1),
            recipe,
            seed: 1,
            privacy: Some(DpSettings {
                clip: b.dp_clip,
                noise_multiplier: sigma,
                noise_at: NoiseAt::Distributed,
                delta: 1e-5,
                budget: None,
            }),
        };
        let (_, reports) = federate(&trainer, &shards, &test, &fed)?;
        let last = reports.last();
        let acc = last.map(|r| r.eval.accuracy).unwrap_or(0.0);
        let eps = last.and_then(|r| r.epsilon).unwrap_or(f64::INFINITY);
        println!("  σ {sigma}: ε {eps:.2}, accuracy {acc:.3}");
        println!(
            "{}",
            json!({"bench": "dp", "sigma": sigma, "clip": b.dp_clip, "rounds": b.dp_rounds,
                   "epsilon": if eps.is_finite() { json!(eps) } else { json!(null) }, "accuracy": acc})
        );
    }
    Ok(())
}

/// SecAgg+ over `clients` clients in one process: the time of its four
/// stages for one model-sized vector (every client's and the server's work,
/// one after another, as one core would do them; no network), against the
/// round time of plain FedAvg, and what each client sends beyond its vector.
fn secure_aggregation(spec: ModelSpec, clients: usize) -> anyhow::Result<()> {
    use tessera_train::secagg::{Client, Config, Server};
    let clients = clients.max(3);
    let length = spec.parameters() + 1; // the weighted update and its weight
    let neighbours = clients - 1;
    let config = Config {
        round: 1,
        clients: (0..clients as u32).collect(),
        neighbours,
        threshold: neighbours / 2 + 1,
        clip: 1.0,
        length,
    };
    let values: Vec<f32> = (0..length).map(|i| (i as f32 * 0.37).sin() * 0.5).collect();
    let runs = 20;
    let mut ms = Vec::with_capacity(runs);
    let mut sent = 0usize;
    for _ in 0..runs {
        let t = Instant::now();
        let mut server = Server::new(config.clone())?;
        let mut cs = Vec::with_capacity(clients);
        let mut ads = Vec::with_capacity(clients);
        for &id in &config.clients {
            let (c, k) = Client::new(config.clone(), id)?;
            cs.push(c);
            ads.push(k);
        }
        let relayed = server.collect_keys(ads);
        let mut shares = Vec::new();
        for c in cs.iter_mut() {
            shares.extend(c.share_keys(&relayed)?);
        }
        let relayed = server.collect_shares(shares);
        let mut inputs = Vec::with_capacity(clients);
        for c in cs.iter_mut() {
            inputs.push(c.masked_input(&relayed, &values)?);
        }
        let (survivors, dropped) = server.collect_inputs(inputs);
        let mut unmaskings = Vec::with_capacity(clients);
        for c in cs.iter_mut() {
            unmaskings.push(c.unmask(&survivors, &dropped)?);
        }
        server.finish(&unmaskings)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        // What client 0 sent: its keys, its encrypted shares (ciphertext,
        // tag, both ends), its masked vector, its revealed shares.
        let mine: usize = relayed
            .iter()
            .filter(|s| s.from == 0)
            .map(|s| s.ciphertext.len() + 32 + 8)
            .sum();
        let revealed = unmaskings[0].seed_shares.len() + unmaskings[0].key_shares.len();
        sent = 4 + 64 + mine + 4 * length + revealed * (4 + 48);
    }
    let p50 = percentile(ms, 0.5);
    let plain = 4 * length;
    println!(
        "SecAgg+, {clients} clients (k = {neighbours}, t = {}), {length} values: p50 {p50:.1} ms for all four stages, one core; each client sends {sent} bytes against {plain} for its plain update ({:.3}×)",
        config.threshold,
        sent as f64 / plain as f64
    );
    println!(
        "{}",
        json!({"bench": "secagg", "clients": clients, "neighbours": neighbours, "threshold": config.threshold,
               "values": length, "p50_ms": p50, "bytes_sent_per_client": sent, "plain_bytes": plain, "rounds": runs})
    );
    Ok(())
}

/// The federation over provider processes: one devnet per run.
fn networked(home: &std::path::Path, b: &TrainBench) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let alpha = b.alpha.to_string();
    let runs: [(&str, Vec<&str>); 4] = [
        ("plain, IID", vec![]),
        ("plain, non-IID", vec!["--non-iid", &alpha]),
        ("SecAgg+, IID", vec!["--secagg"]),
        ("SecAgg+, non-IID", vec!["--secagg", "--non-iid", &alpha]),
    ];
    println!(
        "over the network: {} provider processes, {} rounds of {} local epochs",
        b.clients, b.rounds, b.local_epochs
    );
    for (name, extra) in runs {
        let out = std::process::Command::new(&exe)
            .args([
                "devnet",
                "--train-demo",
                "--json",
                "--listen",
                "127.0.0.1:18080",
            ])
            .args(["--providers", &b.clients.to_string()])
            .args(["--rounds", &b.rounds.to_string()])
            .args(["--local-epochs", &b.local_epochs.to_string()])
            .args(extra)
            // The devnets run in this home (its model store gives the
            // gateway its tokenizer), as `tessera devnet` would.
            .env("TESSERA_HOME", home)
            .env("TESSERA_LOG", "error")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|_| anyhow::anyhow!("{name}: the devnet printed no result: {text}"))?;
        println!(
            "  {name}: accuracy {:.4} (centralized {:.4}), {:.1} ms per round, {} bytes per provider per round, 95% after {} rounds",
            v["accuracy"].as_f64().unwrap_or(0.0),
            v["centralized_accuracy"].as_f64().unwrap_or(0.0),
            v["seconds_per_round"].as_f64().unwrap_or(0.0) * 1e3,
            v["bytes_per_client_round"],
            v["rounds_to_95"],
        );
        println!(
            "{}",
            json!({"bench": "federated_network", "run": name, "result": v})
        );
    }
    Ok(())
}
