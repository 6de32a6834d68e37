//! Per-example outputs of `sfron eval`, and their file: `examples.safetensors`
//! (loads with `safetensors.numpy.load_file` or `safetensors.torch.load_file`),
//! one row per sample in the order forget, remain, test, excluded (each by
//! index):
//!
//! | tensor | dtype | meaning |
//! |---|---|---|
//! | `subset` | u8 | 0 forget, 1 remain, 2 test, 3 excluded (training samples the split leaves out: never learned) |
//! | `index` | i64 | the sample's id: its index in the training part (forget, remain, excluded) or the test part |
//! | `label` | i64 | true class |
//! | `loss` | f32 | cross-entropy |
//! | `margin` | f32 | correct logit − logsumexp of the other logits (= log(p / (1 − p)), LiRA's logit-scaled confidence; KLoM's margin) |
//! | `predicted` | i64 | top-1 class |
//! | `confidence` | f32 | softmax probability of the true class |
//! | `entropy` | f32 | softmax entropy (nats) |
//! | `correct` | u8 | top-1 prediction is the label |
//! | `kl`, `js` | f32 | KL(reference ‖ model) and JS divergence (with `--reference`) |
//! | `logits` | f32 [n, classes] | with `eval.logits = true` |
//!
//! More rows than `eval.shard_rows` are written shard by shard:
//! `examples-00000-of-00003.safetensors`, …, each a contiguous run of rows
//! with every column (metadata `sfron.rows` = `first..end`); concatenated in
//! name order they are the one file's rows ([`Examples::load_dir`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Kind, Tensor};

use crate::model::weights;

/// The per-example file of an evaluation (one shard: the whole of it).
pub const FILE: &str = "examples.safetensors";

/// The per-example files in `dir` (`examples.safetensors` or its shards,
/// `examples-KKKKK-of-NNNNN.safetensors`), in name order.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n == FILE || (n.starts_with("examples-") && n.ends_with(".safetensors"))
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Which part of the split a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Subset {
    Forget = 0,
    Remain = 1,
    Test = 2,
    /// Training samples the split leaves out of both sets.
    Excluded = 3,
}

impl Subset {
    /// The sets every evaluation judges.
    pub const ALL: [Subset; 3] = [Subset::Forget, Subset::Remain, Subset::Test];
    /// Every kind of row, in the file's order.
    pub const ROWS: [Subset; 4] = [
        Subset::Forget,
        Subset::Remain,
        Subset::Test,
        Subset::Excluded,
    ];
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Examples {
    pub subset: Vec<u8>,
    pub index: Vec<i64>,
    pub label: Vec<i64>,
    pub loss: Vec<f32>,
    pub margin: Vec<f32>,
    pub predicted: Vec<i64>,
    pub confidence: Vec<f32>,
    pub entropy: Vec<f32>,
    pub correct: Vec<u8>,
    pub kl: Option<Vec<f32>>,
    pub js: Option<Vec<f32>>,
    /// Row-major `[rows, classes]`.
    pub logits: Option<Vec<f32>>,
}

impl Examples {
    pub fn len(&self) -> usize {
        self.subset.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subset.is_empty()
    }

    /// The values of `column` on the rows of `subset`.
    pub fn of(&self, subset: Subset, column: &[f32]) -> Vec<f64> {
        (0..self.len())
            .filter(|&i| self.subset[i] == subset as u8)
            .map(|i| column[i] as f64)
            .collect()
    }

    /// The rows `range`, every column.
    fn rows(&self, range: std::ops::Range<usize>) -> Examples {
        let classes = self
            .logits
            .as_ref()
            .map_or(0, |l| l.len() / self.len().max(1));
        let column = |v: &Option<Vec<f32>>| v.as_ref().map(|v| v[range.clone()].to_vec());
        Examples {
            subset: self.subset[range.clone()].to_vec(),
            index: self.index[range.clone()].to_vec(),
            label: self.label[range.clone()].to_vec(),
            loss: self.loss[range.clone()].to_vec(),
            margin: self.margin[range.clone()].to_vec(),
            predicted: self.predicted[range.clone()].to_vec(),
            confidence: self.confidence[range.clone()].to_vec(),
            entropy: self.entropy[range.clone()].to_vec(),
            correct: self.correct[range.clone()].to_vec(),
            kl: column(&self.kl),
            js: column(&self.js),
            logits: self
                .logits
                .as_ref()
                .map(|l| l[range.start * classes..range.end * classes].to_vec()),
        }
    }

    /// `other`'s rows after these (the same columns).
    fn append(&mut self, other: Examples) {
        fn join<T>(a: &mut Option<Vec<T>>, b: Option<Vec<T>>) {
            if let (Some(a), Some(b)) = (a.as_mut(), b) {
                a.extend(b);
            }
        }
        self.subset.extend(other.subset);
        self.index.extend(other.index);
        self.label.extend(other.label);
        self.loss.extend(other.loss);
        self.margin.extend(other.margin);
        self.predicted.extend(other.predicted);
        self.confidence.extend(other.confidence);
        self.entropy.extend(other.entropy);
        self.correct.extend(other.correct);
        join(&mut self.kl, other.kl);
        join(&mut self.js, other.js);
        join(&mut self.logits, other.logits);
    }

