//! The provider protocol (DESIGN.md §4), independent of the transport.
//!
//! A provider dials a gateway over iroh with ALPN [`ALPN`] and opens a
//! **control stream**: it sends [`Frame::Hello`] (protocol version, models by
//! sha256, slots, hardware, software), the gateway answers
//! [`Frame::Welcome`] or [`Frame::Refused`] with a reason, and the provider
//! then sends a [`Frame::Heartbeat`] every few seconds. Each **job** is one
//! bi-directional stream opened by the gateway: [`Frame::JobRequest`], then
//! [`Frame::Tokens`] frames, then exactly one [`Frame::JobDone`] or
//! [`Frame::JobError`]. The gateway may send [`Frame::Cancel`] on the job
//! stream (its client went away): the provider stops and ends with a
//! `JobDone` whose proof covers the tokens generated so far, so that work
//! is still paid. Resetting the stream cancels the job without that.
//!
//! A **training round** (federated learning, `tessera-net::federated`) is a
//! job too: [`JobKind::TrainRound`] carries the global parameters, the
//! local recipe, a deadline and the round's price; the provider trains on
//! its own data and answers [`Frame::TrainCommit`] (a commitment to its
//! result, never the data); once every sampled provider has committed, the
//! gateway sends [`Frame::Reveal`] and the provider answers
//! [`Frame::TrainDone`] with the parameters that open the commitment. A
//! In a SecAgg+ round ([`TrainRound::secagg`]) the commitment is replaced
//! by the protocol's four stages ([`SecAggMessage`]): keys, shares, masked
//! step, unmasking, each relayed by the gateway, which learns only the sum.
//! A provider that trains says so in `Hello` ([`TrainingOffer`]: its sample
//! count and data shape, its price per round) and may serve no model.
//!
//! **Auditors** dial a gateway with ALPN [`AUDIT_ALPN`] and the same framing:
//! [`Frame::AuditorHello`] on the control stream, answered `Welcome` (only
//! when the gateway's operator named the auditor's node id) or `Refused`;
//! then each audit is one stream opened by the gateway:
//! [`Frame::AuditRequest`], answered by exactly one [`Frame::AuditDone`] or
//! [`Frame::JobError`]. Audit frames are only valid on that ALPN.
//!
//! **Blobs between peers** ([`BLOBS_ALPN`]): anyone may dial a node that
//! serves blobs (a gateway) and ask on a stream with [`Frame::Fetch`]; the
//! answer is a [`Frame::Blob`] saying what comes ([`BlobKind::Model`]:
//! sha256 and size) and then the bytes as binary blobs of at most
//! [`FETCH_CHUNK`] each, or a [`Frame::JobError`]. The fetcher checks the
//! sha256 before it keeps anything, so it need not trust the peer.
//!
//! On the wire every frame is a 6-byte header — the magic byte `T`, the
//! protocol version, the payload length as a big-endian `u32` — followed by
//! the JSON payload. A frame over [`MAX_FRAME_BYTES`], a wrong magic or
//! version, or a payload that does not parse is a [`FrameError`]: the reader
//! drops the peer, nothing panics.

