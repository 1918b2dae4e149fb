//! DiLoCo: training one language model across workers that synchronize
//! rarely. Each outer step every worker starts from the global checkpoint,
//! takes its assigned number of inner AdamW steps on its shard
//! ([`run_inner`]) and sends its pseudo-gradient (checkpoint − its final
//! parameters), int8-quantized ([`Int8`]); the coordinator averages them
//! weighted by tokens and takes an outer Nesterov-momentum step
//! ([`Outer`]), publishing the change of the global parameters int8
//! quantized too (with error feedback, so the published model tracks the
//! exact trajectory).
//!
//! **Verification.** Before revealing its pseudo-gradient, a worker
//! commits to it, to its loss at every step and to a Merkle root over its
//! state (parameters and both moments) every `checkpoint_every` steps
//! ([`Commitment`], [`merkle_root`]). An auditor re-executes sampled
//! (worker, outer step) pairs from the same checkpoint, shard and seed
//! ([`audit`]); when the result does not match, [`bisect`] opens
//! O(log(H / k)) of the committed states (each checked against the root)
//! to find the first boundary where the worker's trace leaves the honest
//! one, and re-executes that one segment to prove the worker's state does
//! not follow from its own previous one.
//!
//! The inner optimizer's moments restart at zero every outer step (with
//! bias correction), so a (worker, outer step) pair depends only on public
//! inputs: checkpoint, shard, seed, step count and schedule.

use serde::{Deserialize, Serialize};
pub use tessera_core::train::{InnerOptimizer, InnerWork};

use crate::corpus::{self, Corpus};
use crate::lm::{self, LmSpec, LmTrainer};
use crate::rng::Rng;
use crate::TrainError;

/// A worker's full optimizer state.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// Parameters.
    pub params: Vec<f32>,
    /// AdamW's first moment.
    pub m: Vec<f32>,
    /// AdamW's second moment.
    pub v: Vec<f32>,
}

impl State {
    /// The state at the start of an outer step.
    pub fn start(global: &[f32]) -> State {
        State {
            params: global.to_vec(),
            m: vec![0.0; global.len()],
            v: vec![0.0; global.len()],
        }
    }

