//! Split manifests: which training samples are forgotten, written once by
//! `sfron split` and read by every command of a study.
//!
//! A manifest records the dataset's fingerprint (and format, root and sizes,
//! for people), the scenario that chose the forget set, the sorted forget
//! indices and the per-class counts of the forget and remain sets. Commands
//! that take a manifest call [`Manifest::check`] against the dataset they
//! opened and refuse a mismatch.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::DataError;
use super::dataset::Dataset;
use crate::rng::Rng;

pub const MANIFEST_VERSION: u32 = 1;

/// How the forget set is chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Scenario {
    /// `round(fraction · n)` samples drawn uniformly with `seed`.
    Random { fraction: f64, seed: u64 },
    /// Every sample of these classes.
    Class { classes: Vec<usize> },
    /// The samples named in a file, one per line (index or sample id).
    List {
        file: PathBuf,
        listed: usize,
        duplicates: usize,
    },
}

impl Scenario {
    /// Parses `random:FRACTION`, `class:3,5` or `list:FILE` (`seed` is used
    /// by `random`).
    pub fn parse(spec: &str, seed: u64) -> Result<Self, DataError> {
        let bad = |why: &str| DataError::Scenario {
            spec: spec.into(),
            reason: why.into(),
        };
        let (kind, arg) = spec
            .split_once(':')
            .ok_or_else(|| bad("expected random:FRACTION, class:C1,C2 or list:FILE"))?;
        match kind {
            "random" => {
                let fraction: f64 = arg
                    .parse()
                    .map_err(|_| bad("the fraction must be a number"))?;
                if !(fraction > 0.0 && fraction < 1.0) {
                    return Err(bad("the fraction must be in (0, 1)"));
                }
                Ok(Scenario::Random { fraction, seed })
            }
            "class" => {
                let classes: Result<BTreeSet<usize>, _> =
                    arg.split(',').map(|c| c.trim().parse::<usize>()).collect();
                let classes =
                    classes.map_err(|_| bad("classes must be comma-separated class numbers"))?;
                if classes.is_empty() {
                    return Err(bad("name at least one class"));
                }
                Ok(Scenario::Class {
                    classes: classes.into_iter().collect(),
                })
            }
            "list" => Ok(Scenario::List {
                file: PathBuf::from(arg),
                listed: 0,
                duplicates: 0,
            }),
            _ => Err(bad("the scenario kind must be random, class or list")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetInfo {
    pub format: String,
    pub root: PathBuf,
    pub fingerprint: String,
    pub samples: usize,
    pub classes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    pub forget: Vec<usize>,
    pub remain: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub dataset: DatasetInfo,
    pub scenario: Scenario,
    /// Sorted, distinct indices into the training part.
    pub forget: Vec<usize>,
    pub counts: Counts,
    /// Training samples in neither set (sorted, distinct, none forgotten):
    /// the model never learns them. A population model that learns a random
    /// half of the data has the other half here ([`Manifest::restricted`]);
    /// empty (and absent from the file) for an ordinary split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<usize>,
}

impl Manifest {
    /// Chooses the forget set of `train` by `scenario`.
    pub fn create(train: &Dataset, scenario: Scenario) -> Result<Self, DataError> {
        let n = train.len();
        let (forget, scenario) = match scenario {
            Scenario::Random { fraction, seed } => {
                let k = (fraction * n as f64).round() as usize;
                if k == 0 || k == n {
                    return Err(DataError::Scenario {
                        spec: format!("random:{fraction}"),
                        reason: format!("selects {k} of {n} samples; both sets must be non-empty"),
                    });
                }
                let mut order: Vec<usize> = (0..n).collect();
                Rng::keyed(&[seed, crate::rng::tag::SPLIT]).shuffle(&mut order);
                let mut forget = order[..k].to_vec();
                forget.sort_unstable();
                (forget, Scenario::Random { fraction, seed })
            }
            Scenario::Class { classes } => {
                if let Some(&c) = classes.iter().find(|&&c| c >= train.num_classes()) {
                    return Err(DataError::Scenario {
                        spec: format!("class:{c}"),
                        reason: format!("the dataset has classes 0..{}", train.num_classes() - 1),
                    });
                }
                let forget: Vec<usize> = (0..n)
                    .filter(|&i| classes.contains(&(train.labels[i] as usize)))
                    .collect();
                (forget, Scenario::Class { classes })
            }
            Scenario::List { file, .. } => read_list(train, &file)?,
        };
        if forget.is_empty() || forget.len() == n {
            return Err(DataError::Scenario {
                spec: format!("{scenario:?}"),
                reason: format!(
                    "forgets {} of {n} samples; both sets must be non-empty",
                    forget.len()
                ),
            });
        }
        let counts = count(train, &forget, &[]);
        Ok(Manifest {
            version: MANIFEST_VERSION,
            dataset: DatasetInfo {
                format: train.format.name().into(),
                root: train.root.clone(),
                fingerprint: train.fingerprint.clone(),
                samples: n,
                classes: train.classes.clone(),
            },
            scenario,
            forget,
            counts,
            excluded: Vec::new(),
        })
    }

    /// This split restricted to the training samples `keep`s: the forget
    /// set becomes the kept forget samples, every other sample leaves both
    /// sets (`excluded`). Refused when nothing kept is forgotten or remains.
    pub fn restricted(&self, train: &Dataset, keep: &[bool]) -> Result<Self, DataError> {
        let forget: Vec<usize> = self.forget.iter().copied().filter(|&i| keep[i]).collect();
        let excluded: Vec<usize> = (0..keep.len()).filter(|&i| !keep[i]).collect();
        let kept = keep.len() - excluded.len();
        if forget.is_empty() || forget.len() == kept {
            return Err(DataError::Scenario {
                spec: format!("{:?}", self.scenario),
                reason: format!(
                    "restricted to {kept} samples it forgets {} of them; both sets must be \
                     non-empty",
                    forget.len()
                ),
            });
        }
        Ok(Manifest {
            counts: count(train, &forget, &excluded),
            forget,
            excluded,
            ..self.clone()
        })
    }
    /// Reads and validates a manifest file.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| DataError::file(path, e.to_string()))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| DataError::file(path, format!("is not a split manifest: {e}")))?;
        if m.version != MANIFEST_VERSION {
            return Err(DataError::file(
                path,
                format!(
                    "manifest version {} (this sfron reads {MANIFEST_VERSION})",
                    m.version
                ),
            ));
        }
        let sorted = m.forget.windows(2).all(|w| w[0] < w[1]);
        if !sorted || m.forget.last().is_some_and(|&i| i >= m.dataset.samples) {
            return Err(DataError::file(
                path,
                "forget indices must be sorted, distinct and below the sample count",
            ));
        }
        let sorted = m.excluded.windows(2).all(|w| w[0] < w[1]);
        if !sorted
            || m.excluded.last().is_some_and(|&i| i >= m.dataset.samples)
            || m.excluded.iter().any(|i| m.forget.binary_search(i).is_ok())
        {
            return Err(DataError::file(
                path,
                "excluded indices must be sorted, distinct, below the sample count and not \
                 forgotten",
            ));
        }
        Ok(m)
    }

    /// Writes the manifest atomically as pretty JSON.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let json = serde_json::to_string_pretty(self).expect("manifest serialises");
        crate::fsx::write_atomic(path, format!("{json}\n").as_bytes())
            .map_err(|e| DataError::file(path, e.to_string()))
    }

    /// Refuses a dataset other than the one the manifest was made for.
    pub fn check(&self, train: &Dataset, path: &Path) -> Result<(), DataError> {
        if self.dataset.fingerprint != train.fingerprint || self.dataset.samples != train.len() {
            return Err(DataError::Mismatch {
                manifest: path.into(),
                reason: format!(
                    "it was made for {} data at {} ({} samples, {}), but this dataset is {} at {} ({} samples, {})",
                    self.dataset.format,
                    self.dataset.root.display(),
                    self.dataset.samples,
                    self.dataset.fingerprint,
                    train.format.name(),
                    train.root.display(),
                    train.len(),
                    train.fingerprint
                ),
            });
        }
        Ok(())
    }

    /// The remain set: every training index neither forgotten nor
    /// excluded, sorted.
    pub fn remain(&self) -> Vec<usize> {
        let mut forget = self.forget.iter().peekable();
        let mut excluded = self.excluded.iter().peekable();
        (0..self.dataset.samples)
            .filter(|i| {
                if forget.peek() == Some(&i) {
                    forget.next();
                    false
                } else if excluded.peek() == Some(&i) {
                    excluded.next();
                    false
                } else {
                    true
                }
            })
            .collect()
    }

    /// SHA-256 of the forget set and fingerprint: what checkpoints record.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.dataset.fingerprint.as_bytes());
        for i in &self.forget {
            h.update(i.to_le_bytes());
        }
        // Absent from ordinary splits, whose hashes stay as they were.
        if !self.excluded.is_empty() {
            h.update(b"excluded");
            for i in &self.excluded {
                h.update(i.to_le_bytes());
            }
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

fn count(train: &Dataset, forget: &[usize], excluded: &[usize]) -> Counts {
    let mut f = vec![0; train.num_classes()];
    let mut r = vec![0; train.num_classes()];
    let mut it = forget.iter().peekable();
    let mut out = excluded.iter().peekable();
    for (i, &label) in train.labels.iter().enumerate() {
        if it.peek() == Some(&&i) {
            it.next();
            f[label as usize] += 1;
        } else if out.peek() == Some(&&i) {
            out.next();
        } else {
            r[label as usize] += 1;
        }
    }
    Counts {
        forget: f,
        remain: r,
    }
}

/// Lines name samples by index (`123`) or id (a relative path or tar key);
/// blank lines and `#` comments are skipped; duplicates are counted and kept once.
fn read_list(train: &Dataset, file: &Path) -> Result<(Vec<usize>, Scenario), DataError> {
    let text = std::fs::read_to_string(file).map_err(|e| DataError::file(file, e.to_string()))?;
    let by_id: std::collections::HashMap<&str, usize> = train
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut chosen = BTreeSet::new();
    let mut listed = 0;
    for (line_no, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        listed += 1;
        let index = match by_id.get(entry) {
            Some(&i) => i,
            None => match entry.parse::<usize>() {
                Ok(i) if i < train.len() => i,
                _ => {
                    return Err(DataError::file(
                        file,
                        format!(
                            "line {}: {entry:?} is neither a sample id nor an index below {}",
                            line_no + 1,
                            train.len()
                        ),
                    ));
                }
            },
        };
        chosen.insert(index);
    }
    let duplicates = listed - chosen.len();
    Ok((
        chosen.into_iter().collect(),
        Scenario::List {
            file: file.into(),
            listed,
            duplicates,
        },
    ))
}
