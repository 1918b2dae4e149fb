//! The provider side: dial gateways, introduce ourselves, serve jobs.
//!
//! A provider dials every gateway it was given and those it learns through
//! discovery (so it works behind NAT: it only accepts gossip), keeps the session alive with heartbeats, and serves
//! each bi-stream the gateway opens as one job on the local scheduler. A
//! lost session is redialled with backoff; a reset job stream drops the
//! job's event receiver, which cancels it in the scheduler.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::{Endpoint, EndpointId};
use tessera_core::{GenerationRequest, NodeId, Token};
use tessera_engine::{Event, SchedulerHandle, SubmitError, WrapUp};
use tessera_protocol::{
    read_frame, write_frame, Frame, Heartbeat, Hello, JobDone, JobError, JobKind, JobProof,
    ModelOffer, Receipt, ALPN, PROTOCOL_VERSION,
};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::admission::Admission;
use crate::discovery::Discovery;
use crate::node::{node_id, Ticket};
use crate::receipt;

/// Where a provider's jobs run: the engine's scheduler, or for the gateway
/// load benchmark a [`crate::synthetic::SyntheticRunner`].
pub trait JobRunner: Send + Sync + 'static {
    /// Queue a job; the receiver yields tokens then one `Done` or `Error`,
    /// and dropping it cancels the job; the [`WrapUp`] ends it early with
    /// its proof and `Done` (a runner that cannot may ignore it).
    fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<(UnboundedReceiver<Event>, WrapUp), SubmitError>;
    /// Jobs running now.
    fn active(&self) -> usize;
    /// Jobs that can run at once.
    fn max_sequences(&self) -> usize;
    /// Prefix-cache entries evicted since the last call (their tags).
    fn take_evicted(&self) -> Vec<String> {
        Vec::new()
    }
    /// Prompt tokens reused from kept prefixes, and in all, so far.
    fn prefix_reuse(&self) -> (u64, u64) {
        (0, 0)
    }
}

impl JobRunner for SchedulerHandle {
    fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<(UnboundedReceiver<Event>, WrapUp), SubmitError> {
        SchedulerHandle::submit_with_wrap_up(self, request)
    }
    fn active(&self) -> usize {
        SchedulerHandle::active(self)
    }
    fn max_sequences(&self) -> usize {
        SchedulerHandle::max_sequences(self)
    }
    fn take_evicted(&self) -> Vec<String> {
        SchedulerHandle::take_evicted(self)
    }
    fn prefix_reuse(&self) -> (u64, u64) {
        SchedulerHandle::prefix_reuse(self)
    }
}

/// The job runner of a provider that only trains: it serves no model, so
/// no inference job reaches a runner (the provider refuses them by model
/// hash first), and it reports no slots.
pub struct NoInference;

impl JobRunner for NoInference {
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

/// Who signs this session's receipts, and for which gateway.
struct Signer {
    key: iroh::SecretKey,
    gateway: NodeId,
}

/// What a provider offers and to whom.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    /// Gateways to serve from the start.
    pub gateways: Vec<Ticket>,
    /// Models it serves, at what price and context.
    pub offers: Vec<ModelOffer>,
    /// One line about the machine, for the gateway's directory.
    pub hardware: String,
    /// Most gateways to serve at once, configured and discovered together.
    pub max_gateways: usize,
    /// The network operator's key (from the tickets given): every gateway
    /// must show its certificate. Without one, only the given gateways are
    /// served, never discovered ones (see [`crate::admission`]).
    pub admission: Option<Admission>,
    /// Training data it trains on for federated tasks, if any.
    pub training: Option<Arc<crate::federated::client::TrainingData>>,
    /// Compute it offers for DiLoCo tasks, if any.
    pub compute: Option<Arc<crate::diloco::worker::Compute>>,
}

