//! Configuration: layered sources → [`RawConfig`] → validated [`RunPlan`].
//!
//! Layers, lowest to highest precedence (the `config` crate merges them):
//! 1. built-in defaults (`raw.rs`);
//! 2. the TOML file given with `--config`;
//! 3. the environment variables of [`ENV_KEYS`] (and no others);
//! 4. `--set key.path=value`, in command-line order (the shorthand flags such
//!    as `--device` are `--set`s applied last).
//!
//! Every value remembers where it came from, so an unknown key, a wrong type
//! or a rejected value is reported with the key, its origin (file, variable or
//! flag) and what is allowed. Nothing downstream reads the raw form.

mod plan;
pub mod raw;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use config::{Map, Source, Value, ValueKind};

pub use plan::{
    BadTeacherPlan, Baselines, BatchNormPlan, DataPlan, EpochPlan, GaPlan, L1SparsePlan, ModelPlan,
    OptimizerPlan, RunPlan, Saliency, SalunPlan, Schedule, ScrubPlan, SfronPlan, TrainPlan,
    UnlearnPlan,
};
pub use raw::RawConfig;

/// The only environment variables that set configuration keys.
pub const ENV_KEYS: [(&str, &str); 8] = [
    ("SFRON_RUN_ROOT", "run.root"),
    ("SFRON_SEED", "run.seed"),
    ("SFRON_DEVICE", "device.kind"),
    ("SFRON_THREADS", "device.threads"),
    ("SFRON_LOG_LEVEL", "log.level"),
    ("SFRON_LOG_RANKS", "log.ranks"),
    ("SFRON_LOG_FORMAT", "log.format"),
    ("SFRON_DATA_ROOT", "data.root"),
];

const DEFAULT_ORIGIN: &str = "built-in default";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("`--set {arg}`: {message}")]
    Set { arg: String, message: String },
    #[error("config key `{key}` (from {origin}): {message}")]
    Key {
        key: String,
        origin: String,
        message: String,
    },
}

/// What the command line and the environment contribute.
#[derive(Clone, Debug, Default)]
pub struct Layers {
    pub file: Option<PathBuf>,
    /// `(variable, value)` pairs; see [`Layers::from_env`].
    pub env: Vec<(String, String)>,
    /// `key.path=value` strings, lowest precedence first.
    pub sets: Vec<String>,
}

impl Layers {
    /// The values of [`ENV_KEYS`] found in this process's environment.
    pub fn env_from_process() -> Vec<(String, String)> {
        ENV_KEYS
            .iter()
            .filter_map(|(var, _)| std::env::var(var).ok().map(|v| (var.to_string(), v)))
            .collect()
    }
}

/// A merged configuration and the origin of each of its leaf keys.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub raw: RawConfig,
    origins: BTreeMap<String, String>,
    sources: Vec<String>,
}

impl LoadedConfig {
    /// Where `key` got its value ("built-in default" if nobody set it).
    pub fn origin(&self, key: &str) -> &str {
        origin_of(&self.origins, key)
    }

    /// An error about `key` that names its origin.
    pub fn key_error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            key: key.into(),
            origin: self.origin(key).into(),
            message: message.into(),
        }
    }

    /// The resolved configuration as TOML, headed by the layers that made it.
    pub fn resolved_toml(&self) -> String {
        let body = toml::to_string(&self.raw).expect("RawConfig serialises to TOML");
        format!(
            "# resolved by sfron {} from: {}\n{body}",
            env!("CARGO_PKG_VERSION"),
            self.sources.join(" < ")
        )
    }

    /// One line per key: `key = value    # origin`, sorted.
    pub fn table(&self) -> String {
        let value = toml::Value::try_from(&self.raw).expect("RawConfig serialises to TOML");
        let mut leaves = Vec::new();
        flatten_toml("", &value, &mut leaves);
        let width = leaves
            .iter()
            .map(|(k, v)| format!("{k} = {v}").len())
            .max()
            .unwrap_or(0)
            + 2;
        leaves
            .iter()
            .map(|(k, v)| {
                let kv = format!("{k} = {v}");
                format!("{kv:<width$}# {}\n", self.origin(k))
            })
            .collect()
    }
}

/// Merges the layers and deserialises them into a [`RawConfig`].
pub fn load(layers: &Layers) -> Result<LoadedConfig, ConfigError> {
    let defaults = toml::Value::try_from(RawConfig::default()).expect("defaults serialise");
    let mut builder =
        config::Config::builder().add_source(Layer::from_toml(&defaults, DEFAULT_ORIGIN));
    let mut sources = vec!["defaults".to_string()];
    if let Some(path) = &layers.file {
        for (toml, path) in preset_chain(path)? {
            builder = builder.add_source(Layer::from_toml(&toml, &path.display().to_string()));
            sources.push(path.display().to_string());
        }
    }
    for (var, value) in &layers.env {
        let Some((_, key)) = ENV_KEYS.iter().find(|(v, _)| v == var) else {
            continue;
        };
        let origin = format!("environment variable {var}");
        builder = builder.add_source(Layer::single(
            key,
            ValueKind::String(value.clone()),
            &origin,
        ));
        sources.push(format!("${var}"));
    }
    for arg in &layers.sets {
        let (key, value) = parse_set(arg)?;
        builder = builder.add_source(Layer::single(&key, value, &format!("--set {arg}")));
        sources.push(format!("--set {arg}"));
    }
    let merged = builder
        .build()
        .and_then(|c| c.collect())
        .map_err(|e| ConfigError::Key {
            key: "?".into(),
            origin: "layers".into(),
            message: e.to_string(),
        })?;
    let mut origins = BTreeMap::new();
    collect_origins("", &merged, &mut origins);
    let root = Value::new(None, ValueKind::Table(merged));
    let raw: RawConfig = serde_path_to_error::deserialize(root).map_err(|e| {
        let key = e.path().to_string();
        let origin = origin_of(&origins, &key).to_string();
        ConfigError::Key {
            key,
            origin,
            message: clean_message(&e.into_inner().to_string()),
        }
    })?;
    Ok(LoadedConfig {
        raw,
        origins,
        sources,
    })
}

