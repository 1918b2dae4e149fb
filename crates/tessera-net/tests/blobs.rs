//! Models between peers over real iroh connections on loopback: a gateway
//! serves its model files by alias or sha256; a fetcher keeps only bytes
//! that hash to what it asked for, whatever a lying peer sends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use iroh::{Endpoint, SecretKey};
use sha2::{Digest, Sha256};
use tessera_net::blobs::{fetch_model, BlobServer, FetchError, ServedFile};
use tessera_net::directory::Directory;
use tessera_net::node::{self, Ticket};
use tessera_net::Gateway;
use tessera_protocol::{
    read_frame, write_blob, write_frame, BlobKind, Frame, ALPN, BLOBS_ALPN, FETCH_CHUNK,
};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp() -> TempDir {
    let d = std::env::temp_dir().join(format!("tessera-blobs-{}", tessera_core::unique_u64()));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

async fn client() -> Endpoint {
    node::bind(
        SecretKey::generate(),
        "127.0.0.1:0".parse().unwrap(),
        vec![],
    )
    .await
    .unwrap()
}

fn files_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// A gateway serving one 2.5-MiB file (several pieces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_serves_its_model_by_alias_or_hash_and_nothing_else() {
    let dir = temp();
    let bytes: Vec<u8> = (0..(2 * FETCH_CHUNK + FETCH_CHUNK / 2))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let path = dir.0.join("model.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let endpoint = node::bind_gateway(
        SecretKey::generate(),
        "127.0.0.1:0".parse().unwrap(),
        vec![ALPN.to_vec(), BLOBS_ALPN.to_vec()],
    )
    .await
    .unwrap();
    let ticket = Ticket::of(&endpoint, None);
    let gateway = Gateway::new(endpoint, vec![], Arc::new(Directory::default())).with_blobs(
        BlobServer::new(vec![ServedFile {
            sha256: sha256.clone(),
            alias: "tiny".into(),
            path,
            size: bytes.len() as u64,
        }]),
    );
    tokio::spawn(gateway.clone().accept());
    let me = client().await;
    let out = temp();
    let mut seen = 0;
    for name in ["tiny", sha256.as_str(), &sha256.to_uppercase()] {
        let got = fetch_model(&me, &ticket, name, None, &out.0, 1 << 30, &mut |d, _| {
            seen = d
        })
        .await
        .unwrap();
        assert_eq!(got.sha256, sha256);
        assert_eq!(got.alias, "tiny");
        assert_eq!(std::fs::read(&got.path).unwrap(), bytes, "{name}");
        assert_eq!(seen, bytes.len() as u64);
    }
    // The pieces were removed with the `Fetched` values.
    assert_eq!(files_in(&out.0), 0);
    // Not served here.
    match fetch_model(&me, &ticket, "other", None, &out.0, 1 << 30, &mut |_, _| {}).await {
        Err(FetchError::Refused { message, retryable }) => {
            assert!(message.contains("no model"), "{message}");
            assert!(!retryable);
        }
        other => panic!("{other:?}"),
    }
    // Served, but not the hash the fetcher needs: nothing is kept.
    let want = "ab".repeat(32);
    match fetch_model(
        &me,
        &ticket,
        "tiny",
        Some(&want),
        &out.0,
        1 << 30,
        &mut |_, _| {},
    )
    .await
    {
        Err(FetchError::Bad(m)) => assert!(m.contains("not the model asked for"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Too big for the fetcher.
    match fetch_model(&me, &ticket, "tiny", None, &out.0, 1000, &mut |_, _| {}).await {
        Err(FetchError::Bad(m)) => assert!(m.contains("at most 1000"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(files_in(&out.0), 0);
    // Garbage on a blob stream gets an error frame; the gateway goes on.
    let conn = me
        .connect(ticket.endpoint_addr(), BLOBS_ALPN)
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"GET /model HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let _ = send.finish();
    assert!(matches!(
        read_frame(&mut recv).await,
        Ok(Some(Frame::JobError(_)))
    ));
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &Frame::Cancel).await.unwrap();
    let _ = send.finish();
    assert!(matches!(
        read_frame(&mut recv).await,
        Ok(Some(Frame::JobError(_)))
    ));
    conn.close(0u32.into(), b"");
    let again = fetch_model(&me, &ticket, "tiny", None, &out.0, 1 << 30, &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(again.sha256, sha256);
}

/// How a lying peer answers.
#[derive(Clone, Copy, Debug)]
enum Lie {
    /// Other bytes than the hash it announces.
    OtherBytes,
    /// Fewer bytes than announced, then the stream ends.
    Short,
    /// More bytes than announced.
    Long,
    /// An announced size the stream never reaches, in bigger pieces.
    OversizedPiece,
}

async fn liar(lie: Lie, sha256: String, bytes: Vec<u8>) -> Ticket {
    let endpoint = node::bind_gateway(
        SecretKey::generate(),
        "127.0.0.1:0".parse().unwrap(),
        vec![BLOBS_ALPN.to_vec()],
    )
    .await
    .unwrap();
    let ticket = Ticket::of(&endpoint, None);
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let (sha256, bytes) = (sha256.clone(), bytes.clone());
            tokio::spawn(async move {
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let _ = read_frame(&mut recv).await;
                let half = bytes.len() / 2;
                let (size, sha256) = match lie {
                    // The first half, honestly hashed, and then more.
                    Lie::Long => (half as u64, hex::encode(Sha256::digest(&bytes[..half]))),
                    Lie::OversizedPiece => (half as u64, sha256),
                    _ => (bytes.len() as u64, sha256),
                };
                let kind = BlobKind::Model {
                    sha256,
                    alias: "liar".into(),
                    size,
                };
                write_frame(&mut send, &Frame::Blob(Box::new(kind)))
                    .await
                    .unwrap();
                match lie {
                    Lie::OtherBytes => {
                        let mut other = bytes.clone();
                        other[5] ^= 1;
                        write_blob(&mut send, &other).await.unwrap();
                    }
                    Lie::Short => {
                        write_blob(&mut send, &bytes[..bytes.len() / 2])
                            .await
                            .unwrap();
                    }
                    Lie::Long => {
                        write_blob(&mut send, &bytes[..half]).await.unwrap();
                        write_blob(&mut send, &bytes[half..]).await.unwrap();
                    }
                    Lie::OversizedPiece => {
                        write_blob(&mut send, &bytes).await.unwrap();
                    }
                }
                let _ = send.finish();
                let _ = send.stopped().await;
            });
        }
    });
    ticket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_gets_nothing_kept() {
    let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let me = client().await;
    let out = temp();
    for lie in [Lie::OtherBytes, Lie::Short, Lie::Long, Lie::OversizedPiece] {
        let peer = liar(lie, sha256.clone(), bytes.clone()).await;
        // Asked by alias, so only the bytes and the announcement decide.
        let r = fetch_model(&me, &peer, "liar", None, &out.0, 1 << 30, &mut |_, _| {}).await;
        assert!(matches!(r, Err(FetchError::Bad(_))), "{lie:?}: {r:?}");
        assert_eq!(files_in(&out.0), 0, "{lie:?} left a file");
    }
}
