//! The configuration as plain data, loaded with figment from a TOML file and `NBD_RS_`
//! environment variables, checked with every problem collected, and located by line.
//!
//! Environment variables use `__` between keys: `NBD_RS_SERVER__LISTEN='["127.0.0.1:10809"]'`,
//! `NBD_RS_EXPORTS__SCRATCH__SIZE=128MiB`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};

use super::pipeline::{self, Pipeline};
use super::size::parse_size;
use crate::block::{BlockSizes, MAX_PAYLOAD};
use crate::registry;
use crate::server::{DEFAULT_LISTEN, ListenAddr};
use crate::tls::TlsSettings;

/// Where an export was declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file (or the environment over it).
    File,
    /// `-e` on the command line.
    CommandLine,
}

/// One export: a name, a pipeline and the parameters of its stages.
#[derive(Clone, PartialEq)]
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
    /// Who may see and use it (absent: everyone): client addresses and networks.
    pub allow: Option<Vec<Allowed>>,
    /// Who may see and use it (absent: everyone): names in the client's certificate.
    pub allow_names: Option<Vec<String>>,
    /// Where it was declared.
    pub origin: Origin,
}

/// Stage parameters are left out: they may hold an S3 secret.
impl fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportConfig")
            .field("name", &self.name)
            .field("pipeline", &self.pipeline.to_string())
            .field("size", &self.size)
            .field("description", &self.description)
            .field("read_only", &self.read_only)
            .field("block_sizes", &self.block_sizes)
            .field("params", &self.params.keys().collect::<Vec<_>>())
            .field("allow", &self.allow)
            .field("allow_names", &self.allow_names)
            .field("origin", &self.origin)
            .finish()
    }
}

/// An entry of an export's `allow` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// An address or a network: `192.0.2.7`, `10.0.0.0/8`, `::1`, `fd00::/8`.
    Net(ipnet::IpNet),
    /// Every client of a Unix socket: `"unix"`.
    Unix,
}

impl Allowed {
    /// Parses an `allow` entry.
    pub fn parse(s: &str) -> Result<Allowed, String> {
        let t = s.trim();
        if t == "unix" {
            return Ok(Allowed::Unix);
        }
        if let Ok(n) = t.parse::<ipnet::IpNet>() {
            return Ok(Allowed::Net(n.trunc()));
        }
        if let Ok(a) = t.parse::<std::net::IpAddr>() {
            return Ok(Allowed::Net(ipnet::IpNet::from(a)));
        }
        Err(format!(
            "bad allow entry {s:?}: expected an address (192.0.2.7, ::1), a network (10.0.0.0/8, fd00::/8) or \"unix\""
        ))
    }

    /// True if a client at `addr` (`None`: a Unix-socket client) matches.
    pub fn matches(&self, addr: Option<std::net::IpAddr>) -> bool {
        match (self, addr) {
            (Allowed::Unix, None) => true,
            (Allowed::Net(n), Some(a)) => n.contains(&canonical(a)),
            _ => false,
        }
    }
}

/// An IPv4 client seen through an IPv6 socket (`::ffff:192.0.2.7`) is matched as IPv4.
fn canonical(a: std::net::IpAddr) -> std::net::IpAddr {
    match a {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// `[server]` limits on clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A client that has not finished the handshake by then is disconnected.
    pub handshake_timeout: Duration,
    /// A connection with no request for this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Which clients get large file reads by `sendfile`.
    pub sendfile: Sendfile,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: None,
            sendfile: Sendfile::Auto,
        }
    }
}

/// `[server] sendfile`: which clients get large reads of cached file pages by `sendfile(2)`,
/// which saves the server a copy. The client's kernel copies the bytes either way; when it
/// runs on the same machine it copies from pages no CPU cache holds, which on this project's
/// test machine halved 1 MiB sequential reads, so by default only remote clients get it, and
/// local ones get those reads copied once, from a mapping of the image (`block::mapped`), not
/// read into memory and copied again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sendfile {
    /// TCP clients whose address is not a loopback one; the others get mapped reads.
    Auto,
    /// Every TCP and Unix-socket client (not over TLS).
    Always,
    /// None, and no mapped reads either: every read is read into memory first.
    Never,
}

impl Sendfile {
    /// Whether a client at `addr` (`None`: a Unix socket) gets `sendfile`.
    pub fn allows(self, addr: Option<std::net::IpAddr>) -> bool {
        match self {
            Sendfile::Auto => addr.is_some_and(|a| !canonical(a).is_loopback()),
            Sendfile::Always => true,
            Sendfile::Never => false,
        }
    }

