//! The provider side: dial gateways, introduce ourselves, serve jobs.
//!
//! A provider never listens: it dials every gateway it was given (so it
//! works behind NAT), keeps the session alive with heartbeats, and serves
//! each bi-stream the gateway opens as one job on the local scheduler. A
//! lost session is redialled with backoff; a reset job stream drops the
//! job's event receiver, which cancels it in the scheduler.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::Endpoint;
use tessera_engine::{Event, SchedulerHandle, SubmitError};
use tessera_protocol::{
    read_frame, write_frame, Frame, Heartbeat, Hello, JobDone, JobError, ModelOffer, ALPN,
    PROTOCOL_VERSION,
};

use crate::node::Ticket;

/// What a provider offers and to whom.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub gateways: Vec<Ticket>,
    pub offers: Vec<ModelOffer>,
    /// One line about the machine, for the gateway's directory.
    pub hardware: String,
}

/// Serve jobs for every configured gateway until the process ends.
pub async fn run(endpoint: Endpoint, handle: SchedulerHandle, config: ProviderConfig) {
    let generated = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for ticket in config.gateways.clone() {
        let (endpoint, handle, config, generated) = (
            endpoint.clone(),
            handle.clone(),
            config.clone(),
            generated.clone(),
        );
        tasks.spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let started = Instant::now();
                match session(&endpoint, &ticket, &handle, &config, &generated).await {
                    Ok(()) => tracing::info!(gateway = %ticket.id.fmt_short(), "session ended"),
                    Err(e) => tracing::warn!(gateway = %ticket.id.fmt_short(), error = %e, "session failed"),
                }
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(200);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// One connection to one gateway, from Hello to the connection's end.
async fn session(
    endpoint: &Endpoint,
    ticket: &Ticket,
    handle: &SchedulerHandle,
    config: &ProviderConfig,
    generated: &Arc<AtomicU64>,
) -> anyhow::Result<()> {
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
    };
    write_frame(&mut send, &Frame::Hello(hello)).await?;
    let heartbeat_ms = match read_frame(&mut recv).await? {
        Some(Frame::Welcome {
            gateway,
            heartbeat_ms,
        }) => {
            tracing::info!(gateway = %gateway, "joined gateway");
            heartbeat_ms.clamp(100, 60_000)
        }
        Some(Frame::Refused { reason }) => bail!("the gateway refused us: {reason}"),
        other => bail!("expected Welcome, got {other:?}"),
    };
    let beats = {
        let handle = handle.clone();
        let generated = generated.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), generated.load(Ordering::Relaxed));
            loop {
                tokio::time::sleep(Duration::from_millis(heartbeat_ms)).await;
                let now = (Instant::now(), generated.load(Ordering::Relaxed));
                let tok_s = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
                last = now;
                let active = handle.active();
                let beat = Heartbeat {
                    active,
                    free_slots: handle.max_sequences().saturating_sub(active),
                    tok_s,
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
    let result = serve_jobs(&conn, handle, config, generated).await;
    beats.abort();
    result
}

async fn serve_jobs(
    conn: &Connection,
    handle: &SchedulerHandle,
    config: &ProviderConfig,
    generated: &Arc<AtomicU64>,
) -> anyhow::Result<()> {
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return Err(anyhow!("connection closed: {e}")),
        };
        let (handle, offers, generated) =
            (handle.clone(), config.offers.clone(), generated.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_job(send, recv, &handle, &offers, &generated).await {
                tracing::debug!(error = %e, "job stream ended early");
            }
        });
    }
}

/// Run one job: read its request, stream its tokens, end with JobDone or
/// JobError. Returns early (cancelling the job) if the gateway goes away.
async fn serve_job(
    mut send: SendStream,
    mut recv: RecvStream,
    handle: &SchedulerHandle,
    offers: &[ModelOffer],
    generated: &AtomicU64,
) -> anyhow::Result<()> {
    let job = match read_frame(&mut recv).await {
        Ok(Some(Frame::JobRequest(job))) => job,
        Ok(other) => {
            let e = JobError {
                message: format!("expected a JobRequest, got {other:?}"),
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
    if !offers.iter().any(|o| o.sha256 == job.model_sha256) {
        let e = JobError {
            message: format!("this provider does not serve model {}", job.model_sha256),
            retryable: true,
        };
        write_frame(&mut send, &Frame::JobError(e)).await?;
        return Ok(());
    }
    let mut events = match handle.submit(job.generation) {
        Ok(rx) => rx,
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
    while let Some(event) = events.recv().await {
        let frame = match event {
            Event::Token(t) => {
                generated.fetch_add(1, Ordering::Relaxed);
                Frame::Tokens { tokens: vec![t] }
            }
            Event::Done {
                finish_reason,
                usage,
                text,
            } => Frame::JobDone(JobDone {
                finish_reason,
                usage,
                text,
            }),
            Event::Provider(_) => continue,
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
