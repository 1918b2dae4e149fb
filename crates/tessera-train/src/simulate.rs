//! Federated rounds run in one process: each round samples clients (seeded),
//! trains each from the global parameters on its own shard, and applies the
//! strategy. The networked runs do the same steps over the provider
//! protocol; this is their reference, and the baseline benchmarks compare
//! with (with [`centralized`], training on all the data in one place).

use serde::Serialize;

use crate::data::Dataset;
use crate::privacy::{self, Accountant, DpSettings};
use crate::rng::Rng;
use crate::strategy::{Aggregation, ClientUpdate, Server, Strategy};
use crate::trainer::{train_locally, Evaluation, Initialize, ModelSpec, Recipe, Trainer};
use crate::TrainError;

/// A federated task's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Federation {
    /// The model.
    pub spec: ModelSpec,
    /// The server's strategy.
    pub strategy: Strategy,
    /// How updates are combined.
    pub aggregation: Aggregation,
    /// Rounds to run.
    pub rounds: u32,
    /// Clients sampled each round (all when 0 or more than there are).
    pub clients_per_round: usize,
    /// Each client's local training (its seed is derived per round and
    /// client).
    pub recipe: Recipe,
    /// Seed of the initial parameters and of client sampling.
    pub seed: u64,
    /// Differential privacy: updates clipped and noised, ε accounted
    /// (client-level, q = clients per round ÷ clients), rounds stopped at
    /// the budget. With it the aggregate is the plain mean of the clipped,
    /// noised updates (a fixed weight per client bounds the sensitivity),
    /// whatever `aggregation` says.
    pub privacy: Option<DpSettings>,
}

/// What one round did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundReport {
    /// Round number, from 1.
    pub round: u32,
    /// Clients that trained (shard indices).
    pub clients: Vec<usize>,
    /// Their mean training loss, weighted by samples.
    pub train_loss: f64,
    /// The new global model on the held-out data.
    pub eval: Evaluation,
    /// Bytes each client fetched and sent (the parameters, f32, each way).
    pub bytes_per_client: usize,
    /// ε spent so far at the task's δ (with differential privacy).
    pub epsilon: Option<f64>,
}

/// The seed of `client`'s local training in `round`.
pub fn round_seed(seed: u64, round: u32, client: usize) -> u64 {
    let mut r = Rng::new(seed ^ (u64::from(round) << 32) ^ client as u64);
    r.next_u64()
}

/// Which clients train in `round`: a seeded sample of `per_round` of
/// `clients` (all of them when `per_round` is 0 or at least `clients`).
pub fn sample_clients(seed: u64, round: u32, clients: usize, per_round: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..clients).collect();
    if per_round == 0 || per_round >= clients {
        return all;
    }
    Rng::new(round_seed(seed, round, usize::MAX)).shuffle(&mut all);
    let mut chosen = all[..per_round].to_vec();
    chosen.sort_unstable();
    chosen
}

/// Run `fed` over `shards` (one per client), evaluating on `test` after
/// every round. Returns the final parameters and the rounds' reports (fewer
/// than `fed.rounds` when the privacy budget stopped the task).
pub fn federate(
    trainer: &dyn Trainer,
    shards: &[Dataset],
    test: &Dataset,
    fed: &Federation,
) -> Result<(Vec<f32>, Vec<RoundReport>), TrainError> {
    let mut server = Server::new(fed.strategy, fed.spec.init(fed.seed));
    let mut reports = Vec::with_capacity(fed.rounds as usize);
    let mut accountant = Accountant::default();
    for round in 1..=fed.rounds {
        let clients = sample_clients(fed.seed, round, shards.len(), fed.clients_per_round);
        let q = clients.len() as f64 / shards.len().max(1) as f64;
        if let Some(dp) = &fed.privacy {
            let next = accountant.epsilon_after(q, dp.noise_multiplier, 1, dp.delta);
            if dp.budget.is_some_and(|b| next > b) {
                break;
            }
        }
        let mut updates = Vec::with_capacity(clients.len());
        let (mut loss, mut samples) = (0.0, 0usize);
        for &c in &clients {
            let recipe = Recipe {
                seed: round_seed(fed.seed, round, c),
                proximal: fed.strategy.proximal(),
                ..fed.recipe
            };
            let mut u = train_locally(trainer, server.parameters(), &shards[c], &recipe)?;
            loss += u.loss * u.samples as f64;
            samples += u.samples;
            if let Some(dp) = &fed.privacy {
                // Clip and noise the update (the difference from the
                // global parameters), as the client does before sending.
                let mut delta: Vec<f32> = u
                    .parameters
                    .iter()
                    .zip(server.parameters())
                    .map(|(p, g)| p - g)
                    .collect();
                privacy::clip(&mut delta, dp.clip);
                let mut rng = Rng::new(round_seed(fed.seed ^ 0xD1FF, round, c));
                privacy::add_gaussian(&mut delta, dp.client_std(clients.len()), &mut rng);
                u.parameters = server
                    .parameters()
                    .iter()
                    .zip(&delta)
                    .map(|(g, d)| g + d)
                    .collect();
                u.samples = 1;
            }
            updates.push(ClientUpdate {
                parameters: u.parameters,
                samples: u.samples,
            });
        }
        let rule = match fed.privacy {
            Some(_) => Aggregation::WeightedMean,
            None => fed.aggregation,
        };
        server.apply(&updates, rule)?;
        let epsilon = fed.privacy.map(|dp| {
            accountant.compose(q, dp.noise_multiplier, 1);
            accountant.epsilon(dp.delta).0
        });
        reports.push(RoundReport {
            round,
            clients,
            train_loss: loss / samples.max(1) as f64,
            eval: trainer.evaluate(server.parameters(), test)?,
            bytes_per_client: 2 * 4 * fed.spec.parameters(),
            epsilon,
        });
    }
    Ok((server.parameters().to_vec(), reports))
}

/// Train on all of `train` in one place for `epochs` (the recipe's own
/// epochs ignored), from the same initial parameters: the accuracy
/// federated training is measured against.
pub fn centralized(
    trainer: &dyn Trainer,
    train: &Dataset,
    test: &Dataset,
    spec: ModelSpec,
    recipe: &Recipe,
    epochs: u32,
    seed: u64,
) -> Result<Evaluation, TrainError> {
    let recipe = Recipe {
        epochs,
        proximal: 0.0,
        seed,
        ..*recipe
    };
    let u = train_locally(trainer, &spec.init(seed), train, &recipe)?;
    trainer.evaluate(&u.parameters, test)
}
