//! What every long-running command shares: the files it keeps in its home
//! (written atomically and readable by their owner only), the signals that
//! stop it, and the child processes a devnet starts and stops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

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

/// Child processes, stopped (SIGTERM, then SIGKILL after 10 s) when dropped.
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &mut self.0 {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

pub fn wait_for_file(path: &Path, child: &mut Child, what: &str) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = read_json(path) {
            return Ok(v);
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited during start-up: {status}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not start within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait for Ctrl-C or SIGTERM, saying so when a process of the devnet dies
/// meanwhile: a provider's death is reported and the devnet goes on with
/// the others; the gateway's ends the devnet with an error.
async fn watch(children: &mut Children) -> anyhow::Result<()> {
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut reported = vec![false; children.0.len()];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tick.tick() => {}
        }
        for (i, child) in children.0.iter_mut().enumerate() {
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            if i == 0 {
                bail!("the gateway (pid {}) exited: {status}", child.id());
            }
            if !reported[i] {
                reported[i] = true;
                eprintln!(
                    "provider {} (pid {}) exited: {status}; the devnet goes on with the others",
                    i - 1,
                    child.id()
                );
            }
        }
    }
}

/// Keep the devnet up until Ctrl-C or SIGTERM (see [`watch`]), then stop
/// every process it started.
pub fn run_until_stopped(mut children: Children) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(watch(&mut children));
    println!("stopping the devnet");
    drop(children);
    outcome
}