    /// Writes the rows into `dir` as `examples.safetensors`, or as shards of
    /// at most `shard_rows` rows each when there are more (0: one file),
    /// after removing the files of an earlier evaluation; returns the file
    /// names written.
    pub fn save_dir(
        &self,
        dir: &Path,
        shard_rows: usize,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Vec<String>> {
        for old in files_in(dir) {
            let path = dir.join(&old);
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        if shard_rows == 0 || self.len() <= shard_rows {
            self.save(&dir.join(FILE), metadata)?;
            return Ok(vec![FILE.to_string()]);
        }
        let shards = self.len().div_ceil(shard_rows);
        let mut names = Vec::with_capacity(shards);
        for k in 0..shards {
            let range = k * shard_rows..((k + 1) * shard_rows).min(self.len());
            let mut meta = metadata.clone();
            meta.insert(
                "sfron.rows".into(),
                format!("{}..{}", range.start, range.end),
            );
            let name = format!("examples-{k:05}-of-{shards:05}.safetensors");
            self.rows(range).save(&dir.join(&name), &meta)?;
            names.push(name);
        }
        Ok(names)
    }

    /// Reads what [`Examples::save_dir`] wrote into `dir`.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let names = files_in(dir);
        if names.is_empty() {
            bail!("{}: no {FILE} (nor its shards)", dir.display());
        }
        let mut all: Option<Examples> = None;
        for name in &names {
            let part = Self::load(&dir.join(name))?;
            match all.as_mut() {
                None => all = Some(part),
                Some(all) => all.append(part),
            }
        }
        Ok(all.expect("at least one file"))
    }

    /// Writes the file atomically, with `metadata`.
    pub fn save(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<()> {
        let n = self.len() as i64;
        let mut tensors = vec![
            ("subset".to_string(), Tensor::from_slice(&self.subset)),
            ("index".into(), Tensor::from_slice(&self.index)),
            ("label".into(), Tensor::from_slice(&self.label)),
            ("loss".into(), Tensor::from_slice(&self.loss)),
            ("margin".into(), Tensor::from_slice(&self.margin)),
            ("predicted".into(), Tensor::from_slice(&self.predicted)),
            ("confidence".into(), Tensor::from_slice(&self.confidence)),
            ("entropy".into(), Tensor::from_slice(&self.entropy)),
            ("correct".into(), Tensor::from_slice(&self.correct)),
        ];
        if let Some(kl) = &self.kl {
            tensors.push(("kl".into(), Tensor::from_slice(kl)));
        }
        if let Some(js) = &self.js {
            tensors.push(("js".into(), Tensor::from_slice(js)));
        }
        if let Some(logits) = &self.logits {
            let classes = if n == 0 { 0 } else { logits.len() as i64 / n };
            tensors.push((
                "logits".into(),
                Tensor::from_slice(logits).view([n, classes]),
            ));
        }
        weights::save(path, &tensors, metadata)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a file written by [`Examples::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let (tensors, _) = weights::load(path)?;
        let map: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        let get = |name: &str, kind: Kind| -> Result<Tensor> {
            let t = map
                .get(name)
                .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
            if t.kind() != kind {
                bail!(
                    "{}: `{name}` is {:?}, expected {kind:?}",
                    path.display(),
                    t.kind()
                );
            }
            Ok(t.flatten(0, -1))
        };
        let f32s =
            |name: &str| -> Result<Vec<f32>> { Ok(Vec::<f32>::try_from(get(name, Kind::Float)?)?) };
        let optional = |name: &str| -> Result<Option<Vec<f32>>> {
            if map.contains_key(name) {
                f32s(name).map(Some)
            } else {
                Ok(None)
            }
        };
        let ex = Examples {
            subset: Vec::<u8>::try_from(get("subset", Kind::Uint8)?)?,
            index: Vec::<i64>::try_from(get("index", Kind::Int64)?)?,
            label: Vec::<i64>::try_from(get("label", Kind::Int64)?)?,
            loss: f32s("loss")?,
            margin: f32s("margin")?,
            predicted: Vec::<i64>::try_from(get("predicted", Kind::Int64)?)?,
            confidence: f32s("confidence")?,
            entropy: f32s("entropy")?,
            correct: Vec::<u8>::try_from(get("correct", Kind::Uint8)?)?,
            kl: optional("kl")?,
            js: optional("js")?,
            logits: optional("logits")?,
        };
        let n = ex.len();
        let columns = [
            ex.index.len(),
            ex.label.len(),
            ex.loss.len(),
            ex.margin.len(),
            ex.predicted.len(),
            ex.confidence.len(),
            ex.entropy.len(),
            ex.correct.len(),
        ];
        if columns.iter().any(|&c| c != n)
            || ex.kl.as_ref().is_some_and(|v| v.len() != n)
            || ex.js.as_ref().is_some_and(|v| v.len() != n)
        {
            bail!("{}: the columns have different lengths", path.display());
        }
        Ok(ex)
    }
}
