//! A provider's side of a DiLoCo outer step, on its job stream:
//!
//! 1. check the work (model size, steps, shard, price, the corpus);
//! 2. say which checkpoint it holds ([`Frame::Have`]); the gateway sends
//!    the int8 change from that one, or the whole checkpoint; the result
//!    must hash to the checkpoint the work names;
//! 3. take the inner steps (on its own thread pool, one outer step at a
//!    time), keeping its state every `checkpoint_every` steps;
//! 4. commit ([`DilocoCommit`]), reveal the int8 pseudo-gradient when asked;
//! 5. until the gateway ends the stream, open committed states on request
//!    (an audit's bisection).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use iroh::endpoint::{RecvStream, SendStream};
use tessera_protocol::{
    read_blob, read_frame, write_blob, write_frame, BlobKind, ComputeOffer, DilocoCommit,
    DilocoStep, Frame, JobError,
};
use tessera_train::corpus::Corpus;
use tessera_train::diloco::{self, InnerRun, Int8, CHUNK};
use tessera_train::lm::LmTrainer;

/// Largest model a worker trains.
pub const MAX_PARAMETERS: usize = 4_000_000;
/// Most inner steps in one outer step.
pub const MAX_STEPS: u32 = 100_000;
/// Most memory the kept states of one outer step may take.
const MAX_STATE_BYTES: usize = 1 << 30;

/// How a cheating worker cheats (test builds).
#[cfg(feature = "adversary")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cheat {
    /// Takes half the inner steps it is paid for.
    Lazy,
    /// Sends a random pseudo-gradient of the honest one's size.
    Random,
    /// Sends its previous outer step's pseudo-gradient again.
    Replay,
    /// Sends its pseudo-gradient scaled by 3.
    Scale,
    /// Sends its pseudo-gradient sign-flipped.
    Flip,
    /// Trains honestly but claims each step took a millisecond (to be
    /// given the most inner steps, and the pay for them).
    Boast,
    /// Trains on text other than its shard (the start of the corpus, or
    /// the range after it when that is its shard).
    Poison,
}

#[cfg(feature = "adversary")]
impl std::str::FromStr for Cheat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "lazy" => Cheat::Lazy,
            "random" => Cheat::Random,
            "replay" => Cheat::Replay,
            "scale" => Cheat::Scale,
            "flip" => Cheat::Flip,
            "poison" => Cheat::Poison,
            "boast" => Cheat::Boast,
            _ => {
                return Err(format!(
                    "unknown cheat {s:?} (lazy, random, replay, scale, flip, poison, boast)"
                ))
            }
        })
    }
}

/// A provider's compute for DiLoCo tasks.
pub struct Compute {
    /// The text it trains on (the task names its hash).
    pub corpus: Arc<Corpus>,
    corpus_hash: String,
    /// Micro-credits per inner step.
    pub price_per_step: u64,
    /// Threads of its training pool.
    pub threads: usize,
    /// Benchmarks: each step is stretched to this many times its length
    /// (2: a machine half as fast).
    pub slowdown: f64,
    gate: Arc<tokio::sync::Semaphore>,
    /// The checkpoint it holds (hash, parameters).
    held: Mutex<Option<(String, Arc<Vec<f32>>)>>,
    /// Test builds: how it cheats.
    #[cfg(feature = "adversary")]
    pub cheat: Option<Cheat>,
    #[cfg(feature = "adversary")]
    last: Mutex<Option<Vec<u8>>>,
}

impl std::fmt::Debug for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compute")
            .field("corpus", &self.corpus_hash)
            .field("price_per_step", &self.price_per_step)
            .finish()
    }
}

/// The content address of a corpus's training text.
pub fn corpus_hash(corpus: &Corpus) -> String {
    corpus.hash()
}

