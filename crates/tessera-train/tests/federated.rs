//! Federated training of the digits set in one process, on the real candle
//! trainer: each strategy learns, federated accuracy comes close to
//! centralized, robust rules withstand a malicious client that plain
//! averaging does not, and a run is reproducible from its seed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tessera_train::simulate::{centralized, federate, round_seed, Federation};
use tessera_train::{
    data, train_locally, Aggregation, CandleTrainer, ClientUpdate, Dataset, Initialize, ModelSpec,
    Recipe, Server, Split, Strategy, Trainer,
};

const MLP: ModelSpec = ModelSpec::Mlp {
    inputs: 64,
    hidden: 32,
    classes: 10,
};

fn shards(clients: usize, split: Split) -> (Vec<Dataset>, Dataset, Dataset) {
    let (train, test) = data::digits().unwrap().split(0.2, 42);
    let parts = data::partition(&train, clients, split, 7);
    (parts.iter().map(|p| train.subset(p)).collect(), train, test)
}

fn federation(strategy: Strategy, rounds: u32) -> Federation {
    Federation {
        spec: MLP,
        strategy,
        aggregation: Aggregation::WeightedMean,
        rounds,
        clients_per_round: 0,
        recipe: Recipe {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.1,
            proximal: 0.0,
            seed: 0,
        },
        seed: 1,
        privacy: None,
    }
}

#[test]
fn fedavg_over_four_clients_comes_close_to_centralized_training() {
    let trainer = CandleTrainer::new(MLP, 1).unwrap();
    let (shards, train, test) = shards(4, Split::Iid);
    let fed = federation(Strategy::FedAvg, 20);
    let (_, reports) = federate(&trainer, &shards, &test, &fed).unwrap();
    let last = reports.last().unwrap().eval;
    // Every client passed over its quarter once a round: 20 epochs of data.
    let central = centralized(&trainer, &train, &test, MLP, &fed.recipe, 20, 1).unwrap();
    eprintln!(
        "FedAvg, 4 IID clients, 20 rounds: accuracy {:.3} (centralized, 20 epochs: {:.3})",
        last.accuracy, central.accuracy
    );
    assert!(last.accuracy >= 0.9, "federated accuracy {}", last.accuracy);
    assert!(
        last.accuracy >= central.accuracy - 0.05,
        "federated {} vs centralized {}",
        last.accuracy,
        central.accuracy
    );
    assert!(reports[0].eval.loss > last.loss, "the loss fell");
    assert_eq!(reports[0].bytes_per_client, 2 * 4 * MLP.parameters());
}

