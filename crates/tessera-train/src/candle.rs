//! The CPU trainer on candle.
//!
//! Chosen over burn after timing one epoch of the digits MLP (57 steps of
//! 32 samples) on this project's 2-core machine: candle 4.1 ms on one
//! thread, burn's NdArray backend 15 ms at its default and 30–46 ms on one
//! thread (BENCHMARKS.md, "Training in one process"). Candle's matrix
//! products split work over rayon, so a trainer runs every computation
//! inside its own rayon pool of a set size and never touches the global
//! pool an inference engine may be using.

use candle_core::{DType, Device, Tensor, Var};

use crate::data::Dataset;
use crate::trainer::{Evaluation, ModelSpec, Trainer};
use crate::TrainError;

/// A [`Trainer`] on candle's CPU backend.
pub struct CandleTrainer {
    spec: ModelSpec,
    pool: rayon::ThreadPool,
}

impl CandleTrainer {
    /// A trainer of `spec` computing on `threads` CPU threads (at least 1).
    pub fn new(spec: ModelSpec, threads: usize) -> Result<CandleTrainer, TrainError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("trainer-{i}"))
            .build()
            .map_err(|e| TrainError::Engine(format!("thread pool: {e}")))?;
        Ok(CandleTrainer { spec, pool })
    }

    /// The model's logits for `rows` samples in `x`, and its parameter
    /// variables (to take gradients of).
    fn forward(
        &self,
        parameters: &[f32],
        x: &[f32],
        rows: usize,
    ) -> candle_core::Result<(Tensor, Vec<Var>)> {
        let device = Device::Cpu;
        let mut vars = Vec::new();
        let mut at = 0;
        for shape in self.spec.shapes() {
            let n: usize = shape.iter().product();
            vars.push(Var::from_slice(
                &parameters[at..at + n],
                shape.as_slice(),
                &device,
            )?);
            at += n;
        }
        let x = Tensor::from_slice(x, (rows, self.spec.inputs()), &device)?;
        let logits = match vars.as_slice() {
            [w, b] => x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?,
            [w1, b1, w2, b2] => x
                .matmul(w1.as_tensor())?
                .broadcast_add(b1.as_tensor())?
                .relu()?
                .matmul(w2.as_tensor())?
                .broadcast_add(b2.as_tensor())?,
            _ => candle_core::bail!("unexpected parameter layout"),
        };
        Ok((logits, vars))
    }

    fn check(&self, parameters: &[f32], x: &[f32], y: &[u32]) -> Result<(), TrainError> {
        if parameters.len() != self.spec.parameters() {
            return Err(TrainError::Shape(format!(
                "{} parameters for a model of {}",
                parameters.len(),
                self.spec.parameters()
            )));
        }
        if y.is_empty() || x.len() != y.len() * self.spec.inputs() {
            return Err(TrainError::Shape(format!(
                "{} values for {} samples of {} features",
                x.len(),
                y.len(),
                self.spec.inputs()
            )));
        }
        if let Some(bad) = y.iter().find(|&&c| c as usize >= self.spec.classes()) {
            return Err(TrainError::Data(format!("label {bad} out of range")));
        }
        Ok(())
    }
}

pub(crate) fn engine(e: candle_core::Error) -> TrainError {
    TrainError::Engine(e.to_string())
}

/// A scalar loss and its gradient with respect to `vars`, flat in their
/// order (`n` values in all; a variable the loss does not reach gets
/// zeros).
pub(crate) fn loss_and_flat_gradients(
    loss: &Tensor,
    vars: &[Var],
    n: usize,
) -> Result<(f32, Vec<f32>), TrainError> {
    let grads = loss.backward().map_err(engine)?;
    let mut flat = Vec::with_capacity(n);
    for v in vars {
        match grads.get(v.as_tensor()) {
            Some(g) => flat.extend(
                g.flatten_all()
                    .and_then(|g| g.to_vec1::<f32>())
                    .map_err(engine)?,
            ),
            None => flat.extend(std::iter::repeat_n(0.0, v.as_tensor().elem_count())),
        }
    }
    let loss = loss
        .to_dtype(DType::F32)
        .and_then(|l| l.to_scalar::<f32>())
        .map_err(engine)?;
    Ok((loss, flat))
}

