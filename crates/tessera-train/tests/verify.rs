//! Checking untrusted trainers on the real candle trainer: a commitment
//! opens only to what was committed; re-execution passes an honest round
//! (bit for bit, at one thread or two) and fails a lazy, random, scaled or
//! replayed one; plausibility refuses sign-flipped, oversized and NaN
//! updates; the outlier test names a poisoning client and no honest one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tessera_train::simulate::round_seed;
use tessera_train::verify::{commitment, plausible, reexecute};
use tessera_train::{
    data, outliers, train_locally, Aggregation, CandleTrainer, ClientUpdate, Initialize, ModelSpec,
    Recipe, Rng, Server, Split, Strategy,
};

const MLP: ModelSpec = ModelSpec::Mlp {
    inputs: 64,
    hidden: 32,
    classes: 10,
};

fn recipe(seed: u64) -> Recipe {
    Recipe {
        epochs: 1,
        batch_size: 32,
        learning_rate: 0.1,
        proximal: 0.0,
        seed,
    }
}

#[test]
fn a_commitment_opens_only_to_what_was_committed() {
    let nonce = [7u8; 32];
    let p = vec![0.5f32, -1.0, 2.0];
    let c = commitment(3, &nonce, &p, 100, 0.25);
    assert!(c.opens(3, &nonce, &p, 100, 0.25));
    assert!(!c.opens(3, &nonce, &[0.5, -1.0, 2.0001], 100, 0.25));
    assert!(!c.opens(3, &nonce, &p, 101, 0.25));
    assert!(!c.opens(3, &nonce, &p, 100, 0.2));
    assert!(!c.opens(4, &nonce, &p, 100, 0.25));
    assert!(!c.opens(3, &[8u8; 32], &p, 100, 0.25));
}

#[test]
fn reexecution_passes_honest_rounds_and_catches_cheats() {
    let (train, _) = data::digits().unwrap().split(0.2, 42);
    let shard = train.subset(&data::partition(&train, 4, Split::Iid, 7)[0]);
    let one = CandleTrainer::new(MLP, 1).unwrap();
    let two = CandleTrainer::new(MLP, 2).unwrap();
    let global = MLP.init(1);
    let r = recipe(round_seed(1, 1, 0));
    let honest = train_locally(&one, &global, &shard, &r).unwrap();
    for trainer in [&one, &two] {
        let v = reexecute(trainer, &global, &shard, &r, &honest.parameters).unwrap();
        assert_eq!(v.relative_distance, 0.0, "bit for bit");
        assert!(v.passed);
    }
    // Lazy: trained on half its shard (half the steps).
    let half: Vec<usize> = (0..shard.len() / 2).collect();
    let lazy = train_locally(&one, &global, &shard.subset(&half), &r).unwrap();
    // Random: noise of the honest update's size.
    let mut rng = Rng::new(9);
    let scale = honest
        .parameters
        .iter()
        .zip(&global)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        .sqrt()
        / (global.len() as f32).sqrt();
    let random: Vec<f32> = global
        .iter()
        .map(|g| g + scale * rng.normal() as f32)
        .collect();
    // Scaled: the honest step doubled.
    let scaled: Vec<f32> = honest
        .parameters
        .iter()
        .zip(&global)
        .map(|(a, g)| g + 2.0 * (a - g))
        .collect();
    // Replayed: the previous round's honest result, sent again.
    let previous = train_locally(&one, &global, &shard, &recipe(round_seed(1, 0, 0))).unwrap();
    for (name, claimed) in [
        ("lazy", lazy.parameters),
        ("random", random),
        ("scaled", scaled),
        ("replayed", previous.parameters),
    ] {
        let v = reexecute(&one, &global, &shard, &r, &claimed).unwrap();
        eprintln!("{name}: relative distance {:.3}", v.relative_distance);
        assert!(!v.passed, "{name} passed: {v:?}");
    }
}

#[test]
fn implausible_updates_are_refused() {
    let global = vec![0.0f32; 4];
    let honest = vec![0.1f32, 0.2, -0.1, 0.0];
    let consensus = vec![0.1f32, 0.1, -0.1, 0.0];
    assert!(plausible(&global, &honest, 0.5, 1.0, Some(&consensus)).is_ok());
    let flipped: Vec<f32> = honest.iter().map(|v| -v).collect();
    assert!(plausible(&global, &flipped, 0.5, 1.0, Some(&consensus)).is_err());
    assert!(plausible(&global, &[10.0, 0.0, 0.0, 0.0], 0.5, 1.0, None).is_err());
    assert!(plausible(&global, &[f32::NAN, 0.0, 0.0, 0.0], 0.5, 1.0, None).is_err());
    assert!(plausible(&global, &honest, f64::NAN, 1.0, None).is_err());
    assert!(plausible(&global, &honest, -1.0, 1.0, None).is_err());
    assert!(plausible(&global, &honest[..3], 0.5, 1.0, None).is_err());
}

/// Five clients, one sending a sign-flipped update scaled fivefold each
/// round: the outlier test names it every round and never an honest one,
/// and the round without it learns as if it were not there.
#[test]
fn a_poisoning_client_is_named_every_round() {
    let trainer = CandleTrainer::new(MLP, 1).unwrap();
    let (train, test) = data::digits().unwrap().split(0.2, 42);
    let shards: Vec<_> = data::partition(&train, 5, Split::Iid, 7)
        .iter()
        .map(|p| train.subset(p))
        .collect();
    let mut server = Server::new(Strategy::FedAvg, MLP.init(1));
    for round in 1..=10 {
        let global = server.parameters().to_vec();
        let updates: Vec<ClientUpdate> = shards
            .iter()
            .enumerate()
            .map(|(c, shard)| {
                let mut u =
                    train_locally(&trainer, &global, shard, &recipe(round_seed(1, round, c)))
                        .unwrap();
                if c == 3 {
                    for (p, g) in u.parameters.iter_mut().zip(&global) {
                        *p = g - 5.0 * (*p - g);
                    }
                }
                ClientUpdate {
                    parameters: u.parameters,
                    samples: u.samples,
                }
            })
            .collect();
        let named = outliers(&updates, 3.0);
        assert_eq!(named, vec![3], "round {round}");
        // The named client is struck from the round (and not paid for it).
        let kept: Vec<ClientUpdate> = updates
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !named.contains(i))
            .map(|(_, u)| u)
            .collect();
        server.apply(&kept, Aggregation::WeightedMean).unwrap();
    }
    let acc = tessera_train::Trainer::evaluate(&trainer, server.parameters(), &test)
        .unwrap()
        .accuracy;
    assert!(acc >= 0.85, "accuracy {acc}");
}