impl Compute {
    /// Compute on `corpus` at `price_per_step`, on `threads` threads.
    pub fn new(corpus: Corpus, price_per_step: u64, threads: usize) -> Compute {
        Compute {
            corpus_hash: corpus_hash(&corpus),
            corpus: Arc::new(corpus),
            price_per_step,
            threads: threads.max(1),
            slowdown: 1.0,
            gate: Arc::new(tokio::sync::Semaphore::new(1)),
            held: Mutex::new(None),
            #[cfg(feature = "adversary")]
            cheat: None,
            #[cfg(feature = "adversary")]
            last: Mutex::new(None),
        }
    }

    /// What `Hello` says of it.
    pub fn offer(&self) -> ComputeOffer {
        ComputeOffer {
            corpus: self.corpus_hash.clone(),
            price_per_step: self.price_per_step,
        }
    }

    /// Why this work is not done here, if it is not.
    fn refusal(&self, step: &DilocoStep) -> Option<String> {
        let w = &step.work;
        if let Err(e) = w.spec.check() {
            return Some(format!("model: {e}"));
        }
        let n = w.spec.parameters();
        if n > MAX_PARAMETERS {
            return Some(format!(
                "{n} parameters (this worker trains at most {MAX_PARAMETERS})"
            ));
        }
        if step.corpus != self.corpus_hash {
            return Some(format!(
                "the task trains on text {}; this worker holds {}",
                step.corpus, self.corpus_hash
            ));
        }
        let (a, b) = w.shard;
        if a >= b || b as usize > self.corpus.train.len() || ((b - a) as usize) <= w.spec.context {
            return Some(format!("shard {a}..{b} is not a range of the text"));
        }
        let states = diloco::boundaries(w.steps, w.checkpoint_every).len();
        if w.steps == 0 || w.steps > MAX_STEPS || w.batch == 0 || w.batch > 4096 {
            return Some(format!(
                "{} steps of {} windows is not work this worker takes",
                w.steps, w.batch
            ));
        }
        if w.checkpoint_every == 0 || states.saturating_mul(12 * n) > MAX_STATE_BYTES {
            return Some("states kept every checkpoint_every steps would not fit in memory".into());
        }
        let o = &w.optimizer;
        let finite = [
            o.lr,
            o.beta1,
            o.beta2,
            o.eps,
            o.weight_decay,
            o.min_lr_ratio,
        ];
        if finite.iter().any(|v| !v.is_finite() || *v < 0.0) || o.beta1 >= 1.0 || o.beta2 >= 1.0 {
            return Some("an optimizer setting out of range".into());
        }
        if step.price_per_step < self.price_per_step {
            return Some(format!(
                "a step pays {}; this worker asks {}",
                step.price_per_step, self.price_per_step
            ));
        }
        None
    }
}

async fn fail(send: &mut SendStream, message: String, retryable: bool) -> anyhow::Result<()> {
    write_frame(send, &Frame::JobError(JobError { message, retryable })).await?;
    let _ = send.finish();
    Ok(())
}

