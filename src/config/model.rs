//! The configuration as plain data, loaded with figment from a TOML file and `NBD_RS_`
//! environment variables, checked with every problem collected, and located by line.
//!
//! Environment variables use `__` between keys: `NBD_RS_SERVER__LISTEN='["127.0.0.1:10809"]'`,
//! `NBD_RS_EXPORTS__SCRATCH__SIZE=128MiB`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};

use super::pipeline::{self, Pipeline};
use super::size::parse_size;
use crate::block::{BlockSizes, MAX_PAYLOAD};
use crate::registry;
use crate::server::{DEFAULT_LISTEN, ListenAddr};

/// Where an export was declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file (or the environment over it).
    File,
    /// `-e` on the command line.
    CommandLine,
}

/// One export: a name, a pipeline and the parameters of its stages.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportConfig {
    /// The name clients ask for.
    pub name: String,
    /// The stages, checked.
    pub pipeline: Pipeline,
    /// The disk's size: required by `memory`; creates a missing image or volume.
    pub size: Option<u64>,
    /// Shown by `nbdinfo --list`.
    pub description: String,
    /// Refuse writes.
    pub read_only: bool,
    /// Block size constraints to advertise and enforce instead of the pipeline's own.
    pub block_sizes: Option<BlockSizes>,
    /// Each stage's parameter table, by stage name (absent: defaults).
    pub params: BTreeMap<String, Value>,
    /// Where it was declared.
    pub origin: Origin,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Listen addresses.
    pub listen: Vec<ListenAddr>,
    /// The export the empty name selects (default: the first export).
    pub default_export: Option<String>,
    /// The exports: the file's in name order, then the command line's.
    pub exports: Vec<ExportConfig>,
    /// `[log] level`: a level, or filter directives (`RUST_LOG` overrides it).
    pub log_level: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![ListenAddr::Tcp(DEFAULT_LISTEN.to_owned())],
            default_export: None,
            exports: Vec::new(),
            log_level: None,
        }
    }
}

/// One thing wrong with a configuration, at a key path such as
/// `["exports", "vol", "sharded", "chunk_size"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: the key path (empty for the file as a whole).
    pub path: Vec<String>,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    /// A problem at `path`.
    pub fn at<S: AsRef<str>>(path: &[S], message: impl Into<String>) -> Self {
        Problem {
            path: path.iter().map(|s| s.as_ref().to_owned()).collect(),
            message: message.into(),
        }
    }
}

/// Every problem found, rendered with its place: file and line, environment variable, or
/// command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for Problems {}

/// Finds where a key came from: a line of the file, or an environment variable.
#[derive(Debug, Default)]
pub struct Locator {
    file: Option<(PathBuf, String)>,
    figment: Option<Figment>,
    cli_exports: Vec<String>,
}

impl Locator {
    /// Renders a problem as one line: `FILE:LINE: export "vol", stage "sharded", key
    /// "chunk_size": message`.
    pub fn render(&self, p: &Problem) -> String {
        let cli = p.path.first().map(String::as_str) == Some("exports")
            && p.path.get(1).is_some_and(|n| self.cli_exports.contains(n));
        // An -e export has no stage tables to point at: name the export only.
        let what = if cli {
            describe_path(&p.path[..2])
        } else {
            describe_path(&p.path)
        };
        let place = self.place(&p.path);
        match (place, what.is_empty()) {
            (Some(pl), false) => format!("{pl}: {what}: {}", p.message),
            (Some(pl), true) => format!("{pl}: {}", p.message),
            (None, false) => format!("{what}: {}", p.message),
            (None, true) => p.message.clone(),
        }
    }

    /// Renders every problem.
    pub fn render_all(&self, problems: &[Problem]) -> Problems {
        Problems(problems.iter().map(|p| self.render(p)).collect())
    }

    /// Notes that an export came from `-e`.
    pub fn add_cli_export(&mut self, name: &str) {
        self.cli_exports.push(name.to_owned());
    }

