//! How the global model moves from the clients' updates each round.
//!
//! An *aggregation rule* combines the clients' parameter vectors into one
//! (the sample-weighted mean, or a robust rule that a few malicious clients
//! cannot drag far: coordinate-wise median, trimmed mean, Krum). A
//! *strategy* then turns the difference between that and the global
//! parameters into the next global parameters: FedAvg (and FedProx, which
//! differs only in the clients' proximal term) takes it whole; FedAvgM adds
//! server momentum; FedAdam applies Adam on the server (Reddi et al. 2021,
//! "Adaptive Federated Optimization").

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Combine the clients' parameter vectors.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean weighted by each client's sample count (FedAvg's rule).
    WeightedMean,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise mean of what is left after dropping the `trim`
    /// share (0–0.5) of the lowest and of the highest values.
    TrimmedMean {
        /// Share cut at each end.
        trim: f64,
    },
    /// Krum (Blanchard et al. 2017): the update whose `n − f − 2` nearest
    /// others are closest, for up to `byzantine` (f) malicious clients.
    Krum {
        /// Malicious clients tolerated.
        byzantine: usize,
    },
}

/// One client's contribution to a round.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientUpdate {
    /// Its parameters after local training.
    pub parameters: Vec<f32>,
    /// Samples it trained on.
    pub samples: usize,
}

impl Aggregation {
    /// The combined parameters; an error when there is no update, their
    /// lengths differ, or a rule has too few updates to be robust.
    pub fn combine(&self, updates: &[ClientUpdate]) -> Result<Vec<f32>, TrainError> {
        let first = updates
            .first()
            .ok_or_else(|| TrainError::Aggregate("no update to aggregate".into()))?;
        let len = first.parameters.len();
        if updates.iter().any(|u| u.parameters.len() != len) {
            return Err(TrainError::Aggregate("updates of different lengths".into()));
        }
        if updates
            .iter()
            .any(|u| u.parameters.iter().any(|v| !v.is_finite()))
        {
            return Err(TrainError::Aggregate(
                "an update holds a non-finite value".into(),
            ));
        }
        let n = updates.len();
        match *self {
            Aggregation::WeightedMean => {
                let total: f64 = updates.iter().map(|u| u.samples as f64).sum();
                let weights: Vec<f64> = if total > 0.0 {
                    updates.iter().map(|u| u.samples as f64 / total).collect()
                } else {
                    vec![1.0 / n as f64; n]
                };
                let mut out = vec![0f64; len];
                for (u, w) in updates.iter().zip(&weights) {
                    for (o, v) in out.iter_mut().zip(&u.parameters) {
                        *o += w * f64::from(*v);
                    }
                }
                Ok(out.into_iter().map(|v| v as f32).collect())
            }
            Aggregation::Median | Aggregation::TrimmedMean { .. } => {
                let cut = match *self {
                    Aggregation::TrimmedMean { trim } => {
                        let k = (trim.clamp(0.0, 0.5) * n as f64).floor() as usize;
                        k.min((n - 1) / 2)
                    }
                    _ => 0,
                };
                let mut column = vec![0f32; n];
                let mut out = Vec::with_capacity(len);
                for i in 0..len {
                    for (c, u) in column.iter_mut().zip(updates) {
                        *c = u.parameters[i];
                    }
                    column.sort_unstable_by(f32::total_cmp);
                    out.push(match *self {
                        Aggregation::Median => {
                            if n % 2 == 1 {
                                column[n / 2]
                            } else {
                                (column[n / 2 - 1] + column[n / 2]) / 2.0
                            }
                        }
                        _ => {
                            let kept = &column[cut..n - cut];
                            kept.iter().map(|&v| f64::from(v)).sum::<f64>() as f32
                                / kept.len() as f32
                        }
                    });
                }
                Ok(out)
            }
            Aggregation::Krum { byzantine } => {
                if n < 2 * byzantine + 3 {
                    return Err(TrainError::Aggregate(format!(
                        "Krum tolerating {byzantine} malicious clients needs at least {} updates, got {n}",
                        2 * byzantine + 3
                    )));
                }
                let neighbours = n - byzantine - 2;
                let dist = |a: &[f32], b: &[f32]| -> f64 {
                    a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
                };
                let mut best = (f64::INFINITY, 0);
                for (i, u) in updates.iter().enumerate() {
                    let mut d: Vec<f64> = updates
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, v)| dist(&u.parameters, &v.parameters))
                        .collect();
                    d.sort_unstable_by(f64::total_cmp);
                    let score: f64 = d.iter().take(neighbours).sum();
                    if score < best.0 {
                        best = (score, i);
                    }
                }
                Ok(updates[best.1].parameters.clone())
            }
        }
    }
}