use serde::{Deserialize, Serialize};
use tessera_core::audit::{AuditJob, Evidence};
use tessera_core::train::secagg::{AdvertiseKeys, EncryptedShare, MaskedInput, Unmasking};
use tessera_core::train::{InnerWork, ModelSpec, Recipe, Weights};
use tessera_core::{
    FinishReason, GenerationRequest, NodeId, Price, Proof, Token, TokenEvent, Usage,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The ALPN of the provider protocol.
pub const ALPN: &[u8] = b"tessera/1";
/// The ALPN of auditor processes serving a gateway.
pub const AUDIT_ALPN: &[u8] = b"tessera/audit/1";
/// The ALPN of content-addressed blobs served to peers (models today).
pub const BLOBS_ALPN: &[u8] = b"tessera/blobs/1";
/// Bytes per binary blob when a file is sent in pieces after
/// [`Frame::Fetch`].
pub const FETCH_CHUNK: usize = 1 << 20;
/// The version in every frame header and in `Hello`. 2: a job request
/// carries its kind. 3: `Cancel`. 4: training rounds. 5: DiLoCo outer
/// steps and binary blobs.
pub const PROTOCOL_VERSION: u8 = 5;
/// Largest payload accepted; a longer frame is garbage or an attack.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
const MAGIC: u8 = b'T';

/// A model a provider serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelOffer {
    /// sha256 of the GGUF file: the model's identity.
    pub sha256: String,
    /// The provider's friendly name for it.
    pub alias: String,
    /// Positions (prompt + output) one job may use.
    pub context_length: usize,
    /// What the provider charges for this model (micro-credits per token).
    #[serde(default)]
    pub price: Price,
}

/// The provider's introduction on the control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the provider.
    pub protocol_version: u8,
    /// What it serves.
    pub models: Vec<ModelOffer>,
    /// Jobs it decodes at once.
    pub slots: usize,
    /// A one-line description of the machine (CPU, threads, accelerator).
    pub hardware: String,
    /// `tessera x.y.z`.
    pub software: String,
    /// What it offers for federated training, when it holds training data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingOffer>,
    /// What it offers for DiLoCo training (compute on text it holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<ComputeOffer>,
}

/// A provider's compute for DiLoCo tasks, as it describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeOffer {
    /// BLAKE3 (hex) of the training text it holds (`tessera_train::corpus`).
    pub corpus: String,
    /// What it charges for one inner step (micro-credits).
    pub price_per_step: u64,
}

/// One worker's share of a DiLoCo outer step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DilocoStep {
    /// The task's id.
    pub task: String,
    /// BLAKE3 (hex) of the training text the shard is a range of.
    pub corpus: String,
    /// What to compute.
    pub work: InnerWork,
    /// Milliseconds since the epoch by which the commitment must arrive.
    pub deadline_ms: u64,
    /// What one verified inner step pays (micro-credits).
    pub price_per_step: u64,
}

/// A worker's commitment to its outer step (see `tessera_train::diloco`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DilocoCommit {
    /// `tessera_train::diloco::commitment` (hex).
    pub commitment: String,
    /// Tokens it trained on.
    pub tokens: u64,
    /// Its loss at every inner step.
    pub losses: Vec<f32>,
    /// The Merkle root of its states (hex).
    pub root: String,
    /// Milliseconds it spent computing.
    pub compute_ms: u64,
}

/// What a binary blob that follows on the stream holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "blob", rename_all = "snake_case")]
pub enum BlobKind {
    /// A whole checkpoint: f32 little-endian parameters, addressed by
    /// their BLAKE3.
    Checkpoint {
        /// BLAKE3 (hex).
        hash: String,
    },
    /// The int8 change from checkpoint `base` to checkpoint `hash`.
    Change {
        /// What it applies to (hex).
        base: String,
        /// What it makes (hex).
        hash: String,
    },
    /// A worker's int8 pseudo-gradient, revealed (opens its commitment
    /// with `nonce`, hex).
    PseudoGradient {
        /// The commitment's nonce.
        nonce: String,
    },
    /// A committed state opened for an audit: leaf `index`, the losses
    /// since the previous leaf, its Merkle proof (hex).
    State {
        /// The leaf.
        index: u32,
        /// Losses of its segment.
        losses: Vec<f32>,
        /// Sibling hashes.
        proof: Vec<String>,
    },
    /// A model file (GGUF), addressed by its sha256, sent as binary blobs
    /// of at most [`FETCH_CHUNK`] bytes until `size`.
    Model {
        /// sha256 of the whole file (hex).
        sha256: String,
        /// The peer's name for it.
        alias: String,
        /// Bytes in all.
        size: u64,
    },
}

