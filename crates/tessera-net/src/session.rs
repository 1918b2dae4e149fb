//! The gateway's side of a provider's session: the handshake and the
//! heartbeats on the control stream.
//!
//! A provider dials in and opens the control stream with `Hello`. The
//! gateway answers `Welcome` and lists it in the [`Directory`], or
//! `Refused` with the reason (protocol version, no model this gateway
//! serves — with advice when the model is one an earlier release served —,
//! no slot, or a price or context beyond [`OfferLimits`]). The session lasts while the control stream does; each
//! heartbeat keeps the provider routable.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use iroh::endpoint::{Connection, SendStream};
use tessera_backend::ServedModel;
use tessera_core::{NodeId, Price};
use tessera_protocol::{read_frame, write_frame, Frame, ModelOffer, PROTOCOL_VERSION};

use crate::directory::{Directory, Session};
use crate::federated::{Trainer, Trainers};

/// How often providers are asked to send a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Longest wait for a new connection's `Hello`.
const HELLO_DEADLINE: Duration = Duration::from_secs(10);

/// Most connections a gateway holds that have not finished their handshake
/// (a provider's or auditor's Hello): a flood of silent peers holds this
/// many at most, the oldest being closed to make room for each newcomer,
/// so a peer that says Hello at once always gets in.
pub const MAX_HANDSHAKES: usize = 64;

/// Connections still in their handshake, oldest first; a newcomer beyond
/// [`MAX_HANDSHAKES`] closes the oldest.
#[derive(Default)]
pub struct Handshakes {
    pending: std::sync::Mutex<std::collections::BTreeMap<u64, iroh::endpoint::Connection>>,
    next: std::sync::atomic::AtomicU64,
}

/// One connection's place among the handshakes, given up when dropped.
pub struct Pending {
    handshakes: Arc<Handshakes>,
    seq: u64,
}

impl Handshakes {
    /// `conn` starts its handshake (closing the oldest beyond the bound).
    pub fn begin(self: &Arc<Self>, conn: &iroh::endpoint::Connection) -> Pending {
        let seq = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let oldest = self.pending.lock().ok().and_then(|mut p| {
            let oldest = (p.len() >= MAX_HANDSHAKES)
                .then(|| p.pop_first().map(|(_, c)| c))
                .flatten();
            p.insert(seq, conn.clone());
            oldest
        });
        if let Some(c) = oldest {
            tracing::debug!("too many handshakes: closed the oldest");
            c.close(5u32.into(), b"too slow to say Hello");
        }
        Pending {
            handshakes: self.clone(),
            seq,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut p) = self.handshakes.pending.lock() {
            p.remove(&self.seq);
        }
    }
}

/// What a provider may announce: prices up to `max_price` (micro-credits
/// per token), a context up to the model's own. The router may go up to the
/// dearest price among eligible providers (raising the request's hold), so
/// one provider announcing absurd figures would take every client without a
/// price cap once honest providers are busy.
#[derive(Clone, Copy, Debug)]
pub struct OfferLimits {
    /// Dearest prompt and output prices accepted.
    pub max_price: Price,
    /// Dearest price of a training round accepted (micro-credits).
    pub max_round_price: u64,
}

impl Default for OfferLimits {
    /// 100× the default provider prices (20 and 80 per token).
    fn default() -> Self {
        OfferLimits {
            max_price: Price {
                input: 2_000,
                output: 8_000,
            },
            max_round_price: tessera_ledger::MICRO,
        }
    }
}

impl OfferLimits {
    /// Why a training offer is refused, if it is: no data, a shape beyond
    /// what a round can carry, a price above the limit.
    pub fn training_refusal(&self, t: &tessera_protocol::TrainingOffer) -> Option<String> {
        if t.samples == 0 || t.inputs == 0 || t.classes < 2 {
            return Some("a training offer needs samples, inputs and at least 2 classes".into());
        }
        if t.inputs > 1_000_000 || t.classes > 100_000 {
            return Some(format!(
                "training data of {} values and {} classes is beyond what a round carries",
                t.inputs, t.classes
            ));
        }
        if t.price > self.max_round_price {
            return Some(format!(
                "a round price of {} micro-credits is above this gateway's limit of {}",
                t.price, self.max_round_price
            ));
        }
        None
    }

    /// Why `offer` (of `model`) is refused, if it is.
    pub fn refusal(&self, offer: &ModelOffer, model: &ServedModel) -> Option<String> {
        let (p, max) = (offer.price, self.max_price);
        if p.input > max.input || p.output > max.output {
            return Some(format!(
                "price {}/{} (prompt/output micro-credits per token) is above this gateway's \
                 limit of {}/{}",
                p.input, p.output, max.input, max.output
            ));
        }
        if offer.context_length == 0 || offer.context_length > model.context_length {
            return Some(format!(
                "a context of {} positions is not one model {} has (1 to {})",
                offer.context_length, model.id, model.context_length
            ));
        }
        None
    }
}

/// Who the gateway is to its providers: its node id and the operator's
/// certificate of it (see [`crate::admission`]).
#[derive(Clone, Debug)]
pub struct GatewayIdentity {
    /// The gateway's node id.
    pub node: NodeId,
    /// Its certificate, shown in every `Welcome`.
    pub certificate: Option<String>,
}