/// Serve jobs for every configured gateway, and for gateways learnt
/// through `discovery` up to `max_gateways` in all, until the process ends.
pub async fn run(
    endpoint: Endpoint,
    handle: Arc<dyn JobRunner>,
    config: ProviderConfig,
    discovery: Option<Discovery>,
) {
    let shared = Shared {
        endpoint,
        handle,
        config,
        generated: Arc::default(),
        serving: Arc::default(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for ticket in shared.config.gateways.clone() {
        if let Ok(mut s) = shared.serving.lock() {
            s.insert(ticket.id);
        }
        tasks.spawn(serve_gateway(shared.clone(), ticket, None));
    }
    let Some(discovery) = discovery else {
        while tasks.join_next().await.is_some() {}
        return;
    };
    // Gateways refused, each logged once with the reason.
    let mut refused: HashSet<EndpointId> = HashSet::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (ticket, certificate) in discovery.gateway_offers() {
            if shared.serving.lock().is_ok_and(|s| s.contains(&ticket.id)) {
                continue;
            }
            let verdict = match &shared.config.admission {
                Some(admission) => admission.check(&node_id(&ticket.id), certificate.as_deref()),
                None => Err(format!(
                    "gateway {} was discovered, and this provider serves only the gateways it \
                     was given (their tickets name no network operator)",
                    node_id(&ticket.id).short()
                )),
            };
            if let Err(reason) = verdict {
                if refused.insert(ticket.id) {
                    tracing::warn!(%reason, "not serving a discovered gateway");
                }
                continue;
            }
            refused.remove(&ticket.id);
            let new = shared.serving.lock().is_ok_and(|mut s| {
                s.len() < shared.config.max_gateways.max(1) && s.insert(ticket.id)
            });
            if new {
                tracing::info!(gateway = %ticket.id.fmt_short(), "serving a discovered gateway");
                tasks.spawn(serve_gateway(
                    shared.clone(),
                    ticket,
                    Some(discovery.clone()),
                ));
            }
        }
        while tasks.try_join_next().is_some() {}
    }
}

/// What every gateway session of one provider shares.
#[derive(Clone)]
struct Shared {
    endpoint: Endpoint,
    handle: Arc<dyn JobRunner>,
    config: ProviderConfig,
    /// Tokens generated, for the tok/s in heartbeats.
    generated: Arc<AtomicU64>,
    /// Gateways with a session loop running.
    serving: Arc<Mutex<HashSet<EndpointId>>>,
}

/// Keep a session with one gateway, redialling with backoff. A configured
/// gateway is served for ever; a discovered one until its announcements
/// stop while it is unreachable.
async fn serve_gateway(shared: Shared, mut ticket: Ticket, discovered: Option<Discovery>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        match session(&shared, &ticket).await {
            Ok(()) => tracing::info!(gateway = %ticket.id.fmt_short(), "session ended"),
            Err(e) => {
                tracing::warn!(gateway = %ticket.id.fmt_short(), error = %e, "session failed")
            }
        }
        if let Some(d) = &discovered {
            match d.gateways().into_iter().find(|t| t.id == ticket.id) {
                Some(fresh) => ticket = fresh,
                None => {
                    tracing::info!(gateway = %ticket.id.fmt_short(), "gateway no longer announced");
                    if let Ok(mut s) = shared.serving.lock() {
                        s.remove(&ticket.id);
                    }
                    return;
                }
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection to one gateway, from Hello to the connection's end.
async fn session(shared: &Shared, ticket: &Ticket) -> anyhow::Result<()> {
    let Shared {
        endpoint,
        handle,
        config,
        generated,
        ..
    } = shared;
    let conn = endpoint
        .connect(ticket.endpoint_addr(), ALPN)
        .await
        .map_err(|e| anyhow!("cannot reach gateway: {e}"))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| anyhow!("control stream: {e}"))?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        models: config.offers.clone(),
        slots: handle.max_sequences(),
        hardware: config.hardware.clone(),
        software: format!("tessera {}", env!("CARGO_PKG_VERSION")),
        training: config.training.as_ref().map(|t| t.offer()),
        compute: config.compute.as_ref().map(|c| c.offer()),
    };
    write_frame(&mut send, &Frame::Hello(hello)).await?;
    let gateway = node_id(&conn.remote_id());
    let (heartbeat_ms, certificate) = match read_frame(&mut recv).await? {
        Some(Frame::Welcome {
            heartbeat_ms,
            certificate,
            ..
        }) => (heartbeat_ms.clamp(100, 60_000), certificate),
        Some(Frame::Refused { reason }) => bail!("the gateway refused us: {reason}"),
        other => bail!(
            "expected Welcome, got {}",
            other.as_ref().map_or("the end of the stream", Frame::kind)
        ),
    };
    // Serve only a gateway of our network, for as long as it stays one.
    let admitted = || match &config.admission {
        Some(a) => a.check(&gateway, certificate.as_deref()),
        None => Ok(()),
    };
    if let Err(reason) = admitted() {
        conn.close(4u32.into(), b"not certified by this network's operator");
        bail!("not serving this gateway: {reason}");
    }
    tracing::info!(gateway = %gateway, "joined gateway");
    let beats = {
        let conn = conn.clone();
        let admission = config.admission.clone();
        let certificate = certificate.clone();
        let handle = handle.clone();
        let generated = generated.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), generated.load(Ordering::Relaxed));
            loop {
                tokio::time::sleep(Duration::from_millis(heartbeat_ms)).await;
                if let Some(Err(reason)) = admission
                    .as_ref()
                    .map(|a| a.check(&gateway, certificate.as_deref()))
                {
                    tracing::warn!(%reason, "leaving a gateway no longer certified");
                    conn.close(
                        4u32.into(),
                        b"no longer certified by this network's operator",
                    );
                    return;
                }
                let now = (Instant::now(), generated.load(Ordering::Relaxed));
                let tok_s = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
                last = now;
                let active = handle.active();
                let beat = Heartbeat {
                    active,
                    free_slots: handle.max_sequences().saturating_sub(active),
                    tok_s,
                    evicted: handle.take_evicted(),
                    reused_tokens: handle.prefix_reuse().0,
                    prompt_tokens: handle.prefix_reuse().1,
                };
                if write_frame(&mut send, &Frame::Heartbeat(beat))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let signer = Signer {
        key: endpoint.secret_key().clone(),
        gateway,
    };
    let result = serve_jobs(&conn, handle, config, generated, signer).await;
    beats.abort();
    result
}

async fn serve_jobs(
    conn: &Connection,
    handle: &Arc<dyn JobRunner>,
    config: &ProviderConfig,
    generated: &Arc<AtomicU64>,
    signer: Signer,
) -> anyhow::Result<()> {
    let signer = Arc::new(signer);
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return Err(anyhow!("connection closed: {e}")),
        };
        let (handle, offers, generated, signer) = (
            handle.clone(),
            config.offers.clone(),
            generated.clone(),
            signer.clone(),
        );
        let training = config.training.clone();
        let compute = config.compute.clone();
        tokio::spawn(async move {
            let served = serve_job(
                send,
                recv,
                &handle,
                &offers,
                training.as_ref(),
                compute.as_ref(),
                &generated,
                &signer,
            );
            if let Err(e) = served.await {
                tracing::debug!(error = %e, "job stream ended early");
            }
        });
    }
}