    /// The state as bytes (parameters, then the moments, f32 little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 * self.params.len());
        for part in [&self.params, &self.m, &self.v] {
            out.extend(part.iter().flat_map(|x| x.to_le_bytes()));
        }
        out
    }

    /// The state [`State::to_bytes`] wrote, for a model of `n` parameters.
    pub fn from_bytes(bytes: &[u8], n: usize) -> Option<State> {
        if bytes.len() != 12 * n {
            return None;
        }
        let f = |part: usize| -> Vec<f32> {
            bytes[part * 4 * n..(part + 1) * 4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        Some(State {
            params: f(0),
            m: f(1),
            v: f(2),
        })
    }
}

/// BLAKE3 of a parameter vector: a checkpoint's content address.
pub fn checkpoint_hash(params: &[f32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in params {
        h.update(&p.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// A Merkle leaf: the state after `step` inner steps and the losses of the
/// steps since the previous leaf.
pub fn leaf(step: u32, state: &State, losses: &[f32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("tessera diloco v1 state leaf");
    h.update(&step.to_le_bytes());
    h.update(&state.to_bytes());
    for l in losses {
        h.update(&l.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

fn node(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("tessera diloco v1 merkle node");
    h.update(a);
    h.update(b);
    *h.finalize().as_bytes()
}

/// The Merkle root over `leaves` (an odd node is carried up unchanged).
pub fn merkle_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    if leaves.is_empty() {
        return [0; 32];
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| {
                if p.len() == 2 {
                    node(&p[0], &p[1])
                } else {
                    p[0]
                }
            })
            .collect();
    }
    level[0]
}

/// The sibling hashes proving leaf `index` under [`merkle_root`].
pub fn merkle_proof(leaves: &[[u8; 32]], mut index: usize) -> Vec<[u8; 32]> {
    let mut proof = Vec::new();
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        let sib = index ^ 1;
        if sib < level.len() {
            proof.push(level[sib]);
        }
        level = level
            .chunks(2)
            .map(|p| {
                if p.len() == 2 {
                    node(&p[0], &p[1])
                } else {
                    p[0]
                }
            })
            .collect();
        index /= 2;
    }
    proof
}

/// Whether `leaf` is leaf `index` of `count` under `root`.
pub fn merkle_verify(
    root: &[u8; 32],
    count: usize,
    mut index: usize,
    leaf: [u8; 32],
    proof: &[[u8; 32]],
) -> bool {
    if index >= count {
        return false;
    }
    let (mut hash, mut width, mut used) = (leaf, count, 0);
    while width > 1 {
        let sib = index ^ 1;
        if sib < width {
            let Some(p) = proof.get(used) else {
                return false;
            };
            used += 1;
            hash = if index.is_multiple_of(2) {
                node(&hash, p)
            } else {
                node(p, &hash)
            };
        }
        index /= 2;
        width = width.div_ceil(2);
    }
    used == proof.len() && &hash == root
}

/// What a worker's outer step produced.
#[derive(Clone, Debug)]
pub struct InnerRun {
    /// Its final parameters.
    pub params: Vec<f32>,
    /// The loss of every inner step.
    pub losses: Vec<f32>,
    /// Its state at every boundary (step 0, every `checkpoint_every`, the
    /// last), kept to open on an audit.
    pub states: Vec<(u32, State)>,
    /// Merkle leaves of those states.
    pub leaves: Vec<[u8; 32]>,
    /// Tokens trained on.
    pub tokens: u64,
}

impl InnerRun {
    /// The Merkle root of its states.
    pub fn root(&self) -> [u8; 32] {
        merkle_root(&self.leaves)
    }
}

/// The boundaries at which states are committed: 0, every `k`, `steps`.
pub fn boundaries(steps: u32, k: u32) -> Vec<u32> {
    let k = k.max(1);
    let mut b: Vec<u32> = (0..steps).step_by(k as usize).collect();
    b.push(steps);
    b
}

/// Step `step`'s own random source: the `step`-th output of a source
/// seeded with `seed`, as a new seed. (Seeding with `seed ^ step × γ`
/// would not do: SplitMix64 walks its state by γ, so step `i + 1`'s draws
/// would be step `i`'s shifted by one, and consecutive batches would share
/// all but one window.)
fn step_rng(seed: u64, step: u32) -> Rng {
    let mut r = Rng::new(seed.wrapping_add(u64::from(step).wrapping_mul(0xD1B5_4A32_D192_ED03)));
    Rng::new(r.next_u64())
}

/// Take inner steps `from..to` of `work` from `state` (after `from` steps),
/// returning each step's loss. Step `i` draws its batch from its own seed,
/// so any segment can be re-executed alone.
pub fn run_segment(
    trainer: &LmTrainer,
    text: &[u8],
    work: &InnerWork,
    state: &mut State,
    from: u32,
    to: u32,
) -> Result<Vec<f32>, TrainError> {
    run_segment_paced(trainer, text, work, state, from, to, &mut |_| {})
}

/// [`run_segment`], calling `pace` with each step's duration after it
/// (benchmarks stretch steps to stand for a slower machine).
pub fn run_segment_paced(
    trainer: &LmTrainer,
    text: &[u8],
    work: &InnerWork,
    state: &mut State,
    from: u32,
    to: u32,
    pace: &mut dyn FnMut(std::time::Duration),
) -> Result<Vec<f32>, TrainError> {
    let spec = trainer.spec();
    let o = &work.optimizer;
    let decay = decay_mask(&spec);
    let shard = work.shard.0 as usize..work.shard.1 as usize;
    let mut losses = Vec::with_capacity((to - from) as usize);
    for i in from..to {
        let began = std::time::Instant::now();
        let mut rng = step_rng(work.seed, i);
        let tokens = corpus::windows(text, shard.clone(), work.batch, spec.context, &mut rng)?;
        let (loss, g) = trainer.loss_and_gradients(&state.params, &tokens)?;
        if !loss.is_finite() {
            return Err(TrainError::Diverged(i as usize));
        }
        let lr = o.lr_at(work.first_step + u64::from(i));
        let t = (i + 1) as i32;
        let (c1, c2) = (1.0 - o.beta1.powi(t), 1.0 - o.beta2.powi(t));
        for j in 0..g.len() {
            let m = o.beta1 * state.m[j] + (1.0 - o.beta1) * g[j];
            let v = o.beta2 * state.v[j] + (1.0 - o.beta2) * g[j] * g[j];
            state.m[j] = m;
            state.v[j] = v;
            let update = (m / c1) / ((v / c2).sqrt() + o.eps);
            let wd = if decay[j] {
                o.weight_decay * state.params[j]
            } else {
                0.0
            };
            state.params[j] -= lr * (update + wd);
        }
        losses.push(loss);
        pace(began.elapsed());
    }
    Ok(losses)
}

/// Which parameters weight decay applies to (matrices and embeddings).
fn decay_mask(spec: &LmSpec) -> Vec<bool> {
    let mut out = Vec::with_capacity(spec.parameters());
    for (_, shape) in spec.shapes() {
        let n: usize = shape.iter().product();
        out.extend(std::iter::repeat_n(shape.len() > 1, n));
    }
    out
}

/// A worker's outer step: `work.steps` inner steps from `global`, with its
/// states at every boundary.
pub fn run_inner(
    trainer: &LmTrainer,
    text: &[u8],
    work: &InnerWork,
    global: &[f32],
) -> Result<InnerRun, TrainError> {
    run_inner_paced(trainer, text, work, global, &mut |_| {})
}

/// [`run_inner`] with a `pace` called after every step.
pub fn run_inner_paced(
    trainer: &LmTrainer,
    text: &[u8],
    work: &InnerWork,
    global: &[f32],
    pace: &mut dyn FnMut(std::time::Duration),
) -> Result<InnerRun, TrainError> {
    let bounds = boundaries(work.steps, work.checkpoint_every);
    let mut state = State::start(global);
    let mut losses = Vec::new();
    let mut states = vec![(0, state.clone())];
    let mut leaves = vec![leaf(0, &state, &[])];
    for pair in bounds.windows(2) {
        let seg = run_segment_paced(trainer, text, work, &mut state, pair[0], pair[1], pace)?;
        leaves.push(leaf(pair[1], &state, &seg));
        losses.extend(seg);
        states.push((pair[1], state.clone()));
    }
    Ok(InnerRun {
        params: state.params,
        losses,
        states,
        leaves,
        tokens: u64::from(work.steps) * (work.batch * work.spec.context) as u64,
    })
}

/// A pseudo-gradient: checkpoint − final parameters.
pub fn pseudo_gradient(global: &[f32], params: &[f32]) -> Vec<f32> {
    global.iter().zip(params).map(|(g, p)| g - p).collect()
}

/// Values quantized to 8 bits per chunk: each chunk keeps its minimum and
/// maximum, and each value the nearest of 256 levels between them.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8 {
    /// Values per chunk.
    pub chunk: usize,
    /// Each chunk's (min, max).
    pub ranges: Vec<(f32, f32)>,
    /// One level per value.
    pub levels: Vec<u8>,
}

/// Values per quantization chunk.
pub const CHUNK: usize = 1024;

impl Int8 {
    /// Quantize `values` (non-finite values are refused).
    pub fn quantize(values: &[f32], chunk: usize) -> Result<Int8, TrainError> {
        if values.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Data("a value to quantize is not finite".into()));
        }
        let chunk = chunk.max(1);
        let mut ranges = Vec::with_capacity(values.len().div_ceil(chunk));
        let mut levels = Vec::with_capacity(values.len());
        for c in values.chunks(chunk) {
            let lo = c.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = c.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            ranges.push((lo, hi));
            let span = hi - lo;
            levels.extend(c.iter().map(|&v| {
                if span > 0.0 {
                    (((v - lo) / span) * 255.0).round().clamp(0.0, 255.0) as u8
                } else {
                    0
                }
            }));
        }
        Ok(Int8 {
            chunk,
            ranges,
            levels,
        })
    }

    /// The values the levels stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.levels.len());
        for (c, &(lo, hi)) in self.levels.chunks(self.chunk).zip(&self.ranges) {
            let step = (hi - lo) / 255.0;
            out.extend(c.iter().map(|&q| lo + f32::from(q) * step));
        }
        out
    }

    /// On the wire: values (u32), chunk (u32), each chunk's min and max
    /// (f32), the levels. About one byte a value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8 * self.ranges.len() + self.levels.len());
        out.extend((self.levels.len() as u32).to_le_bytes());
        out.extend((self.chunk as u32).to_le_bytes());
        for (lo, hi) in &self.ranges {
            out.extend(lo.to_le_bytes());
            out.extend(hi.to_le_bytes());
        }
        out.extend(&self.levels);
        out
    }

    /// What [`Int8::to_bytes`] wrote, if `bytes` is that for `values`
    /// values with finite ranges.
    pub fn from_bytes(bytes: &[u8], values: usize) -> Result<Int8, TrainError> {
        let bad = |why: &str| TrainError::Data(format!("not an int8 vector: {why}"));
        if bytes.len() < 8 {
            return Err(bad("too short"));
        }
        let n = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        let chunk = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        if n != values {
            return Err(bad(&format!("{n} values for a model of {values}")));
        }
        if chunk == 0 {
            return Err(bad("chunk of 0"));
        }
        let chunks = n.div_ceil(chunk);
        if bytes.len() != 8 + 8 * chunks + n {
            return Err(bad("length"));
        }
        let f = |at: usize| {
            f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let ranges: Vec<(f32, f32)> = (0..chunks).map(|i| (f(8 + 8 * i), f(12 + 8 * i))).collect();
        if ranges
            .iter()
            .any(|(lo, hi)| !(lo.is_finite() && hi.is_finite() && lo <= hi))
        {
            return Err(bad("a chunk's range is not finite"));
        }
        Ok(Int8 {
            chunk,
            ranges,
            levels: bytes[8 + 8 * chunks..].to_vec(),
        })
    }
}

/// A worker's commitment to its outer step: the quantized pseudo-gradient
/// it will reveal, its tokens, its loss trace and the Merkle root of its
/// states, under a nonce it reveals with them.
pub fn commitment(
    outer_step: u32,
    nonce: &[u8; 32],
    pseudo_gradient: &[u8],
    tokens: u64,
    losses: &[f32],
    root: &[u8; 32],
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("tessera diloco v1 commitment");
    h.update(&outer_step.to_le_bytes());
    h.update(nonce);
    h.update(&tokens.to_le_bytes());
    h.update(&(losses.len() as u64).to_le_bytes());
    for l in losses {
        h.update(&l.to_le_bytes());
    }
    h.update(root);
    h.update(pseudo_gradient);
    *h.finalize().as_bytes()
}

/// The coordinator's outer optimizer: Nesterov momentum on the averaged
/// pseudo-gradients, over the exact parameters; the published parameters
/// follow them through int8-quantized changes.
#[derive(Clone, Debug, PartialEq)]
pub struct Outer {
    /// The parameters workers start from (what was published).
    pub published: Vec<f32>,
    /// The exact outer trajectory.
    pub exact: Vec<f32>,
    /// Nesterov's momentum buffer.
    pub momentum: Vec<f32>,
    /// Outer learning rate.
    pub lr: f32,
    /// Momentum.
    pub mu: f32,
}

impl Outer {
    /// The outer optimizer from the initial parameters.
    pub fn new(initial: Vec<f32>, lr: f32, mu: f32) -> Outer {
        Outer {
            momentum: vec![0.0; initial.len()],
            exact: initial.clone(),
            published: initial,
            lr,
            mu,
        }
    }

    /// One outer step on the pseudo-gradients weighted by tokens; returns
    /// the quantized change of the published parameters (what workers
    /// fetch).
    pub fn step(&mut self, updates: &[(Vec<f32>, u64)]) -> Result<Int8, TrainError> {
        let total: u64 = updates.iter().map(|(_, t)| t).sum();
        if total == 0 {
            return Err(TrainError::Aggregate(
                "no pseudo-gradient to average".into(),
            ));
        }
        let n = self.exact.len();
        let mut avg = vec![0f64; n];
        for (u, t) in updates {
            if u.len() != n {
                return Err(TrainError::Shape(format!("{} values for {n}", u.len())));
            }
            let w = *t as f64 / total as f64;
            for (a, x) in avg.iter_mut().zip(u) {
                *a += w * f64::from(*x);
            }
        }
        for ((a, m), x) in avg.iter().zip(&mut self.momentum).zip(&mut self.exact) {
            let g = *a as f32;
            *m = self.mu * *m + g;
            *x -= self.lr * (g + self.mu * *m);
        }
        let delta: Vec<f32> = self
            .exact
            .iter()
            .zip(&self.published)
            .map(|(e, p)| e - p)
            .collect();
        let q = Int8::quantize(&delta, CHUNK)?;
        apply(&mut self.published, &q);
        Ok(q)
    }
}

impl Outer {
    /// Its three vectors (published, exact, momentum) as little-endian f32,
    /// for the coordinator's file; the learning rate and momentum are the
    /// task's settings.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 * self.exact.len());
        for part in [&self.published, &self.exact, &self.momentum] {
            out.extend(part.iter().flat_map(|x| x.to_le_bytes()));
        }
        out
    }

    /// What [`Outer::to_bytes`] wrote for `n` parameters, if every value is
    /// finite.
    pub fn from_bytes(bytes: &[u8], n: usize, lr: f32, mu: f32) -> Result<Outer, TrainError> {
        let state = State::from_bytes(bytes, n).ok_or_else(|| {
            TrainError::Data(format!(
                "an outer state of {} bytes for {n} parameters",
                bytes.len()
            ))
        })?;
        let outer = Outer {
            published: state.params,
            exact: state.m,
            momentum: state.v,
            lr,
            mu,
        };
        if [&outer.published, &outer.exact, &outer.momentum]
            .iter()
            .any(|p| p.iter().any(|x| !x.is_finite()))
        {
            return Err(TrainError::Data(
                "an outer state with a value that is not finite".into(),
            ));
        }
        Ok(outer)
    }

    /// Take `e` back out of an averaged pseudo-gradient applied `later`
    /// outer steps ago (0: the last one). The outer step is linear in the
    /// averaged pseudo-gradients: `e`'s part of the momentum is now
    /// μ^later·e, and of the parameters −lr·e·(1 + μ·Σ_{j=0}^{later} μ^j);
    /// both are subtracted exactly. (What workers learnt from parameters
    /// that held `e` in between stays.)
    pub fn take_back(&mut self, e: &[f32], later: u32) {
        let mu = f64::from(self.mu);
        let decayed = mu.powi(later as i32) as f32;
        let sum: f64 = (0..=later).map(|j| mu.powi(j as i32)).sum();
        let factor = (f64::from(self.lr) * (1.0 + mu * sum)) as f32;
        for ((x, m), d) in self.exact.iter_mut().zip(&mut self.momentum).zip(e) {
            *m -= decayed * d;
            *x += factor * d;
        }
    }
}

/// Apply a published change to parameters (workers and the coordinator do
/// exactly the same arithmetic, so their copies stay bit-identical).
pub fn apply(params: &mut [f32], change: &Int8) {
    for (p, d) in params.iter_mut().zip(change.dequantize()) {
        *p += d;
    }
}

/// ‖a − b‖ ÷ ‖b‖ (infinite when the lengths differ or a value is not
/// finite).
pub fn relative_distance(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let n = b
        .iter()
        .map(|y| f64::from(*y).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    if d.is_finite() {
        d / n
    } else {
        f64::INFINITY
    }
}

/// How far an honest re-execution's pseudo-gradient may be from the
/// claimed one (relative L2, after both are int8-quantized). On one build
/// re-execution is bit for bit the worker's run: measured distance 0 at 1,
/// 2 and 4 threads (BENCHMARKS.md, "DiLoCo"), and the mildest cheat the
/// tests try is 10 times further. Across builds it is **not** calibrated,
/// and a whole-step comparison cannot be: training is chaotic, and one ulp
/// of difference on a seventh of the parameters grows to a distance of
/// 0.006 after 100 inner steps and 0.25 after 400. So a mismatch is not
/// yet a verdict: [`bisect`] and then [`check_segments`] re-execute the
/// worker's committed segments from its own opened states, short enough
/// that drift stays far below what any cheat changes.
pub const AUDIT_TOLERANCE: f64 = 0.02;

/// An audit's verdict on one (worker, outer step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    /// Relative distance of the claimed pseudo-gradient from the
    /// re-executed one.
    pub distance: f64,
    /// Whether it is within [`AUDIT_TOLERANCE`] and the committed root and
    /// losses match the re-execution's within tolerance.
    pub passed: bool,
    /// Inner steps re-executed.
    pub steps: u64,
}

/// Re-execute a worker's outer step from the same checkpoint, shard and
/// seed, and compare the claimed (dequantized) pseudo-gradient and loss
/// trace with the honest ones. Returns the report and the honest run.
pub fn audit(
    trainer: &LmTrainer,
    text: &[u8],
    work: &InnerWork,
    global: &[f32],
    claimed: &[f32],
    claimed_losses: &[f32],
) -> Result<(AuditReport, InnerRun), TrainError> {
    let honest = run_inner(trainer, text, work, global)?;
    let expected = Int8::quantize(&pseudo_gradient(global, &honest.params), CHUNK)?.dequantize();
    let distance = relative_distance(claimed, &expected);
    let losses_match = claimed_losses.len() == honest.losses.len()
        && claimed_losses
            .iter()
            .zip(&honest.losses)
            .all(|(a, b)| (a - b).abs() <= 1e-3 * b.abs().max(1.0));
    Ok((
        AuditReport {
            distance,
            passed: distance <= AUDIT_TOLERANCE && losses_match,
            steps: u64::from(work.steps),
        },
        honest,
    ))
}

/// A state a worker opened during a bisection, with its Merkle proof.
#[derive(Clone, Debug)]
pub struct Opened {
    /// The state.
    pub state: State,
    /// Losses of the steps since the previous boundary.
    pub losses: Vec<f32>,
    /// The sibling hashes.
    pub proof: Vec<[u8; 32]>,
}

/// Where a bisection found the first divergent inner steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// The first divergent segment: inner steps `from..to`.
    pub from: u32,
    /// See `from`.
    pub to: u32,
    /// Segments re-executed to prove it (one; none when a state fails to
    /// open or the trace matches and the pseudo-gradient does not).
    pub segments_reexecuted: u32,
    /// States opened.
    pub states_opened: u32,
    /// Why it is the worker's fault (a state that does not open the root,
    /// or a segment whose end does not follow from its start).
    pub reason: String,
    /// Whether that proves a fault. Not when the worker's segment follows
    /// from its own state and only differs from the auditor's trace (a
    /// worker on another build drifts: training is chaotic), or only its
    /// loss trace differs: then [`check_segments`] decides.
    pub proven: bool,
}

