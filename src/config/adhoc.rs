//! The ad-hoc export grammar of the command line: `-e NAME DRIVER CONN`, mapped onto the same
//! pipelines as the configuration file.
//!
//! `DRIVER` is the layout (`raw` or `sharded`). `CONN` is optional block layers, each followed
//! by `:`, then the store:
//! - `memory:SIZE`: RAM, for example `memory:1GiB`;
//! - `file:PATH`: under `raw`, a raw image file, where `file:DIR/` (or an existing directory)
//!   serves `DIR/NAME`; under `sharded`, the directory of the chunks `NAME.{n}.chunk`;
//! - `s3:http://KEY:SECRET@HOST:PORT/BUCKET/PREFIX` (or `https://`, or `s3://BUCKET/PREFIX`
//!   for AWS): objects in S3, under `sharded`.
//!
//! So `-e vm1 sharded cache:file:/srv/vols/` is `cache -> sharded -> file`. Parameters follow
//! `?`, joined with `&`: `size=SIZE` (creates a missing image or volume), `read_only=true`,
//! `description=TEXT`.

use std::collections::BTreeMap;

use figment::value::{Dict, Value};

use super::model::{ExportConfig, Origin};
use super::pipeline::Pipeline;
use super::size::{SizeError, parse_size};
use crate::nbd::proto::MAX_STRING;
use crate::registry::{self, Kind};
use crate::store::s3::{S3Config, parse_url};

/// Why an `-e` export was refused. Every message names the export.
#[derive(Debug, thiserror::Error)]
pub enum AdhocError {
    /// The name cannot be served.
    #[error("export {name:?}: {why}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Two exports share a name.
    #[error("export {0:?} is given twice")]
    Duplicate(String),
    /// The driver is not known.
    #[error("export {name:?}: unknown driver {driver:?} (known drivers: raw, sharded)")]
    UnknownDriver {
        /// The export.
        name: String,
        /// What was given.
        driver: String,
    },
    /// The connection string is not understood.
    #[error("export {name:?}: {why} in {conn:?}")]
    BadConn {
        /// The export.
        name: String,
        /// The connection string.
        conn: String,
        /// What is wrong.
        why: String,
    },
    /// A size in the connection string is bad.
    #[error("export {name:?}: {source}")]
    Size {
        /// The export.
        name: String,
        /// The size error.
        #[source]
        source: SizeError,
    },
}

/// The connection string with any `KEY:SECRET@` secret replaced, for messages. Everything
/// from the first `:` after `://` to the last `@` is hidden, so a secret with an unencoded `/`
/// or `@` is hidden too (a path with an `@` may be over-redacted, which is harmless).
pub fn redact(conn: &str) -> String {
    let Some(scheme_end) = conn.find("://") else {
        return conn.to_owned();
    };
    let start = scheme_end + 3;
    let Some(at) = conn.rfind('@').filter(|&a| a > start) else {
        return conn.to_owned();
    };
    match conn[start..at].find(':') {
        Some(colon) => format!("{}:<redacted>{}", &conn[..start + colon], &conn[at..]),
        None => conn.to_owned(),
    }
}

/// Checks that a name is one clients can ask for.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("an export name must not be empty");
    }
    if name.len() > MAX_STRING {
        return Err("an export name must be at most 4096 bytes");
    }
    if name.chars().any(char::is_control) {
        return Err("an export name must not contain control characters");
    }
    Ok(())
}

/// The `[s3]` parameter table equivalent to a parsed connection string.
fn s3_table(cfg: &S3Config) -> Value {
    let mut d = Dict::new();
    let mut put = |k: &str, v: Value| {
        d.insert(k.to_owned(), v);
    };
    if let Some(e) = &cfg.endpoint {
        put("endpoint", Value::from(e.clone()));
    }
    put("region", Value::from(cfg.region.clone()));
    put("bucket", Value::from(cfg.bucket.clone()));
    put("prefix", Value::from(cfg.prefix.clone()));
    if let Some(k) = &cfg.access_key_id {
        put("access_key_id", Value::from(k.clone()));
    }
    if let Some(k) = &cfg.secret_access_key {
        put("secret_access_key", Value::from(k.clone()));
    }
    if let Some(f) = &cfg.credentials_file {
        put("credentials_file", Value::from(f.display().to_string()));
    }
    put("profile", Value::from(cfg.profile.clone()));
    put(
        "connect_timeout",
        Value::from(format!("{}ms", cfg.connect_timeout.as_millis())),
    );
    put(
        "request_timeout",
        Value::from(format!("{}ms", cfg.request_timeout.as_millis())),
    );
    Value::from(d)
}

fn table(pairs: &[(&str, &str)]) -> Value {
    let mut d = Dict::new();
    for (k, v) in pairs {
        d.insert((*k).to_owned(), Value::from(v.to_string()));
    }
    Value::from(d)
}

