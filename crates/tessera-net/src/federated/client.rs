//! The provider's side of a training round: check the request, train on
//! the local data, commit, reveal when asked.
//!
//! Rounds run one at a time on their own thread pool (`threads`, one by
//! default), outside the inference engine's threads: a provider that also
//! serves a model shares its CPU between the two by the split its operator
//! chose (`--threads` for inference, `--train-threads` for training), and a
//! second round waits for the first (or its deadline).

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use iroh::endpoint::{RecvStream, SendStream};
use tessera_core::train::Weights;
use tessera_protocol::{
    read_frame, write_frame, Frame, JobError, TrainCommit, TrainDone, TrainRound, TrainingOffer,
};
use tessera_train::{train_locally, CandleTrainer, Dataset};

/// Largest model a round may carry: what fits a frame as base64 with room
/// to spare (fetching parameters by hash is not built).
pub const MAX_PARAMETERS: usize = 500_000;
/// Most local epochs a round may ask for.
pub const MAX_EPOCHS: u32 = 50;

/// How a poisoning provider tampers with its updates (tests only).
#[cfg(feature = "adversary")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poison {
    /// Sends the global parameters minus ten times its honest step.
    Flip,
    /// Sends its honest step scaled by ten.
    Scale,
    /// Sends random parameters.
    Random,
}

#[cfg(feature = "adversary")]
impl std::str::FromStr for Poison {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flip" => Ok(Poison::Flip),
            "scale" => Ok(Poison::Scale),
            "random" => Ok(Poison::Random),
            _ => Err(format!("unknown poison {s:?} (flip, scale, random)")),
        }
    }
}

/// A provider's training data and what it charges to train on it.
pub struct TrainingData {
    /// The labelled samples (`tessera_train::data::load_dir`).
    pub data: Arc<Dataset>,
    /// Micro-credits per round.
    pub price: u64,
    /// Threads of the training pool.
    pub threads: usize,
    /// One round at a time.
    gate: tokio::sync::Semaphore,
    /// Tampering, in test builds.
    #[cfg(feature = "adversary")]
    pub poison: Option<Poison>,
}

impl std::fmt::Debug for TrainingData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingData")
            .field("samples", &self.data.len())
            .field("price", &self.price)
            .finish()
    }
}

impl TrainingData {
    /// Data to train on at `price` per round, on `threads` threads.
    pub fn new(data: Dataset, price: u64, threads: usize) -> TrainingData {
        TrainingData {
            data: Arc::new(data),
            price,
            threads: threads.max(1),
            gate: tokio::sync::Semaphore::new(1),
            #[cfg(feature = "adversary")]
            poison: None,
        }
    }

    /// What `Hello` says of it.
    pub fn offer(&self) -> TrainingOffer {
        TrainingOffer {
            samples: self.data.len() as u64,
            inputs: self.data.features,
            classes: self.data.classes,
            price: self.price,
        }
    }

