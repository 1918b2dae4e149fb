//! Misbehaving peers against a real gateway endpoint on loopback: garbage,
//! wrong protocol versions and unknown models are refused, logged, and
//! leave the gateway serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use iroh::SecretKey;
use tessera_backend::ServedModel;
use tessera_core::Token;
use tessera_engine::{ChatMessage, EngineError, Model, ModelInfo};
use tessera_net::directory::Directory;
use tessera_net::node::{self, Ticket};
use tessera_net::Gateway;
use tessera_protocol::{read_frame, write_frame, Frame, Hello, ModelOffer, ALPN, PROTOCOL_VERSION};

/// The model the test gateway serves: the default model's hash.
const SHA: &str = tessera_models::DEFAULT_MODEL.sha256;

/// An iroh endpoint on 127.0.0.1 accepting `alpns`.
async fn loopback(alpns: Vec<Vec<u8>>) -> iroh::Endpoint {
    node::bind(SecretKey::generate(), "127.0.0.1:0".parse().unwrap(), alpns)
        .await
        .unwrap()
}

fn echo_info() -> ModelInfo {
    ModelInfo {
        name: "echo".into(),
        n_vocab: 2,
        n_embd: 1,
        n_ctx_train: 64,
        eog_tokens: vec![],
    }
}

async fn gateway() -> (Gateway, Ticket) {
    let endpoint = node::bind_gateway(
        SecretKey::generate(),
        "127.0.0.1:0".parse().unwrap(),
        vec![ALPN.to_vec()],
    )
    .await
    .unwrap();
    let ticket = Ticket::of(&endpoint, None);
    let info = echo_info();
    let model = ServedModel {
        id: "m".into(),
        sha256: SHA.into(),
        tokenizer: Arc::new(EchoModel(info)),
        context_length: 2048,
        providers: 0,
        prices: None,
    };
    let gw = Gateway::new(endpoint, vec![model], Arc::new(Directory::default()));
    tokio::spawn(gw.clone().accept());
    (gw, ticket)
}

/// A fresh peer's connection to the gateway (the endpoint must outlive it).
async fn dial(ticket: &Ticket) -> (iroh::Endpoint, iroh::endpoint::Connection) {
    let ep = loopback(vec![]).await;
    let conn = ep.connect(ticket.endpoint_addr(), ALPN).await.unwrap();
    (ep, conn)
}

fn hello(version: u8, sha: &str) -> Frame {
    Frame::Hello(Hello {
        protocol_version: version,
        models: vec![ModelOffer {
            sha256: sha.into(),
            alias: "m".into(),
            context_length: 2048,
            price: Default::default(),
        }],
        slots: 2,
        hardware: "test".into(),
        software: "test".into(),
        training: None,
        compute: None,
    })
}