/// Serve one outer step on its job stream.
pub(crate) async fn serve_step(
    mut send: SendStream,
    mut recv: RecvStream,
    step: DilocoStep,
    compute: Option<&Arc<Compute>>,
) -> anyhow::Result<()> {
    let Some(compute) = compute.cloned() else {
        return fail(
            &mut send,
            "this provider does not offer DiLoCo compute".into(),
            false,
        )
        .await;
    };
    if let Some(reason) = compute.refusal(&step) {
        return fail(&mut send, reason, false).await;
    }
    let work = step.work.clone();
    let n = work.spec.parameters();
    // The checkpoint: the change from the one held, or the whole of it.
    let held = compute.held.lock().ok().and_then(|h| h.clone());
    write_frame(
        &mut send,
        &Frame::Have {
            checkpoint: held.as_ref().map(|(h, _)| h.clone()),
        },
    )
    .await?;
    let kind = match read_frame(&mut recv).await? {
        Some(Frame::Blob(k)) => *k,
        other => bail!(
            "expected the checkpoint, got {}",
            other.as_ref().map_or("the end", Frame::kind)
        ),
    };
    let bytes = read_blob(&mut recv, 8 * n + 64).await?;
    let global: Vec<f32> = match kind {
        BlobKind::Checkpoint { .. } => {
            if bytes.len() != 4 * n {
                return fail(&mut send, "a checkpoint of the wrong size".into(), false).await;
            }
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        BlobKind::Change { base, .. } => {
            let Some((held_hash, params)) = held.filter(|(h, _)| *h == base) else {
                return fail(
                    &mut send,
                    "a change from a checkpoint this worker does not hold".into(),
                    true,
                )
                .await;
            };
            let _ = held_hash;
            let change = match Int8::from_bytes(&bytes, n) {
                Ok(c) => c,
                Err(e) => return fail(&mut send, e.to_string(), false).await,
            };
            let mut p = params.as_ref().clone();
            diloco::apply(&mut p, &change);
            p
        }
        _ => return fail(&mut send, "expected a checkpoint".into(), false).await,
    };
    let hash = hex::encode(diloco::checkpoint_hash(&global));
    if hash != work.checkpoint {
        return fail(
            &mut send,
            format!(
                "the checkpoint received hashes to {hash}, not {}",
                work.checkpoint
            ),
            false,
        )
        .await;
    }
    let global = Arc::new(global);
    if let Ok(mut h) = compute.held.lock() {
        *h = Some((hash, global.clone()));
    }
    // Train, one outer step at a time.
    let left = Duration::from_millis(step.deadline_ms.saturating_sub(tessera_core::now_ms()));
    let Ok(Ok(permit)) = tokio::time::timeout(left, compute.gate.clone().acquire_owned()).await
    else {
        return fail(&mut send, "busy until the step's deadline".into(), true).await;
    };
    let started = Instant::now();
    let (c, w, g) = (compute.clone(), work.clone(), global.clone());
    let trained = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        train(&c, &w, &g)
    })
    .await;
    let (run, pseudo) = match trained {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return fail(&mut send, e.to_string(), false).await,
        Err(e) => return fail(&mut send, format!("training stopped: {e}"), false).await,
    };
    #[allow(unused_mut)]
    let mut compute_ms = started.elapsed().as_millis() as u64;
    #[cfg(feature = "adversary")]
    if compute.cheat == Some(Cheat::Boast) {
        compute_ms = 1;
    }
    let nonce = tessera_core::secret_bytes::<32>()?;
    let root = run.root();
    let commitment = diloco::commitment(
        work.outer_step,
        &nonce,
        &pseudo,
        run.tokens,
        &run.losses,
        &root,
    );
    let commit = DilocoCommit {
        commitment: hex::encode(commitment),
        tokens: run.tokens,
        losses: run.losses.clone(),
        root: hex::encode(root),
        compute_ms,
    };
    write_frame(&mut send, &Frame::DilocoCommit(Box::new(commit))).await?;
    match read_frame(&mut recv).await {
        Ok(Some(Frame::Reveal)) => {}
        Ok(other) => bail!(
            "expected Reveal, got {}",
            other.as_ref().map_or("the end", Frame::kind)
        ),
        Err(e) => bail!("the gateway went away before the reveal: {e}"),
    }
    let kind = BlobKind::PseudoGradient {
        nonce: hex::encode(nonce),
    };
    write_frame(&mut send, &Frame::Blob(Box::new(kind))).await?;
    write_blob(&mut send, &pseudo).await?;
    // Open states until the gateway is done with this step.
    loop {
        match read_frame(&mut recv).await {
            Ok(Some(Frame::OpenState { index })) => {
                let Some((_, state)) = run.states.get(index as usize) else {
                    return fail(&mut send, format!("no state {index}"), false).await;
                };
                let bounds = diloco::boundaries(work.steps, work.checkpoint_every);
                let (from, to) = (
                    index.checked_sub(1).map_or(0, |i| bounds[i as usize]) as usize,
                    bounds.get(index as usize).copied().unwrap_or(0) as usize,
                );
                let kind = BlobKind::State {
                    index,
                    losses: run.losses.get(from..to).unwrap_or_default().to_vec(),
                    proof: diloco::merkle_proof(&run.leaves, index as usize)
                        .iter()
                        .map(hex::encode)
                        .collect(),
                };
                write_frame(&mut send, &Frame::Blob(Box::new(kind))).await?;
                write_blob(&mut send, &state.to_bytes()).await?;
            }
            Ok(None) => break,
            Ok(Some(other)) => bail!("unexpected {} on a DiLoCo step's stream", other.kind()),
            Err(e) => bail!("the gateway went away: {e}"),
        }
    }
    let _ = send.finish();
    Ok(())
}