/// How far a worker's opened state may be from the auditor's at the same
/// boundary (relative L2 of the parameters) and still count as the same.
pub const STATE_TOLERANCE: f64 = 1e-3;

/// Find where a worker's committed trace first leaves the honest one
/// (Gensyn Verde's bisection). `honest` is the auditor's re-execution (its
/// states at the same boundaries); states are opened through `open(leaf
/// index)` (`None`: the worker did not answer), each checked against the
/// committed `root`. A binary search over the boundaries finds `j` where
/// the worker's state still matches the honest one and `j + 1` where it no
/// longer does, opening O(log(H / k)) states; then the one segment `j → j +
/// 1` is re-executed from the worker's own state `j`, which proves the
/// worker's state `j + 1` does not follow from it: one segment of compute
/// settles the dispute, which a third party can check. When every opened
/// state matches, the fault is the pseudo-gradient itself (not the change
/// its committed final state makes).
#[allow(clippy::too_many_arguments)]
pub fn bisect(
    trainer: &LmTrainer,
    text: &[u8],
    work: &InnerWork,
    global: &[f32],
    root: &[u8; 32],
    claimed: &[f32],
    honest: &InnerRun,
    open: &mut dyn FnMut(usize) -> Option<Opened>,
) -> Result<Divergence, TrainError> {
    let bounds = boundaries(work.steps, work.checkpoint_every);
    let count = bounds.len();
    let mut opened = 0u32;
    let mut get = |i: usize, opened: &mut u32| -> Result<State, String> {
        *opened += 1;
        let o =
            open(i).ok_or_else(|| format!("did not open its state after step {}", bounds[i]))?;
        let l = leaf(bounds[i], &o.state, &o.losses);
        if o.state.params.len() != global.len() || !merkle_verify(root, count, i, l, &o.proof) {
            return Err(format!(
                "its state after step {} does not open the committed root",
                bounds[i]
            ));
        }
        Ok(o.state)
    };
    let fault = |from: u32, to: u32, segments: u32, opened: u32, reason: String| Divergence {
        from,
        to,
        segments_reexecuted: segments,
        states_opened: opened,
        reason,
        proven: true,
    };
    let matches = |i: usize, s: &State| {
        relative_distance(&s.params, &honest.states[i].1.params) <= STATE_TOLERANCE
    };
    // State 0 is the checkpoint for both; find the first that differs.
    let (mut good, mut bad) = (0usize, count - 1);
    let last = match get(bad, &mut opened) {
        Ok(s) => s,
        Err(r) => return Ok(fault(bounds[bad], bounds[bad], 0, opened, r)),
    };
    if matches(bad, &last) {
        let own = Int8::quantize(&pseudo_gradient(global, &last.params), CHUNK)?.dequantize();
        let wrong = relative_distance(claimed, &own) > AUDIT_TOLERANCE;
        let reason = if wrong {
            "its pseudo-gradient is not the change its committed final state makes"
        } else {
            "its loss trace is not the one its steps give"
        };
        return Ok(Divergence {
            proven: wrong,
            ..fault(work.steps, work.steps, 0, opened, reason.to_string())
        });
    }
    // Opened states at the ends of the search, so none is opened twice.
    let mut before: Option<State> = None;
    let mut after = last;
    while bad - good > 1 {
        let mid = (good + bad) / 2;
        match get(mid, &mut opened) {
            Ok(s) if matches(mid, &s) => {
                good = mid;
                before = Some(s);
            }
            Ok(s) => {
                bad = mid;
                after = s;
            }
            Err(r) => return Ok(fault(bounds[mid], bounds[mid], 0, opened, r)),
        }
    }
    // `before` is empty only while `good` is the checkpoint.
    let mut start = before.unwrap_or_else(|| State::start(global));
    let end = after;
    run_segment(trainer, text, work, &mut start, bounds[good], bounds[bad])?;
    let follows = relative_distance(&end.params, &start.params) <= STATE_TOLERANCE;
    let reason = if follows {
        format!(
            "its state after step {} differs from the honest one but follows from its own",
            bounds[bad]
        )
    } else {
        format!(
            "its state after step {} does not follow from its state after step {}",
            bounds[bad], bounds[good]
        )
    };
    Ok(Divergence {
        proven: !follows,
        ..fault(bounds[good], bounds[bad], 1, opened, reason)
    })
}