/// What a peer is asked for on [`BLOBS_ALPN`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fetch {
    /// A model the peer serves, by alias or sha256 (hex).
    Model {
        /// Alias or sha256.
        name: String,
    },
}
/// A provider's training data as it describes it (never the data itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingOffer {
    /// Labelled samples it holds (the weight of its updates).
    pub samples: u64,
    /// Values per sample.
    pub inputs: usize,
    /// Classes its labels range over.
    pub classes: usize,
    /// What it charges for one round (micro-credits).
    pub price: u64,
}

/// One round of a federated task, sent to one provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainRound {
    /// The task's id.
    pub task: String,
    /// The round's number (from 1).
    pub round: u32,
    /// The model.
    pub spec: ModelSpec,
    /// The global parameters to start from.
    pub global: Weights,
    /// How to train locally (its seed is this provider's for this round).
    pub recipe: Recipe,
    /// Milliseconds since the epoch by which the commitment must arrive.
    pub deadline_ms: u64,
    /// What the round pays when verified (micro-credits).
    pub price: u64,
    /// SecAgg+: the provider's part in the round's secure aggregation (then
    /// no commitment: the round goes on in [`Frame::SecAgg`] messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secagg: Option<SecAggRound>,
    /// Differential privacy: what the provider does to its step before it
    /// leaves (clip, then Gaussian noise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<RoundPrivacy>,
    /// A canary round: train on these samples (`train.csv`'s format),
    /// which the gateway supplies and re-executes, instead of the
    /// provider's own data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
}

/// A provider's part in a round's SecAgg+ (see `tessera_train::secagg`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecAggRound {
    /// Its id in the round (its place in `members`).
    pub id: u32,
    /// The node ids of the round's providers, by id: each advertisement is
    /// checked against its sender's node key.
    pub members: Vec<NodeId>,
    /// Neighbours each provider shares its secrets with (k).
    pub neighbours: usize,
    /// Shares that rebuild a secret (t).
    pub threshold: usize,
    /// Values are clipped to ±clip before quantization.
    pub clip: f32,
    /// Each step is weighted by samples ÷ this (the round's largest sample
    /// count), and the weight summed with it.
    pub weight_scale: f64,
}

/// Differential privacy in a round: clip the step to L2 norm `clip`, then
/// add N(0, std²) to every value.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundPrivacy {
    /// L2 norm the step is clipped to.
    pub clip: f64,
    /// Standard deviation of the noise each value gets.
    pub std: f64,
}

/// A SecAgg+ advertisement signed with its sender's node key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignedKeys {
    /// The keys.
    pub keys: AdvertiseKeys,
    /// ed25519 over `keys.signed_bytes(round)` (hex).
    pub signature: String,
}

/// One stage of a round's SecAgg+, on its job stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum SecAggMessage {
    /// Provider → gateway: its keys.
    Keys(SignedKeys),
    /// Gateway → provider: every advertisement that arrived in time.
    Peers {
        /// The advertisements.
        keys: Vec<SignedKeys>,
    },
    /// Provider → gateway: its encrypted shares for its neighbours;
    /// gateway → provider: the shares its neighbours sent it.
    Shares {
        /// The shares.
        shares: Vec<EncryptedShare>,
    },
    /// Provider → gateway: its masked step.
    Masked {
        /// The masked, quantized vector.
        input: MaskedInput,
        /// Samples it trained on.
        samples: u64,
        /// Its mean training loss.
        loss: f64,
    },
    /// Gateway → provider: who sent a masked step, who dropped.
    Unmask {
        /// Survivors.
        survivors: Vec<u32>,
        /// Dropped after sharing keys.
        dropped: Vec<u32>,
    },
    /// Provider → gateway: its shares of the survivors' seeds and the
    /// dropped providers' keys.
    Unmasking {
        /// The shares.
        unmasking: Unmasking,
    },
}