impl Trainer for CandleTrainer {
    fn spec(&self) -> ModelSpec {
        self.spec
    }

    fn loss_and_gradients(
        &self,
        parameters: &[f32],
        x: &[f32],
        y: &[u32],
    ) -> Result<(f32, Vec<f32>), TrainError> {
        self.check(parameters, x, y)?;
        self.pool.install(|| {
            let (logits, vars) = self.forward(parameters, x, y.len()).map_err(engine)?;
            let target = Tensor::from_slice(y, y.len(), &Device::Cpu).map_err(engine)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &target).map_err(engine)?;
            loss_and_flat_gradients(&loss, &vars, parameters.len())
        })
    }

    fn evaluate(&self, parameters: &[f32], data: &Dataset) -> Result<Evaluation, TrainError> {
        if data.is_empty() {
            return Err(TrainError::Data("no sample to evaluate on".into()));
        }
        self.check(parameters, &data.x, &data.y)?;
        self.pool.install(|| {
            let (logits, _) = self
                .forward(parameters, &data.x, data.len())
                .map_err(engine)?;
            let target = Tensor::from_slice(&data.y, data.len(), &Device::Cpu).map_err(engine)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &target)
                .and_then(|l| l.to_scalar::<f32>())
                .map_err(engine)?;
            let predicted = logits
                .argmax(1)
                .and_then(|p| p.to_vec1::<u32>())
                .map_err(engine)?;
            let right = predicted
                .iter()
                .zip(&data.y)
                .filter(|(p, y)| p == y)
                .count();
            Ok(Evaluation {
                loss: f64::from(loss),
                accuracy: right as f64 / data.len() as f64,
                samples: data.len(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::Initialize;

    /// The gradients candle computes match central finite differences of
    /// the loss, for both models.
    #[test]
    fn gradients_match_finite_differences() {
        let data = crate::data::digits()
            .unwrap()
            .subset(&[0, 1, 2, 3, 4, 5, 6, 7]);
        for spec in [
            ModelSpec::Logistic {
                inputs: 64,
                classes: 10,
            },
            ModelSpec::Mlp {
                inputs: 64,
                hidden: 16,
                classes: 10,
            },
        ] {
            let t = CandleTrainer::new(spec, 1).unwrap();
            let w = spec.init(5);
            let (_, g) = t.loss_and_gradients(&w, &data.x, &data.y).unwrap();
            assert_eq!(g.len(), spec.parameters());
            // Every 37th parameter, in f64 arithmetic on the f32 loss.
            let h = 1e-2f32;
            for i in (0..w.len()).step_by(37) {
                let at = |d: f32| {
                    let mut v = w.clone();
                    v[i] += d;
                    f64::from(t.loss_and_gradients(&v, &data.x, &data.y).unwrap().0)
                };
                let numeric = (at(h) - at(-h)) / (2.0 * f64::from(h));
                assert!(
                    (numeric - f64::from(g[i])).abs() < 2e-3 + 0.05 * numeric.abs(),
                    "{spec:?} parameter {i}: {numeric} vs {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn wrong_shapes_and_labels_are_refused() {
        let spec = ModelSpec::Logistic {
            inputs: 4,
            classes: 3,
        };
        let t = CandleTrainer::new(spec, 1).unwrap();
        let w = spec.init(1);
        assert!(t.loss_and_gradients(&w[1..], &[0.0; 4], &[0]).is_err());
        assert!(t.loss_and_gradients(&w, &[0.0; 3], &[0]).is_err());
        assert!(t.loss_and_gradients(&w, &[0.0; 4], &[3]).is_err());
        assert!(t.loss_and_gradients(&w, &[0.0; 4], &[2]).is_ok());
    }
}