/// Check every committed segment of a worker's outer step against its
/// own opened start (not the auditor's trace): each state must open the
/// root, the first must be the checkpoint, each segment re-executed from
/// the worker's state must end within [`STATE_TOLERANCE`] of its next
/// state with the committed losses within 1%, and the pseudo-gradient must
/// be the change its final state makes. Segments are short enough that a
/// worker on another build stays within the tolerance where a whole outer
/// step would not (BENCHMARKS.md: one ulp grows to 2·10⁻⁴ of the
/// parameters over 50 steps; a poisoned segment is 0.12–0.39 away).
/// Returns the first failing segment, or `None` when all follow. Costs the
/// outer step's steps again and every state's bytes.
pub fn check_segments(
    trainer: &LmTrainer,
    text: &[u8],
    work: &InnerWork,
    global: &[f32],
    root: &[u8; 32],
    claimed: &[f32],
    open: &mut dyn FnMut(usize) -> Option<Opened>,
) -> Result<Option<Divergence>, TrainError> {
    let bounds = boundaries(work.steps, work.checkpoint_every);
    let count = bounds.len();
    let fault = |from: u32, to: u32, j: u32, opened: u32, reason: String| Divergence {
        from,
        to,
        segments_reexecuted: j,
        states_opened: opened,
        reason,
        proven: true,
    };
    let mut previous: Option<State> = None;
    for i in 0..count {
        let Some(o) = open(i) else {
            let why = format!("did not open its state after step {}", bounds[i]);
            return Ok(Some(fault(
                bounds[i],
                bounds[i],
                i as u32,
                i as u32 + 1,
                why,
            )));
        };
        let l = leaf(bounds[i], &o.state, &o.losses);
        if o.state.params.len() != global.len() || !merkle_verify(root, count, i, l, &o.proof) {
            let why = format!(
                "its state after step {} does not open the committed root",
                bounds[i]
            );
            return Ok(Some(fault(
                bounds[i],
                bounds[i],
                i as u32,
                i as u32 + 1,
                why,
            )));
        }
        match previous.take() {
            None => {
                if o.state != State::start(global) {
                    let why = "its first state is not the checkpoint".to_string();
                    return Ok(Some(fault(0, 0, 0, 1, why)));
                }
            }
            Some(mut start) => {
                let losses =
                    run_segment(trainer, text, work, &mut start, bounds[i - 1], bounds[i])?;
                let losses_ok = losses.len() == o.losses.len()
                    && losses
                        .iter()
                        .zip(&o.losses)
                        .all(|(a, b)| (a - b).abs() <= 1e-2 * a.abs().max(1.0));
                if relative_distance(&o.state.params, &start.params) > STATE_TOLERANCE || !losses_ok
                {
                    let why = format!(
                        "its state after step {} does not follow from its state after step {}",
                        bounds[i],
                        bounds[i - 1]
                    );
                    return Ok(Some(fault(
                        bounds[i - 1],
                        bounds[i],
                        i as u32,
                        i as u32 + 1,
                        why,
                    )));
                }
            }
        }
        previous = Some(o.state);
    }
    let last = previous.unwrap_or_else(|| State::start(global));
    let own = Int8::quantize(&pseudo_gradient(global, &last.params), CHUNK)?.dequantize();
    if relative_distance(claimed, &own) > AUDIT_TOLERANCE {
        let why =
            "its pseudo-gradient is not the change its committed final state makes".to_string();
        return Ok(Some(fault(
            work.steps,
            work.steps,
            count as u32 - 1,
            count as u32,
            why,
        )));
    }
    Ok(None)
}