#[test]
fn every_strategy_learns_iid_and_non_iid_shards() {
    let trainer = CandleTrainer::new(MLP, 1).unwrap();
    for (split, strategy) in [
        (Split::Dirichlet(0.5), Strategy::FedAvg),
        (Split::Dirichlet(0.5), Strategy::FedProx { mu: 0.01 }),
        (
            Split::Iid,
            Strategy::FedAvgM {
                server_lr: 1.0,
                momentum: 0.5,
            },
        ),
        (
            Split::Iid,
            Strategy::FedAdam {
                server_lr: 0.01,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
        ),
    ] {
        let (shards, _, test) = shards(4, split);
        let (_, reports) = federate(&trainer, &shards, &test, &federation(strategy, 20)).unwrap();
        let acc = reports.last().unwrap().eval.accuracy;
        eprintln!("{strategy:?} on {split:?}, 4 clients, 20 rounds: accuracy {acc:.3}");
        assert!(acc >= 0.85, "{strategy:?} on {split:?}: accuracy {acc}");
    }
}

/// One of five clients sends its update sign-flipped and scaled tenfold
/// every round. The plain mean follows it off a cliff; the median, the
/// trimmed mean and Krum keep learning.
#[test]
fn robust_rules_withstand_a_sign_flipping_client_that_breaks_the_mean() {
    let trainer = CandleTrainer::new(MLP, 1).unwrap();
    let (shards, _, test) = shards(5, Split::Iid);
    let recipe = federation(Strategy::FedAvg, 1).recipe;
    let run = |rule: Aggregation| -> f64 {
        let mut server = Server::new(Strategy::FedAvg, MLP.init(1));
        for round in 1..=12 {
            let global = server.parameters().to_vec();
            let updates: Vec<ClientUpdate> = shards
                .iter()
                .enumerate()
                .map(|(c, shard)| {
                    let r = Recipe {
                        seed: round_seed(1, round, c),
                        ..recipe
                    };
                    let mut u = train_locally(&trainer, &global, shard, &r).unwrap();
                    if c == 0 {
                        for (p, g) in u.parameters.iter_mut().zip(&global) {
                            *p = g - 10.0 * (*p - g);
                        }
                    }
                    ClientUpdate {
                        parameters: u.parameters,
                        samples: u.samples,
                    }
                })
                .collect();
            server.apply(&updates, rule).unwrap();
        }
        trainer
            .evaluate(server.parameters(), &test)
            .unwrap()
            .accuracy
    };
    let mean = run(Aggregation::WeightedMean);
    eprintln!("one sign-flipping client of 5, 12 rounds: mean {mean:.3}");
    assert!(mean < 0.5, "the mean withstood the attacker: {mean}");
    for rule in [
        Aggregation::Median,
        Aggregation::TrimmedMean { trim: 0.2 },
        Aggregation::Krum { byzantine: 1 },
    ] {
        let acc = run(rule);
        eprintln!("  {rule:?}: {acc:.3}");
        assert!(acc >= 0.85, "{rule:?}: accuracy {acc}");
    }
}

#[test]
fn a_run_is_reproducible_from_its_seed() {
    let trainer = CandleTrainer::new(
        ModelSpec::Logistic {
            inputs: 64,
            classes: 10,
        },
        1,
    )
    .unwrap();
    let (shards, _, test) = shards(3, Split::Dirichlet(0.5));
    let fed = Federation {
        spec: trainer.spec(),
        ..federation(Strategy::FedAvg, 3)
    };
    let (a, ra) = federate(&trainer, &shards, &test, &fed).unwrap();
    let (b, rb) = federate(&trainer, &shards, &test, &fed).unwrap();
    assert_eq!(a, b);
    assert_eq!(ra, rb);
    let other = Federation { seed: 2, ..fed };
    assert_ne!(federate(&trainer, &shards, &test, &other).unwrap().0, a);
}

/// With differential privacy every round reports the ε spent, ε only
/// grows, a budget stops the task before a round would pass it, and
/// moderate noise still learns.
#[test]
fn differential_privacy_reports_epsilon_and_stops_at_the_budget() {
    use tessera_train::privacy::{DpSettings, NoiseAt};
    let trainer = CandleTrainer::new(MLP, 1).unwrap();
    let (shards, _, test) = shards(4, Split::Iid);
    let dp = DpSettings {
        clip: 1.0,
        noise_multiplier: 0.5,
        noise_at: NoiseAt::Distributed,
        delta: 1e-5,
        budget: None,
    };
    let fed = Federation {
        privacy: Some(dp),
        ..federation(Strategy::FedAvg, 20)
    };
    let (_, reports) = federate(&trainer, &shards, &test, &fed).unwrap();
    assert_eq!(reports.len(), 20);
    let eps: Vec<f64> = reports.iter().map(|r| r.epsilon.unwrap()).collect();
    assert!(eps.windows(2).all(|w| w[1] > w[0]), "{eps:?}");
    let acc = reports.last().unwrap().eval.accuracy;
    eprintln!(
        "DP σ 0.5, C 1, 4 clients, 20 rounds: ε {:.1} at δ 1e-5, accuracy {acc:.3}",
        eps[19]
    );
    // Chance is 0.1; four clients carry a lot of noise each (σC/√4).
    assert!(acc >= 0.6, "accuracy {acc}");

    let budget = eps[9] + 0.5 * (eps[10] - eps[9]);
    let capped = Federation {
        privacy: Some(DpSettings {
            budget: Some(budget),
            ..dp
        }),
        ..fed
    };
    let (_, stopped) = federate(&trainer, &shards, &test, &capped).unwrap();
    assert_eq!(stopped.len(), 10, "the 11th round would pass ε {budget}");
    assert!(stopped.last().unwrap().epsilon.unwrap() <= budget);
}
