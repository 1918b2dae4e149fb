//! The gateway's side of a SecAgg+ round: relay the four stages, each
//! with a deadline, and unmask the sum (`tessera_train::secagg::Server`).
//!
//! Every provider's step arrives masked; the gateway learns the weighted
//! sum of the survivors' steps and their total weight, nothing else. A
//! provider that stops after sharing its keys (killed, cut off) is
//! unmasked out of the sum from its neighbours' shares, so the round
//! completes from the survivors. The round records, from the unmasking
//! messages it received, how many shares of each provider's two secrets
//! (self-mask seed, mask key) the gateway held: never the threshold of both.

use std::collections::BTreeMap;
use std::time::Duration;

use iroh::endpoint::{RecvStream, SendStream};
use tessera_core::train::Weights;
use tessera_core::NodeId;
use tessera_protocol::{
    read_frame_sized, write_frame, Frame, JobKind, JobRequest, RoundPrivacy, SecAggMessage,
    SecAggRound, TrainRound,
};
use tessera_train::secagg;

use super::client::signed_by_member;
use super::pool::Trainer;

/// How long each key stage waits (the masked step waits for the round's
/// training deadline).
pub(crate) const STAGE: Duration = Duration::from_secs(15);

/// One provider's stream in the round, while it keeps to the protocol.
struct Lane {
    trainer: Trainer,
    io: Option<(SendStream, RecvStream)>,
    bytes: u64,
}

impl Lane {
    async fn send(&mut self, m: SecAggMessage) {
        if let Some((send, _)) = self.io.as_mut() {
            match write_frame(send, &Frame::SecAgg(Box::new(m))).await {
                Ok(sent) => self.bytes += sent as u64,
                Err(_) => self.io = None,
            }
        }
    }

    /// The next SecAgg message by `deadline`; the lane closes on anything
    /// else.
    async fn next(&mut self, deadline: tokio::time::Instant) -> Option<SecAggMessage> {
        let (_, recv) = self.io.as_mut()?;
        match tokio::time::timeout_at(deadline, read_frame_sized(recv)).await {
            Ok(Ok(Some((Frame::SecAgg(m), got)))) => {
                self.bytes += got as u64;
                Some(*m)
            }
            _ => {
                if let Some((mut send, _)) = self.io.take() {
                    let _ = send.reset(1u32.into());
                }
                None
            }
        }
    }
}

/// What a SecAgg round produced.
pub(crate) struct Outcome {
    /// The survivors' weighted mean step, when the round unmasked.
    pub step: Result<Vec<f32>, String>,
    /// Survivors that sent their unmasking shares (paid when verified).
    pub completed: Vec<Trainer>,
    /// Mean training loss the survivors reported.
    pub train_loss: Option<f64>,
    /// Providers that stopped, and at which stage.
    pub dropped: BTreeMap<String, String>,
    /// Per provider: shares of its seed and of its key the gateway held.
    pub shares_held: BTreeMap<String, (usize, usize)>,
    /// The threshold t.
    pub threshold: usize,
    /// Bytes on the wire per provider.
    pub bytes_per_client: u64,
}

/// The round's settings for the providers in `chosen`.
pub(crate) struct Settings {
    pub task: String,
    pub round: u32,
    pub spec: tessera_core::train::ModelSpec,
    pub global: Vec<f32>,
    pub recipes: Vec<tessera_core::train::Recipe>,
    pub deadline_ms: u64,
    pub threshold: Option<usize>,
    pub clip: f32,
    pub privacy: Option<RoundPrivacy>,
}