/// Run one job: read its request, stream its tokens, end with JobDone or
/// JobError. Returns early (cancelling the job) if the gateway goes away.
#[allow(clippy::too_many_arguments)]
async fn serve_job(
    mut send: SendStream,
    mut recv: RecvStream,
    handle: &Arc<dyn JobRunner>,
    offers: &[ModelOffer],
    training: Option<&Arc<crate::federated::client::TrainingData>>,
    compute: Option<&Arc<crate::diloco::worker::Compute>>,
    generated: &AtomicU64,
    signer: &Signer,
) -> anyhow::Result<()> {
    let job = match read_frame(&mut recv).await {
        Ok(Some(Frame::JobRequest(job))) => job,
        Ok(_) => {
            let e = JobError {
                message: "expected a JobRequest".into(),
                retryable: false,
            };
            write_frame(&mut send, &Frame::JobError(e)).await?;
            return Ok(());
        }
        Err(e) => {
            tracing::warn!(error = %e, "garbage on a job stream");
            let _ = send.reset(1u32.into());
            return Ok(());
        }
    };
    let job_id = job.job_id;
    let (model_sha256, generation) = match job.kind {
        JobKind::Inference {
            model_sha256,
            generation,
        } => (model_sha256, generation),
        JobKind::TrainRound(round) => {
            return crate::federated::client::serve_round(send, recv, *round, training, &signer.key)
                .await
        }
        JobKind::DilocoStep(step) => {
            return crate::diloco::worker::serve_step(send, recv, *step, compute).await
        }
    };
    let Some(offer) = offers.iter().find(|o| o.sha256 == model_sha256) else {
        let e = JobError {
            message: format!("this provider does not serve model {model_sha256}"),
            retryable: true,
        };
        write_frame(&mut send, &Frame::JobError(e)).await?;
        return Ok(());
    };
    // What the API enforces, enforced again: a gateway is a stranger too.
    let stops_ok = generation.stop.len() <= tessera_core::generation::MAX_STOP_SEQUENCES
        && generation
            .stop
            .iter()
            .all(|s| !s.is_empty() && s.len() <= tessera_core::generation::MAX_STOP_BYTES);
    if !stops_ok {
        let e = JobError {
            message: "too many or too long stop sequences".into(),
            retryable: false,
        };
        write_frame(&mut send, &Frame::JobError(e)).await?;
        return Ok(());
    }
    let prompt_sha256 = receipt::tokens_sha256(&generation.prompt);
    let prompt_tokens = generation.prompt.len() as u64;
    let sampling = generation.sampling.clone();
    let mut output: Vec<Token> = Vec::new();
    let mut proof: Option<JobProof> = None;
    let (mut events, wrap_up) = match handle.submit(generation) {
        Ok(submitted) => submitted,
        Err(e) => {
            let retryable = matches!(e, SubmitError::Busy);
            write_frame(
                &mut send,
                &Frame::JobError(JobError {
                    message: e.to_string(),
                    retryable,
                }),
            )
            .await?;
            return Ok(());
        }
    };
    // The gateway may cancel the job (its client went away): then the
    // engine wraps it up, and its proof and receipt follow as usual. The
    // read is made once and polled across events, so no frame is torn.
    let cancel = read_frame(&mut recv);
    tokio::pin!(cancel);
    let mut watching = true;
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            f = &mut cancel, if watching => {
                watching = false;
                match f {
                    Ok(Some(Frame::Cancel)) => wrap_up.now(),
                    Ok(None) => {}
                    Ok(Some(other)) => tracing::debug!(?other, "unexpected frame on a job stream"),
                    // The gateway reset the stream: the job is cancelled
                    // (dropping `events` tells the scheduler).
                    Err(_) => return Ok(()),
                }
                continue;
            }
        };
        let Some(event) = event else { break };
        let frame = match event {
            Event::Token(t) => {
                generated.fetch_add(1, Ordering::Relaxed);
                output.push(t.token);
                Frame::Tokens { tokens: vec![t] }
            }
            Event::Proof { tokens, proof: p } => {
                proof = Some(JobProof { tokens, proof: p });
                continue;
            }
            Event::Done {
                finish_reason,
                usage,
                text,
            } => {
                let proof_sha256 = proof.as_ref().map(|p| receipt::proof_sha256(&sampling, p));
                let r = Receipt {
                    job_id: job_id.clone(),
                    gateway: signer.gateway,
                    provider: node_id(&signer.key.public()),
                    model_sha256: model_sha256.clone(),
                    prompt_sha256: prompt_sha256.clone(),
                    output_sha256: receipt::tokens_sha256(&output),
                    prompt_tokens,
                    completion_tokens: u64::from(usage.completion_tokens),
                    price: offer.price,
                    issued_ms: tessera_core::now_ms(),
                    proof_sha256,
                };
                Frame::JobDone(JobDone {
                    finish_reason,
                    usage,
                    text,
                    receipt: Some(receipt::sign(&r, &signer.key)),
                    proof: proof.take(),
                })
            }
            Event::Error(e) => Frame::JobError(JobError {
                message: e.to_string(),
                retryable: false,
            }),
        };
        let last = !matches!(frame, Frame::Tokens { .. });
        // A failed write means the gateway reset the stream: returning drops
        // `events`, which cancels the job in the scheduler.
        write_frame(&mut send, &frame).await?;
        if last {
            let _ = send.finish();
            // Keep the stream open until the gateway has read everything.
            let _ = send.stopped().await;
            return Ok(());
        }
    }
    bail!("the engine stopped mid-job")
}
