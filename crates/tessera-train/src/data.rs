//! Labelled data as trainers see it, the digits set, and how a data set is
//! split over clients: IID (a seeded shuffle dealt out evenly) or non-IID
//! (each class's samples shared by Dirichlet(α) proportions, the usual
//! benchmark of federated learning: small α, a few classes per client).

use crate::rng::Rng;
use crate::TrainError;

/// Samples of `features` values each, with a class label in `0..classes`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Row-major: sample `i` is `x[i * features..(i + 1) * features]`.
    pub x: Vec<f32>,
    /// One label per sample.
    pub y: Vec<u32>,
    /// Values per sample.
    pub features: usize,
    /// Number of classes.
    pub classes: usize,
}

impl Dataset {
    /// A data set, checked: `x` holds whole samples, one label each, every
    /// label below `classes`, every value finite.
    pub fn new(
        x: Vec<f32>,
        y: Vec<u32>,
        features: usize,
        classes: usize,
    ) -> Result<Dataset, TrainError> {
        if features == 0 || classes < 2 {
            return Err(TrainError::Data(format!(
                "{features} features and {classes} classes: need at least 1 and 2"
            )));
        }
        if x.len() != y.len() * features {
            return Err(TrainError::Data(format!(
                "{} values for {} samples of {features} features",
                x.len(),
                y.len()
            )));
        }
        if let Some(bad) = y.iter().find(|&&c| c as usize >= classes) {
            return Err(TrainError::Data(format!(
                "label {bad} is not below {classes} classes"
            )));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Data("a value is not a finite number".into()));
        }
        Ok(Dataset {
            x,
            y,
            features,
            classes,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether it holds no sample.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Sample `i`'s values.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.features..(i + 1) * self.features]
    }

    /// The samples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(indices.len() * self.features);
        for &i in indices {
            x.extend_from_slice(self.row(i));
        }
        Dataset {
            x,
            y: indices.iter().map(|&i| self.y[i]).collect(),
            features: self.features,
            classes: self.classes,
        }
    }

    /// A seeded split into a training part and a held-out part of
    /// `test_share` (0–1) of the samples.
    pub fn split(&self, test_share: f64, seed: u64) -> (Dataset, Dataset) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        Rng::new(seed).shuffle(&mut order);
        let test = ((self.len() as f64) * test_share.clamp(0.0, 1.0)).round() as usize;
        let (held, train) = order.split_at(test);
        (self.subset(train), self.subset(held))
    }

    /// Samples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &c in &self.y {
            counts[c as usize] += 1;
        }
        counts
    }
}

/// The 8×8 handwritten digits (UCI; the copy scikit-learn ships as
/// `load_digits`): 1,797 samples of 64 pixel intensities 0–16, here scaled
/// to 0–1, in 10 classes. It ships inside the `smartcore` crate, so no
/// download is needed.
pub fn digits() -> Result<Dataset, TrainError> {
    let d = smartcore::dataset::digits::load_dataset();
    let x = d.data.iter().map(|v| v / 16.0).collect();
    let y = d
        .target
        .iter()
        .map(|&t| {
            if (0.0..10.0).contains(&t) && t.fract() == 0.0 {
                Ok(t as u32)
            } else {
                Err(TrainError::Data(format!("digit label {t}")))
            }
        })
        .collect::<Result<Vec<u32>, _>>()?;
    Dataset::new(x, y, d.num_features, 10)
}

/// The file a provider's local training data lives in, inside the folder
/// given to `--train-data DIR`.
pub const DATA_FILE: &str = "train.csv";

/// Most samples and values per sample a data folder may hold (a provider's
/// memory, and a bound on what a malformed file can cost).
pub const MAX_SAMPLES: usize = 1_000_000;
/// See [`MAX_SAMPLES`].
pub const MAX_FEATURES: usize = 100_000;

/// Read a provider's training data: `DIR/train.csv`, one sample per line —
/// its class label (an integer from 0), then its values, comma-separated;
/// blank lines and lines starting with `#` are skipped. Every line must have
/// the same number of values. `classes` is the task's class count (labels
/// must be below it). Errors name the line at fault; nothing panics.
pub fn load_dir(dir: &std::path::Path, classes: usize) -> Result<Dataset, TrainError> {
    let path = dir.join(DATA_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
    parse_csv(&text, classes).map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))
}

