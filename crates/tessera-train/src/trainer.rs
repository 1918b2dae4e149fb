//! The `Trainer` seam and local training on top of it.
//!
//! A trainer knows a model's shape and computes, for a batch, the mean loss
//! and its gradient with respect to every parameter; parameters cross the
//! seam as one flat `f32` vector (what rounds send, strategies average and
//! SecAgg masks). The optimizer step and the local recipe (epochs, batch
//! size, learning rate, FedProx's proximal term) live here, above the seam,
//! so every implementation trains the same way from the same seed.

use serde::{Deserialize, Serialize};
pub use tessera_core::train::{ModelSpec, Recipe};

use crate::data::Dataset;
use crate::rng::Rng;
use crate::TrainError;

/// Seeded initial parameters of a [`ModelSpec`].
pub trait Initialize {
    /// Weights uniform in ±√(6 / (fan in + fan out)) (Glorot), biases zero.
    fn init(&self, seed: u64) -> Vec<f32>;
}

impl Initialize for ModelSpec {
    fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut out = Vec::with_capacity(self.parameters());
        for shape in self.shapes() {
            let n: usize = shape.iter().product();
            if let [fan_in, fan_out] = shape[..] {
                let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
                out.extend((0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * limit) as f32));
            } else {
                out.extend(std::iter::repeat_n(0.0, n));
            }
        }
        out
    }
}

/// Loss and accuracy of a model on a data set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Share of samples classified right (0–1).
    pub accuracy: f64,
    /// Samples evaluated.
    pub samples: usize,
}

/// What computes a model's loss and gradients: the seam between training
/// logic and the ML crate.
pub trait Trainer: Send {
    /// The model it trains.
    fn spec(&self) -> ModelSpec;
    /// Mean cross-entropy of the model with `parameters` over the batch
    /// (`x`: row-major samples, `y`: their labels), and its gradient with
    /// respect to each parameter (flat, in [`ModelSpec::shapes`] order).
    fn loss_and_gradients(
        &self,
        parameters: &[f32],
        x: &[f32],
        y: &[u32],
    ) -> Result<(f32, Vec<f32>), TrainError>;
    /// Loss and accuracy of the model with `parameters` on `data`.
    fn evaluate(&self, parameters: &[f32], data: &Dataset) -> Result<Evaluation, TrainError>;
}

/// What a client's local training produced.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalUpdate {
    /// Its parameters after training.
    pub parameters: Vec<f32>,
    /// Samples it trained on (the weight of its update).
    pub samples: usize,
    /// Mean training loss over its steps.
    pub loss: f64,
    /// Steps taken.
    pub steps: usize,
}

/// Train from `global` on `data` by `recipe`: mini-batch SGD over seeded
/// shuffles, with the proximal term when the recipe has one.
pub fn train_locally(
    trainer: &dyn Trainer,
    global: &[f32],
    data: &Dataset,
    recipe: &Recipe,
) -> Result<LocalUpdate, TrainError> {
    let spec = trainer.spec();
    if global.len() != spec.parameters() {
        return Err(TrainError::Shape(format!(
            "{} parameters for a model of {}",
            global.len(),
            spec.parameters()
        )));
    }
    if data.features != spec.inputs() || data.classes != spec.classes() {
        return Err(TrainError::Data(format!(
            "data of {} features and {} classes for a model of {} and {}",
            data.features,
            data.classes,
            spec.inputs(),
            spec.classes()
        )));
    }
    if data.is_empty() {
        return Err(TrainError::Data("no sample to train on".into()));
    }
    let mut w = global.to_vec();
    let mut rng = Rng::new(recipe.seed);
    let batch = recipe.batch_size.max(1);
    let (mut steps, mut loss_sum) = (0usize, 0f64);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut x = Vec::with_capacity(batch * data.features);
    let mut y = Vec::with_capacity(batch);
    for _ in 0..recipe.epochs {
        rng.shuffle(&mut order);
        for chunk in order.chunks(batch) {
            x.clear();
            y.clear();
            for &i in chunk {
                x.extend_from_slice(data.row(i));
                y.push(data.y[i]);
            }
            let (loss, grads) = trainer.loss_and_gradients(&w, &x, &y)?;
            if !loss.is_finite() {
                return Err(TrainError::Diverged(steps));
            }
            for ((wi, gi), g0) in w.iter_mut().zip(&grads).zip(global) {
                let prox = recipe.proximal * (*wi - g0);
                *wi -= recipe.learning_rate * (gi + prox);
            }
            loss_sum += f64::from(loss);
            steps += 1;
        }
    }
    Ok(LocalUpdate {
        parameters: w,
        samples: data.len(),
        loss: if steps > 0 {
            loss_sum / steps as f64
        } else {
            0.0
        },
        steps,
    })
}