    fn place(&self, path: &[String]) -> Option<String> {
        if path.first().map(String::as_str) == Some("exports")
            && let Some(name) = path.get(1)
            && self.cli_exports.contains(name)
        {
            return Some(format!("command line (-e {name})"));
        }
        if let Some(fig) = &self.figment
            && !path.is_empty()
        {
            // Walk up until a key that some provider supplied.
            for n in (1..=path.len()).rev() {
                let dotted = path[..n].join(".");
                let Some(meta) = fig.find_metadata(&dotted) else {
                    continue;
                };
                if meta.name.contains("environment") {
                    return Some(format!(
                        "environment variable NBD_RS_{}",
                        path[..n].join("__").to_uppercase()
                    ));
                }
                break;
            }
        }
        let (file, text) = self.file.as_ref()?;
        let line = line_of(text, path);
        Some(match line {
            Some(l) => format!("{}:{l}", file.display()),
            None => file.display().to_string(),
        })
    }
}

/// `export "vol", stage "sharded", key "chunk_size"` for a key path.
fn describe_path(path: &[String]) -> String {
    let mut parts = Vec::new();
    match path {
        [] => {}
        [top, name, rest @ ..] if top == "exports" => {
            parts.push(format!("export {name:?}"));
            match rest {
                [] => {}
                [k] if registry::stage(k).is_some() => parts.push(format!("stage {k:?}")),
                [stage, keys @ ..] if registry::stage(stage).is_some() => {
                    parts.push(format!("stage {stage:?}"));
                    if !keys.is_empty() {
                        parts.push(format!("key {:?}", keys.join(".")));
                    }
                }
                keys => parts.push(format!("key {:?}", keys.join("."))),
            }
        }
        _ => parts.push(format!("key {:?}", path.join("."))),
    }
    parts.join(", ")
}

/// The 1-based line of a key path in TOML text, as close as the file allows.
fn line_of(text: &str, path: &[String]) -> Option<usize> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let mut item = doc.as_item();
    let mut best: Option<std::ops::Range<usize>> = None;
    for key in path {
        let table = item.as_table_like()?;
        let Some((k, next)) = table.get_key_value(key) else {
            break;
        };
        best = k.span().or_else(|| next.span()).or(best);
        if let Some(t) = next.as_table()
            && let Some(span) = t.span()
        {
            best = Some(span);
        }
        item = next;
    }
    let start = best?.start;
    Some(text[..start.min(text.len())].matches('\n').count() + 1)
}

/// Loads the configuration file (if any) with the environment over it. Returns the config,
/// the problems found (empty when valid) and a locator to render them.
pub fn load(path: Option<&Path>) -> (Config, Vec<Problem>, Locator) {
    let mut locator = Locator::default();
    let mut problems = Vec::new();
    let mut figment = Figment::new();
    if let Some(path) = path {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                if let Err(e) = toml_edit::Document::parse(text.as_str()) {
                    let line = e
                        .span()
                        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
                    let place = match line {
                        Some(l) => format!("{}:{l}", path.display()),
                        None => path.display().to_string(),
                    };
                    let msg = e.message().trim().to_owned();
                    return (
                        Config::default(),
                        vec![Problem::at::<&str>(
                            &[],
                            format!("{place}: TOML syntax error: {msg}"),
                        )],
                        Locator::default(),
                    );
                }
                locator.file = Some((path.to_owned(), text));
                figment = figment.merge(Toml::file_exact(path));
            }
            Err(e) => {
                return (
                    Config::default(),
                    vec![Problem::at::<&str>(
                        &[],
                        format!("cannot read config file {}: {e}", path.display()),
                    )],
                    locator,
                );
            }
        }
    }
    figment = figment.merge(Env::prefixed("NBD_RS_").split("__"));
    let dict: Dict = match figment.extract() {
        Ok(d) => d,
        Err(e) => {
            for err in e {
                problems.push(Problem::at(&err.path, err.kind.to_string()));
            }
            locator.figment = Some(figment);
            return (Config::default(), problems, locator);
        }
    };
    locator.figment = Some(figment);
    let config = from_dict(&dict, &mut problems);
    (config, problems, locator)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(..) => "a string",
        Value::Char(..) => "a character",
        Value::Bool(..) => "a boolean",
        Value::Num(..) => "a number",
        Value::Empty(..) => "nothing",
        Value::Dict(..) => "a table",
        Value::Array(..) => "an array",
    }
}