/// H at outer step `t` (from 1): `h`, or during a warm-up that starts at
/// `first` inner steps, `first · 2^(t−1)` until that reaches `h` (frequent
/// synchronization while the model changes fastest, for few bytes).
pub fn inner_steps_at(h: u32, first: Option<u32>, t: u32) -> u32 {
    match first {
        Some(f) if f > 0 && f < h => {
            let doubled = u64::from(f) << (t.saturating_sub(1)).min(31);
            doubled.min(u64::from(h)) as u32
        }
        _ => h,
    }
}

/// Inner steps of the fastest worker over a whole task, and before outer
/// step `t` (the learning-rate schedule's clock).
pub fn inner_steps_before(h: u32, first: Option<u32>, t: u32) -> u64 {
    (1..t).map(|k| u64::from(inner_steps_at(h, first, k))).sum()
}

/// A DiLoCo run's settings (in one process: the reference the networked
/// runs and the benchmark compare against).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DilocoSettings {
    /// The model.
    pub spec: LmSpec,
    /// Workers.
    pub workers: usize,
    /// Outer steps.
    pub outer_steps: u32,
    /// Inner steps per outer step (H).
    pub inner_steps: u32,
    /// Warm-up: H starts here and doubles each outer step up to
    /// `inner_steps` ([`inner_steps_at`]).
    pub first_inner_steps: Option<u32>,
    /// Windows per inner step (per worker).
    pub batch: usize,
    /// The inner optimizer (its `total_steps` is set from the above).
    pub optimizer: InnerOptimizer,
    /// Outer learning rate.
    pub outer_lr: f32,
    /// Outer momentum.
    pub outer_momentum: f32,
    /// Seed of the initial parameters and the windows.
    pub seed: u64,
    /// Validation windows.
    pub val_windows: usize,
}

/// Which of `shards` the worker in `slot` trains on at outer step
/// `outer_step`: the slots rotate through the shards, so over the task
/// every worker sees all of the text (the contiguous shards are not alike:
/// the fortunes are in topic order).
pub fn shard_for(slot: usize, outer_step: u32, shards: usize) -> usize {
    (slot + outer_step as usize) % shards.max(1)
}

/// The seed of a worker's windows in an outer step.
pub fn work_seed(seed: u64, outer_step: u32, slot: usize) -> u64 {
    let mut r = Rng::new(seed ^ (u64::from(outer_step) << 32) ^ slot as u64);
    r.next_u64()
}

/// Validation loss of `params` on the corpus's fixed validation windows.
pub fn validation_loss(
    trainer: &LmTrainer,
    corpus: &Corpus,
    params: &[f32],
    windows: usize,
) -> Result<f64, TrainError> {
    let spec = trainer.spec();
    let tokens = corpus::fixed_windows(&corpus.val, windows, spec.context);
    let w = spec.context + 1;
    let (mut sum, mut n) = (0f64, 0usize);
    for batch in tokens.chunks(32 * w) {
        let k = batch.len() / w;
        sum += f64::from(trainer.loss(params, batch)?) * k as f64;
        n += k;
    }
    Ok(if n > 0 { sum / n as f64 } else { f64::NAN })
}

