//! A small decoder-only transformer language model on candle's CPU backend
//! ([`LmSpec`]: token and position embeddings, pre-norm blocks of causal
//! multi-head self-attention and a GELU MLP, a final layer norm, the output
//! head tied to the token embedding). Parameters cross the seam as one flat
//! `f32` vector in [`LmSpec::shapes`] order, like the classifiers', so the
//! optimizer, compression, hashing and re-execution above it never see a
//! tensor.

use candle_core::{Device, Tensor, Var, D};

use crate::candle::engine;
pub use tessera_core::train::LmSpec;

use crate::rng::Rng;
use crate::TrainError;

/// Seeded initial parameters: weights and embeddings normal with standard
/// deviation 0.02 (the residual projections scaled by 1/√(2·layers)),
/// biases zero, norm gains one.
pub fn init(spec: &LmSpec, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(spec.parameters());
    let residual = 0.02 / (2.0 * spec.layers as f64).sqrt();
    for (name, shape) in spec.shapes() {
        let n: usize = shape.iter().product();
        if name.ends_with(".g") {
            out.extend(std::iter::repeat_n(1.0, n));
        } else if shape.len() == 1 {
            out.extend(std::iter::repeat_n(0.0, n));
        } else {
            let sd = if name.ends_with("w_o") || name.ends_with("w_proj") {
                residual
            } else {
                0.02
            };
            out.extend((0..n).map(|_| (rng.normal() * sd) as f32));
        }
    }
    out
}

/// Computes a [`LmSpec`] model's loss and gradients on candle's CPU backend,
/// inside its own rayon pool of a set size.
pub struct LmTrainer {
    spec: LmSpec,
    pool: rayon::ThreadPool,
}

fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .broadcast_mul(g)?
        .broadcast_add(b)
}

