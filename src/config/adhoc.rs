//! The ad-hoc export grammar of the command line: `-e NAME DRIVER CONN`.
//!
//! `DRIVER` is the layout (`raw`). `CONN` names the store:
//! - `memory:SIZE`: a sparse disk in RAM, for example `memory:1GiB`;
//! - `file:PATH`: a raw image file; `file:DIR/` (or an existing directory) serves `DIR/NAME`;
//!   `?size=SIZE` creates a missing image of that size.
//!
//! Both take `?read_only=true` and `?description=TEXT`, joined with `&`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::size::{SizeError, parse_size};
use crate::block::BlockDevice;
use crate::layout::raw::{FileImage, MemoryImage, OpenError};
use crate::nbd::proto::MAX_STRING;

/// Where an ad-hoc export keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// A sparse disk in memory.
    Memory {
        /// Size in bytes.
        size: u64,
    },
    /// A raw image file.
    File {
        /// The image (a directory has been resolved to `DIR/NAME`).
        path: PathBuf,
        /// Create a missing image of this size; an existing one must have it.
        size: Option<u64>,
    },
}

/// One export from `-e`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// The export's name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Writes are refused.
    pub read_only: bool,
    /// Where the data lives.
    pub storage: Storage,
}

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
    #[error("export {name:?}: unknown driver {driver:?} (known drivers: raw)")]
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
    /// The storage could not be opened.
    #[error("export {name:?}: {source}")]
    Open {
        /// The export.
        name: String,
        /// What went wrong.
        #[source]
        source: OpenError,
    },
}

/// Checks that a name is one clients can ask for and, for directory stores, a plain file name.
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

/// Parses one `-e NAME DRIVER CONN`.
pub fn parse_export(name: &str, driver: &str, conn: &str) -> Result<ExportSpec, AdhocError> {
    check_name(name).map_err(|why| AdhocError::BadName {
        name: name.to_owned(),
        why,
    })?;
    if driver != "raw" {
        return Err(AdhocError::UnknownDriver {
            name: name.to_owned(),
            driver: driver.to_owned(),
        });
    }
    let bad = |why: String| AdhocError::BadConn {
        name: name.to_owned(),
        conn: conn.to_owned(),
        why,
    };
    let size_err = |source| AdhocError::Size {
        name: name.to_owned(),
        source,
    };
    let (base, query) = conn.split_once('?').unwrap_or((conn, ""));
    let mut size = None;
    let mut read_only = false;
    let mut description = String::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
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
    let storage = if let Some(s) = base.strip_prefix("memory:") {
        if size.is_some() {
            return Err(bad(
                "memory takes its size as memory:SIZE, not ?size=".into()
            ));
        }
        Storage::Memory {
            size: parse_size(s).map_err(size_err)?,
        }
    } else if let Some(p) = base.strip_prefix("file:") {
        if p.is_empty() {
            return Err(bad("file: needs a path".into()));
        }
        let path = Path::new(p);
        let path = if p.ends_with('/') || path.is_dir() {
            if name.contains('/') || name == "." || name == ".." {
                return Err(AdhocError::BadName {
                    name: name.to_owned(),
                    why: "a name served from a directory must be a plain file name",
                });
            }
            path.join(name)
        } else {
            path.to_owned()
        };
        Storage::File { path, size }
    } else if base == "memory" {
        return Err(bad("memory needs a size, as memory:SIZE".into()));
    } else {
        return Err(bad(
            "unknown storage (expected memory:SIZE or file:PATH)".into()
        ));
    };
    Ok(ExportSpec {
        name: name.to_owned(),
        description,
        read_only,
        storage,
    })
}

impl ExportSpec {
    /// Opens the export's storage.
    pub fn build(&self) -> Result<Arc<dyn BlockDevice>, AdhocError> {
        Ok(match &self.storage {
            Storage::Memory { size } => Arc::new(MemoryImage::new(*size, self.read_only)),
            Storage::File { path, size } => Arc::new(
                FileImage::open(path, *size, self.read_only).map_err(|source| {
                    AdhocError::Open {
                        name: self.name.clone(),
                        source,
                    }
                })?,
            ),
        })
    }
}

/// Parses every `-e` triple, refusing duplicate names.
pub fn parse_exports(triples: &[[String; 3]]) -> Result<Vec<ExportSpec>, AdhocError> {
    let mut out: Vec<ExportSpec> = Vec::with_capacity(triples.len());
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

    #[test]
    fn memory_and_file_forms() {
        let e = parse_export("disk", "raw", "memory:1GiB").unwrap();
        assert_eq!(e.storage, Storage::Memory { size: 1 << 30 });
        assert!(!e.read_only);
        let e = parse_export("img", "raw", "file:/srv/images/").unwrap();
        assert_eq!(
            e.storage,
            Storage::File {
                path: "/srv/images/img".into(),
                size: None
            }
        );
        let e = parse_export(
            "x",
            "raw",
            "file:/srv/disk.img?size=20GiB&read_only=true&description=a disk",
        )
        .unwrap();
        assert_eq!(
            e.storage,
            Storage::File {
                path: "/srv/disk.img".into(),
                size: Some(20 << 30)
            }
        );
        assert!(e.read_only);
        assert_eq!(e.description, "a disk");
    }

    #[test]
    fn errors_name_the_export_and_the_problem() {
        assert_eq!(
            err("d", "sharded2", "memory:1G"),
            "export \"d\": unknown driver \"sharded2\" (known drivers: raw)"
        );
        assert_eq!(
            err("d", "raw", "memory:lots"),
            "export \"d\": bad size \"lots\": invalid digit found in string (expected a number with an optional unit, like 512, 64KiB, 20GiB or 1T)"
        );
        assert_eq!(
            err("d", "raw", "s4:bucket"),
            "export \"d\": unknown storage (expected memory:SIZE or file:PATH) in \"s4:bucket\""
        );
        assert_eq!(
            err("d", "raw", "memory:1G?colour=red"),
            "export \"d\": unknown parameter \"colour\" (known: size, read_only, description) in \"memory:1G?colour=red\""
        );
        assert_eq!(
            err("", "raw", "memory:1G"),
            "export \"\": an export name must not be empty"
        );
        assert_eq!(
            err("../etc", "raw", "file:/tmp/"),
            "export \"../etc\": a name served from a directory must be a plain file name"
        );
    }

    #[test]
    fn duplicates_are_refused() {
        let t = |n: &str| [n.to_owned(), "raw".to_owned(), "memory:1M".to_owned()];
        let e = parse_exports(&[t("a"), t("b"), t("a")]).unwrap_err();
        assert_eq!(e.to_string(), "export \"a\" is given twice");
    }
}