/// A provider's commitment to its round's result (before it is revealed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainCommit {
    /// `tessera_train::verify::commitment` of the parameters, sample count
    /// and loss, under the nonce revealed with them (hex).
    pub commitment: String,
    /// Samples it trained on.
    pub samples: u64,
    /// Its mean training loss.
    pub loss: f64,
}

/// A provider's round result, revealed after every commitment arrived.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainDone {
    /// Its parameters after local training.
    pub parameters: Weights,
    /// The commitment's nonce (hex, 32 bytes).
    pub nonce: String,
    /// Samples it trained on (as committed).
    pub samples: u64,
    /// Its mean training loss (as committed).
    pub loss: f64,
    /// SGD steps it took.
    pub steps: u64,
}

/// Periodic load report on the control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Jobs running.
    pub active: usize,
    /// Slots free.
    pub free_slots: usize,
    /// Tokens per second the provider measured over the last interval.
    pub tok_s: f64,
    /// Prefix-cache entries (by the tag of the job that left them) evicted
    /// since the last heartbeat, so the gateway stops counting on them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evicted: Vec<String>,
    /// Prompt tokens served from kept prefixes since the provider started,
    /// and prompt tokens in all (its prefix cache's hit rate).
    #[serde(default)]
    pub reused_tokens: u64,
    /// See `reused_tokens`.
    #[serde(default)]
    pub prompt_tokens: u64,
}

/// An auditor's introduction on its control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditorHello {
    /// [`PROTOCOL_VERSION`] of the auditor.
    pub protocol_version: u8,
    /// sha256 of every model file it audits with.
    pub models: Vec<String>,
    /// Audits it runs at once (one engine each).
    pub slots: usize,
    /// A one-line description of the machine.
    pub hardware: String,
    /// `tessera x.y.z`.
    pub software: String,
}

/// One audit sent to an auditor on its own stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRequest {
    /// sha256 of the model the answer claims.
    pub model_sha256: String,
    /// A new provider's probation audit: the auditor runs it after every
    /// other audit it holds.
    pub probation: bool,
    /// The answer to re-check.
    pub job: AuditJob,
}

/// A job sent to a provider on its own stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Unique per part of an answer (the answer's id and the part's number).
    pub job_id: String,
    /// What to do.
    #[serde(flatten)]
    pub kind: JobKind,
}

/// The kinds of work a provider does. New kinds (training rounds) are new
/// variants; a provider answers a kind it does not know with a `JobError`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobKind {
    /// Generate tokens with a model.
    Inference {
        /// sha256 of the model file to use.
        model_sha256: String,
        /// Prompt, sampling and limits.
        generation: GenerationRequest,
    },
    /// Train one round of a federated task on the provider's own data.
    TrainRound(Box<TrainRound>),
    /// Compute one worker's share of a DiLoCo outer step.
    DilocoStep(Box<DilocoStep>),
}

/// The end of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobDone {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Tokens of the prompt and generated.
    pub usage: Usage,
    /// Text held back until the end (see `tessera_engine::text`).
    pub text: String,
    /// The provider's signed account of the job.
    #[serde(default)]
    pub receipt: Option<Signed>,
    /// What an auditor checks the answer by (its hash is in the receipt).
    #[serde(default)]
    pub proof: Option<JobProof>,
}

/// Every token a provider generated for a job (a final end-of-generation
/// token included) with the logprobs and activation commitments of
/// `tessera_engine::commit`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobProof {
    /// Every generated token.
    pub tokens: Vec<Token>,
    /// Their logprobs and activation commitments.
    pub proof: Proof,
}

