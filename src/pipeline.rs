//! Building an export's pipeline from its configuration: every stage's parameters are checked
//! first (all problems collected), then the store is opened at the bottom, wrapped, laid out,
//! and the block layers are stacked on top.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::value::{Dict, Value};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::block::BlockDevice;
use crate::block::cache::{CacheLayer, CacheParams};
use crate::block::fault::{FaultLayer, FaultParams};
use crate::block::retry::{RetryLayer, RetryParams};
use crate::config::model::{ExportConfig, Problem};
use crate::config::size::{Size, SizeOrZero, human};
use crate::layout::raw::{FileImage, MemoryImage};
use crate::layout::sharded::{
    DEFAULT_CHUNK_SIZE, DEFAULT_READAHEAD, MAX_READAHEAD, ShardedOptions, ShardedVolume,
};
use crate::registry::Kind;
use crate::store::ObjectStore;
use crate::store::fault::FaultStore;
use crate::store::file::FileStore;
use crate::store::memory::MemoryStore;
use crate::store::retry::RetryStore;
use crate::store::s3::{S3Config, S3Store};

/// Where and how pipelines are built.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// Check only: open nothing for writing, create nothing.
    pub dry_run: bool,
    /// Where state lives (caches without a `path`): `$STATE_DIRECTORY`, else
    /// `/var/lib/nbd-rs`.
    pub state_dir: PathBuf,
}

impl BuildContext {
    /// The state directory systemd gives (`StateDirectory=`), or `/var/lib/nbd-rs`.
    pub fn state_dir_from_env() -> PathBuf {
        std::env::var_os("STATE_DIRECTORY")
            .map(|s| {
                // systemd passes a colon-separated list when several are configured.
                let s = s.to_string_lossy().into_owned();
                PathBuf::from(s.split(':').next().unwrap_or("/var/lib/nbd-rs"))
            })
            .unwrap_or_else(|| PathBuf::from("/var/lib/nbd-rs"))
    }
}

/// Parameters of `file`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileParams {
    path: PathBuf,
}

/// Parameters of `sharded`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ShardedParams {
    chunk_size: Option<Size>,
    name: Option<String>,
    readahead: Option<SizeOrZero>,
}

/// Parameters of stages that take none.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// Every stage's parameters, parsed.
enum Params {
    None,
    File(FileParams),
    Sharded(ShardedParams),
    Retry(RetryParams),
    Fault(FaultParams),
    Cache(CacheParams),
    S3(Box<S3Config>),
}

fn parse<T: DeserializeOwned>(
    e: &ExportConfig,
    stage: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let empty = Value::from(Dict::new());
    let value = e.params.get(stage).unwrap_or(&empty);
    match value.deserialize::<T>() {
        Ok(t) => Some(t),
        Err(err) => {
            for one in err {
                let mut path: Vec<String> = vec!["exports".into(), e.name.clone(), stage.into()];
                path.extend(one.path.iter().cloned());
                let message = match &one.kind {
                    figment::error::Kind::UnknownField(field, known) => {
                        if path.last() != Some(field) {
                            path.push(field.clone());
                        }
                        if known.is_empty() {
                            "unknown key (this stage takes no parameters)".to_owned()
                        } else {
                            format!("unknown key (known: {})", known.join(", "))
                        }
                    }
                    figment::error::Kind::MissingField(field) => {
                        if path.last().map(String::as_str) != Some(field.as_ref()) {
                            path.push(field.to_string());
                        }
                        "missing key".to_owned()
                    }
                    figment::error::Kind::UnknownVariant(value, known) => {
                        format!("unknown value {value:?} (known: {})", known.join(", "))
                    }
                    other => other.to_string(),
                };
                problems.push(Problem { path, message });
            }
            None
        }
    }
}

/// Records a stage's own validation failure. The messages of the stages begin with the key
/// they are about (`attempts must be at least 1`): the first key of the table the message
/// names places the problem on that key's line.
fn invalid(
    e: &ExportConfig,
    stage: &str,
    checked: Result<(), String>,
    problems: &mut Vec<Problem>,
) -> Option<()> {
    let Err(message) = checked else {
        return Some(());
    };
    let mut path = vec!["exports".to_owned(), e.name.clone(), stage.to_owned()];
    let words: Vec<&str> = message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    if let Some(Value::Dict(_, table)) = e.params.get(stage)
        && let Some(key) = words.iter().find(|w| table.contains_key(**w))
    {
        path.push((*key).to_owned());
    }
    problems.push(Problem { path, message });
    None
}

