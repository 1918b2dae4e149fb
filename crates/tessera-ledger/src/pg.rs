//! A throwaway PostgreSQL server on loopback, for tests and `tessera bench
//! ledger`: `initdb` into a temporary folder, `pg_ctl start` on a free port
//! of 127.0.0.1, stopped and deleted when dropped. It uses Debian's
//! `postgresql` package (`scripts/deps.sh` installs it). PostgreSQL refuses
//! to run as root, so as root the server runs as the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running PostgreSQL server.
pub struct TempPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    /// The loopback port it listens on.
    pub port: u16,
}

fn find_bin() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return Some(p);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl TempPostgres {
    /// Start a server; the error says what to install when PostgreSQL is missing.
    pub fn start() -> Result<TempPostgres, String> {
        let bin = find_bin().ok_or(
            "PostgreSQL is not installed: `apt-get install postgresql` (scripts/deps.sh does it)",
        )?;
        let root = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("tessera-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        if root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .map_err(|e| e.to_string())?
                .success();
            if !ok {
                return Err("cannot hand the data folder to the postgres user".into());
            }
        }
        let data = dir.path().join("data");
        let port = free_port().map_err(|e| e.to_string())?;
        let mut pg = TempPostgres {
            dir,
            bin,
            as_postgres: root,
            port,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "tessera",
                "--no-sync",
            ],
        )?;
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=on -c synchronous_commit=on",
            pg.dir.path().display()
        );
        pg.run(
            "pg_ctl",
            &[
                "-D",
                &data.display().to_string(),
                "-o",
                &opts,
                "-l",
                &pg.dir.path().join("log").display().to_string(),
                "-w",
                "start",
            ],
        )?;
        pg.port = port;
        Ok(pg)
    }

    fn run(&mut self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// URL of the server's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://tessera@127.0.0.1:{}/postgres", self.port)
    }

    /// Its data folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
    }
}

/// Whether this process runs as root (PostgreSQL will not).
fn running_as_root() -> bool {
    // `id -u` rather than libc, to keep this crate free of unsafe code.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