    /// Whether a client at `addr` that does not get `sendfile` gets large cached reads copied
    /// once from a mapping of the image instead of read into memory.
    pub fn maps(self, addr: Option<std::net::IpAddr>) -> bool {
        self == Sendfile::Auto && !self.allows(addr)
    }
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
    /// `[server.tls]`: when set, every client must use TLS.
    pub tls: Option<TlsSettings>,
    /// `[server]` limits.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![ListenAddr::Tcp(DEFAULT_LISTEN.to_owned())],
            default_export: None,
            exports: Vec::new(),
            log_level: None,
            tls: None,
            limits: Limits::default(),
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
                let mut listen = Vec::new();
                for s in strings(v, &path, "addresses", problems) {
                    match s.parse::<ListenAddr>() {
                        Ok(a) => listen.push(a),
                        Err(e) => problems.push(Problem::at(&path, e)),
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
            "tls" => tls(v, config, problems),
            "max_connections" => match v.to_num().and_then(|n| n.to_i128()) {
                Some(n) if (1..=65536).contains(&n) => config.limits.max_connections = n as usize,
                _ => problems.push(Problem::at(
                    &path,
                    format!("expected a number of connections from 1 to 65536, found {}", show(v)),
                )),
            },
            "handshake_timeout" => match duration(v) {
                Ok(d) if !d.is_zero() => config.limits.handshake_timeout = d,
                Ok(_) => problems.push(Problem::at(
                    &path,
                    "a handshake timeout cannot be 0: a client that never finishes its handshake would hold its connection for ever",
                )),
                Err(e) => problems.push(Problem::at(&path, e)),
            },
            "idle_timeout" => match duration(v) {
                Ok(d) => config.limits.idle_timeout = (!d.is_zero()).then_some(d),
                Err(e) => problems.push(Problem::at(&path, e)),
            },
            "sendfile" => match v {
                Value::String(_, s) if s == "auto" => config.limits.sendfile = Sendfile::Auto,
                Value::String(_, s) if s == "always" => config.limits.sendfile = Sendfile::Always,
                Value::String(_, s) if s == "never" => config.limits.sendfile = Sendfile::Never,
                other => problems.push(Problem::at(
                    &path,
                    format!(
                        "expected \"auto\" (remote clients), \"always\" or \"never\", found {}",
                        show(other)
                    ),
                )),
            },
            _ => problems.push(Problem::at(
                &path,
                "unknown key (known: listen, default_export, max_connections, handshake_timeout, idle_timeout, sendfile, tls)",
            )),
        }
    }
}

/// A value shown in a message: strings as written, other values by their kind.
fn show(v: &Value) -> String {
    match v {
        Value::String(_, s) => format!("{s:?}"),
        Value::Num(_, n) => n
            .to_i128()
            .map_or_else(|| type_name(v).to_owned(), |n| n.to_string()),
        other => type_name(other).to_owned(),
    }
}

/// A duration such as `"30s"`; `0` or `"0"` for none.
fn duration(v: &Value) -> Result<Duration, String> {
    match v {
        Value::String(_, s) if s.trim() == "0" => Ok(Duration::ZERO),
        Value::String(_, s) => crate::block::retry::parse_duration(s),
        Value::Num(_, n) if n.to_i128() == Some(0) => Ok(Duration::ZERO),
        other => Err(format!(
            "expected a duration like \"30s\", found {}",
            show(other)
        )),
    }
}

