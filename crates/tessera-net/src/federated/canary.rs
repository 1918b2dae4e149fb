//! Canary rounds: how a SecAgg task verifies its providers, whose steps it
//! never sees. The gateway sends a provider a round on data it supplies
//! (seeded random samples of the task's shape), the provider trains,
//! commits and reveals as in a plain round, and the gateway trains the
//! same round itself and compares (`tessera_train::verify::reexecute`).
//! A pass shows the provider trains as asked; it cannot show that the
//! provider used its private data in the masked rounds.

use std::sync::Arc;

use tessera_core::train::{ModelSpec, Recipe, Weights};
use tessera_protocol::{JobKind, JobRequest, TrainRound};
use tessera_train::{CandleTrainer, Dataset, Rng};

use super::pool::Trainer;
use super::round::{commit_phase, opens, reveal_phase};

/// Samples in a canary round.
pub(crate) const SAMPLES: usize = 48;

/// Seeded random samples of a model's shape: values k/16 for k in 0–16,
/// the range of normalized inputs such as the digits' pixels ÷ 16 (so the
/// task's learning rate trains on them as on its own data), and short in
/// the round's CSV.
pub(crate) fn data(spec: ModelSpec, seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let x: Vec<f32> = (0..SAMPLES * spec.inputs())
        .map(|_| rng.below(17) as f32 / 16.0)
        .collect();
    let y: Vec<u32> = (0..SAMPLES)
        .map(|_| rng.below(spec.classes()) as u32)
        .collect();
    // Shapes and values are valid by construction.
    Dataset::new(x, y, spec.inputs(), spec.classes()).unwrap_or_else(|_| Dataset {
        x: Vec::new(),
        y: Vec::new(),
        features: spec.inputs(),
        classes: spec.classes(),
    })
}

/// Run a canary round on `trainer`: the bytes it moved, and `Err` saying
/// how it failed.
pub(crate) async fn check(
    trainer: &Trainer,
    job_id: String,
    round: u32,
    spec: ModelSpec,
    global: &[f32],
    recipe: Recipe,
    deadline_ms: u64,
) -> (u64, Result<(), String>) {
    let data = Arc::new(data(spec, recipe.seed ^ 0xCA4A));
    let job = JobRequest {
        job_id,
        kind: JobKind::TrainRound(Box::new(TrainRound {
            task: "canary".into(),
            round,
            spec,
            global: Weights(global.to_vec()),
            recipe,
            deadline_ms,
            price: trainer.offer.price,
            secagg: None,
            privacy: None,
            canary: Some(tessera_train::data::to_csv(&data)),
        })),
    };
    let committed = match commit_phase(trainer.clone(), job).await {
        Ok(c) => c,
        Err((_, why)) => return (0, Err(format!("canary: {why}"))),
    };
    let (c, done) = reveal_phase(committed).await;
    (
        c.bytes,
        verdict(&c, round, done, spec, global, &data, recipe).await,
    )
}

/// Whether a canary's revealed result is the gateway's own re-execution.
async fn verdict(
    c: &super::round::Committed,
    round: u32,
    done: Result<tessera_protocol::TrainDone, String>,
    spec: ModelSpec,
    global: &[f32],
    data: &Arc<Dataset>,
    recipe: Recipe,
) -> Result<(), String> {
    let done = done.map_err(|why| format!("canary: {why}"))?;
    opens(c, round, &done).map_err(|why| format!("canary: {why}"))?;
    let data = data.clone();
    let global = global.to_vec();
    let claimed = done.parameters.0;
    let verdict = tokio::task::spawn_blocking(move || {
        let t = CandleTrainer::new(spec, 1)?;
        tessera_train::verify::reexecute(&t, &global, &data, &recipe, &claimed)
    })
    .await
    .map_err(|e| format!("canary re-execution stopped: {e}"))?
    .map_err(|e| format!("canary re-execution failed: {e}"))?;
    if verdict.passed {
        Ok(())
    } else {
        Err(format!(
            "canary: its round differs from the gateway's re-execution by {:.3} (relative; \
             tolerance {})",
            verdict.relative_distance,
            tessera_train::verify::TOLERANCE
        ))
    }
}