/// Parse the text of a `train.csv` (see [`load_dir`]).
pub fn parse_csv(text: &str, classes: usize) -> Result<Dataset, String> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut features: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = n + 1;
        let mut fields = line.split(',').map(str::trim);
        let label = fields.next().unwrap_or_default();
        let label: u32 = label
            .parse()
            .map_err(|_| format!("line {at}: label '{label}' is not a class number"))?;
        if label as usize >= classes {
            return Err(format!(
                "line {at}: label {label} is not below the task's {classes} classes"
            ));
        }
        let start = x.len();
        for f in fields {
            let v: f32 = f
                .parse()
                .map_err(|_| format!("line {at}: '{f}' is not a number"))?;
            if !v.is_finite() {
                return Err(format!("line {at}: '{f}' is not a finite number"));
            }
            x.push(v);
            if x.len() - start > MAX_FEATURES {
                return Err(format!("line {at}: more than {MAX_FEATURES} values"));
            }
        }
        let count = x.len() - start;
        match features {
            None if count == 0 => return Err(format!("line {at}: a label and no values")),
            None => features = Some(count),
            Some(f) if f != count => {
                return Err(format!(
                    "line {at}: {count} values where earlier lines have {f}"
                ))
            }
            Some(_) => {}
        }
        y.push(label);
        if y.len() > MAX_SAMPLES {
            return Err(format!("more than {MAX_SAMPLES} samples"));
        }
    }
    let features = features.ok_or("no sample")?;
    Dataset::new(x, y, features, classes).map_err(|e| e.to_string())
}

/// Write `data` in the `train.csv` format into `dir` (created if missing):
/// how the demo hands each provider its shard.
pub fn write_dir(data: &Dataset, dir: &std::path::Path) -> Result<(), TrainError> {
    let out = to_csv(data);
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(dir.join(DATA_FILE), out))
        .map_err(|e| TrainError::Data(format!("{}: {e}", dir.display())))
}

/// `data` in `train.csv`'s format (what [`parse_csv`] reads back exactly).
pub fn to_csv(data: &Dataset) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(data.x.len() * 6);
    for i in 0..data.len() {
        let _ = write!(out, "{}", data.y[i]);
        for v in data.row(i) {
            let _ = write!(out, ",{v}");
        }
        out.push('\n');
    }
    out
}

/// How a data set is shared over clients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Split {
    /// A seeded shuffle dealt out evenly.
    Iid,
    /// Each class's samples shared in Dirichlet(α) proportions.
    Dirichlet(f64),
}

/// Indices of each client's samples: disjoint, covering every sample, no
/// client left empty (a client the draw left empty gets one sample from
/// the largest).
pub fn partition(data: &Dataset, clients: usize, split: Split, seed: u64) -> Vec<Vec<usize>> {
    let clients = clients.max(1);
    let mut rng = Rng::new(seed);
    let mut parts: Vec<Vec<usize>> = vec![Vec::new(); clients];
    match split {
        Split::Iid => {
            let mut order: Vec<usize> = (0..data.len()).collect();
            rng.shuffle(&mut order);
            for (k, i) in order.into_iter().enumerate() {
                parts[k % clients].push(i);
            }
        }
        Split::Dirichlet(alpha) => {
            let alpha = if alpha.is_finite() && alpha > 0.0 {
                alpha
            } else {
                1.0
            };
            for class in 0..data.classes {
                let mut members: Vec<usize> = (0..data.len())
                    .filter(|&i| data.y[i] as usize == class)
                    .collect();
                rng.shuffle(&mut members);
                let draws: Vec<f64> = (0..clients).map(|_| rng.gamma(alpha)).collect();
                let total: f64 = draws.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                // Cumulative cut points, so the shares add up to the class.
                let mut start = 0;
                let mut acc = 0.0;
                for (k, d) in draws.iter().enumerate() {
                    acc += d / total;
                    let end = if k + 1 == clients {
                        members.len()
                    } else {
                        ((acc * members.len() as f64).round() as usize).min(members.len())
                    };
                    parts[k].extend_from_slice(&members[start..end.max(start)]);
                    start = end.max(start);
                }
            }
        }
    }
    for k in 0..clients {
        if parts[k].is_empty() {
            let largest = (0..clients).max_by_key(|&j| parts[j].len()).unwrap_or(0);
            if let Some(i) = parts[largest].pop() {
                parts[k].push(i);
            }
        }
    }
    parts
}