/// The `[server.tls]` table.
fn tls(value: &Value, config: &mut Config, problems: &mut Vec<Problem>) {
    let Value::Dict(_, dict) = value else {
        problems.push(Problem::at(
            &["server", "tls"],
            format!("expected a table, found {}", type_name(value)),
        ));
        return;
    };
    let mut certificate = None;
    let mut key = None;
    let mut client_ca = None;
    for (k, v) in dict {
        let path = ["server", "tls", k.as_str()];
        let slot = match k.as_str() {
            "certificate" => &mut certificate,
            "key" => &mut key,
            "client_ca" => &mut client_ca,
            _ => {
                problems.push(Problem::at(
                    &path,
                    "unknown key (known: certificate, key, client_ca)",
                ));
                continue;
            }
        };
        match v {
            Value::String(_, s) if !s.is_empty() => *slot = Some(PathBuf::from(s)),
            other => problems.push(Problem::at(
                &path,
                format!("expected a file path, found {}", show(other)),
            )),
        }
    }
    let mut missing = |k: &str| {
        problems.push(Problem::at(
            &["server", "tls"],
            format!("missing key {k:?}: TLS needs a certificate and its private key"),
        ));
    };
    match (certificate, key) {
        (Some(certificate), Some(key)) => {
            config.tls = Some(TlsSettings {
                certificate,
                key,
                client_ca,
            });
        }
        (c, k) => {
            if c.is_none() && !dict.contains_key("certificate") {
                missing("certificate");
            }
            if k.is_none() && !dict.contains_key("key") {
                missing("key");
            }
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
            Some((target, _)) if ["rusoto", "hyper"].iter().any(|t| target.starts_with(t)) => {
                return Err(format!(
                    "log level {d:?}: the S3 client's libraries stay at info, because below it they log request signatures and credentials"
                ));
            }
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
    "pipeline, size, description, read_only, block_size, allow, allow_names, and a table per stage";

/// A list of strings, or one string.
fn strings(v: &Value, path: &[&str], what: &str, problems: &mut Vec<Problem>) -> Vec<String> {
    let items: Vec<&Value> = match v {
        Value::Array(_, a) => a.iter().collect(),
        one => vec![one],
    };
    let mut out = Vec::new();
    for item in items {
        match item {
            Value::String(_, s) => out.push(s.clone()),
            other => problems.push(Problem::at(
                path,
                format!("expected {what} as strings, found {}", type_name(other)),
            )),
        }
    }
    out
}

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
    let mut allow = None;
    let mut allow_names = None;
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
            "allow" => {
                let mut list = Vec::new();
                let entries = strings(v, &path, "addresses", problems);
                if entries.is_empty() && matches!(v, Value::Array(..)) {
                    problems.push(Problem::at(
                        &path,
                        "an empty allow list lets no one in: leave the key out to allow everyone",
                    ));
                }
                for entry in entries {
                    match Allowed::parse(&entry) {
                        Ok(a) => list.push(a),
                        Err(e) => problems.push(Problem::at(&path, e)),
                    }
                }
                allow = Some(list);
            }
            "allow_names" => {
                let names = strings(v, &path, "certificate names", problems);
                if names.iter().any(|n| n.trim().is_empty()) {
                    problems.push(Problem::at(
                        &path,
                        "an empty certificate name matches nothing",
                    ));
                }
                if names.is_empty() && matches!(v, Value::Array(..)) {
                    problems.push(Problem::at(
                        &path,
                        "an empty allow_names list lets no one in: leave the key out to allow everyone",
                    ));
                }
                allow_names = Some(names);
            }
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
        allow,
        allow_names,
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

/// Checks what needs the whole config: the default export exists, names are unique, and
/// certificate name lists have client certificates to match.
pub fn check_whole(config: &Config, problems: &mut Vec<Problem>) {
    let client_certs = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    for e in &config.exports {
        if e.allow_names.is_some() && !client_certs {
            problems.push(Problem::at(
                &["exports", e.name.as_str(), "allow_names"],
                "certificate names need client certificates: set [server.tls] client_ca",
            ));
        }
    }
    if let Some(d) = &config.default_export
        && !config.exports.iter().any(|e| &e.name == d)
    {
        problems.push(Problem::at(
            &["server", "default_export"],
            format!("no export is named {d:?}"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendfile_auto_is_for_remote_tcp_clients_only() {
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        for local in ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"] {
            assert!(!Sendfile::Auto.allows(ip(local)), "{local}");
            assert!(Sendfile::Always.allows(ip(local)), "{local}");
            // Local clients get mapped reads instead, unless they get sendfile or nothing.
            assert!(Sendfile::Auto.maps(ip(local)), "{local}");
            assert!(!Sendfile::Always.maps(ip(local)), "{local}");
            assert!(!Sendfile::Never.maps(ip(local)), "{local}");
        }
        for remote in ["192.0.2.7", "10.1.2.3", "2001:db8::1", "::ffff:192.0.2.7"] {
            assert!(Sendfile::Auto.allows(ip(remote)), "{remote}");
            assert!(!Sendfile::Never.allows(ip(remote)), "{remote}");
            assert!(!Sendfile::Auto.maps(ip(remote)), "{remote}");
            assert!(!Sendfile::Never.maps(ip(remote)), "{remote}");
        }
        // A Unix-socket client is on this machine.
        assert!(!Sendfile::Auto.allows(None));
        assert!(Sendfile::Always.allows(None));
        assert!(Sendfile::Auto.maps(None));
        assert!(!Sendfile::Never.maps(None));
    }

    #[test]
    fn debug_output_never_shows_stage_parameters() {
        let dir = std::env::temp_dir().join(format!("nbd-rs-model-debug-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "[exports.v]\npipeline = \"sharded -> s3\"\nsize = \"1GiB\"\n[exports.v.s3]\nbucket = \"b\"\naccess_key_id = \"AK\"\nsecret_access_key = \"SUPERSECRET\"\n",
        )
        .unwrap();
        let (config, problems, _) = load(Some(&path));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        let shown = format!("{config:?}");
        assert!(!shown.contains("SUPERSECRET"), "{shown}");
        assert!(shown.contains("params: [\"s3\"]"), "{shown}");
    }

    #[test]
    fn allow_entries_match_addresses_networks_and_unix_clients() {
        let net = Allowed::parse("10.0.0.0/8").unwrap();
        assert!(net.matches(Some("10.1.2.3".parse().unwrap())));
        assert!(net.matches(Some("::ffff:10.1.2.3".parse().unwrap())));
        assert!(!net.matches(Some("11.0.0.1".parse().unwrap())));
        assert!(!net.matches(None));
        // A network written with host bits is the network.
        assert_eq!(
            Allowed::parse("192.168.1.7/24").unwrap(),
            Allowed::parse("192.168.1.0/24").unwrap()
        );
        let one = Allowed::parse("::1").unwrap();
        assert!(one.matches(Some("::1".parse().unwrap())));
        assert!(!one.matches(Some("127.0.0.1".parse().unwrap())));
        assert!(Allowed::parse("unix").unwrap().matches(None));
        assert!(Allowed::parse("10.0.0.0/33").is_err());
        assert!(Allowed::parse("example.com").is_err());
    }
}