impl LmTrainer {
    /// A trainer of `spec` computing on `threads` CPU threads (at least 1).
    pub fn new(spec: LmSpec, threads: usize) -> Result<LmTrainer, TrainError> {
        spec.check().map_err(TrainError::Shape)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("lm-trainer-{i}"))
            .build()
            .map_err(|e| TrainError::Engine(format!("thread pool: {e}")))?;
        Ok(LmTrainer { spec, pool })
    }

    /// The model it trains.
    pub fn spec(&self) -> LmSpec {
        self.spec
    }

    /// Checks `tokens` holds whole windows of `context + 1` tokens in the
    /// vocabulary, and returns how many.
    fn windows(&self, parameters: &[f32], tokens: &[u32]) -> Result<usize, TrainError> {
        if parameters.len() != self.spec.parameters() {
            return Err(TrainError::Shape(format!(
                "{} parameters for a model of {}",
                parameters.len(),
                self.spec.parameters()
            )));
        }
        let w = self.spec.context + 1;
        if tokens.is_empty() || !tokens.len().is_multiple_of(w) {
            return Err(TrainError::Shape(format!(
                "{} tokens are not whole windows of {w}",
                tokens.len()
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.spec.vocab) {
            return Err(TrainError::Data(format!(
                "token {bad} out of the vocabulary"
            )));
        }
        Ok(tokens.len() / w)
    }

    /// Mean next-token cross-entropy over the windows, and the variables.
    fn forward(
        &self,
        parameters: &[f32],
        tokens: &[u32],
        batch: usize,
    ) -> candle_core::Result<(Tensor, Vec<Var>)> {
        let dev = Device::Cpu;
        let LmSpec {
            vocab,
            context: t,
            width: d,
            layers,
            heads,
        } = self.spec;
        let hd = d / heads;
        let mut vars = Vec::new();
        let mut at = 0;
        for (_, shape) in self.spec.shapes() {
            let n: usize = shape.iter().product();
            vars.push(Var::from_slice(
                &parameters[at..at + n],
                shape.as_slice(),
                &dev,
            )?);
            at += n;
        }
        let all = Tensor::from_slice(tokens, (batch, t + 1), &dev)?;
        let inputs = all.narrow(1, 0, t)?.contiguous()?.flatten_all()?;
        let targets = all.narrow(1, 1, t)?.contiguous()?.flatten_all()?;
        let tok_emb = vars[0].as_tensor();
        let pos_emb = vars[1].as_tensor();
        let mut x = tok_emb
            .index_select(&inputs, 0)?
            .reshape((batch, t, d))?
            .broadcast_add(pos_emb)?;
        // Causal mask: −∞ above the diagonal.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_slice(&mask, (t, t), &dev)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in 0..layers {
            let p = &vars[2 + 12 * l..2 + 12 * (l + 1)];
            let p = |i: usize| p[i].as_tensor();
            let h = layer_norm(&x, p(0), p(1))?.reshape((batch * t, d))?;
            let qkv = h.matmul(p(2))?.broadcast_add(p(3))?;
            let split = |i: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(1, i * d, d)?
                    .reshape((batch, t, heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let att = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let y = att
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((batch * t, d))?;
            let y = y.matmul(p(4))?.broadcast_add(p(5))?;
            x = (x + y.reshape((batch, t, d))?)?;
            let h = layer_norm(&x, p(6), p(7))?.reshape((batch * t, d))?;
            let m = h
                .matmul(p(8))?
                .broadcast_add(p(9))?
                .gelu()?
                .matmul(p(10))?
                .broadcast_add(p(11))?;
            x = (x + m.reshape((batch, t, d))?)?;
        }
        let n = vars.len();
        let h = layer_norm(&x, vars[n - 2].as_tensor(), vars[n - 1].as_tensor())?
            .reshape((batch * t, d))?;
        let logits = h.matmul(&tok_emb.t()?)?;
        debug_assert_eq!(logits.dims(), &[batch * t, vocab]);
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        Ok((loss, vars))
    }

    /// Mean next-token loss (nats) of the windows in `tokens` (each
    /// `context + 1` tokens long) and its gradient with respect to every
    /// parameter, flat.
    pub fn loss_and_gradients(
        &self,
        parameters: &[f32],
        tokens: &[u32],
    ) -> Result<(f32, Vec<f32>), TrainError> {
        let batch = self.windows(parameters, tokens)?;
        self.pool.install(|| {
            let (loss, vars) = self.forward(parameters, tokens, batch).map_err(engine)?;
            crate::candle::loss_and_flat_gradients(&loss, &vars, parameters.len())
        })
    }

    /// Mean next-token loss (nats) of the windows, without gradients.
    pub fn loss(&self, parameters: &[f32], tokens: &[u32]) -> Result<f32, TrainError> {
        let batch = self.windows(parameters, tokens)?;
        self.pool.install(|| {
            let (loss, _) = self.forward(parameters, tokens, batch).map_err(engine)?;
            loss.to_scalar::<f32>().map_err(engine)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LmSpec {
        LmSpec {
            vocab: 16,
            context: 8,
            width: 16,
            layers: 2,
            heads: 2,
        }
    }

    /// The transformer's gradients match central finite differences of its
    /// loss (attention, norms, the tied head and the embeddings included).
    #[test]
    fn gradients_match_finite_differences() {
        let spec = tiny();
        let t = LmTrainer::new(spec, 1).unwrap();
        let w = init(&spec, 3);
        let mut rng = Rng::new(9);
        let tokens: Vec<u32> = (0..3 * 9).map(|_| rng.below(16) as u32).collect();
        let (loss, g) = t.loss_and_gradients(&w, &tokens).unwrap();
        assert!((loss - t.loss(&w, &tokens).unwrap()).abs() < 1e-6);
        // Near ln(16) at initialization.
        assert!((f64::from(loss) - 16f64.ln()).abs() < 0.2, "{loss}");
        let h = 1e-2f32;
        let mut checked = 0;
        for i in (0..w.len()).step_by(29) {
            let at = |dv: f32| {
                let mut v = w.clone();
                v[i] += dv;
                f64::from(t.loss(&v, &tokens).unwrap())
            };
            let numeric = (at(h) - at(-h)) / (2.0 * f64::from(h));
            assert!(
                (numeric - f64::from(g[i])).abs() < 2e-3 + 0.05 * numeric.abs(),
                "parameter {i}: {numeric} vs {}",
                g[i]
            );
            checked += 1;
        }
        assert!(checked > 100);
    }

    #[test]
    fn bad_windows_and_tokens_are_refused() {
        let spec = tiny();
        let t = LmTrainer::new(spec, 1).unwrap();
        let w = init(&spec, 1);
        assert!(t.loss(&w, &[1; 8]).is_err());
        assert!(t.loss(&w, &[16; 9]).is_err());
        assert!(t.loss(&w[1..], &[1; 9]).is_err());
        assert!(t.loss(&w, &[1; 9]).is_ok());
    }
}