fn params_of(
    e: &ExportConfig,
    stage: &str,
    kind: Kind,
    problems: &mut Vec<Problem>,
) -> Option<Params> {
    let at = |key: &str| -> Vec<String> {
        let mut p = vec!["exports".to_owned(), e.name.clone(), stage.to_owned()];
        if !key.is_empty() {
            p.push(key.to_owned());
        }
        p
    };
    Some(match stage {
        "file" => Params::File(parse(e, stage, problems)?),
        "s3" => {
            let p: S3Config = parse(e, stage, problems)?;
            match p.validate() {
                Ok(p) => Params::S3(Box::new(p)),
                Err(why) => {
                    problems.push(Problem {
                        path: at(""),
                        message: why,
                    });
                    return None;
                }
            }
        }
        "sharded" => {
            let p: ShardedParams = parse(e, stage, problems)?;
            let mut ok = true;
            if let Some(Size(c)) = p.chunk_size
                && (!c.is_power_of_two() || !(4096..=1 << 30).contains(&c))
            {
                problems.push(Problem {
                    path: at("chunk_size"),
                    message: format!(
                        "chunk_size must be a power of two from 4KiB to 1GiB, not {}",
                        human(c)
                    ),
                });
                ok = false;
            }
            if let Some(SizeOrZero(r)) = p.readahead
                && r > MAX_READAHEAD
            {
                problems.push(Problem {
                    path: at("readahead"),
                    message: format!("readahead must be at most 1GiB, not {}", human(r)),
                });
                ok = false;
            }
            if !ok {
                return None;
            }
            Params::Sharded(p)
        }
        "retry" => {
            let p: RetryParams = parse(e, stage, problems)?;
            invalid(e, stage, p.validate(), problems)?;
            Params::Retry(p)
        }
        "fault" => {
            let p: FaultParams = parse(e, stage, problems)?;
            let checked = if kind == Kind::StoreWrapper {
                p.validate_for_store()
            } else {
                p.validate()
            };
            invalid(e, stage, checked, problems)?;
            Params::Fault(p)
        }
        "cache" => {
            let p: CacheParams = parse(e, stage, problems)?;
            invalid(e, stage, p.validate().map_err(|e| e.to_string()), problems)?;
            Params::Cache(p)
        }
        _ => {
            parse::<NoParams>(e, stage, problems)?;
            Params::None
        }
    })
}

/// A built export with a line for `nbd-rs check`.
pub struct Built {
    /// The pipeline's top.
    pub device: Option<Arc<dyn BlockDevice>>,
    /// What was built, for people: `raw -> memory, 64 MiB`.
    pub summary: String,
    /// The disk's size, when known (a check does not learn the size of an S3 volume whose
    /// configuration does not state it).
    pub size: Option<u64>,
}