/// Run one SecAgg+ round over `chosen`.
pub(crate) async fn round(s: Settings, chosen: &[Trainer]) -> Outcome {
    let n = chosen.len();
    let k = n.saturating_sub(1).max(1);
    let t = s.threshold.unwrap_or(k / 2 + 1).clamp(1, k);
    let members: Vec<NodeId> = chosen.iter().map(|c| c.node).collect();
    let weight_scale = chosen
        .iter()
        .map(|c| c.offer.samples)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let config = secagg::Config {
        round: u64::from(s.round),
        clients: (0..n as u32).collect(),
        neighbours: k,
        threshold: t,
        clip: s.clip,
        length: s.global.len() + 1,
    };
    let mut out = Outcome {
        step: Err("the round did not get far".into()),
        completed: Vec::new(),
        train_loss: None,
        dropped: BTreeMap::new(),
        shares_held: BTreeMap::new(),
        threshold: t,
        bytes_per_client: 0,
    };
    let mut server = match secagg::Server::new(config.clone()) {
        Ok(server) => server,
        Err(e) => {
            out.step = Err(e.to_string());
            return out;
        }
    };
    // Open every lane and send its round.
    let lanes = futures::future::join_all(chosen.iter().enumerate().map(|(j, t)| {
        let job = JobRequest {
            job_id: format!("{}-r{}-{}", s.task, s.round, t.node.short()),
            kind: JobKind::TrainRound(Box::new(TrainRound {
                task: s.task.clone(),
                round: s.round,
                spec: s.spec,
                global: Weights(s.global.clone()),
                recipe: s.recipes[j],
                deadline_ms: s.deadline_ms,
                price: t.offer.price,
                secagg: Some(SecAggRound {
                    id: j as u32,
                    members: members.clone(),
                    neighbours: k,
                    threshold: config.threshold,
                    clip: s.clip,
                    weight_scale,
                }),
                privacy: s.privacy,
                canary: None,
            })),
        };
        let trainer = t.clone();
        async move {
            let mut lane = Lane {
                bytes: 0,
                trainer: trainer.clone(),
                io: None,
            };
            if let Ok(Ok((mut send, recv))) =
                tokio::time::timeout(STAGE, trainer.conn.open_bi()).await
            {
                if let Ok(sent) = write_frame(&mut send, &Frame::JobRequest(job)).await {
                    lane.bytes = sent as u64;
                    lane.io = Some((send, recv));
                }
            }
            lane
        }
    }))
    .await;
    let mut lanes = lanes;
    let stage_end = || tokio::time::Instant::now() + STAGE;

    // Stage 1: keys, each signed by its sender's node key.
    let until = stage_end();
    let keys = futures::future::join_all(lanes.iter_mut().map(|l| l.next(until))).await;
    let mut signed = Vec::new();
    for (j, m) in keys.into_iter().enumerate() {
        match m {
            Some(SecAggMessage::Keys(k))
                if k.keys.id == j as u32 && signed_by_member(&k, &members, config.round) =>
            {
                signed.push(k)
            }
            _ => close(&mut lanes[j], &mut out.dropped, "no signed keys"),
        }
    }
    server.collect_keys(signed.iter().map(|k| k.keys.clone()).collect());
    // Stage 2: relay the keys; collect the encrypted shares.
    for l in lanes.iter_mut().filter(|l| l.io.is_some()) {
        l.send(SecAggMessage::Peers {
            keys: signed.clone(),
        })
        .await;
    }
    let until = stage_end();
    let sent = futures::future::join_all(lanes.iter_mut().map(|l| l.next(until))).await;
    let mut all_shares = Vec::new();
    for (j, m) in sent.into_iter().enumerate() {
        match m {
            // A provider sends only its own shares.
            Some(SecAggMessage::Shares { shares }) if shares.iter().all(|e| e.from == j as u32) => {
                all_shares.extend(shares)
            }
            _ => close(&mut lanes[j], &mut out.dropped, "no shares"),
        }
    }
    let relayed = server.collect_shares(all_shares);
    // Stage 3: hand each its neighbours' shares; collect the masked steps.
    for (j, l) in lanes.iter_mut().enumerate() {
        if l.io.is_some() {
            let shares = relayed
                .iter()
                .filter(|e| e.to == j as u32)
                .cloned()
                .collect();
            l.send(SecAggMessage::Shares { shares }).await;
        }
    }
    let until = tokio::time::Instant::now()
        + Duration::from_millis(s.deadline_ms.saturating_sub(tessera_core::now_ms()));
    let masked = futures::future::join_all(lanes.iter_mut().map(|l| l.next(until))).await;
    let (mut inputs, mut losses) = (Vec::new(), Vec::new());
    for (j, m) in masked.into_iter().enumerate() {
        match m {
            Some(SecAggMessage::Masked {
                input,
                samples,
                loss,
            }) if input.id == j as u32 => {
                inputs.push(input);
                losses.push((loss, samples));
            }
            _ => close(&mut lanes[j], &mut out.dropped, "no masked step"),
        }
    }
    let (survivors, dropped) = server.collect_inputs(inputs);
    let total: u64 = losses.iter().map(|(_, n)| n).sum();
    out.train_loss =
        (total > 0).then(|| losses.iter().map(|(l, n)| l * *n as f64).sum::<f64>() / total as f64);
    // Stage 4: ask the survivors for their shares.
    for &j in &survivors {
        lanes[j as usize]
            .send(SecAggMessage::Unmask {
                survivors: survivors.clone(),
                dropped: dropped.clone(),
            })
            .await;
    }
    let until = stage_end();
    let answers = futures::future::join_all(
        lanes
            .iter_mut()
            .enumerate()
            .filter(|(j, _)| survivors.contains(&(*j as u32)))
            .map(|(j, l)| async move { (j, l.next(until).await) }),
    )
    .await;
    let mut unmaskings = Vec::new();
    for (j, m) in answers {
        match m {
            Some(SecAggMessage::Unmasking { unmasking }) if unmasking.id == j as u32 => {
                // What the gateway now holds of each provider's secrets.
                for (owner, _) in &unmasking.seed_shares {
                    if let Some(c) = chosen.get(*owner as usize) {
                        out.shares_held.entry(c.node.to_string()).or_default().0 += 1;
                    }
                }
                for (owner, _) in &unmasking.key_shares {
                    if let Some(c) = chosen.get(*owner as usize) {
                        out.shares_held.entry(c.node.to_string()).or_default().1 += 1;
                    }
                }
                unmaskings.push(unmasking);
                out.completed.push(chosen[j].clone());
            }
            _ => close(&mut lanes[j], &mut out.dropped, "no unmasking shares"),
        }
    }
    out.step = server
        .finish(&unmaskings)
        .map_err(|e| e.to_string())
        .and_then(|a| {
            let weight = a.sum.last().copied().unwrap_or(0.0);
            if weight <= 0.0 {
                return Err("the survivors' weights sum to nothing".into());
            }
            Ok(a.sum[..a.sum.len() - 1]
                .iter()
                .map(|v| v / weight)
                .collect())
        });
    for l in lanes.iter_mut() {
        if let Some((mut send, _)) = l.io.take() {
            let _ = send.finish();
        }
    }
    out.bytes_per_client = lanes.iter().map(|l| l.bytes).sum::<u64>() / n.max(1) as u64;
    out
}

fn close(lane: &mut Lane, dropped: &mut BTreeMap<String, String>, why: &str) {
    if let Some((mut send, _)) = lane.io.take() {
        let _ = send.reset(1u32.into());
    }
    dropped
        .entry(lane.trainer.node.to_string())
        .or_insert_with(|| why.to_string());
}
