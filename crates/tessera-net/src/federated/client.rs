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
use tessera_core::NodeId;
use tessera_protocol::{
    read_frame, write_frame, Frame, JobError, RoundPrivacy, SecAggMessage, SecAggRound, SignedKeys,
    TrainCommit, TrainDone, TrainRound, TrainingOffer,
};
use tessera_train::{privacy, secagg, train_locally, CandleTrainer, Dataset};

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
    /// Sends half its honest step (a lazy trainer: close to the others,
    /// so no outlier, but not the round it was asked to train).
    Half,
}

#[cfg(feature = "adversary")]
impl std::str::FromStr for Poison {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flip" => Ok(Poison::Flip),
            "scale" => Ok(Poison::Scale),
            "random" => Ok(Poison::Random),
            "half" => Ok(Poison::Half),
            _ => Err(format!("unknown poison {s:?} (flip, scale, random, half)")),
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
    gate: Arc<tokio::sync::Semaphore>,
    /// Tampering, in test builds.
    #[cfg(feature = "adversary")]
    pub poison: Option<Poison>,
    /// Called right after the provider sent its shares in a SecAgg round
    /// (test builds: the binary SIGKILLs itself; the round's stream is
    /// reset in any case).
    #[cfg(feature = "adversary")]
    pub vanish: Option<Arc<dyn Fn() + Send + Sync>>,
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
            gate: Arc::new(tokio::sync::Semaphore::new(1)),
            #[cfg(feature = "adversary")]
            poison: None,
            #[cfg(feature = "adversary")]
            vanish: None,
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
    key: &iroh::SecretKey,
) -> anyhow::Result<()> {
    let Some(training) = training else {
        return fail(&mut send, "this provider does not train".into(), false).await;
    };
    if let Some(reason) = training.refusal(&round) {
        return fail(&mut send, reason, false).await;
    }
    let data = match &round.canary {
        None => training.data.clone(),
        Some(csv) => match tessera_train::data::parse_csv(csv, round.spec.classes()) {
            Ok(d) if d.features == round.spec.inputs() => Arc::new(d),
            Ok(_) => return fail(&mut send, "canary data of another shape".into(), false).await,
            Err(e) => return fail(&mut send, format!("canary data: {e}"), false).await,
        },
    };
    let left = Duration::from_millis(round.deadline_ms.saturating_sub(tessera_core::now_ms()));
    let Ok(Ok(permit)) = tokio::time::timeout(left, training.gate.clone().acquire_owned()).await
    else {
        return fail(&mut send, "busy until the round's deadline".into(), true).await;
    };
    let (threads, spec) = (training.threads, round.spec);
    let (global, recipe) = (round.global.0.clone(), round.recipe);
    // Training starts at once; a SecAgg round exchanges keys meanwhile.
    let trained = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let trainer = CandleTrainer::new(spec, threads)?;
        train_locally(&trainer, &global, &data, &recipe)
    });
    let trained = async move {
        match trained.await {
            Ok(Ok(u)) => Ok(u),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("training stopped: {e}")),
        }
    };
    if let Some(sa) = round.secagg.clone() {
        return secagg_round(send, recv, &round, sa, trained, training, key).await;
    }
    #[cfg_attr(not(feature = "adversary"), allow(unused_mut))]
    let mut update = match trained.await {
        Ok(u) => u,
        Err(e) => return fail(&mut send, e, false).await,
    };
    if let Some(p) = round.privacy {
        update.parameters = privatize(&round.global.0, &update.parameters, p, 1.0)?;
    }
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

/// The step from `global` to `parameters`, clipped to L2 norm `p.clip` and
/// noised with N(0, p.std²) from the OS's random source, times `weight`.
fn privatize(
    global: &[f32],
    parameters: &[f32],
    p: RoundPrivacy,
    weight: f32,
) -> anyhow::Result<Vec<f32>> {
    let mut delta: Vec<f32> = parameters.iter().zip(global).map(|(a, g)| a - g).collect();
    if p.clip.is_finite() && p.clip > 0.0 {
        privacy::clip(&mut delta, p.clip);
    }
    if p.std.is_finite() && p.std > 0.0 {
        let seed = u64::from_le_bytes(tessera_core::secret_bytes::<8>()?);
        privacy::add_gaussian(&mut delta, p.std, &mut tessera_train::Rng::new(seed));
    }
    Ok(global
        .iter()
        .zip(&delta)
        .map(|(g, d)| g + d * weight)
        .collect())
}

async fn next_secagg(recv: &mut RecvStream, deadline_ms: u64) -> anyhow::Result<SecAggMessage> {
    let left = Duration::from_millis(deadline_ms.saturating_sub(tessera_core::now_ms()));
    match tokio::time::timeout(left, read_frame(recv)).await {
        Ok(Ok(Some(Frame::SecAgg(m)))) => Ok(*m),
        Ok(Ok(other)) => bail!(
            "expected a SecAgg message, got {}",
            other.as_ref().map_or("the end of the stream", Frame::kind)
        ),
        Ok(Err(e)) => bail!("garbage on the round's stream: {e}"),
        Err(_) => bail!("the gateway sent nothing by the round's deadline"),
    }
}

async fn send_secagg(send: &mut SendStream, m: SecAggMessage) -> anyhow::Result<()> {
    write_frame(send, &Frame::SecAgg(Box::new(m))).await?;
    Ok(())
}

