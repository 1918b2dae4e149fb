//! Content-addressed blobs between peers over iroh ([`BLOBS_ALPN`]). A
//! gateway serves the model files it serves, by alias or sha256, so a
//! provider can fetch its model from the gateway it joins — no package
//! registry needed. The fetcher hashes what arrives and keeps it only if
//! it is the file it asked for, so the peer need not be trusted: a peer
//! that sends other bytes, too many or too few wastes the fetch and
//! nothing else.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::Endpoint;
use sha2::{Digest, Sha256};
use tessera_protocol::{
    read_blob, read_frame, write_blob, write_frame, BlobKind, Fetch, Frame, JobError, BLOBS_ALPN,
    FETCH_CHUNK,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::node::Ticket;

/// A file a node serves to peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedFile {
    /// sha256 of the file (hex).
    pub sha256: String,
    /// Its name here.
    pub alias: String,
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// Transfers served at once; a peer asking while they run is told to come
/// back (`retryable`).
pub const MAX_TRANSFERS: usize = 4;

/// How long a peer has to say what it wants.
const ASK_DEADLINE: Duration = Duration::from_secs(10);

/// Serves [`ServedFile`]s to peers that dial with [`BLOBS_ALPN`].
#[derive(Clone, Debug)]
pub struct BlobServer {
    files: Arc<Vec<ServedFile>>,
    transfers: Arc<Semaphore>,
}

impl BlobServer {
    /// Serve these files.
    pub fn new(files: Vec<ServedFile>) -> BlobServer {
        BlobServer {
            files: Arc::new(files),
            transfers: Arc::new(Semaphore::new(MAX_TRANSFERS)),
        }
    }

    /// What it serves.
    pub fn files(&self) -> &[ServedFile] {
        &self.files
    }

    /// Answer a peer's streams until it closes the connection: each stream
    /// one [`Frame::Fetch`], one answer.
    pub async fn serve(&self, conn: Connection) {
        let mut streams = tokio::task::JoinSet::new();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let server = self.clone();
            streams.spawn(async move {
                if let Err(e) = server.answer(send, recv).await {
                    tracing::debug!(error = %e, "a blob request ended");
                }
            });
            // At most a few requests per connection at once.
            while streams.len() >= MAX_TRANSFERS {
                let _ = streams.join_next().await;
            }
        }
        while streams.join_next().await.is_some() {}
    }

    async fn answer(&self, mut send: SendStream, mut recv: RecvStream) -> Result<u64, String> {
        let asked = tokio::time::timeout(ASK_DEADLINE, read_frame(&mut recv))
            .await
            .map_err(|_| "no request within the deadline".to_string())?;
        let refuse =
            |message: String, retryable: bool| Frame::JobError(JobError { message, retryable });
        let name = match asked {
            Ok(Some(Frame::Fetch(Fetch::Model { name }))) => name,
            Ok(Some(other)) => {
                let f = refuse(format!("{} is not a fetch", other.kind()), false);
                let _ = write_frame(&mut send, &f).await;
                let _ = send.finish();
                return Err("not a fetch".into());
            }
            Ok(None) => return Err("the stream ended".into()),
            Err(e) => {
                let _ = write_frame(&mut send, &refuse(format!("garbage: {e}"), false)).await;
                let _ = send.finish();
                return Err(e.to_string());
            }
        };
        let wanted = name.to_ascii_lowercase();
        let Some(file) = self
            .files
            .iter()
            .find(|f| f.alias == name || f.sha256 == wanted)
            .cloned()
        else {
            let _ = write_frame(&mut send, &refuse(format!("no model {name:?} here"), false)).await;
            let _ = send.finish();
            return Err(format!("asked for {name:?}, not served"));
        };
        let Ok(_permit) = self.transfers.clone().try_acquire_owned() else {
            let _ = write_frame(
                &mut send,
                &refuse(
                    format!("{MAX_TRANSFERS} transfers running; try again"),
                    true,
                ),
            )
            .await;
            let _ = send.finish();
            return Err("busy".into());
        };
        let mut f = tokio::fs::File::open(&file.path)
            .await
            .map_err(|e| format!("{}: {e}", file.path.display()))?;
        let size = f.metadata().await.map_err(|e| e.to_string())?.len();
        write_frame(
            &mut send,
            &Frame::Blob(Box::new(BlobKind::Model {
                sha256: file.sha256.clone(),
                alias: file.alias.clone(),
                size,
            })),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut sent = 0u64;
        let mut buf = vec![0u8; FETCH_CHUNK];
        while sent < size {
            let want = (size - sent).min(FETCH_CHUNK as u64) as usize;
            f.read_exact(&mut buf[..want])
                .await
                .map_err(|e| format!("{}: {e}", file.path.display()))?;
            write_blob(&mut send, &buf[..want])
                .await
                .map_err(|e| e.to_string())?;
            sent += want as u64;
        }
        send.finish().map_err(|e| e.to_string())?;
        // Let the peer read to the end before the stream is dropped.
        let _ = send.stopped().await;
        tracing::info!(model = %file.alias, bytes = sent, "served a model to a peer");
        Ok(sent)
    }
}

/// A model fetched from a peer and checked: its file (under the folder
/// given, removed when dropped unless kept).
#[derive(Debug)]
pub struct Fetched {
    /// sha256 of the bytes received (equal to what the peer announced and
    /// to what was asked for, when a hash was).
    pub sha256: String,
    /// The peer's name for it.
    pub alias: String,
    /// Bytes.
    pub size: u64,
    /// Where the bytes are.
    pub path: PathBuf,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The peer could not be reached or the stream broke.
    #[error("cannot reach the peer: {0}")]
    Connect(String),
    /// The peer refused (`retryable`: it was busy).
    #[error("the peer refused: {message}")]
    Refused {
        /// What it said.
        message: String,
        /// Whether asking again later may work.
        retryable: bool,
    },
    /// The peer sent something other than what was asked for.
    #[error("the peer sent a bad answer: {0}")]
    Bad(String),
    /// Writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Fetch model `name` (alias or sha256) from `peer`, writing it under
/// `dir`. `expected`: the sha256 it must have (a pinned model's), if any
/// besides a hash `name` itself gives. `max_size` bounds what is accepted.
pub async fn fetch_model(
    endpoint: &Endpoint,
    peer: &Ticket,
    name: &str,
    expected: Option<&str>,
    dir: &Path,
    max_size: u64,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Fetched, FetchError> {
    let conn = endpoint
        .connect(peer.endpoint_addr(), BLOBS_ALPN)
        .await
        .map_err(|e| FetchError::Connect(e.to_string()))?;
    let result = fetch_on(&conn, name, expected, dir, max_size, progress).await;
    conn.close(0u32.into(), b"done");
    result
}

async fn fetch_on(
    conn: &Connection,
    name: &str,
    expected: Option<&str>,
    dir: &Path,
    max_size: u64,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Fetched, FetchError> {
    let connect = |e: String| FetchError::Connect(e);
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| connect(e.to_string()))?;
    let ask = Frame::Fetch(Fetch::Model {
        name: name.to_string(),
    });
    write_frame(&mut send, &ask)
        .await
        .map_err(|e| connect(e.to_string()))?;
    let _ = send.finish();
    let (sha256, alias, size) = match read_frame(&mut recv).await {
        Ok(Some(Frame::Blob(kind))) => match *kind {
            BlobKind::Model {
                sha256,
                alias,
                size,
            } => (sha256.to_ascii_lowercase(), alias, size),
            _ => return Err(FetchError::Bad("another blob than a model".into())),
        },
        Ok(Some(Frame::JobError(e))) => {
            return Err(FetchError::Refused {
                message: e.message,
                retryable: e.retryable,
            })
        }
        Ok(Some(other)) => {
            return Err(FetchError::Bad(format!(
                "{} instead of a blob",
                other.kind()
            )))
        }
        Ok(None) => return Err(FetchError::Bad("nothing".into())),
        Err(e) => return Err(FetchError::Bad(e.to_string())),
    };
    let is_hash = |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
    let mut want: Vec<String> = expected.map(str::to_ascii_lowercase).into_iter().collect();
    if is_hash(name) {
        want.push(name.to_ascii_lowercase());
    }
    if !is_hash(&sha256) || want.iter().any(|w| *w != sha256) {
        return Err(FetchError::Bad(format!(
            "it offers {sha256:?}, not the model asked for"
        )));
    }
    if size > max_size {
        return Err(FetchError::Bad(format!(
            "a file of {size} bytes (at most {max_size} accepted)"
        )));
    }
    let path = dir.join(format!(
        ".fetch-{}-{}.part",
        &sha256[..16],
        tessera_core::unique_u64()
    ));
    let fetched = Fetched {
        sha256: sha256.clone(),
        alias,
        size,
        path: path.clone(),
    };
    let io = |source| FetchError::Io {
        path: path.clone(),
        source,
    };
    let mut file = tokio::fs::File::create(&path).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    while got < size {
        let left = (size - got).min(FETCH_CHUNK as u64) as usize;
        let chunk = read_blob(&mut recv, left)
            .await
            .map_err(|e| FetchError::Bad(format!("after {got} of {size} bytes: {e}")))?;
        if chunk.is_empty() {
            return Err(FetchError::Bad(format!("an empty piece after {got} bytes")));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io)?;
        got += chunk.len() as u64;
        progress(got, size);
    }
    file.flush().await.map_err(io)?;
    file.sync_all().await.map_err(io)?;
    // Nothing may follow the file.
    let mut extra = [0u8; 1];
    if matches!(recv.read(&mut extra).await, Ok(Some(n)) if n > 0) {
        return Err(FetchError::Bad("more bytes than announced".into()));
    }
    let hash = hex::encode(hasher.finalize());
    if hash != sha256 {
        return Err(FetchError::Bad(format!(
            "the bytes hash to {hash}, not the {sha256} announced"
        )));
    }
    Ok(fetched)
}