/// A size from TOML: a string with a unit (`"64MiB"`) or a number of bytes.
pub fn size_value(v: &Value) -> Result<u64, String> {
    match v {
        Value::String(_, s) => parse_size(s).map_err(|e| e.to_string()),
        Value::Num(_, n) => {
            let whole = n
                .to_i128()
                .or_else(|| n.to_u128().and_then(|u| i128::try_from(u).ok()));
            match whole {
                Some(b) if b > 0 && b <= i128::from(super::size::MAX_SIZE) => Ok(b as u64),
                Some(b) => Err(format!(
                    "bad size {b}: a size must be between 1 byte and 8 EiB - 1"
                )),
                None => Err(
                    "bad size: expected a whole number of bytes, or a string like \"64MiB\"".into(),
                ),
            }
        }
        other => Err(format!(
            "expected a size like \"64MiB\" or a number of bytes, found {}",
            type_name(other)
        )),
    }
}

fn from_dict(dict: &Dict, problems: &mut Vec<Problem>) -> Config {
    let mut config = Config::default();
    for (key, value) in dict {
        match key.as_str() {
            "server" => server(value, &mut config, problems),
            "log" => log(value, &mut config, problems),
            "exports" => match value {
                Value::Dict(_, exports) => {
                    for (name, v) in exports {
                        if let Some(e) = export(name, v, problems) {
                            config.exports.push(e);
                        }
                    }
                }
                other => problems.push(Problem::at(
                    &["exports"],
                    format!("expected a table of exports, found {}", type_name(other)),
                )),
            },
            _ => problems.push(Problem::at(
                &[key],
                "unknown key (known: server, log, exports)",
            )),
        }
    }
    config
}

fn server(value: &Value, config: &mut Config, problems: &mut Vec<Problem>) {
    let Value::Dict(_, dict) = value else {
        problems.push(Problem::at(
            &["server"],
            format!("expected a table, found {}", type_name(value)),
        ));
        return;
    };
    for (key, v) in dict {
        let path = ["server", key.as_str()];
        match key.as_str() {
            "listen" => {
                let items: Vec<&Value> = match v {
                    Value::Array(_, a) => a.iter().collect(),
                    single => vec![single],
                };
                let mut listen = Vec::new();
                for item in items {
                    match item {
                        Value::String(_, s) => match s.parse::<ListenAddr>() {
                            Ok(a) => listen.push(a),
                            Err(e) => problems.push(Problem::at(&path, e)),
                        },
                        other => problems.push(Problem::at(
                            &path,
                            format!("expected addresses as strings, found {}", type_name(other)),
                        )),
                    }
                }
                if listen.is_empty() {
                    problems.push(Problem::at(&path, "at least one address is needed"));
                } else {
                    config.listen = listen;
                }
            }
            "default_export" => match v {
                Value::String(_, s) => config.default_export = Some(s.clone()),
                other => problems.push(Problem::at(
                    &path,
                    format!("expected an export name, found {}", type_name(other)),
                )),
            },
            _ => problems.push(Problem::at(
                &path,
                "unknown key (known: listen, default_export)",
            )),
        }
    }
}