/// What a provider did for one job (one part of an answer), as it signs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The job id of the `JobRequest` (unique per part of an answer).
    pub job_id: String,
    /// The gateway that asked (node id, hex in JSON).
    pub gateway: NodeId,
    /// The provider that served (node id, hex in JSON).
    pub provider: NodeId,
    /// The model it ran.
    pub model_sha256: String,
    /// sha256 of the prompt tokens and of the generated tokens (each token
    /// as 4 little-endian bytes).
    pub prompt_sha256: String,
    /// See `prompt_sha256`.
    pub output_sha256: String,
    /// Tokens of the prompt it was given.
    pub prompt_tokens: u64,
    /// Tokens it generated.
    pub completion_tokens: u64,
    /// Its price.
    pub price: Price,
    /// Milliseconds since the Unix epoch.
    pub issued_ms: u64,
    /// sha256 of the job's proof with the sampling settings and seed it was
    /// generated with (`tessera_net::receipt::proof_sha256`), when the
    /// provider sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof_sha256: Option<String>,
}

/// Signed bytes: `body` (JSON) and ed25519 signatures over exactly them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// The signed JSON.
    pub body: String,
    /// The provider's signature (hex).
    pub signature: String,
    /// The gateway's countersignature (hex), once it accepted the receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub countersignature: Option<String>,
}

/// Why a job failed on the provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// What went wrong (for logs; never shown to clients as is).
    pub message: String,
    /// True when another provider may well succeed (overload, shutdown).
    pub retryable: bool,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// Provider → gateway, first on the control stream.
    Hello(Hello),
    /// Gateway → provider: accepted.
    Welcome {
        /// The gateway's node id.
        gateway: String,
        /// How often to send heartbeats.
        heartbeat_ms: u64,
        /// The network operator's signed certificate of this gateway
        /// (`tessera-net::admission`); providers of a network serve only
        /// gateways showing one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        certificate: Option<String>,
    },
    /// Gateway → provider: refused, and why.
    Refused {
        /// Why.
        reason: String,
    },
    /// Provider → gateway, periodically on the control stream.
    Heartbeat(Heartbeat),
    /// Gateway → provider, first on a job stream.
    JobRequest(JobRequest),
    /// Provider → gateway: generated tokens.
    Tokens {
        /// The tokens, in order.
        tokens: Vec<TokenEvent>,
    },
    /// Provider → gateway: the job ended.
    JobDone(JobDone),
    /// Provider → gateway: the job failed.
    JobError(JobError),
    /// Gateway → provider, on a job stream: stop now and end with a
    /// `JobDone` (and its proof) for the tokens generated so far.
    Cancel,
    /// Provider → gateway, on a training round's stream: the commitment.
    TrainCommit(TrainCommit),
    /// Gateway → provider, on a training round's stream: every sampled
    /// provider committed; reveal.
    Reveal,
    /// Provider → gateway, on a training round's stream: the result.
    TrainDone(Box<TrainDone>),
    /// Either way, on a SecAgg+ round's stream: one stage's message.
    SecAgg(Box<SecAggMessage>),
    /// Worker → gateway, on a DiLoCo step's stream: the checkpoint it
    /// holds (so the gateway sends only the change).
    Have {
        /// BLAKE3 (hex).
        #[serde(default)]
        checkpoint: Option<String>,
    },
    /// Either way, on a DiLoCo step's stream: a binary blob follows
    /// ([`write_blob`]).
    Blob(Box<BlobKind>),
    /// Worker → gateway: its commitment.
    DilocoCommit(Box<DilocoCommit>),
    /// Gateway → worker: open committed state `index` (an audit).
    OpenState {
        /// The leaf.
        index: u32,
    },
    /// Anyone → a peer serving blobs, first on a stream of [`BLOBS_ALPN`].
    Fetch(Fetch),
    /// Auditor → gateway, first on the control stream of [`AUDIT_ALPN`].
    AuditorHello(AuditorHello),
    /// Gateway → auditor, first on an audit stream.
    AuditRequest(Box<AuditRequest>),
    /// Auditor → gateway: what the audit found.
    AuditDone {
        /// Every figure the verdict is drawn from.
        evidence: Evidence,
    },
}