fn listed(gw: &Gateway) -> usize {
    gw.directory().describe().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_hello_closes_that_connection_only() {
    let (gw, ticket) = gateway().await;
    let (_ep, conn) = dial(&ticket).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(b"\x00\xffGET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
    assert!(
        closed.is_ok(),
        "the gateway should drop a peer that sends garbage"
    );
    assert_eq!(listed(&gw), 0);

    // An oversized frame header is garbage too.
    let (_ep, conn) = dial(&ticket).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[b'T', PROTOCOL_VERSION, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .is_ok());

    // The gateway still welcomes a well-behaved provider afterwards.
    let (_ep, conn) = dial(&ticket).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &hello(PROTOCOL_VERSION, SHA))
        .await
        .unwrap();
    let answer = read_frame(&mut recv).await.unwrap();
    assert!(matches!(answer, Some(Frame::Welcome { .. })), "{answer:?}");
    for _ in 0..50 {
        if listed(&gw) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(listed(&gw), 1);

    // Garbage on the control stream after Welcome drops the provider.
    send.write_all(b"not a frame at all").await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .is_ok());
    for _ in 0..50 {
        if listed(&gw) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(listed(&gw), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_version_and_unknown_models_are_refused_with_a_reason() {
    let (gw, ticket) = gateway().await;
    for (frame, expect) in [
        (hello(PROTOCOL_VERSION + 1, SHA), "protocol version"),
        (hello(PROTOCOL_VERSION, &"0".repeat(64)), "unknown model"),
        // The file the default model was before Q8_0: told how to update.
        (
            hello(PROTOCOL_VERSION, tessera_models::SMOLLM2_Q4_1.sha256),
            "run `tessera models pull smollm2-135m-instruct`",
        ),
    ] {
        let (_ep, conn) = dial(&ticket).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        write_frame(&mut send, &frame).await.unwrap();
        match read_frame(&mut recv).await {
            Ok(Some(Frame::Refused { reason })) => assert!(reason.contains(expect), "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .is_ok());
    }
    assert_eq!(listed(&gw), 0);
}

/// A two-token vocabulary: the "model" always predicts token 1, which
/// renders as "x". Enough to run the scheduler behind a real provider, and
/// a tokenizer for the gateway tests (which send no jobs).
struct Echo;

impl tessera_engine::Engine for Echo {
    fn decode(
        &mut self,
        batch: &[tessera_engine::BatchEntry],
        _: bool,
        out: &mut tessera_engine::BatchOutput,
    ) -> Result<(), EngineError> {
        out.logits.clear();
        for _ in batch.iter().filter(|e| e.output) {
            out.logits.extend([0.0, 5.0]);
        }
        Ok(())
    }
    fn clear_sequence(&mut self, _: tessera_engine::SeqId) {}
    fn max_sequences(&self) -> usize {
        2
    }
    fn max_batch(&self) -> usize {
        64
    }
    fn context_per_sequence(&self) -> usize {
        64
    }
}

struct EchoModel(ModelInfo);

impl Model for EchoModel {
    fn info(&self) -> &ModelInfo {
        &self.0
    }
    fn apply_chat_template(&self, _: &[ChatMessage]) -> Result<String, EngineError> {
        Ok(String::new())
    }
    fn tokenize(&self, _: &str, _: bool) -> Result<Vec<Token>, EngineError> {
        Ok(vec![0])
    }
    fn token_bytes(&self, t: Token) -> Vec<u8> {
        if t == 1 {
            b"x".to_vec()
        } else {
            vec![]
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_survives_garbage_on_job_streams_and_keeps_serving() {
    use tessera_core::{GenerationRequest, SamplingParams};
    use tessera_engine::{Scheduler, SchedulerConfig};
    use tessera_protocol::{JobKind, JobRequest};

    // A bare gateway endpoint that this test drives by hand.
    let gw = loopback(vec![ALPN.to_vec()]).await;
    let ticket = Ticket::of(&gw, None);
    let info = echo_info();
    let (_scheduler, handle) = Scheduler::spawn(
        Arc::new(EchoModel(info)),
        SchedulerConfig::default(),
        || Ok(Box::new(Echo) as Box<dyn tessera_engine::Engine>),
    )
    .unwrap();
    let provider_ep = loopback(vec![]).await;
    let config = tessera_net::ProviderConfig {
        gateways: vec![ticket],
        offers: vec![ModelOffer {
            sha256: SHA.into(),
            alias: "echo".into(),
            context_length: 64,
            price: Default::default(),
        }],
        hardware: "test".into(),
        max_gateways: 1,
        admission: None,
        training: None,
        compute: None,
    };
    tokio::spawn(tessera_net::provider::run(
        provider_ep.clone(),
        Arc::new(handle.clone()),
        config,
        None,
    ));

    let conn = gw.accept().await.unwrap().await.unwrap();
    let (mut ctl_send, mut ctl_recv) = conn.accept_bi().await.unwrap();
    assert!(matches!(
        read_frame(&mut ctl_recv).await.unwrap(),
        Some(Frame::Hello(_))
    ));
    write_frame(
        &mut ctl_send,
        &Frame::Welcome {
            gateway: "test".into(),
            heartbeat_ms: 200,
            certificate: None,
        },
    )
    .await
    .unwrap();

    // Garbage, then an oversized header, each on its own job stream: the
    // provider drops that stream and nothing else.
    for bad in [
        b"garbage!garbage!".to_vec(),
        vec![b'T', PROTOCOL_VERSION, 0xff, 0xff, 0xff, 0xff],
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&bad).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv))
            .await
            .unwrap();
        assert!(
            !matches!(answer, Ok(Some(Frame::Tokens { .. }))),
            "garbage got an answer: {answer:?}"
        );
    }

    // A well-formed job on the same connection is still served in full.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let job = JobRequest {
        job_id: "j".into(),
        kind: JobKind::Inference {
            model_sha256: SHA.into(),
            generation: GenerationRequest {
                prompt: vec![0],
                sampling: SamplingParams::greedy(),
                max_tokens: Some(3),
                stop: vec![],
                top_logprobs: 0,
                ignore_eos: false,
                cache: None,
            },
        },
    };
    write_frame(&mut send, &Frame::JobRequest(job))
        .await
        .unwrap();
    let mut tokens = 0;
    loop {
        match read_frame(&mut recv).await.unwrap() {
            Some(Frame::Tokens { tokens: t }) => tokens += t.len(),
            Some(Frame::JobDone(done)) => {
                assert_eq!(done.usage.completion_tokens, 3);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(tokens, 3);
    // And no slot leaked on the provider.
    for _ in 0..50 {
        if handle.active() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(handle.active(), 0);
    provider_ep.close().await;
}

/// Slowloris: 100 strangers (fresh keys) connect, and each opens its
/// control stream and sends a frame header announcing 4 MiB, then one
/// byte, then nothing. The gateway holds at most its handshake bound of
/// them (the oldest are closed to make room), and a provider that says
/// Hello at once is welcomed in the middle of the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_flood_holds_a_bounded_number_of_handshakes() {
    let (gw, ticket) = gateway().await;
    let mut attackers = Vec::new();
    for _ in 0..100 {
        let (ep, conn) = dial(&ticket).await;
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let mut header = vec![b'T', PROTOCOL_VERSION];
        header.extend_from_slice(&(4u32 * 1024 * 1024).to_be_bytes());
        header.push(b'{');
        send.write_all(&header).await.unwrap();
        attackers.push((ep, conn, send, recv));
    }
    // The honest provider, dialled last.
    let (_ep, conn) = dial(&ticket).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &hello(PROTOCOL_VERSION, SHA))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut recv))
        .await
        .expect("the honest provider waited for its Welcome")
        .unwrap();
    assert!(matches!(answer, Some(Frame::Welcome { .. })), "{answer:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = attackers
        .iter()
        .filter(|(_, c, _, _)| c.close_reason().is_none())
        .count();
    assert!(
        open <= tessera_net::gateway::MAX_HANDSHAKES,
        "the gateway holds {open} silent handshakes (bound {})",
        tessera_net::gateway::MAX_HANDSHAKES
    );
    assert_eq!(listed(&gw), 1);
}
