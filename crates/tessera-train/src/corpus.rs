//! Text to train language models on: Debian's `fortunes` package (about
//! 2.6 MB of English, installed by `scripts/deps.sh`), as bytes (the
//! vocabulary is the 256 byte values), split by fortune into a training
//! text and a held-out validation text, and cut into windows.
//!
//! Windows are drawn from a seed: worker `w`'s batches in an outer step
//! come from its shard of the training text and the step's seed, so an
//! auditor draws the same batches again.

use std::ops::Range;
use std::path::Path;

use crate::rng::Rng;
use crate::TrainError;

/// Where Debian's `fortunes` package puts its text.
pub const FORTUNES_DIR: &str = "/usr/share/games/fortunes";

/// Share of the fortunes held out for validation.
pub const VAL_SHARE: f64 = 0.05;

/// Seed of the train/validation split of the fortunes.
pub const SPLIT_SEED: u64 = 7;

/// A training text and a held-out validation text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corpus {
    /// The training text.
    pub train: Vec<u8>,
    /// The held-out text (whole fortunes the training text does not hold).
    pub val: Vec<u8>,
}

impl Corpus {
    /// Every fortune in `dir`'s files (the files without an extension; the
    /// `.dat` indexes and `.u8` links skipped), in file name order, 1 in
    /// `1 / val_share` of them held out by a seeded draw.
    pub fn fortunes(dir: &Path, val_share: f64) -> Result<Corpus, TrainError> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| {
                TrainError::Data(format!(
                    "cannot read {} ({e}); install Debian's `fortunes` package (scripts/deps.sh)",
                    dir.display()
                ))
            })?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_none())
            .collect();
        files.sort();
        let mut text = Vec::new();
        for f in &files {
            text.extend(
                std::fs::read(f).map_err(|e| TrainError::Data(format!("{}: {e}", f.display())))?,
            );
            text.extend_from_slice(b"\n%\n");
        }
        Corpus::from_text(&text, val_share)
    }

    /// Split `text`'s records (separated by lines holding only `%`) into a
    /// training and a validation text, `val_share` of them held out.
    pub fn from_text(text: &[u8], val_share: f64) -> Result<Corpus, TrainError> {
        let mut rng = Rng::new(SPLIT_SEED);
        let (mut train, mut val) = (Vec::new(), Vec::new());
        let mut records = 0;
        let mut record: Vec<u8> = Vec::new();
        let mut lines = text.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            let last = lines.peek().is_none();
            if line != b"%" {
                record.extend_from_slice(line);
                record.push(b'\n');
            }
            if line != b"%" && !last {
                continue;
            }
            if !record.iter().all(u8::is_ascii_whitespace) {
                records += 1;
                let to = if rng.uniform() < val_share {
                    &mut val
                } else {
                    &mut train
                };
                to.extend_from_slice(&record);
                to.extend_from_slice(b"%\n");
            }
            record.clear();
        }
        if records == 0 {
            return Err(TrainError::Data("no text to train on".into()));
        }
        Ok(Corpus { train, val })
    }

    /// The content address of the training text (BLAKE3, hex): what a
    /// task names and a worker checks it holds.
    pub fn hash(&self) -> String {
        blake3::hash(&self.train).to_hex().to_string()
    }

    /// The training text cut into `n` contiguous shards of (nearly) equal
    /// size.
    pub fn shards(&self, n: usize) -> Vec<Range<usize>> {
        let n = n.max(1);
        let len = self.train.len();
        (0..n).map(|i| i * len / n..(i + 1) * len / n).collect()
    }
}

/// `count` windows of `context + 1` tokens starting at seeded offsets in
/// `range` of `text`, one after another (what a batch is made of).
pub fn windows(
    text: &[u8],
    range: Range<usize>,
    count: usize,
    context: usize,
    rng: &mut Rng,
) -> Result<Vec<u32>, TrainError> {
    let w = context + 1;
    let range = range.start.min(text.len())..range.end.min(text.len());
    if range.len() < w {
        return Err(TrainError::Data(format!(
            "a shard of {} bytes cannot hold a window of {w}",
            range.len()
        )));
    }
    let mut out = Vec::with_capacity(count * w);
    for _ in 0..count {
        let at = range.start + rng.below(range.len() - w + 1);
        out.extend(text[at..at + w].iter().map(|&b| u32::from(b)));
    }
    Ok(out)
}

/// The first `count` non-overlapping windows of `text` (the fixed
/// validation set; fewer when the text is short).
pub fn fixed_windows(text: &[u8], count: usize, context: usize) -> Vec<u32> {
    text.chunks_exact(context + 1)
        .take(count)
        .flatten()
        .map(|&b| u32::from(b))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_whole_and_shards_cover_the_text() {
        let mut text = Vec::new();
        for i in 0..200 {
            text.extend(format!("fortune number {i}\n%\n").bytes());
        }
        let c = Corpus::from_text(&text, 0.1).unwrap();
        let all = c.train.len() + c.val.len();
        assert_eq!(all, text.len());
        assert!(!c.val.is_empty() && c.val.len() < c.train.len() / 4);
        // Every held-out record is whole and absent from the training text.
        for rec in c.val.split(|&b| b == b'%').filter(|r| r.len() > 3) {
            let rec = String::from_utf8_lossy(rec);
            let rec = rec.trim();
            assert!(rec.starts_with("fortune number"), "{rec}");
            let needle = format!("\n{rec}\n");
            assert!(!String::from_utf8_lossy(&c.train).contains(&needle));
        }
        let shards = c.shards(4);
        assert_eq!(shards[0].start, 0);
        assert_eq!(shards[3].end, c.train.len());
        assert!(shards.windows(2).all(|p| p[0].end == p[1].start));
        let mut a = Rng::new(5);
        let mut b = Rng::new(5);
        let wa = windows(&c.train, shards[1].clone(), 3, 8, &mut a).unwrap();
        assert_eq!(
            wa,
            windows(&c.train, shards[1].clone(), 3, 8, &mut b).unwrap()
        );
        assert_eq!(wa.len(), 27);
        assert!(windows(&c.train, 0..5, 1, 8, &mut a).is_err());
        assert!(Corpus::from_text(b"\n%\n  \n%\n", 0.1).is_err());
    }
}