impl Frame {
    /// The frame's kind, for logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Refused { .. } => "Refused",
            Frame::Heartbeat(_) => "Heartbeat",
            Frame::JobRequest(_) => "JobRequest",
            Frame::Tokens { .. } => "Tokens",
            Frame::JobDone(_) => "JobDone",
            Frame::JobError(_) => "JobError",
            Frame::Cancel => "Cancel",
            Frame::TrainCommit(_) => "TrainCommit",
            Frame::Reveal => "Reveal",
            Frame::TrainDone(_) => "TrainDone",
            Frame::SecAgg(_) => "SecAgg",
            Frame::Have { .. } => "Have",
            Frame::Blob(_) => "Blob",
            Frame::DilocoCommit(_) => "DilocoCommit",
            Frame::OpenState { .. } => "OpenState",
            Frame::Fetch(_) => "Fetch",
            Frame::AuditorHello(_) => "AuditorHello",
            Frame::AuditRequest(_) => "AuditRequest",
            Frame::AuditDone { .. } => "AuditDone",
        }
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// Not our magic byte: garbage or another protocol.
    #[error("not a Tessera frame (magic byte {0:#04x})")]
    BadMagic(u8),
    /// Another protocol version.
    #[error("protocol version {0} is not supported (this node speaks {PROTOCOL_VERSION})")]
    Version(u8),
    /// Longer than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    /// The payload is not a frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("the stream ended in the middle of a frame")]
    Truncated,
}

/// Write one frame; returns its size on the wire (header included).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<usize, FrameError> {
    let payload = serde_json::to_vec(frame).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if payload.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(payload.len()));
    }
    let mut buf = Vec::with_capacity(6 + payload.len());
    buf.push(MAGIC);
    buf.push(PROTOCOL_VERSION);
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(&payload);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(buf.len())
}

/// Read one frame; `Ok(None)` when the stream ended cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    Ok(read_frame_sized(r).await?.map(|(frame, _)| frame))
}