/// The `[log]` table.
fn log(value: &Value, config: &mut Config, problems: &mut Vec<Problem>) {
    let Value::Dict(_, dict) = value else {
        problems.push(Problem::at(
            &["log"],
            format!("expected a table, found {}", type_name(value)),
        ));
        return;
    };
    for (key, v) in dict {
        let path = ["log", key.as_str()];
        match (key.as_str(), v) {
            ("level", Value::String(_, s)) => match check_log_level(s) {
                Ok(()) => config.log_level = Some(s.trim().to_owned()),
                Err(m) => problems.push(Problem::at(&path, m)),
            },
            ("level", other) => problems.push(Problem::at(
                &path,
                format!(
                    "expected a level such as \"info\", found {}",
                    type_name(other)
                ),
            )),
            _ => problems.push(Problem::at(&path, "unknown key (known: level)")),
        }
    }
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A level (`debug`), or comma-separated directives each a level or `TARGET=LEVEL`
/// (`info,nbd_rs::nbd=debug`). Stricter than `RUST_LOG`, where a misspelt level silently
/// becomes a target name.
fn check_log_level(s: &str) -> Result<(), String> {
    let bad = |d: &str| {
        format!(
            "bad log level {d:?}: expected one of {}, or TARGET=LEVEL directives separated by commas (\"info,nbd_rs=debug\")",
            LEVELS.join(", ")
        )
    };
    if s.trim().is_empty() {
        return Err(bad(s));
    }
    for d in s.split(',').map(str::trim) {
        let level = match d.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            Some(_) => return Err(bad(d)),
            None => d,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(bad(d));
        }
    }
    Ok(())
}

const EXPORT_KEYS: &str =
    "pipeline, size, description, read_only, block_size, and a table per stage";

/// Parses `block_size = { minimum = 512, preferred = "4KiB", maximum = "1MiB" }`, checked
/// against the NBD rules: powers of two, minimum at most 64 KiB, preferred at least 512 and the
/// minimum, maximum from the preferred size to 32 MiB and a multiple of the minimum.
fn block_sizes(v: &Value, path: &[&str], problems: &mut Vec<Problem>) -> Option<BlockSizes> {
    let Value::Dict(_, d) = v else {
        problems.push(Problem::at(
            path,
            format!(
                "expected a table like {{ minimum = 512, preferred = \"4KiB\", maximum = \"1MiB\" }}, found {}",
                type_name(v)
            ),
        ));
        return None;
    };
    let mut sizes = BlockSizes::default();
    let before = problems.len();
    for (key, value) in d {
        let mut at: Vec<&str> = path.to_vec();
        at.push(key);
        let slot = match key.as_str() {
            "minimum" => &mut sizes.minimum,
            "preferred" => &mut sizes.preferred,
            "maximum" => &mut sizes.maximum,
            _ => {
                problems.push(Problem::at(
                    &at,
                    "unknown key (known: minimum, preferred, maximum)",
                ));
                continue;
            }
        };
        match size_value(value) {
            Ok(n) if n <= u64::from(MAX_PAYLOAD) => *slot = n as u32,
            Ok(_) => problems.push(Problem::at(&at, "must be at most 32MiB")),
            Err(e) => problems.push(Problem::at(&at, e)),
        }
    }
    if problems.len() > before {
        return None;
    }
    let BlockSizes {
        minimum,
        preferred,
        maximum,
    } = sizes;
    let why = if !minimum.is_power_of_two() || minimum > 65536 {
        Some(format!(
            "minimum ({minimum}) must be a power of two of at most 64KiB"
        ))
    } else if !preferred.is_power_of_two() || preferred < 512 || preferred < minimum {
        Some(format!(
            "preferred ({preferred}) must be a power of two of at least 512 and the minimum ({minimum})"
        ))
    } else if maximum < preferred || maximum % minimum != 0 {
        Some(format!(
            "maximum ({maximum}) must be at least the preferred size ({preferred}) and a multiple of the minimum ({minimum})"
        ))
    } else {
        None
    };
    match why {
        Some(w) => {
            problems.push(Problem::at(path, w));
            None
        }
        None => Some(sizes),
    }
}