/// The one-process AdamW baseline at equal tokens: `outer_steps ×
/// inner_steps` steps of `workers × batch` windows from the whole training
/// text, the same schedule. Returns the validation loss after each
/// `inner_steps` steps.
pub fn baseline(
    s: &DilocoSettings,
    corpus: &Corpus,
    threads: usize,
) -> Result<Vec<f64>, TrainError> {
    let total = u64::from(s.outer_steps) * u64::from(s.inner_steps);
    let optimizer = InnerOptimizer {
        total_steps: total,
        ..s.optimizer
    };
    let run = Baseline {
        spec: s.spec,
        steps: total,
        batch: s.batch * s.workers,
        optimizer,
        seed: s.seed,
        eval_every: u64::from(s.inner_steps),
        val_windows: s.val_windows,
    };
    Ok(run
        .train(corpus, threads)?
        .into_iter()
        .map(|(_, l)| l)
        .collect())
}

/// One process training with AdamW (what DiLoCo is measured against).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Baseline {
    /// The model.
    pub spec: LmSpec,
    /// Steps.
    pub steps: u64,
    /// Windows per step.
    pub batch: usize,
    /// The optimizer (its schedule over `total_steps`).
    pub optimizer: InnerOptimizer,
    /// Seed of the initial parameters and the windows.
    pub seed: u64,
    /// Validation loss every this many steps.
    pub eval_every: u64,
    /// Validation windows.
    pub val_windows: usize,
}

impl Baseline {
    /// Train; returns (steps done, validation loss) every `eval_every`
    /// steps and at the end.
    pub fn train(&self, corpus: &Corpus, threads: usize) -> Result<Vec<(u64, f64)>, TrainError> {
        let trainer = LmTrainer::new(self.spec, threads)?;
        let steps =
            u32::try_from(self.steps).map_err(|_| TrainError::Data("too many steps".into()))?;
        let work = InnerWork {
            spec: self.spec,
            outer_step: 1,
            checkpoint: String::new(),
            shard: (0, corpus.train.len() as u64),
            steps,
            batch: self.batch,
            seed: self.seed,
            first_step: 0,
            optimizer: self.optimizer,
            checkpoint_every: steps.max(1),
        };
        let mut state = State::start(&lm::init(&self.spec, self.seed));
        let mut curve = Vec::new();
        let every = self.eval_every.max(1) as u32;
        let mut at = 0u32;
        while at < steps {
            let to = (at + every).min(steps);
            // One long run: the moments are never reset.
            run_segment(&trainer, &corpus.train, &work, &mut state, at, to)?;
            at = to;
            curve.push((
                u64::from(at),
                validation_loss(&trainer, corpus, &state.params, self.val_windows)?,
            ));
        }
        Ok(curve)
    }
}