/// Parses one `-e NAME DRIVER CONN`.
pub fn parse_export(name: &str, driver: &str, conn: &str) -> Result<ExportConfig, AdhocError> {
    check_name(name).map_err(|why| AdhocError::BadName {
        name: name.to_owned(),
        why,
    })?;
    if registry::stage(driver).is_none_or(|s| !s.kinds.contains(&Kind::Layout)) {
        return Err(AdhocError::UnknownDriver {
            name: name.to_owned(),
            driver: driver.to_owned(),
        });
    }
    let bad = |why: String| AdhocError::BadConn {
        name: name.to_owned(),
        conn: redact(conn),
        why,
    };
    let size_err = |source| AdhocError::Size {
        name: name.to_owned(),
        source,
    };

    // Block layers in front: `cache:retry:file:/x`.
    let mut rest = conn;
    let mut layers = Vec::new();
    while let Some((head, tail)) = rest.split_once(':') {
        match registry::stage(head) {
            Some(s) if s.kinds.contains(&Kind::Layer) => {
                if layers.iter().any(|l| l == head) {
                    return Err(bad(format!("{head:?} is given twice")));
                }
                layers.push(head.to_owned());
                rest = tail;
            }
            _ => break,
        }
    }

    // The store, and the export parameters after `?`. An s3 URL reads its own parameters
    // (region, profile, ...) and hands back the others.
    let mut params = BTreeMap::new();
    let mut pairs: Vec<(String, String)> = Vec::new();
    let base;
    if rest.starts_with("s3:") {
        let (cfg, others) = parse_url(rest).map_err(&bad)?;
        params.insert("s3".to_owned(), s3_table(&cfg));
        pairs = others;
        base = "s3";
    } else {
        let (b, query) = rest.split_once('?').unwrap_or((rest, ""));
        base = b;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            pairs.push((key.to_owned(), value.to_owned()));
        }
    }
    let mut size = None;
    let mut read_only = false;
    let mut description = String::new();
    for (key, value) in &pairs {
        let (key, value) = (key.as_str(), value.as_str());
        match key {
            "size" => size = Some(parse_size(value).map_err(size_err)?),
            "read_only" => {
                read_only = match value {
                    "" | "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    _ => return Err(bad(format!("read_only={value:?} is not true or false"))),
                }
            }
            "description" => description = value.to_owned(),
            _ => {
                return Err(bad(format!(
                    "unknown parameter {key:?} (known: size, read_only, description)"
                )));
            }
        }
    }

    for l in &layers {
        params.insert(l.clone(), Value::from(Dict::new()));
    }
    let rest = base;
    let store = if rest == "s3" {
        if driver == "raw" {
            return Err(bad(
                "raw serves memory or file; use the sharded driver for s3".into(),
            ));
        }
        "s3"
    } else if let Some(s) = rest.strip_prefix("memory:") {
        if size.is_some() {
            return Err(bad(
                "memory takes its size as memory:SIZE, not ?size=".into()
            ));
        }
        size = Some(parse_size(s).map_err(size_err)?);
        "memory"
    } else if let Some(p) = rest.strip_prefix("file:") {
        if p.is_empty() {
            return Err(bad("file: needs a path".into()));
        }
        params.insert("file".to_owned(), table(&[("path", p)]));
        "file"
    } else if rest == "memory" {
        return Err(bad("memory needs a size, as memory:SIZE".into()));
    } else {
        return Err(bad(format!(
            "unknown storage {:?} (expected memory:SIZE, file:PATH or s3:URL, optionally after block layers like cache:)",
            redact(rest)
        )));
    };
    Ok(ExportConfig {
        name: name.to_owned(),
        pipeline: Pipeline {
            layers,
            layout: driver.to_owned(),
            wrappers: Vec::new(),
            store: store.to_owned(),
        },
        size,
        description,
        read_only,
        block_sizes: None,
        params,
        allow: None,
        allow_names: None,
        origin: Origin::CommandLine,
    })
}

