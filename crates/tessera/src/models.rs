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
    /// check its sha256.
    Pull { name: String },
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
        ModelsCommand::Pull { name } => {
            let mut bar = ProgressLine::new(&format!("{name}: checking"));
            let m = store.pull(&name, &mut |d, t| bar.update(d, t))?;
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