    /// Why this round cannot be trained here, if it cannot.
    fn refusal(&self, round: &TrainRound) -> Option<String> {
        let spec = round.spec;
        let r = &round.recipe;
        if spec.inputs() != self.data.features || spec.classes() != self.data.classes {
            return Some(format!(
                "the model takes {} values and {} classes; this provider's data has {} and {}",
                spec.inputs(),
                spec.classes(),
                self.data.features,
                self.data.classes
            ));
        }
        if spec.parameters() > MAX_PARAMETERS || round.global.0.len() != spec.parameters() {
            return Some(format!(
                "{} parameters sent for a model of {} (at most {MAX_PARAMETERS})",
                round.global.0.len(),
                spec.parameters()
            ));
        }
        if round.global.0.iter().any(|v| !v.is_finite()) {
            return Some("the global parameters are not all finite".into());
        }
        let lr_ok = r.learning_rate.is_finite() && r.learning_rate > 0.0 && r.learning_rate <= 10.0;
        let mu_ok = r.proximal.is_finite() && r.proximal >= 0.0 && r.proximal <= 100.0;
        if r.epochs == 0 || r.epochs > MAX_EPOCHS || r.batch_size == 0 || !lr_ok || !mu_ok {
            return Some(format!(
                "a recipe of {} epochs (1 to {MAX_EPOCHS}), batch {}, learning rate {}, \
                 proximal {} is not one this provider runs",
                r.epochs, r.batch_size, r.learning_rate, r.proximal
            ));
        }
        if round.price < self.price {
            return Some(format!(
                "the round pays {} micro-credits; this provider asks {}",
                round.price, self.price
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

/// Serve one round on its job stream.
pub(crate) async fn serve_round(
    mut send: SendStream,
    mut recv: RecvStream,
    round: TrainRound,
    training: Option<&Arc<TrainingData>>,
) -> anyhow::Result<()> {
    let Some(training) = training else {
        return fail(&mut send, "this provider does not train".into(), false).await;
    };
    if let Some(reason) = training.refusal(&round) {
        return fail(&mut send, reason, false).await;
    }
    let left = Duration::from_millis(round.deadline_ms.saturating_sub(tessera_core::now_ms()));
    let Ok(Ok(_permit)) = tokio::time::timeout(left, training.gate.acquire()).await else {
        return fail(&mut send, "busy until the round's deadline".into(), true).await;
    };
    let (data, threads, spec) = (training.data.clone(), training.threads, round.spec);
    let (global, recipe) = (round.global.0.clone(), round.recipe);
    let trained = tokio::task::spawn_blocking(move || {
        let trainer = CandleTrainer::new(spec, threads)?;
        train_locally(&trainer, &global, &data, &recipe)
    })
    .await;
    #[cfg_attr(not(feature = "adversary"), allow(unused_mut))]
    let mut update = match trained {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => return fail(&mut send, e.to_string(), false).await,
        Err(e) => return fail(&mut send, format!("training stopped: {e}"), false).await,
    };
    #[cfg(feature = "adversary")]
    if let Some(poison) = training.poison {
        poison_update(poison, &round.global.0, &mut update.parameters, round.round);
    }
    let nonce = tessera_core::secret_bytes::<32>()?;
    let commitment = tessera_train::verify::commitment(
        u64::from(round.round),
        &nonce,
        &update.parameters,
        update.samples,
        update.loss,
    );
    let commit = TrainCommit {
        commitment: hex::encode(commitment.0),
        samples: update.samples as u64,
        loss: update.loss,
    };
    write_frame(&mut send, &Frame::TrainCommit(commit)).await?;
    match read_frame(&mut recv).await {
        Ok(Some(Frame::Reveal)) => {}
        Ok(other) => bail!(
            "expected Reveal, got {}",
            other.as_ref().map_or("the end of the stream", Frame::kind)
        ),
        Err(e) => bail!("the gateway went away before the reveal: {e}"),
    }
    let done = TrainDone {
        parameters: Weights(update.parameters),
        nonce: hex::encode(nonce),
        samples: update.samples as u64,
        loss: update.loss,
        steps: update.steps as u64,
    };
    write_frame(&mut send, &Frame::TrainDone(Box::new(done))).await?;
    let _ = send.finish();
    let _ = send.stopped().await;
    Ok(())
}

#[cfg(feature = "adversary")]
fn poison_update(poison: Poison, global: &[f32], params: &mut [f32], round: u32) {
    tracing::warn!(?poison, "POISONING a training update (test build)");
    match poison {
        Poison::Flip => params
            .iter_mut()
            .zip(global)
            .for_each(|(p, g)| *p = g - 10.0 * (*p - g)),
        Poison::Scale => params
            .iter_mut()
            .zip(global)
            .for_each(|(p, g)| *p = g + 10.0 * (*p - g)),
        Poison::Random => {
            let mut rng = tessera_train::Rng::new(u64::from(round) ^ 0x5eed);
            params
                .iter_mut()
                .for_each(|p| *p = (rng.uniform() * 2.0 - 1.0) as f32);
        }
    }
}

/// The job runner of a provider that only trains: it serves no model, so
/// no inference job reaches a runner (the provider refuses them by model
/// hash first), and it reports no slots.
pub struct NoInference;

impl crate::provider::JobRunner for NoInference {
    fn submit(
        &self,
        _request: tessera_core::GenerationRequest,
    ) -> Result<
        (
            tokio::sync::mpsc::UnboundedReceiver<tessera_engine::Event>,
            tessera_engine::WrapUp,
        ),
        tessera_engine::SubmitError,
    > {
        Err(tessera_engine::SubmitError::Busy)
    }
    fn active(&self) -> usize {
        0
    }
    fn max_sequences(&self) -> usize {
        0
    }
}