/// Parses every `-e` triple, refusing duplicate names.
pub fn parse_exports(triples: &[[String; 3]]) -> Result<Vec<ExportConfig>, AdhocError> {
    let mut out: Vec<ExportConfig> = Vec::with_capacity(triples.len());
    for [name, driver, conn] in triples {
        if out.iter().any(|e| e.name == *name) {
            return Err(AdhocError::Duplicate(name.clone()));
        }
        out.push(parse_export(name, driver, conn)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(name: &str, driver: &str, conn: &str) -> String {
        parse_export(name, driver, conn).unwrap_err().to_string()
    }

    fn path_of(e: &ExportConfig) -> String {
        e.params["file"]
            .find_ref("path")
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn memory_and_file_forms() {
        let e = parse_export("disk", "raw", "memory:1GiB").unwrap();
        assert_eq!(e.pipeline.to_string(), "raw -> memory");
        assert_eq!(e.size, Some(1 << 30));
        assert!(!e.read_only);
        let e = parse_export("img", "raw", "file:/srv/images/").unwrap();
        assert_eq!(e.pipeline.to_string(), "raw -> file");
        assert_eq!(path_of(&e), "/srv/images/");
        let e = parse_export(
            "x",
            "raw",
            "file:/srv/disk.img?size=20GiB&read_only=true&description=a disk",
        )
        .unwrap();
        assert_eq!(e.size, Some(20 << 30));
        assert!(e.read_only);
        assert_eq!(e.description, "a disk");
    }

    #[test]
    fn the_seed_grammar_maps_onto_pipelines() {
        let e = parse_export("vm1", "sharded", "cache:file:/srv/vols/").unwrap();
        assert_eq!(e.pipeline.to_string(), "cache -> sharded -> file");
        assert_eq!(path_of(&e), "/srv/vols/");
        let e = parse_export("vm2", "sharded", "retry:fault:memory:1GiB").unwrap();
        assert_eq!(
            e.pipeline.to_string(),
            "retry -> fault -> sharded -> memory"
        );
    }

    #[test]
    fn errors_name_the_export_and_the_problem() {
        assert_eq!(
            err("d", "qcow9", "memory:1G"),
            "export \"d\": unknown driver \"qcow9\" (known drivers: raw, sharded)"
        );
        assert_eq!(
            err("d", "file", "memory:1G"),
            "export \"d\": unknown driver \"file\" (known drivers: raw, sharded)"
        );
        assert_eq!(
            err("d", "raw", "memory:lots"),
            "export \"d\": bad size \"lots\": invalid digit found in string (expected a number with an optional unit, like 512, 64KiB, 20GiB or 1T)"
        );
        assert_eq!(
            err("d", "raw", "s4:bucket"),
            "export \"d\": unknown storage \"s4:bucket\" (expected memory:SIZE, file:PATH or s3:URL, optionally after block layers like cache:) in \"s4:bucket\""
        );
        assert_eq!(
            err("d", "raw", "memory:1G?colour=red"),
            "export \"d\": unknown parameter \"colour\" (known: size, read_only, description) in \"memory:1G?colour=red\""
        );
        assert_eq!(
            err("d", "raw", "cache:cache:memory:1G"),
            "export \"d\": \"cache\" is given twice in \"cache:cache:memory:1G\""
        );
        assert_eq!(
            err("", "raw", "memory:1G"),
            "export \"\": an export name must not be empty"
        );
    }

    #[test]
    fn s3_connection_strings_map_onto_pipelines_and_never_show_the_secret() {
        let e = parse_export(
            "vm1",
            "sharded",
            "cache:s3:http://AKID:s3cr%2Ft@127.0.0.1:9000/bucket/vols?size=1GiB&read_only=true",
        )
        .unwrap();
        assert_eq!(e.pipeline.to_string(), "cache -> sharded -> s3");
        assert_eq!(e.size, Some(1 << 30));
        assert!(e.read_only);
        let t = &e.params["s3"];
        let get = |k: &str| t.find_ref(k).unwrap().as_str().unwrap().to_owned();
        assert_eq!(get("endpoint"), "http://127.0.0.1:9000");
        assert_eq!(get("bucket"), "bucket");
        assert_eq!(get("prefix"), "vols/");
        assert_eq!(get("secret_access_key"), "s3cr/t");
        let msg = err("v", "sharded", "s3:http://AKID:topsecret@h:9/b?colour=1");
        assert!(!msg.contains("topsecret"), "{msg}");
        assert_eq!(
            msg,
            "export \"v\": unknown parameter \"colour\" (known: size, read_only, description) in \"s3:http://AKID:<redacted>@h:9/b?colour=1\""
        );
        let msg = err("v", "sharded", "s3:ftp://AKID:topsecret@h:9/b");
        assert!(!msg.contains("topsecret"), "{msg}");
    }

    #[test]
    fn redaction_hides_everything_that_may_be_a_secret() {
        assert_eq!(redact("s3:http://K:S@h/b"), "s3:http://K:<redacted>@h/b");
        assert_eq!(
            redact("s3:http://K:S/x@y@h/b"),
            "s3:http://K:<redacted>@h/b"
        );
        assert_eq!(redact("s3:http://h:9000/b"), "s3:http://h:9000/b");
        assert_eq!(redact("file:/x@y"), "file:/x@y");
    }

    #[test]
    fn duplicates_are_refused() {
        let t = |n: &str| [n.to_owned(), "raw".to_owned(), "memory:1M".to_owned()];
        let e = parse_exports(&[t("a"), t("b"), t("a")]).unwrap_err();
        assert_eq!(e.to_string(), "export \"a\" is given twice");
    }
}