/// The updates that stand out (indices into `updates`): those whose
/// distance to the coordinate-wise median is more than `factor` times the
/// median of those distances. The robust rules neutralise such updates;
/// this names them, so the task can strike their senders and not pay them.
pub fn outliers(updates: &[ClientUpdate], factor: f64) -> Vec<usize> {
    if updates.len() < 3 {
        return Vec::new();
    }
    let Ok(median) = Aggregation::Median.combine(updates) else {
        return Vec::new();
    };
    let dist: Vec<f64> = updates
        .iter()
        .map(|u| {
            u.parameters
                .iter()
                .zip(&median)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mut sorted = dist.clone();
    sorted.sort_unstable_by(f64::total_cmp);
    let typical = sorted[sorted.len() / 2].max(f64::MIN_POSITIVE);
    dist.iter()
        .enumerate()
        .filter(|(_, d)| **d > factor * typical)
        .map(|(i, _)| i)
        .collect()
}

/// The server side of a federated strategy.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum Strategy {
    /// The aggregate becomes the global model.
    FedAvg,
    /// FedAvg on the server; clients add the proximal term μ (Li et al.
    /// 2020), which keeps non-IID clients from drifting apart.
    FedProx {
        /// The clients' proximal term μ.
        mu: f32,
    },
    /// Server momentum on the aggregate's step (Hsu et al. 2019).
    FedAvgM {
        /// Server learning rate.
        server_lr: f32,
        /// Momentum β.
        momentum: f32,
    },
    /// Adam on the server with the aggregate's step as the gradient.
    FedAdam {
        /// Server learning rate η.
        server_lr: f32,
        /// First-moment decay β₁.
        beta1: f32,
        /// Second-moment decay β₂.
        beta2: f32,
        /// Adaptivity τ (added to √v).
        tau: f32,
    },
}

impl Strategy {
    /// The proximal term clients train with.
    pub fn proximal(&self) -> f32 {
        match *self {
            Strategy::FedProx { mu } => mu,
            _ => 0.0,
        }
    }
}

/// The global model and the strategy's state between rounds.
#[derive(Clone, Debug)]
pub struct Server {
    strategy: Strategy,
    parameters: Vec<f32>,
    /// FedAvgM's velocity, FedAdam's first moment.
    first: Vec<f32>,
    /// FedAdam's second moment.
    second: Vec<f32>,
}

impl Server {
    /// A server starting from `initial` parameters.
    pub fn new(strategy: Strategy, initial: Vec<f32>) -> Server {
        let n = initial.len();
        Server {
            strategy,
            parameters: initial,
            first: vec![0.0; n],
            second: vec![0.0; n],
        }
    }

    /// The global parameters now.
    pub fn parameters(&self) -> &[f32] {
        &self.parameters
    }

    /// Apply one round: combine `updates` by `rule`, then take the
    /// strategy's step.
    pub fn apply(&mut self, updates: &[ClientUpdate], rule: Aggregation) -> Result<(), TrainError> {
        let combined = rule.combine(updates)?;
        if combined.len() != self.parameters.len() {
            return Err(TrainError::Aggregate(format!(
                "updates of {} parameters for a model of {}",
                combined.len(),
                self.parameters.len()
            )));
        }
        // Δ: where the clients went, from the global model.
        let delta: Vec<f32> = combined
            .iter()
            .zip(&self.parameters)
            .map(|(c, g)| c - g)
            .collect();
        match self.strategy {
            Strategy::FedAvg | Strategy::FedProx { .. } => self.parameters = combined,
            Strategy::FedAvgM {
                server_lr,
                momentum,
            } => {
                for ((p, v), d) in self.parameters.iter_mut().zip(&mut self.first).zip(&delta) {
                    *v = momentum * *v + d;
                    *p += server_lr * *v;
                }
            }
            Strategy::FedAdam {
                server_lr,
                beta1,
                beta2,
                tau,
            } => {
                for (((p, m), v), d) in self
                    .parameters
                    .iter_mut()
                    .zip(&mut self.first)
                    .zip(&mut self.second)
                    .zip(&delta)
                {
                    *m = beta1 * *m + (1.0 - beta1) * d;
                    *v = beta2 * *v + (1.0 - beta2) * d * d;
                    *p += server_lr * *m / (v.sqrt() + tau);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(p: &[f32], samples: usize) -> ClientUpdate {
        ClientUpdate {
            parameters: p.to_vec(),
            samples,
        }
    }

    #[test]
    fn rules_combine_as_defined() {
        let ups = [
            u(&[1.0, 10.0], 1),
            u(&[2.0, 20.0], 1),
            u(&[3.0, 30.0], 2),
            u(&[100.0, -100.0], 0),
        ];
        assert_eq!(
            Aggregation::WeightedMean.combine(&ups[..3]).unwrap(),
            vec![2.25, 22.5]
        );
        assert_eq!(Aggregation::Median.combine(&ups).unwrap(), vec![2.5, 15.0]);
        assert_eq!(
            Aggregation::TrimmedMean { trim: 0.25 }
                .combine(&ups)
                .unwrap(),
            vec![2.5, 15.0]
        );
        let five = [
            u(&[1.0], 1),
            u(&[1.1], 1),
            u(&[0.9], 1),
            u(&[1.05], 1),
            u(&[50.0], 1),
        ];
        // 1.05's two nearest others (1.0 and 1.1) are the closest pair.
        assert_eq!(
            Aggregation::Krum { byzantine: 1 }.combine(&five).unwrap(),
            vec![1.05]
        );
        assert!(Aggregation::Krum { byzantine: 2 }.combine(&five).is_err());
        assert!(Aggregation::Median.combine(&[]).is_err());
        assert!(Aggregation::Median
            .combine(&[u(&[1.0], 1), u(&[1.0, 2.0], 1)])
            .is_err());
        assert!(Aggregation::WeightedMean
            .combine(&[u(&[f32::NAN], 1)])
            .is_err());
    }

    #[test]
    fn server_steps_follow_each_strategy() {
        let ups = [u(&[1.0], 1)];
        let mut avg = Server::new(Strategy::FedAvg, vec![0.0]);
        avg.apply(&ups, Aggregation::WeightedMean).unwrap();
        assert_eq!(avg.parameters(), &[1.0]);
        let mut m = Server::new(
            Strategy::FedAvgM {
                server_lr: 1.0,
                momentum: 0.5,
            },
            vec![0.0],
        );
        m.apply(&ups, Aggregation::WeightedMean).unwrap(); // v = 1, p = 1
        m.apply(&ups, Aggregation::WeightedMean).unwrap(); // Δ = 0, v = 0.5
        assert_eq!(m.parameters(), &[1.5]);
        let mut adam = Server::new(
            Strategy::FedAdam {
                server_lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
            vec![0.0],
        );
        adam.apply(&ups, Aggregation::WeightedMean).unwrap();
        // m = 0.1, v = 0.01: 0.1 · 0.1 / (0.1 + 0.001)
        assert!((adam.parameters()[0] - 0.1 * 0.1 / 0.101).abs() < 1e-6);
    }
}
