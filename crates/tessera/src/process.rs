//! What every long-running command shares: the files it keeps in its home
//! (written atomically and readable by their owner only) and the signals
//! that stop it.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Removes endpoint.json when the server stops, so scripts never find a
/// stale address.
pub struct EndpointFile(pub PathBuf);

impl Drop for EndpointFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Write JSON atomically (temporary file, then rename), so a reader polling
/// for the file never sees half of it. It may hold an API key, so only its
/// owner may read it.
pub fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    write_private(path, &String::from_utf8(serde_json::to_vec_pretty(value)?)?)
}

/// Write a file only its owner can read, atomically: the temporary file is
/// created with those permissions, so the text is never readable by others,
/// not even for a moment.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", tmp.display()))?;
    Ok(())
}
