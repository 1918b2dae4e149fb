//! The `Trainer` seam and local training on top of it.
//!
//! A trainer knows a model's shape and computes, for a batch, the mean loss
//! and its gradient with respect to every parameter; parameters cross the
//! seam as one flat `f32` vector (what rounds send, strategies average and
//! SecAgg masks). The optimizer step and the local recipe (epochs, batch
//! size, learning rate, FedProx's proximal term) live here, above the seam,
//! so every implementation trains the same way from the same seed.

use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::rng::Rng;
use crate::TrainError;

/// A model's architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSpec {
    /// Multinomial logistic regression: one linear layer and softmax.
    Logistic {
        /// Values per sample.
        inputs: usize,
        /// Classes.
        classes: usize,
    },
    /// One hidden ReLU layer.
    Mlp {
        /// Values per sample.
        inputs: usize,
        /// Hidden units.
        hidden: usize,
        /// Classes.
        classes: usize,
    },
}

impl ModelSpec {
    /// Shapes of its parameter tensors, in the flat vector's order
    /// (weights as inputs × outputs, then biases, layer by layer).
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        match *self {
            ModelSpec::Logistic { inputs, classes } => vec![vec![inputs, classes], vec![classes]],
            ModelSpec::Mlp {
                inputs,
                hidden,
                classes,
            } => vec![
                vec![inputs, hidden],
                vec![hidden],
                vec![hidden, classes],
                vec![classes],
            ],
        }
    }

    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        self.shapes()
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// Values per sample it takes.
    pub fn inputs(&self) -> usize {
        match *self {
            ModelSpec::Logistic { inputs, .. } | ModelSpec::Mlp { inputs, .. } => inputs,
        }
    }

    /// Classes it tells apart.
    pub fn classes(&self) -> usize {
        match *self {
            ModelSpec::Logistic { classes, .. } | ModelSpec::Mlp { classes, .. } => classes,
        }
    }

    /// Seeded initial parameters: weights uniform in ±√(6 / (fan in + fan
    /// out)) (Glorot), biases zero.
    pub fn init(&self, seed: u64) -> Vec<f32> {
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

/// How a client trains locally in one round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Passes over the local data.
    pub epochs: u32,
    /// Samples per step.
    pub batch_size: usize,
    /// SGD step size.
    pub learning_rate: f32,
    /// FedProx's proximal term μ (0: plain local SGD): each step also pulls
    /// the parameters toward the round's global ones by μ·(w − w_global).
    pub proximal: f32,
    /// Seed of the shuffles (a round's seed, so the round can be re-executed).
    pub seed: u64,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.1,
            proximal: 0.0,
            seed: 0,
        }
    }
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