/// A SecAgg+ round: advertise signed keys, share secrets with the
/// neighbours whose advertisements are signed by their node keys, send the
/// masked (weighted) step, reveal shares for the unmasking.
async fn secagg_round(
    mut send: SendStream,
    mut recv: RecvStream,
    round: &TrainRound,
    sa: SecAggRound,
    trained: impl std::future::Future<Output = Result<tessera_train::LocalUpdate, String>>,
    #[cfg_attr(not(feature = "adversary"), allow(unused_variables))] training: &TrainingData,
    key: &iroh::SecretKey,
) -> anyhow::Result<()> {
    let n = round.global.0.len();
    // The gateway's deadline for the whole round, with room for the
    // unmasking after the masked step.
    let deadline = round.deadline_ms + 120_000;
    let config = secagg::Config {
        round: u64::from(round.round),
        clients: (0..sa.members.len() as u32).collect(),
        neighbours: sa.neighbours,
        threshold: sa.threshold,
        clip: sa.clip,
        length: n + 1,
    };
    let (mut client, keys) = match secagg::Client::new(config.clone(), sa.id) {
        Ok(c) => c,
        Err(e) => return fail(&mut send, e.to_string(), false).await,
    };
    let signature = hex::encode(key.sign(&keys.signed_bytes(config.round)).to_bytes());
    send_secagg(
        &mut send,
        SecAggMessage::Keys(SignedKeys { keys, signature }),
    )
    .await?;
    let SecAggMessage::Peers { keys } = next_secagg(&mut recv, deadline).await? else {
        bail!("expected the peers' keys");
    };
    // Only advertisements signed by the node the round names for that id.
    let signed: Vec<secagg::AdvertiseKeys> = keys
        .into_iter()
        .filter(|k| signed_by_member(k, &sa.members, config.round))
        .map(|k| k.keys)
        .collect();
    let shares = match client.share_keys(&signed) {
        Ok(s) => s,
        Err(e) => return fail(&mut send, e.to_string(), false).await,
    };
    send_secagg(&mut send, SecAggMessage::Shares { shares }).await?;
    #[cfg(feature = "adversary")]
    if let Some(vanish) = &training.vanish {
        tracing::warn!("VANISHING after sharing keys (test build)");
        vanish();
        let _ = send.reset(9u32.into());
        bail!("vanished after sharing keys");
    }
    let SecAggMessage::Shares { shares: mine } = next_secagg(&mut recv, deadline).await? else {
        bail!("expected the neighbours' shares");
    };
    let update = match trained.await {
        Ok(u) => u,
        Err(e) => return fail(&mut send, e, false).await,
    };
    // With differential privacy every step weighs the same (the noise is
    // calibrated to a mean of equals).
    let weight = match round.privacy {
        Some(_) => 1.0,
        None => (update.samples as f64 / sa.weight_scale.max(1.0)).min(1.0) as f32,
    };
    let mut values = match round.privacy {
        Some(p) => privatize(&round.global.0, &update.parameters, p, weight)?,
        None => update.parameters.clone(),
    };
    // The weighted step (not the parameters: steps are small, so they
    // quantize finely within ±clip), then the weight.
    for (v, g) in values.iter_mut().zip(&round.global.0) {
        *v = if round.privacy.is_some() {
            *v - g
        } else {
            (*v - g) * weight
        };
    }
    #[cfg(feature = "adversary")]
    if let Some(poison) = training.poison {
        let zero = vec![0.0; n];
        poison_update(poison, &zero, &mut values, round.round);
    }
    values.push(weight);
    let input = match client.masked_input(&mine, &values) {
        Ok(m) => m,
        Err(e) => return fail(&mut send, e.to_string(), false).await,
    };
    let masked = SecAggMessage::Masked {
        input,
        samples: update.samples as u64,
        loss: update.loss,
    };
    send_secagg(&mut send, masked).await?;
    let SecAggMessage::Unmask { survivors, dropped } = next_secagg(&mut recv, deadline).await?
    else {
        bail!("expected the unmasking request");
    };
    let unmasking = match client.unmask(&survivors, &dropped) {
        Ok(u) => u,
        Err(e) => return fail(&mut send, e.to_string(), false).await,
    };
    send_secagg(&mut send, SecAggMessage::Unmasking { unmasking }).await?;
    let _ = send.finish();
    let _ = send.stopped().await;
    Ok(())
}

/// Whether `k` is signed by the node `members` names for its id.
pub(crate) fn signed_by_member(k: &SignedKeys, members: &[NodeId], round: u64) -> bool {
    let Some(node) = members.get(k.keys.id as usize) else {
        return false;
    };
    let Ok(public) = iroh::PublicKey::from_bytes(node.as_bytes()) else {
        return false;
    };
    let Some(sig) = hex::decode(&k.signature)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
    else {
        return false;
    };
    public
        .verify(
            &k.keys.signed_bytes(round),
            &iroh::Signature::from_bytes(&sig),
        )
        .is_ok()
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
        Poison::Half => params
            .iter_mut()
            .zip(global)
            .for_each(|(p, g)| *p = g + 0.5 * (*p - g)),
        Poison::Random => {
            let mut rng = tessera_train::Rng::new(u64::from(round) ^ 0x5eed);
            params
                .iter_mut()
                .for_each(|p| *p = (rng.uniform() * 2.0 - 1.0) as f32);
        }
    }
}
