//! Where a gateway keeps its DiLoCo tasks, so a restarted gateway resumes
//! them: one folder per task holding `task.json` (the request, the outer
//! steps settled with their reports, the money, the struck workers) and the
//! outer optimizer's state after the last settled step (`outer-<step>.bin`:
//! published parameters, exact parameters, momentum as little-endian f32).
//!
//! A task is written when an outer step is *settled* — every part of it
//! audited or not, paid or not — and steps settle in order, so the file
//! never holds an effect of a step after it: a resumed task runs again
//! every step after the last settled one (their workers' unsettled work is
//! lost with the gateway; nothing of it was paid). The step's payment is
//! written before the ledger is asked to make it; on resume a payment the
//! ledger has no receipt for is made then, so a crash between the two
//! neither loses nor doubles it. Writes go to a temporary file renamed into
//! place, so a crash mid-write leaves the previous state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tessera_train::diloco::Outer;

use super::records::{DilocoRequest, Progress};

/// A task as written to its folder: its progress (the same fields as the
/// live task's, at the last settled step) and what resuming it needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Saved {
    pub id: String,
    pub account: String,
    pub request: DilocoRequest,
    /// BLAKE3 of the training text.
    pub corpus: String,
    pub created_ms: u64,
    /// Status, money, the settled steps' reports (`settled` is the step the
    /// file's state is the one after).
    #[serde(flatten)]
    pub progress: Progress,
    /// Outer-optimizer steps applied through `settled` (steps where every
    /// worker failed apply none).
    pub applied: u32,
    /// Inner steps per second each worker showed (H for the slow ones).
    pub speeds: BTreeMap<String, f64>,
    /// The last settled step's payment, written before the ledger made it.
    pub payment: Option<Payment>,
}

#[cfg(test)]
impl Saved {
    /// A task of `account` with nothing settled yet, as resumed.
    pub(crate) fn for_test(account: &str, request: DilocoRequest) -> Saved {
        let mut progress = Progress::new(Vec::new(), 0);
        progress.status = tessera_core::train::TaskStatus::Running;
        Saved {
            id: "t".into(),
            account: account.into(),
            request,
            corpus: String::new(),
            created_ms: 0,
            progress,
            applied: 0,
            speeds: BTreeMap::new(),
            payment: None,
        }
    }
}

/// One step's payment: the hold it is paid from, the ledger's job id (its
/// receipts say whether it was made) and each worker's (node, steps,
/// price per step).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Payment {
    pub step: u32,
    pub hold: String,
    pub job: String,
    pub charges: Vec<(String, u64, u64)>,
}

/// The folder of a gateway's DiLoCo tasks.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Tasks kept under `dir` (created when the first is written).
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Write `saved` with the outer state after its last settled step.
    pub(crate) fn save(&self, saved: &Saved, outer: &Outer) -> std::io::Result<()> {
        if !safe_id(&saved.id) {
            return Err(std::io::Error::other(format!(
                "{:?} is not a task id",
                saved.id
            )));
        }
        let dir = self.dir.join(&saved.id);
        std::fs::create_dir_all(&dir)?;
        let name = format!("outer-{}.bin", saved.progress.settled);
        write_atomic(&dir.join(&name), &outer.to_bytes())?;
        let json = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
        write_atomic(&dir.join("task.json"), &json)?;
        // Older states are no longer named by task.json.
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if file.starts_with("outer-") && file != name {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Every task written here, with its outer state; a folder that cannot
    /// be read is reported and skipped (the gateway still starts).
    pub(crate) fn load(&self) -> Vec<(Saved, Outer)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            match read_task(&dir) {
                Ok(t) => out.push(t),
                Err(why) => {
                    tracing::warn!(folder = %dir.display(), %why, "a DiLoCo task cannot be read; skipped")
                }
            }
        }
        out.sort_by_key(|(s, _)| s.created_ms);
        out
    }
}

fn read_task(dir: &Path) -> Result<(Saved, Outer), String> {
    let json = std::fs::read(dir.join("task.json")).map_err(|e| format!("task.json: {e}"))?;
    let saved: Saved = serde_json::from_slice(&json).map_err(|e| format!("task.json: {e}"))?;
    if !safe_id(&saved.id) || dir.file_name().and_then(|n| n.to_str()) != Some(&saved.id) {
        return Err(format!("task.json names task {:?}", saved.id));
    }
    let name = format!("outer-{}.bin", saved.progress.settled);
    let bytes = std::fs::read(dir.join(&name)).map_err(|e| format!("{name}: {e}"))?;
    let r = &saved.request;
    let outer = Outer::from_bytes(&bytes, r.model.parameters(), r.outer_lr, r.outer_momentum)
        .map_err(|e| format!("{name}: {e}"))?;
    if saved.progress.steps.len() > saved.progress.settled as usize
        || saved.progress.settled > r.outer_steps
    {
        return Err(format!(
            "{} reports for {} settled of {} steps",
            saved.progress.steps.len(),
            saved.progress.settled,
            r.outer_steps
        ));
    }
    Ok((saved, outer))
}

/// Task ids are `diloco-` and hex: nothing that walks out of the folder.
fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}