/// Run one provider's session until its connection or control stream ends.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    directory: &Directory,
    trainers: &Trainers,
    workers: &crate::diloco::Workers,
    models: &[ServedModel],
    limits: &OfferLimits,
    gateway: &GatewayIdentity,
    conn: Connection,
    node: NodeId,
    pending: Pending,
) -> anyhow::Result<()> {
    let (mut send, mut recv) = tokio::time::timeout(HELLO_DEADLINE, conn.accept_bi())
        .await
        .map_err(|_| anyhow!("no control stream within {} s", HELLO_DEADLINE.as_secs()))?
        .map_err(|e| anyhow!("control stream: {e}"))?;
    let hello = match tokio::time::timeout(HELLO_DEADLINE, read_frame(&mut recv)).await {
        Ok(Ok(Some(Frame::Hello(h)))) => h,
        Ok(Ok(other)) => {
            conn.close(2u32.into(), b"expected Hello");
            return Err(anyhow!("expected Hello, got {}", describe(other.as_ref())));
        }
        Ok(Err(e)) => {
            conn.close(2u32.into(), b"bad frame");
            return Err(anyhow!("garbage instead of Hello: {e}"));
        }
        Err(_) => {
            conn.close(2u32.into(), b"no Hello");
            return Err(anyhow!("no Hello within {} s", HELLO_DEADLINE.as_secs()));
        }
    };
    // Said Hello: no longer among the handshakes a flood may crowd out.
    drop(pending);
    if hello.protocol_version != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version {} is not supported; this gateway speaks {PROTOCOL_VERSION}",
            hello.protocol_version
        );
        return refuse(&mut send, &conn, node, reason).await;
    }
    let known: Vec<ModelOffer> = hello
        .models
        .iter()
        .filter(|o| models.iter().any(|m| m.sha256 == o.sha256))
        .cloned()
        .collect();
    if let Some(t) = &hello.training {
        if let Some(reason) = limits.training_refusal(t) {
            return refuse(&mut send, &conn, node, reason).await;
        }
    }
    let trains = (hello.training.is_some() || hello.compute.is_some()) && hello.models.is_empty();
    if known.is_empty() && !trains {
        return refuse(&mut send, &conn, node, unknown_models(&hello.models)).await;
    }
    if hello.slots == 0 && !known.is_empty() {
        let reason = "a provider must offer at least one slot".to_string();
        return refuse(&mut send, &conn, node, reason).await;
    }
    let refusal = known.iter().find_map(|o| {
        let model = models.iter().find(|m| m.sha256 == o.sha256)?;
        limits.refusal(o, model)
    });
    if let Some(reason) = refusal {
        return refuse(&mut send, &conn, node, reason).await;
    }
    let welcome = Frame::Welcome {
        gateway: gateway.node.to_string(),
        heartbeat_ms: HEARTBEAT.as_millis() as u64,
        certificate: gateway.certificate.clone(),
    };
    write_frame(&mut send, &welcome).await?;
    let id = conn.stable_id() as u64;
    let serves = !known.is_empty();
    if serves {
        directory.join(Session {
            node,
            node_hex: node.to_string(),
            id,
            conn: Some(conn.clone()),
            offers: known,
            slots: hello.slots,
            hardware: hello.hardware,
        });
    }
    if let Some(offer) = hello.training {
        trainers.join(Trainer {
            node,
            session: id,
            conn: conn.clone(),
            offer,
        });
    }
    if let Some(offer) = hello.compute.clone() {
        workers.join(crate::diloco::Worker {
            node,
            session: id,
            conn: conn.clone(),
            offer,
        });
    }
    tracing::info!(provider = %node.short(), slots = hello.slots, trains = hello.training.is_some(), computes = hello.compute.is_some(), "provider joined");
    let result = loop {
        match read_frame(&mut recv).await {
            Ok(Some(Frame::Heartbeat(beat))) => {
                directory.heartbeat(&node, id, beat.tok_s);
                directory.cache_stats(&node, id, beat.reused_tokens, beat.prompt_tokens);
                if !beat.evicted.is_empty() {
                    directory.forget_prefixes(&node, &beat.evicted);
                }
            }
            Ok(Some(other)) => {
                conn.close(2u32.into(), b"unexpected frame");
                break Err(anyhow!(
                    "unexpected frame on the control stream: {}",
                    describe(Some(&other))
                ));
            }
            Ok(None) => break Ok(()),
            Err(e) => {
                conn.close(2u32.into(), b"bad frame");
                break Err(anyhow!("bad control frame: {e}"));
            }
        }
    };
    if serves {
        directory.leave(&node, id);
    }
    trainers.leave(&node, id);
    workers.leave(&node, id);
    tracing::info!(provider = %node.short(), "provider left");
    result
}

/// A frame's kind, for logs (never its contents).
pub(crate) fn describe(frame: Option<&Frame>) -> &'static str {
    frame.map_or("the end of the stream", Frame::kind)
}

/// Why none of `offers` is served here, with advice for a model an
/// earlier release served under the same alias.
fn unknown_models(offers: &[ModelOffer]) -> String {
    let hashes: Vec<&str> = offers.iter().map(|o| o.sha256.as_str()).collect();
    let advice = hashes.iter().find_map(|h| {
        tessera_models::SUPERSEDED
            .iter()
            .find(|(old, _, _)| old == h)
            .map(|(_, _, advice)| *advice)
    });
    match advice {
        Some(advice) => format!("model {} is no longer served: {advice}", hashes.join(", ")),
        None => format!("unknown model hash(es) {hashes:?}; this gateway serves other models"),
    }
}

/// Tell a provider why it is refused, then close its connection.
async fn refuse(
    send: &mut SendStream,
    conn: &Connection,
    node: NodeId,
    reason: String,
) -> anyhow::Result<()> {
    tracing::warn!(provider = %node.short(), %reason, "refusing provider");
    let _ = write_frame(
        send,
        &Frame::Refused {
            reason: reason.clone(),
        },
    )
    .await;
    let _ = send.finish();
    // Give the frame time to arrive before the connection goes.
    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    conn.close(3u32.into(), b"refused");
    Err(anyhow!("refused: {reason}"))
}
