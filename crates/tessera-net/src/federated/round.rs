//! One provider's plain round on its job stream, as the gateway drives it:
//! send the round, wait for the commitment (by the round's deadline), ask
//! for the reveal, check that the result opens the commitment. Task rounds
//! and canary rounds both run on this.

use std::time::Duration;

use iroh::endpoint::{RecvStream, SendStream};
use tessera_protocol::{
    read_frame_sized, write_frame, Frame, JobKind, JobRequest, TrainCommit, TrainDone,
};

use super::pool::Trainer;

/// How long a committed provider has to reveal.
const REVEAL_DEADLINE: Duration = Duration::from_secs(30);

/// A provider that committed, waiting for the reveal.
pub(crate) struct Committed {
    /// Who committed.
    pub trainer: Trainer,
    send: SendStream,
    recv: RecvStream,
    commit: TrainCommit,
    /// Bytes on the wire so far (both directions).
    pub bytes: u64,
}

/// Send one provider its round and wait for its commitment.
pub(crate) async fn commit_phase(
    trainer: Trainer,
    job: JobRequest,
) -> Result<Committed, (Trainer, String)> {
    let deadline = match &job.kind {
        JobKind::TrainRound(r) => r.deadline_ms,
        JobKind::Inference { .. } | JobKind::DilocoStep(_) => 0,
    };
    let left = Duration::from_millis(deadline.saturating_sub(tessera_core::now_ms()));
    let conn = trainer.conn.clone();
    let attempt = async move {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let sent = write_frame(&mut send, &Frame::JobRequest(job))
            .await
            .map_err(|e| e.to_string())?;
        match read_frame_sized(&mut recv).await {
            Ok(Some((Frame::TrainCommit(commit), got))) => {
                Ok((send, recv, commit, (sent + got) as u64))
            }
            Ok(Some((Frame::JobError(e), _))) => Err(format!("failed: {}", e.message)),
            Ok(other) => Err(format!(
                "sent {} instead of a commitment",
                other.as_ref().map_or("nothing", |(f, _)| f.kind())
            )),
            Err(e) => Err(format!("garbage on the round's stream: {e}")),
        }
    };
    match tokio::time::timeout(left, attempt).await {
        Ok(Ok((send, recv, commit, bytes))) => Ok(Committed {
            trainer,
            send,
            recv,
            commit,
            bytes,
        }),
        Ok(Err(reason)) => Err((trainer, reason)),
        Err(_) => Err((trainer, "no commitment by the round's deadline".into())),
    }
}

/// Ask a committed provider to reveal; its result and the bytes moved.
pub(crate) async fn reveal_phase(mut c: Committed) -> (Committed, Result<TrainDone, String>) {
    let attempt = async {
        c.bytes += write_frame(&mut c.send, &Frame::Reveal)
            .await
            .map_err(|e| e.to_string())? as u64;
        match read_frame_sized(&mut c.recv).await {
            Ok(Some((Frame::TrainDone(done), got))) => {
                c.bytes += got as u64;
                Ok(*done)
            }
            Ok(other) => Err(format!(
                "sent {} instead of its result",
                other.as_ref().map_or("nothing", |(f, _)| f.kind())
            )),
            Err(e) => Err(format!("garbage instead of its result: {e}")),
        }
    };
    let result = match tokio::time::timeout(REVEAL_DEADLINE, attempt).await {
        Ok(r) => r,
        Err(_) => Err("no reveal within its deadline".into()),
    };
    (c, result)
}

/// Whether a revealed result is the committed one and as announced.
pub(crate) fn opens(c: &Committed, round: u32, done: &TrainDone) -> Result<(), String> {
    let commitment = hex::decode(&c.commit.commitment)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or("a commitment that is not 32 bytes of hex")?;
    let nonce = hex::decode(&done.nonce)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or("a nonce that is not 32 bytes of hex")?;
    if done.samples != c.commit.samples || done.loss.to_bits() != c.commit.loss.to_bits() {
        return Err("revealed a sample count or loss other than committed".into());
    }
    if done.samples == 0 || done.samples > c.trainer.offer.samples {
        return Err(format!(
            "claims {} samples; its Hello announced {}",
            done.samples, c.trainer.offer.samples
        ));
    }
    let opened = tessera_train::verify::Commitment(commitment).opens(
        u64::from(round),
        &nonce,
        &done.parameters.0,
        done.samples as usize,
        done.loss,
    );
    if !opened {
        return Err("the revealed update does not open its commitment".into());
    }
    Ok(())
}