/// [`read_frame`], with the frame's size on the wire (header included).
pub async fn read_frame_sized<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(Frame, usize)>, FrameError> {
    let mut header = [0u8; 6];
    let mut got = 0;
    while got < header.len() {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    if header[0] != MAGIC {
        return Err(FrameError::BadMagic(header[0]));
    }
    if header[1] != PROTOCOL_VERSION {
        return Err(FrameError::Version(header[1]));
    }
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    // Memory grows with the bytes that arrive, not with the length a peer
    // announces: a header claiming 4 MiB followed by one byte costs 64 KiB.
    let mut payload = Vec::with_capacity(len.min(64 * 1024));
    (&mut *r).take(len as u64).read_to_end(&mut payload).await?;
    if payload.len() < len {
        return Err(FrameError::Truncated);
    }
    serde_json::from_slice(&payload)
        .map(|frame| Some((frame, header.len() + len)))
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Most bytes a blob may hold.
pub const MAX_BLOB_BYTES: usize = 256 * 1024 * 1024;
const BLOB_MAGIC: u8 = b'B';

/// Write a binary blob (after a [`Frame::Blob`] saying what it is): the
/// magic byte `B`, the version, the length as a big-endian `u32`, the raw
/// bytes. Returns its size on the wire.
pub async fn write_blob<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> Result<usize, FrameError> {
    if bytes.len() > MAX_BLOB_BYTES {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    let mut header = Vec::with_capacity(6);
    header.push(BLOB_MAGIC);
    header.push(PROTOCOL_VERSION);
    header.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    w.write_all(&header).await?;
    w.write_all(bytes).await?;
    w.flush().await?;
    Ok(6 + bytes.len())
}

/// Read a binary blob of at most `max` bytes (and [`MAX_BLOB_BYTES`]).
pub async fn read_blob<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 6];
    r.read_exact(&mut header)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(e),
        })?;
    if header[0] != BLOB_MAGIC {
        return Err(FrameError::BadMagic(header[0]));
    }
    if header[1] != PROTOCOL_VERSION {
        return Err(FrameError::Version(header[1]));
    }
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if len > max.min(MAX_BLOB_BYTES) {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = Vec::with_capacity(len.min(1024 * 1024));
    (&mut *r).take(len as u64).read_to_end(&mut payload).await?;
    if payload.len() < len {
        return Err(FrameError::Truncated);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::SamplingParams;

    fn job() -> Frame {
        Frame::JobRequest(JobRequest {
            job_id: "j1".into(),
            kind: JobKind::Inference {
                model_sha256: "ab".repeat(32),
                generation: GenerationRequest {
                    prompt: vec![1, 2, 3],
                    sampling: SamplingParams {
                        temperature: 0.5,
                        seed: 9,
                        ..SamplingParams::default()
                    },
                    max_tokens: Some(4),
                    stop: vec!["\n".into()],
                    top_logprobs: 0,
                    ignore_eos: false,
                    cache: None,
                },
            },
        })
    }

    async fn roundtrip(bytes: Vec<u8>) -> Result<Option<Frame>, FrameError> {
        read_frame(&mut bytes.as_slice()).await
    }

    #[tokio::test]
    async fn frames_round_trip_in_order() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let frames = vec![
            job(),
            Frame::Tokens { tokens: vec![] },
            Frame::JobDone(JobDone {
                receipt: None,
                proof: None,
                finish_reason: FinishReason::Stop,
                usage: Usage::default(),
                text: "x".into(),
            }),
        ];
        for f in &frames {
            write_frame(&mut a, f).await.unwrap();
        }
        drop(a);
        for f in frames {
            assert_eq!(read_frame(&mut b).await.unwrap(), Some(f));
        }
        assert!(
            read_frame(&mut b).await.unwrap().is_none(),
            "clean end between frames"
        );
    }

    #[tokio::test]
    async fn garbage_wrong_version_oversized_and_truncated_frames_are_errors() {
        assert!(matches!(
            roundtrip(b"GET / HTTP/1.1\r\n".to_vec()).await,
            Err(FrameError::BadMagic(b'G'))
        ));
        assert!(matches!(
            roundtrip(vec![b'T', 9, 0, 0, 0, 2, b'{', b'}']).await,
            Err(FrameError::Version(9))
        ));
        assert!(matches!(
            roundtrip(vec![b'T', PROTOCOL_VERSION, 0xff, 0xff, 0xff, 0xff]).await,
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            roundtrip(vec![b'T', PROTOCOL_VERSION, 0, 0]).await,
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            roundtrip(vec![b'T', PROTOCOL_VERSION, 0, 0, 0, 10, b'{']).await,
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            roundtrip(vec![b'T', PROTOCOL_VERSION, 0, 0, 0, 3, b'{', b'x', b'}']).await,
            Err(FrameError::Malformed(_))
        ));
        let unknown = br#"{"type":"launch_missiles"}"#;
        let mut bytes = vec![b'T', PROTOCOL_VERSION, 0, 0, 0, unknown.len() as u8];
        bytes.extend_from_slice(unknown);
        assert!(matches!(
            roundtrip(bytes).await,
            Err(FrameError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn blobs_round_trip_and_bad_blobs_are_errors() {
        let mut buf = Vec::new();
        let n = write_blob(&mut buf, &[1, 2, 3]).await.unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(
            read_blob(&mut buf.as_slice(), 10).await.unwrap(),
            vec![1, 2, 3]
        );
        // Longer than the reader accepts.
        assert!(matches!(
            read_blob(&mut buf.as_slice(), 2).await,
            Err(FrameError::TooLarge(3))
        ));
        // Truncated, and a JSON frame where a blob should be.
        assert!(matches!(
            read_blob(&mut &buf[..7], 10).await,
            Err(FrameError::Truncated)
        ));
        let mut frame = Vec::new();
        write_frame(&mut frame, &Frame::Reveal).await.unwrap();
        assert!(matches!(
            read_blob(&mut frame.as_slice(), 1 << 20).await,
            Err(FrameError::BadMagic(b'T'))
        ));
    }
}