/// Builds (or, with `dry_run`, checks) an export's pipeline. Every problem found is returned,
/// each at its export, stage and key.
pub async fn build(e: &ExportConfig, ctx: &BuildContext) -> Result<Built, Vec<Problem>> {
    let mut problems = Vec::new();
    let stages = e.pipeline.stages();
    let mut parsed = Vec::with_capacity(stages.len());
    for s in &stages {
        parsed.push(params_of(e, &s.name, s.kind, &mut problems));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut parsed: Vec<Params> = parsed.into_iter().flatten().collect();
    let export_at = |key: &str| -> Vec<String> {
        let mut p = vec!["exports".to_owned(), e.name.clone()];
        if !key.is_empty() {
            p.push(key.to_owned());
        }
        p
    };
    let fail = |path: Vec<String>, message: String| Err(vec![Problem { path, message }]);

    // The bottom: store and layout.
    let store_params = parsed.pop();
    let n_layers = e.pipeline.layers.len();
    let layout_params = parsed.remove(n_layers);
    let wrapper_params: Vec<Params> = parsed.split_off(n_layers);
    let layer_params = parsed;

    let detail: String;
    let size: Option<u64>;
    let mut chunk_size: Option<u64> = None;
    let mut device: Option<Arc<dyn BlockDevice>>;
    let volume_key: String;
    match e.pipeline.layout.as_str() {
        "raw" => match (e.pipeline.store.as_str(), store_params) {
            ("memory", _) => {
                let Some(bytes) = e.size else {
                    return fail(
                        export_at(""),
                        "missing key \"size\": a memory disk needs a size".into(),
                    );
                };
                detail = human(bytes);
                size = Some(bytes);
                device = (!ctx.dry_run).then(|| {
                    Arc::new(MemoryImage::new(bytes, e.read_only)) as Arc<dyn BlockDevice>
                });
                // A memory disk starts empty on every run: a cache above it must never replay
                // into another run's disk, so its key is new each time.
                volume_key = format!("memory:{}:{}", e.name, uuid::Uuid::new_v4());
            }
            ("file", Some(Params::File(p))) => {
                let path = image_path(&p.path, &e.name).map_err(|m| {
                    vec![Problem {
                        path: vec![
                            "exports".into(),
                            e.name.clone(),
                            "file".into(),
                            "path".into(),
                        ],
                        message: m,
                    }]
                })?;
                let open_err = |err: crate::layout::raw::OpenError| {
                    vec![Problem {
                        path: vec![
                            "exports".into(),
                            e.name.clone(),
                            "file".into(),
                            "path".into(),
                        ],
                        message: err.to_string(),
                    }]
                };
                if ctx.dry_run {
                    let bytes = FileImage::check(&path, e.size, e.read_only).map_err(open_err)?;
                    detail = format!("{}, image {}", human(bytes), path.display());
                    size = Some(bytes);
                    device = None;
                } else {
                    let img = FileImage::open(&path, e.size, e.read_only).map_err(open_err)?;
                    detail = format!("{}, image {}", human(img.info().size), path.display());
                    size = Some(img.info().size);
                    device = Some(Arc::new(img));
                }
                volume_key = format!("file:{}", path.display());
            }
            (other, _) => {
                return fail(
                    export_at("pipeline"),
                    format!("raw cannot serve the store {other:?}"),
                );
            }
        },
        "sharded" => {
            let mut store: Arc<dyn ObjectStore> = match (e.pipeline.store.as_str(), store_params) {
                ("memory", _) => Arc::new(MemoryStore::new()),
                ("s3", Some(Params::S3(cfg))) => {
                    if ctx.dry_run {
                        // A check does not call S3: the parameters were validated, and a server
                        // that is down for a moment must not stop the service from starting.
                        Arc::new(MemoryStore::new())
                    } else {
                        match S3Store::open(*cfg).await {
                            Ok(s) => Arc::new(s),
                            Err(err) => {
                                return fail(
                                    vec!["exports".into(), e.name.clone(), "s3".into()],
                                    err.to_string(),
                                );
                            }
                        }
                    }
                }
                ("file", Some(Params::File(p))) => {
                    let create = !ctx.dry_run && e.size.is_some();
                    match FileStore::open(&p.path, create) {
                        Ok(s) => Arc::new(s),
                        // A directory that would be created on a real start is fine in a check.
                        Err(_) if ctx.dry_run && e.size.is_some() && !p.path.exists() => {
                            Arc::new(MemoryStore::new())
                        }
                        Err(err) => {
                            return fail(
                                vec![
                                    "exports".into(),
                                    e.name.clone(),
                                    "file".into(),
                                    "path".into(),
                                ],
                                err.to_string(),
                            );
                        }
                    }
                }
                (other, _) => {
                    return fail(
                        export_at("pipeline"),
                        format!("sharded cannot use the store {other:?}"),
                    );
                }
            };
            for (name, p) in e.pipeline.wrappers.iter().zip(wrapper_params).rev() {
                store = match p {
                    Params::Retry(p) => Arc::new(RetryStore::new(store, p)),
                    Params::Fault(p) => Arc::new(FaultStore::new(store, p)),
                    _ => {
                        return fail(
                            export_at("pipeline"),
                            format!("{name:?} is not a store wrapper"),
                        );
                    }
                };
            }
            let Params::Sharded(sp) = layout_params else {
                return fail(export_at("pipeline"), "sharded has no parameters".into());
            };
            let opts = ShardedOptions {
                name: sp.name.clone().unwrap_or_else(|| e.name.clone()),
                chunk_size: sp.chunk_size.map(|s| s.0),
                size: e.size,
                read_only: e.read_only,
                create: !ctx.dry_run,
            };
            if ctx.dry_run && e.pipeline.store == "s3" {
                // The volume's metadata lives in S3, which a check does not contact.
                let stated = e
                    .size
                    .map_or("size recorded in the volume".to_owned(), human);
                let chunk = human(opts.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE));
                detail = format!("{stated}, {chunk} chunks; S3 not contacted by a check");
                size = e.size;
                volume_key = String::new();
                device = None;
            } else {
                let vol = ShardedVolume::open(store, opts)
                    .await
                    .map_err(|err| {
                        vec![Problem {
                            path: vec!["exports".into(), e.name.clone(), "sharded".into()],
                            message: err.to_string(),
                        }]
                    })?
                    .with_readahead(sp.readahead.map_or(DEFAULT_READAHEAD, |s| s.0));
                detail = format!(
                    "{}, {} chunks",
                    human(vol.info().size),
                    human(vol.chunk_size())
                );
                volume_key = format!("sharded:{}", vol.volume_id());
                size = Some(vol.info().size);
                chunk_size = Some(vol.chunk_size());
                device = Some(Arc::new(vol));
            }
        }
        other => return fail(export_at("pipeline"), format!("unknown layout {other:?}")),
    }

    // The top: block layers, built from the bottom up.
    for (name, p) in e.pipeline.layers.iter().zip(layer_params).rev() {
        let Some(inner) = device.take() else {
            // A dry run of a pipeline whose bottom was not opened: parameters were checked.
            break;
        };
        device = Some(match p {
            Params::Retry(p) => Arc::new(RetryLayer::new(inner, p)),
            Params::Fault(p) => Arc::new(FaultLayer::new(inner, p)),
            Params::Cache(mut p) => {
                // One cache block per chunk, unless the file says otherwise: an upload is then
                // one whole-chunk write below, never a read-modify-write.
                let explicit = matches!(e.params.get("cache"), Some(Value::Dict(_, d)) if d.contains_key("block_size"));
                if !explicit
                    && let Some(chunk) = chunk_size.filter(|c| (4096..=32 << 20).contains(c))
                {
                    p.block_size = chunk;
                }
                let dir = p
                    .path
                    .clone()
                    .unwrap_or_else(|| ctx.state_dir.join("cache").join(&e.name));
                if ctx.dry_run {
                    inner
                } else {
                    let layer = CacheLayer::open(inner, p, &dir, &volume_key)
                        .await
                        .map_err(|err| {
                            vec![Problem {
                                path: vec!["exports".into(), e.name.clone(), "cache".into()],
                                message: err.to_string(),
                            }]
                        })?;
                    Arc::new(layer)
                }
            }
            _ => {
                return fail(
                    export_at("pipeline"),
                    format!("{name:?} is not a block layer"),
                );
            }
        });
    }
    if ctx.dry_run {
        device = None;
    }
    let mut summary = format!("{}: {} ({detail})", e.name, e.pipeline);
    if e.read_only {
        summary.push_str(", read-only");
    }
    if let Some(b) = e.block_sizes {
        summary.push_str(&format!(
            ", block sizes {}/{}/{}",
            b.minimum, b.preferred, b.maximum
        ));
    }
    if !e.description.is_empty() {
        summary.push_str(&format!(", {:?}", e.description));
    }
    Ok(Built {
        device,
        summary,
        size,
    })
}

/// Under `raw`, a directory path serves `DIR/NAME`.
fn image_path(path: &Path, name: &str) -> Result<PathBuf, String> {
    let as_dir = path.as_os_str().to_string_lossy().ends_with('/') || path.is_dir();
    if !as_dir {
        return Ok(path.to_owned());
    }
    if name.contains('/') || name == "." || name == ".." {
        return Err(format!(
            "{} is a directory, and the export name {name:?} is not a plain file name to serve from it",
            path.display()
        ));
    }
    Ok(path.join(name))
}
