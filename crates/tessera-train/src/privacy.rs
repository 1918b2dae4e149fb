//! Differential privacy of federated rounds: each client's update (its
//! parameters minus the round's global ones) is clipped to an L2 norm `C`
//! and Gaussian noise is added; an accountant tracks the privacy spent.
//!
//! - **Central DP through SecAgg (distributed noise)**: each of the `n`
//!   clients adds N(0, (σC)²/n) to its clipped update, so the *sum* the
//!   aggregator learns carries N(0, (σC)²) — the central mechanism with
//!   noise multiplier σ — while no client's update is seen alone. If
//!   clients drop out, the sum carries less noise than planned; the
//!   accountant charges the planned σ, so a round where more than a few
//!   drop should be scaled up by the task (the dropout share is reported).
//! - **Local DP**: each client adds N(0, (σC)²) itself; nobody needs to be
//!   trusted, at a far larger accuracy cost.
//!
//! The accountant is Rényi DP of the Poisson-subsampled Gaussian mechanism
//! (Mironov, Talwar and Zhang 2019), composed over rounds, converted to
//! (ε, δ) by Proposition 12 of Canonne, Kamath and Steinke 2020: the
//! computation Google's `dp-accounting` package does in its
//! `RdpAccountant`, over the same default orders (a test checks the two
//! agree within 1%). A client-level guarantee: q is the share of clients
//! sampled each round.

use crate::rng::Rng;

/// Where the noise is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseAt {
    /// Each of the round's `m` clients adds N(0, (σC)²/m): the sum carries
    /// the central mechanism's noise (meant with SecAgg).
    Distributed,
    /// Each client adds N(0, (σC)²) to its own update.
    Local,
}

/// A task's differential-privacy settings.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpSettings {
    /// L2 norm each client's update is clipped to (C).
    pub clip: f64,
    /// Noise standard deviation ÷ C (σ).
    pub noise_multiplier: f64,
    /// Where the noise is added.
    pub noise_at: NoiseAt,
    /// δ the reported ε is at.
    pub delta: f64,
    /// Stop before a round that would take ε past this.
    pub budget: Option<f64>,
}

impl DpSettings {
    /// The noise one of `clients` clients adds to its clipped update.
    pub fn client_std(&self, clients: usize) -> f64 {
        let central = self.noise_multiplier * self.clip;
        match self.noise_at {
            NoiseAt::Distributed => central / (clients.max(1) as f64).sqrt(),
            NoiseAt::Local => central,
        }
    }
}

/// Scale `update` down to L2 norm `max_norm` if it is longer; returns its
/// norm before.
pub fn clip(update: &mut [f32], max_norm: f64) -> f64 {
    let norm = update
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt();
    if norm > max_norm && norm > 0.0 {
        let scale = (max_norm / norm) as f32;
        for v in update.iter_mut() {
            *v *= scale;
        }
    }
    norm
}

/// Add N(0, std²) to every coordinate.
pub fn add_gaussian(update: &mut [f32], std: f64, rng: &mut Rng) {
    if std <= 0.0 {
        return;
    }
    for v in update.iter_mut() {
        *v += (rng.normal() * std) as f32;
    }
}

/// The orders `dp-accounting`'s `RdpAccountant` uses by default.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// Rényi-DP accountant of subsampled Gaussian rounds.
#[derive(Clone, Debug, PartialEq)]
pub struct Accountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for Accountant {
    fn default() -> Self {
        Accountant::new(default_orders())
    }
}

impl Accountant {
    /// An accountant over these orders (each > 1), nothing spent.
    pub fn new(orders: Vec<f64>) -> Accountant {
        let rdp = vec![0.0; orders.len()];
        Accountant { orders, rdp }
    }

    /// Compose `count` rounds of the Gaussian mechanism with noise
    /// multiplier `sigma` (noise std ÷ clipping norm) on a Poisson sample of
    /// rate `q` (0–1).
    pub fn compose(&mut self, q: f64, sigma: f64, count: u32) {
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += f64::from(count) * rdp_subsampled_gaussian(q, sigma, a);
        }
    }

    /// The smallest ε over the orders at which the rounds so far are
    /// (ε, δ)-DP, and that order.
    pub fn epsilon(&self, delta: f64) -> (f64, f64) {
        epsilon(&self.orders, &self.rdp, delta)
    }

    /// ε at `delta` if `count` more rounds of (`q`, `sigma`) were run.
    pub fn epsilon_after(&self, q: f64, sigma: f64, count: u32, delta: f64) -> f64 {
        let mut next = self.clone();
        next.compose(q, sigma, count);
        next.epsilon(delta).0
    }
}

/// RDP of order `alpha` of one round of the Poisson-subsampled Gaussian.
pub fn rdp_subsampled_gaussian(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if alpha.is_infinite() || sigma <= 0.0 {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = (x.min(y), x.max(y));
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    for i in 0..=alpha {
        let i = i as f64;
        let coef = log_comb(alpha as f64, i) + i * q.ln() + (alpha as f64 - i) * log1mq;
        log_a = log_add(log_a, coef + (i * i - i) / (2.0 * sigma * sigma));
    }
    log_a
}

/// log(erfc(x)), accurate far into the tail.
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 1e-200 {
        return r.ln();
    }
    // The asymptotic series of erfc at infinity.
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x * x - 0.5 * x.powi(-2) + 0.625 * x.powi(-4)
        - 37.0 / 24.0 * x.powi(-6)
        + 353.0 / 64.0 * x.powi(-8)
}

fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let root2 = std::f64::consts::SQRT_2;
    for i in 0..1000 {
        let i = f64::from(i);
        let coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = coef + i * q.ln() + j * log1mq;
        let log_t1 = coef + j * q.ln() + i * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / (root2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (root2 * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    // Did not converge: this order is left out of the minimum.
    f64::INFINITY
}

/// The smallest ε over `orders` given their RDP, at `delta`.
fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    if delta <= 0.0 {
        return match rdp.iter().all(|&r| r == 0.0) {
            true => (0.0, 0.0),
            false => (f64::INFINITY, 0.0),
        };
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_bounds_the_norm_and_keeps_short_updates() {
        let mut v = vec![3.0f32, 4.0];
        assert_eq!(clip(&mut v, 1.0), 5.0);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut w = vec![0.3f32, 0.4];
        clip(&mut w, 1.0);
        assert_eq!(w, vec![0.3, 0.4]);
    }

    #[test]
    fn epsilon_grows_with_rounds_and_falls_with_noise() {
        let mut a = Accountant::default();
        assert_eq!(a.epsilon(1e-5).0, 0.0);
        a.compose(0.1, 1.0, 10);
        let ten = a.epsilon(1e-5).0;
        a.compose(0.1, 1.0, 10);
        assert!(a.epsilon(1e-5).0 > ten);
        assert!(Accountant::default().epsilon_after(0.1, 2.0, 10, 1e-5) < ten);
        // Without subsampling: ρ-zCDP-like growth, α/(2σ²) per round.
        assert_eq!(rdp_subsampled_gaussian(1.0, 2.0, 4.0), 0.5);
    }
}