fn export(name: &str, value: &Value, problems: &mut Vec<Problem>) -> Option<ExportConfig> {
    let base = ["exports", name];
    if let Err(why) = super::adhoc::check_name(name) {
        problems.push(Problem::at(&base, why));
        return None;
    }
    let Value::Dict(_, dict) = value else {
        problems.push(Problem::at(
            &base,
            format!("expected a table, found {}", type_name(value)),
        ));
        return None;
    };
    let before = problems.len();
    let mut pipeline = None;
    let mut size = None;
    let mut description = String::new();
    let mut read_only = false;
    let mut sizes = None;
    let mut params = BTreeMap::new();
    for (key, v) in dict {
        let path = ["exports", name, key.as_str()];
        match key.as_str() {
            "pipeline" => match v {
                Value::String(_, s) => match pipeline::parse(s) {
                    Ok(p) => pipeline = Some(p),
                    Err(e) => problems.push(Problem::at(&path, e)),
                },
                other => problems.push(Problem::at(
                    &path,
                    format!(
                        "expected a string like \"raw -> memory\", found {}",
                        type_name(other)
                    ),
                )),
            },
            "size" => match size_value(v) {
                Ok(s) => size = Some(s),
                Err(e) => problems.push(Problem::at(&path, e)),
            },
            "description" => match v {
                Value::String(_, s) => description = s.clone(),
                other => problems.push(Problem::at(
                    &path,
                    format!("expected a string, found {}", type_name(other)),
                )),
            },
            "read_only" => match v {
                Value::Bool(_, b) => read_only = *b,
                other => problems.push(Problem::at(
                    &path,
                    format!("expected true or false, found {}", type_name(other)),
                )),
            },
            "block_size" => sizes = block_sizes(v, &path, problems),
            stage if registry::stage(stage).is_some() => {
                if matches!(v, Value::Dict(..)) {
                    params.insert(stage.to_owned(), v.clone());
                } else {
                    problems.push(Problem::at(
                        &path,
                        format!("expected a table of parameters, found {}", type_name(v)),
                    ));
                }
            }
            _ => problems.push(Problem::at(
                &path,
                format!("unknown key (known: {EXPORT_KEYS})"),
            )),
        }
    }
    let Some(pipeline) = pipeline else {
        if !dict.contains_key("pipeline") {
            problems.push(Problem::at(
                &base,
                "missing key \"pipeline\" (for example pipeline = \"raw -> memory\")",
            ));
        }
        return None;
    };
    for stage in params.keys() {
        if !pipeline.contains(stage) {
            problems.push(Problem::at(
                &["exports", name, stage.as_str()],
                format!(
                    "this table configures a stage that the pipeline \"{pipeline}\" does not use"
                ),
            ));
        }
    }
    if let (Some(b), Some(size)) = (sizes, size)
        && size % u64::from(b.minimum) != 0
    {
        problems.push(Problem::at(
            &["exports", name, "size"],
            format!(
                "the size ({size}) must be a multiple of the minimum block size ({})",
                b.minimum
            ),
        ));
    }
    if problems.len() > before {
        return None;
    }
    Some(ExportConfig {
        name: name.to_owned(),
        pipeline,
        size,
        description,
        read_only,
        block_sizes: sizes,
        params,
        origin: Origin::File,
    })
}

/// Merges command-line settings over a loaded config: `--listen` replaces the listeners,
/// each `-e` export adds an export or replaces the file's export of the same name.
pub fn apply_cli(
    config: &mut Config,
    listen: Option<Vec<ListenAddr>>,
    exports: Vec<ExportConfig>,
    locator: &mut Locator,
) {
    if let Some(l) = listen {
        config.listen = l;
    }
    for e in exports {
        locator.add_cli_export(&e.name);
        if let Some(slot) = config.exports.iter_mut().find(|x| x.name == e.name) {
            *slot = e;
        } else {
            config.exports.push(e);
        }
    }
}

/// Checks what needs the whole config: the default export exists, names are unique.
pub fn check_whole(config: &Config, problems: &mut Vec<Problem>) {
    if let Some(d) = &config.default_export
        && !config.exports.iter().any(|e| &e.name == d)
    {
        problems.push(Problem::at(
            &["server", "default_export"],
            format!("no export is named {d:?}"),
        ));
    }
}