/// How many presets a `base` chain may hold (a cycle stops here).
const MAX_BASES: usize = 4;

/// A configuration file and the presets it builds on, lowest first: a
/// top-level `base = "FILE"` (relative to the file) layers the file over
/// that preset, for scenario presets that change a few keys of another.
fn preset_chain(path: &Path) -> Result<Vec<(toml::Value, PathBuf)>, ConfigError> {
    let mut chain = Vec::new();
    let mut next = Some(path.to_path_buf());
    while let Some(path) = next.take() {
        if chain.len() > MAX_BASES {
            return Err(ConfigError::File {
                path,
                message: format!("more than {MAX_BASES} presets deep through `base` (a cycle?)"),
            });
        }
        let mut toml = read_toml(&path)?;
        if let Some(base) = toml.as_table_mut().and_then(|t| t.remove("base")) {
            let Some(base) = base.as_str() else {
                return Err(ConfigError::File {
                    path,
                    message: "`base` must be the path of a preset, a string".into(),
                });
            };
            next = Some(path.parent().unwrap_or(Path::new(".")).join(base));
        }
        chain.push((toml, path));
    }
    chain.reverse();
    Ok(chain)
}

fn read_toml(path: &Path) -> Result<toml::Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.into(),
        message: e.to_string(),
    })?;
    text.parse::<toml::Table>()
        .map(toml::Value::Table)
        .map_err(|e| ConfigError::File {
            path: path.into(),
            message: e.to_string().trim_end().to_string(),
        })
}

/// Splits `key.path=value`; the value is read as a TOML value when it is one
/// (`3`, `0.5`, `true`, `[1, 2]`, `"text"`) and as a bare string otherwise.
fn parse_set(arg: &str) -> Result<(String, ValueKind), ConfigError> {
    let err = |message: &str| ConfigError::Set {
        arg: arg.into(),
        message: message.into(),
    };
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| err("expected key.path=value"))?;
    let key = key.trim();
    let valid_key = !key.is_empty()
        && key.split('.').all(|part| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if !valid_key {
        return Err(err("the key must be dotted words such as `device.threads`"));
    }
    let value = value.trim();
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"));
    let kind = match parsed {
        // `nan` and `inf` are TOML floats, but as a value they are far more
        // likely a name (`run.name=nan`); no key takes a non-finite number.
        Some(toml::Value::Float(f)) if !f.is_finite() => ValueKind::String(value.to_string()),
        Some(v) => toml_to_kind(&v),
        None => ValueKind::String(value.to_string()),
    };
    Ok((key.to_string(), kind))
}

/// The origin of a leaf key, or of the first leaf under a table key.
fn origin_of<'a>(origins: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    if let Some(origin) = origins.get(key) {
        return origin;
    }
    let prefix = format!("{key}.");
    origins
        .range(prefix.clone()..)
        .next()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(_, o)| o.as_str())
        .unwrap_or(DEFAULT_ORIGIN)
}

/// Drops the config crate's " for key `...` in ..." suffix: the error names
/// the key and origin itself.
fn clean_message(message: &str) -> String {
    match message.find(" for key `") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

fn collect_origins(prefix: &str, map: &Map<String, Value>, out: &mut BTreeMap<String, String>) {
    for (k, v) in map {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match &v.kind {
            ValueKind::Table(inner) => collect_origins(&key, inner, out),
            _ => {
                out.insert(key, v.origin().unwrap_or(DEFAULT_ORIGIN).to_string());
            }
        }
    }
}

fn flatten_toml(prefix: &str, value: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_toml(&key, v, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf.clone())),
    }
}

fn toml_to_kind(value: &toml::Value) -> ValueKind {
    match value {
        toml::Value::String(s) => ValueKind::String(s.clone()),
        toml::Value::Integer(i) => ValueKind::I64(*i),
        toml::Value::Float(f) => ValueKind::Float(*f),
        toml::Value::Boolean(b) => ValueKind::Boolean(*b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(a) => ValueKind::Array(
            a.iter()
                .map(|v| Value::new(None, toml_to_kind(v)))
                .collect(),
        ),
        toml::Value::Table(t) => ValueKind::Table(
            t.iter()
                .map(|(k, v)| (k.clone(), Value::new(None, toml_to_kind(v))))
                .collect(),
        ),
    }
}

/// One configuration layer whose every value carries `origin`.
#[derive(Clone, Debug)]
struct Layer {
    entries: Map<String, Value>,
}

impl Layer {
    fn from_toml(value: &toml::Value, origin: &str) -> Self {
        let mut leaves = Vec::new();
        flatten_toml("", value, &mut leaves);
        let origin = origin.to_string();
        let entries = leaves
            .iter()
            .map(|(k, v)| (k.clone(), Value::new(Some(&origin), toml_to_kind(v))))
            .collect();
        Layer { entries }
    }

    fn single(key: &str, kind: ValueKind, origin: &str) -> Self {
        let mut entries = Map::new();
        entries.insert(key.to_string(), Value::new(Some(&origin.to_string()), kind));
        Layer { entries }
    }
}

impl Source for Layer {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self.entries.clone())
    }
}

#[cfg(test)]
mod tests;