/// Seed of [`digits_split`].
pub const DIGITS_SPLIT_SEED: u64 = 42;

/// The digits set split into 80% to train on and 20% held out (seed
/// [`DIGITS_SPLIT_SEED`]): the split the demo shards over its providers,
/// the benchmark uses, and a gateway evaluates `"test": "digits"` tasks on.
pub fn digits_split() -> Result<(Dataset, Dataset), TrainError> {
    Ok(digits()?.split(0.2, DIGITS_SPLIT_SEED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_1797_samples_of_64_values_in_10_classes() {
        let d = digits().unwrap();
        assert_eq!((d.len(), d.features, d.classes), (1797, 64, 10));
        assert!(d.x.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(d.class_counts().iter().all(|&c| (170..=185).contains(&c)));
        let (train, test) = d.split(0.2, 1);
        assert_eq!((train.len(), test.len()), (1438, 359));
    }

    #[test]
    fn partitions_cover_every_sample_once_and_dirichlet_skews_the_classes() {
        let d = digits().unwrap();
        for split in [Split::Iid, Split::Dirichlet(0.5)] {
            let parts = partition(&d, 10, split, 3);
            let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..d.len()).collect::<Vec<_>>(), "{split:?}");
            assert!(parts.iter().all(|p| !p.is_empty()));
        }
        // How far a client's class mix is from the whole set's, on average
        // (total variation distance).
        let skew = |parts: &[Vec<usize>]| {
            parts
                .iter()
                .map(|p| {
                    let counts = d.subset(p).class_counts();
                    counts
                        .iter()
                        .map(|&c| (c as f64 / p.len() as f64 - 0.1).abs())
                        .sum::<f64>()
                        / 2.0
                })
                .sum::<f64>()
                / parts.len() as f64
        };
        let iid = skew(&partition(&d, 10, Split::Iid, 3));
        let non_iid = skew(&partition(&d, 10, Split::Dirichlet(0.5), 3));
        assert!(iid < 0.1 && non_iid > 0.3, "iid {iid}, dirichlet {non_iid}");
    }

    #[test]
    fn a_data_folder_round_trips_and_bad_files_name_their_line() {
        let dir = std::env::temp_dir().join(format!("tessera-train-{}", std::process::id()));
        let d = digits().unwrap().subset(&[0, 5, 17]);
        write_dir(&d, &dir).unwrap();
        assert_eq!(load_dir(&dir, 10).unwrap(), d);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(load_dir(&dir, 10).is_err(), "a missing folder");
        let ok = parse_csv("# a comment\n1, 0.5, 2\n\n0,1,-3e2\n", 2).unwrap();
        assert_eq!((ok.len(), ok.features, ok.y.clone()), (2, 2, vec![1, 0]));
        for (text, says) in [
            ("x,1,2\n", "line 1: label 'x'"),
            ("-1,1,2\n", "line 1: label '-1'"),
            ("5,1,2\n", "line 1: label 5 is not below"),
            (
                "1,1,2\n0,1\n",
                "line 2: 1 values where earlier lines have 2",
            ),
            ("1,1,nan\n", "line 1: 'nan' is not a finite"),
            ("1,1,abc\n", "line 1: 'abc' is not a number"),
            ("1\n", "line 1: a label and no values"),
            ("# nothing\n", "no sample"),
        ] {
            let e = parse_csv(text, 2).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_malformed_data_set_is_refused() {
        assert!(Dataset::new(vec![0.0; 5], vec![0, 1], 2, 2).is_err());
        assert!(Dataset::new(vec![0.0; 4], vec![0, 2], 2, 2).is_err());
        assert!(Dataset::new(vec![f32::NAN, 0.0], vec![0], 2, 2).is_err());
        assert!(Dataset::new(vec![0.0; 4], vec![0, 1], 2, 2).is_ok());
    }
}