/// DiLoCo in one process: each outer step every worker trains from the
/// published parameters on its shard (rotating as in a networked task,
/// [`shard_for`]), and the outer optimizer averages.
/// Returns the validation loss after each outer step.
pub fn simulate(
    s: &DilocoSettings,
    corpus: &Corpus,
    threads: usize,
) -> Result<Vec<f64>, TrainError> {
    let trainer = LmTrainer::new(s.spec, threads)?;
    let total = inner_steps_before(s.inner_steps, s.first_inner_steps, s.outer_steps + 1);
    let shards = corpus.shards(s.workers);
    let mut outer = Outer::new(lm::init(&s.spec, s.seed), s.outer_lr, s.outer_momentum);
    let mut curve = Vec::new();
    for o in 1..=s.outer_steps {
        let mut updates = Vec::new();
        for w in 0..s.workers {
            let shard = &shards[shard_for(w, o, shards.len())];
            let work = InnerWork {
                spec: s.spec,
                outer_step: o,
                checkpoint: String::new(),
                shard: (shard.start as u64, shard.end as u64),
                steps: inner_steps_at(s.inner_steps, s.first_inner_steps, o),
                batch: s.batch,
                seed: work_seed(s.seed, o, w),
                first_step: inner_steps_before(s.inner_steps, s.first_inner_steps, o),
                optimizer: InnerOptimizer {
                    total_steps: total,
                    ..s.optimizer
                },
                checkpoint_every: s.inner_steps,
            };
            let run = run_inner(&trainer, &corpus.train, &work, &outer.published)?;
            let q = Int8::quantize(&pseudo_gradient(&outer.published, &run.params), CHUNK)?;
            updates.push((q.dequantize(), run.tokens));
        }
        outer.step(&updates)?;
        curve.push(validation_loss(
            &trainer,
            corpus,
            &outer.published,
            s.val_windows,
        )?);
    }
    Ok(curve)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LmSpec {
        LmSpec {
            vocab: 256,
            context: 16,
            width: 16,
            layers: 1,
            heads: 2,
        }
    }

    fn corpus() -> Corpus {
        let mut text = String::new();
        for i in 0..400 {
            text.push_str(&format!(
                "The {} quick brown fox number {i} jumps over the lazy dog.\n%\n",
                ["red", "green", "blue", "small"][i % 4]
            ));
        }
        Corpus::from_text(text.as_bytes(), 0.1).unwrap()
    }

    fn work(c: &Corpus, steps: u32, every: u32) -> InnerWork {
        let shard = &c.shards(2)[1];
        InnerWork {
            spec: spec(),
            outer_step: 1,
            checkpoint: String::new(),
            shard: (shard.start as u64, shard.end as u64),
            steps,
            batch: 4,
            seed: 11,
            first_step: 0,
            optimizer: InnerOptimizer {
                lr: 1e-2,
                warmup: 2,
                total_steps: 100,
                ..InnerOptimizer::default()
            },
            checkpoint_every: every,
        }
    }

    #[test]
    fn int8_round_trips_within_half_a_level_and_refuses_garbage() {
        let mut rng = Rng::new(3);
        let v: Vec<f32> = (0..3000).map(|_| rng.normal() as f32).collect();
        let q = Int8::quantize(&v, CHUNK).unwrap();
        let back = Int8::from_bytes(&q.to_bytes(), v.len()).unwrap();
        assert_eq!(back, q);
        let d = q.dequantize();
        for (orig, got) in v.chunks(CHUNK).zip(d.chunks(CHUNK)) {
            let c = orig;
            let lo = c.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = c.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let half = (hi - lo) / 255.0 / 2.0 + 1e-6;
            assert!(orig.iter().zip(got).all(|(a, b)| (a - b).abs() <= half));
        }
        // About one byte a value.
        assert!(q.to_bytes().len() < v.len() + 64);
        assert!(Int8::from_bytes(&q.to_bytes(), v.len() - 1).is_err());
        assert!(Int8::from_bytes(&q.to_bytes()[..100], v.len()).is_err());
        let mut nan = q.to_bytes();
        nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(Int8::from_bytes(&nan, v.len()).is_err());
        assert!(Int8::quantize(&[1.0, f32::INFINITY], CHUNK).is_err());
    }

    /// Consecutive steps draw different windows (a regression: seeds one
    /// SplitMix64 stride apart once made step i + 1's batch step i's
    /// shifted by one).
    #[test]
    fn consecutive_steps_draw_unrelated_batches() {
        let mut rng = Rng::new(2);
        let text: Vec<u8> = (0..100_000).map(|_| rng.below(256) as u8).collect();
        let mut shared = 0;
        for step in 0..50 {
            let a = corpus::windows(&text, 0..text.len(), 8, 4, &mut step_rng(1, step)).unwrap();
            let b =
                corpus::windows(&text, 0..text.len(), 8, 4, &mut step_rng(1, step + 1)).unwrap();
            let starts = |v: &[u32]| v.chunks(5).map(|w| w.to_vec()).collect::<Vec<_>>();
            let (sa, sb) = (starts(&a), starts(&b));
            shared += sa.iter().filter(|w| sb.contains(w)).count();
        }
        assert!(
            shared < 5,
            "{shared} windows shared between consecutive batches"
        );
    }

    #[test]
    fn merkle_proofs_open_every_leaf_and_nothing_else() {
        for count in [1usize, 2, 3, 5, 8, 11] {
            let leaves: Vec<[u8; 32]> = (0..count)
                .map(|i| *blake3::hash(&[i as u8]).as_bytes())
                .collect();
            let root = merkle_root(&leaves);
            for i in 0..count {
                let proof = merkle_proof(&leaves, i);
                assert!(
                    merkle_verify(&root, count, i, leaves[i], &proof),
                    "{count} {i}"
                );
                let other = *blake3::hash(b"x").as_bytes();
                assert!(!merkle_verify(&root, count, i, other, &proof));
                if count > 1 {
                    assert!(!merkle_verify(
                        &root,
                        count,
                        (i + 1) % count,
                        leaves[i],
                        &proof
                    ));
                }
            }
        }
    }

    /// Taking a part back out of an outer step leaves the trajectory the
    /// outer optimizer would have followed without it.
    #[test]
    fn a_pseudo_gradient_taken_back_leaves_the_trajectory_without_it() {
        let init = vec![0.5f32; 2000];
        let mut rng = Rng::new(1);
        let mut draw = || -> Vec<f32> { (0..2000).map(|_| rng.normal() as f32 * 0.01).collect() };
        let (a, b, c, d) = (draw(), draw(), draw(), draw());
        let mut with = Outer::new(init.clone(), 0.7, 0.9);
        with.step(&[(a.clone(), 30), (b.clone(), 10)]).unwrap();
        with.step(&[(c.clone(), 40)]).unwrap();
        with.step(&[(d.clone(), 40)]).unwrap();
        let mut without = Outer::new(init, 0.7, 0.9);
        without.step(&[(a.clone(), 30)]).unwrap();
        without.step(&[(c, 40)]).unwrap();
        without.step(&[(d, 40)]).unwrap();
        // e = the step-1 average with b − without b.
        let e: Vec<f32> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (30.0 * x + 10.0 * y) / 40.0 - x)
            .collect();
        with.take_back(&e, 2);
        assert!(relative_distance(&with.exact, &without.exact) < 1e-5);
        assert!(relative_distance(&with.momentum, &without.momentum) < 1e-5);
        // What the coordinator writes to its file reads back exactly.
        let back = Outer::from_bytes(&with.to_bytes(), 2000, 0.7, 0.9).unwrap();
        assert_eq!(back, with);
        assert!(Outer::from_bytes(&with.to_bytes()[1..], 2000, 0.7, 0.9).is_err());
        let mut nan = with.to_bytes();
        nan[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(Outer::from_bytes(&nan, 2000, 0.7, 0.9).is_err());
    }

    /// Re-execution: honest work passes at one and two threads; each way
    /// of cheating is caught; bisection finds where a trace was forged
    /// re-executing O(log(H / k)) segments.
    #[test]
    fn audits_pass_honest_work_and_catch_every_cheat() {
        let c = corpus();
        let spec = spec();
        let w = work(&c, 16, 2);
        let global = lm::init(&spec, 5);
        let one = LmTrainer::new(spec, 1).unwrap();
        let two = LmTrainer::new(spec, 2).unwrap();
        let honest = run_inner(&one, &c.train, &w, &global).unwrap();
        assert!(
            honest.losses.last() < honest.losses.first(),
            "{:?}",
            honest.losses
        );
        let pg = |params: &[f32]| {
            Int8::quantize(&pseudo_gradient(&global, params), CHUNK)
                .unwrap()
                .dequantize()
        };
        let claimed = pg(&honest.params);
        for t in [&one, &two] {
            let (r, _) = audit(t, &c.train, &w, &global, &claimed, &honest.losses).unwrap();
            assert!(r.passed, "honest work failed its audit: {r:?}");
            assert!(r.distance < AUDIT_TOLERANCE / 10.0, "{}", r.distance);
        }
        // Lazy: half the steps.
        let lazy = run_inner(
            &one,
            &c.train,
            &InnerWork {
                steps: 8,
                ..w.clone()
            },
            &global,
        )
        .unwrap();
        // Poisoned shard: another part of the text.
        let other = c.shards(2)[0].clone();
        let poisoned = run_inner(
            &one,
            &c.train,
            &InnerWork {
                shard: (other.start as u64, other.end as u64),
                ..w.clone()
            },
            &global,
        )
        .unwrap();
        // Replayed: another outer step's (another seed's) work.
        let replayed = run_inner(
            &one,
            &c.train,
            &InnerWork {
                seed: 99,
                ..w.clone()
            },
            &global,
        )
        .unwrap();
        let mut rng = Rng::new(8);
        let cheats: Vec<(&str, Vec<f32>)> = vec![
            ("lazy", pg(&lazy.params)),
            ("poisoned shard", pg(&poisoned.params)),
            ("replayed", pg(&replayed.params)),
            ("scaled", claimed.iter().map(|x| 3.0 * x).collect()),
            ("sign-flipped", claimed.iter().map(|x| -x).collect()),
            (
                "random",
                claimed.iter().map(|_| rng.normal() as f32 * 1e-3).collect(),
            ),
        ];
        for (name, bad) in cheats {
            let (r, _) = audit(&one, &c.train, &w, &global, &bad, &honest.losses).unwrap();
            assert!(!r.passed, "{name} passed its audit");
            assert!(
                r.distance > 10.0 * AUDIT_TOLERANCE,
                "{name}: {}",
                r.distance
            );
        }
        // Bisection over a forged trace: honest states up to step 10, then
        // a state shifted by noise, honestly continued from there.
        let bounds = boundaries(w.steps, w.checkpoint_every);
        let mut states = honest.states.clone();
        let mut leaves = honest.leaves.clone();
        let forged_at = bounds.iter().position(|&b| b == 12).unwrap();
        let mut s = states[forged_at - 1].1.clone();
        run_segment(&one, &c.train, &w, &mut s, 10, 12).unwrap();
        s.params.iter_mut().for_each(|p| *p += 0.01);
        states[forged_at].1 = s.clone();
        let mut seg_losses: Vec<Vec<f32>> = bounds
            .windows(2)
            .map(|p| honest.losses[p[0] as usize..p[1] as usize].to_vec())
            .collect();
        seg_losses.insert(0, Vec::new());
        leaves[forged_at] = leaf(12, &s, &seg_losses[forged_at]);
        for j in forged_at + 1..bounds.len() {
            let l = run_segment(&one, &c.train, &w, &mut s, bounds[j - 1], bounds[j]).unwrap();
            states[j].1 = s.clone();
            seg_losses[j] = l;
            leaves[j] = leaf(bounds[j], &s, &seg_losses[j]);
        }
        let root = merkle_root(&leaves);
        let claimed = pg(&s.params);
        let (r, _) = audit(&one, &c.train, &w, &global, &claimed, &honest.losses).unwrap();
        assert!(!r.passed);
        let mut open = |i: usize| {
            Some(Opened {
                state: states[i].1.clone(),
                losses: seg_losses[i].clone(),
                proof: merkle_proof(&leaves, i),
            })
        };
        let d = bisect(
            &one, &c.train, &w, &global, &root, &claimed, &honest, &mut open,
        )
        .unwrap();
        assert_eq!((d.from, d.to), (10, 12), "{d:?}");
        // One segment re-executed, O(log) states opened.
        let segments = bounds.len() - 1;
        let log = (segments as f64).log2().ceil() as u32;
        assert_eq!(d.segments_reexecuted, 1);
        assert!(
            d.states_opened <= log + 2,
            "{} states of {}",
            d.states_opened,
            bounds.len()
        );
        assert!(d.reason.contains("does not follow"), "{d:?}");
        assert!(d.proven);
        // Checking every segment from the worker's own states finds it too.
        let mut open = |i: usize| {
            Some(Opened {
                state: states[i].1.clone(),
                losses: seg_losses[i].clone(),
                proof: merkle_proof(&leaves, i),
            })
        };
        let d = check_segments(&one, &c.train, &w, &global, &root, &claimed, &mut open)
            .unwrap()
            .unwrap();
        assert_eq!((d.from, d.to), (10, 12), "{d:?}");
        // A worker whose arithmetic differs by an ulp at every boundary (as
        // on another build): its trace leaves the auditor's, but every
        // segment follows from its own start, so it passes.
        let bump = |s: &mut State| {
            s.params
                .iter_mut()
                .step_by(7)
                .for_each(|v| *v = f32::from_bits(v.to_bits() + 1));
        };
        let mut s = State::start(&global);
        let (mut d_states, mut d_losses, mut d_leaves) =
            (vec![s.clone()], vec![Vec::new()], vec![leaf(0, &s, &[])]);
        for pair in bounds.windows(2) {
            let l = run_segment(&one, &c.train, &w, &mut s, pair[0], pair[1]).unwrap();
            bump(&mut s);
            d_leaves.push(leaf(pair[1], &s, &l));
            d_states.push(s.clone());
            d_losses.push(l);
        }
        let d_root = merkle_root(&d_leaves);
        let d_claimed = pg(&s.params);
        let mut open = |i: usize| {
            Some(Opened {
                state: d_states[i].clone(),
                losses: d_losses[i].clone(),
                proof: merkle_proof(&d_leaves, i),
            })
        };
        assert_eq!(
            check_segments(&one, &c.train, &w, &global, &d_root, &d_claimed, &mut open).unwrap(),
            None
        );
        // A worker whose opened state does not open its root is caught at once.
        let mut lying = |i: usize| {
            let mut st = states[i].1.clone();
            st.params[0] += 1.0;
            Some(Opened {
                state: st,
                losses: seg_losses[i].clone(),
                proof: merkle_proof(&leaves, i),
            })
        };
        let d = bisect(
            &one, &c.train, &w, &global, &root, &claimed, &honest, &mut lying,
        )
        .unwrap();
        assert!(d.reason.contains("does not open"), "{d:?}");
        // Honest states with a tampered pseudo-gradient: every segment follows.
        let mut honest_open = |i: usize| {
            let mut sl = vec![Vec::new()];
            sl.extend(
                bounds
                    .windows(2)
                    .map(|p| honest.losses[p[0] as usize..p[1] as usize].to_vec()),
            );
            Some(Opened {
                state: honest.states[i].1.clone(),
                losses: sl[i].clone(),
                proof: merkle_proof(&honest.leaves, i),
            })
        };
        let flipped: Vec<f32> = pg(&honest.params).iter().map(|x| -x).collect();
        let d = bisect(
            &one,
            &c.train,
            &w,
            &global,
            &honest.root(),
            &flipped,
            &honest,
            &mut honest_open,
        )
        .unwrap();
        assert!(d.reason.contains("pseudo-gradient"), "{d:?}");
    }

    /// In every outer step the workers train on different shards, and over
    /// as many steps as shards each worker has trained on all of them.
    #[test]
    fn shards_rotate_without_two_workers_on_one() {
        for n in 1..6 {
            for t in 1..20 {
                let mut taken: Vec<usize> = (0..n).map(|k| shard_for(k, t, n)).collect();
                taken.sort_unstable();
                assert_eq!(taken, (0..n).collect::<Vec<_>>());
            }
            for k in 0..n {
                let mut seen: Vec<usize> = (1..=n as u32).map(|t| shard_for(k, t, n)).collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>());
            }
        }
    }

    /// DiLoCo in one process lowers the validation loss like the baseline.
    #[test]
    fn diloco_and_the_baseline_both_learn() {
        let c = corpus();
        let s = DilocoSettings {
            spec: spec(),
            workers: 2,
            outer_steps: 3,
            inner_steps: 10,
            first_inner_steps: None,
            batch: 4,
            optimizer: InnerOptimizer {
                lr: 1e-2,
                warmup: 2,
                ..InnerOptimizer::default()
            },
            outer_lr: 0.7,
            outer_momentum: 0.9,
            seed: 1,
            val_windows: 16,
        };
        let start = validation_loss(
            &LmTrainer::new(s.spec, 1).unwrap(),
            &c,
            &lm::init(&s.spec, 1),
            16,
        )
        .unwrap();
        let d = simulate(&s, &c, 1).unwrap();
        let b = baseline(&s, &c, 1).unwrap();
        assert_eq!(d.len(), 3);
        assert!(*d.last().unwrap() < start - 0.5, "{start} → {d:?}");
        assert!(*b.last().unwrap() < start - 0.5, "{start} → {b:?}");
    }
}