/// The inner steps and the int8 pseudo-gradient to reveal (bytes).
fn train(
    compute: &Compute,
    work: &tessera_core::train::InnerWork,
    global: &[f32],
) -> Result<(InnerRun, Vec<u8>), tessera_train::TrainError> {
    let trainer = LmTrainer::new(work.spec, compute.threads)?;
    let text = &compute.corpus.train;
    let slowdown = compute.slowdown.max(1.0);
    let mut pace = |spent: Duration| {
        if slowdown > 1.0 {
            std::thread::sleep(spent.mul_f64(slowdown - 1.0));
        }
    };
    #[cfg(feature = "adversary")]
    if let Some(cheat) = compute.cheat {
        return cheat_run(compute, cheat, &trainer, work, global, &mut pace);
    }
    let run = diloco::run_inner_paced(&trainer, text, work, global, &mut pace)?;
    let pseudo = Int8::quantize(&diloco::pseudo_gradient(global, &run.params), CHUNK)?.to_bytes();
    Ok((run, pseudo))
}

#[cfg(feature = "adversary")]
fn cheat_run(
    compute: &Compute,
    cheat: Cheat,
    trainer: &LmTrainer,
    work: &tessera_core::train::InnerWork,
    global: &[f32],
    pace: &mut dyn FnMut(Duration),
) -> Result<(InnerRun, Vec<u8>), tessera_train::TrainError> {
    tracing::warn!(?cheat, "CHEATING at a DiLoCo step (test build)");
    let text = &compute.corpus.train;
    let mut w = work.clone();
    match cheat {
        Cheat::Lazy => w.steps = (work.steps / 2).max(1),
        Cheat::Poison => {
            // Text of its own choosing: the start of the corpus, or the
            // next range when its shard is the start.
            let len = work.shard.1 - work.shard.0;
            w.shard = match work.shard.0 {
                0 => (len, 2 * len),
                _ => (0, len),
            };
        }
        _ => {}
    }
    let mut run = diloco::run_inner_paced(trainer, text, &w, global, pace)?;
    if cheat == Cheat::Lazy {
        // Claims the full step count's tokens.
        run.tokens = u64::from(work.steps) * (work.batch * work.spec.context) as u64;
        let last = *run.losses.last().unwrap_or(&0.0);
        run.losses.resize(work.steps as usize, last);
    }
    let mut pg = diloco::pseudo_gradient(global, &run.params);
    match cheat {
        Cheat::Random => {
            let norm = pg.iter().map(|x| x * x).sum::<f32>().sqrt() / (pg.len() as f32).sqrt();
            let mut rng = tessera_train::Rng::new(u64::from(work.outer_step) ^ 0xbad);
            pg.iter_mut()
                .for_each(|x| *x = (rng.normal() as f32) * norm);
        }
        Cheat::Scale => pg.iter_mut().for_each(|x| *x *= 3.0),
        Cheat::Flip => pg.iter_mut().for_each(|x| *x = -*x),
        _ => {}
    }
    let mut bytes = Int8::quantize(&pg, CHUNK)?.to_bytes();
    if cheat == Cheat::Replay {
        let mut last = compute
            .last
            .lock()
            .map_err(|_| tessera_train::TrainError::Engine("lock".into()))?;
        if let Some(prev) = last.replace(bytes.clone()) {
            bytes = prev;
        }
    }
    Ok((run, bytes))
}
