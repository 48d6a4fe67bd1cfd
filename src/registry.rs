//! The stage registry: every stage a pipeline can name, what kind it is, what it takes.
//!
//! A pipeline reads from the client down to storage: block layers, then exactly one layout,
//! then optional store wrappers, then exactly one store (`cache -> retry -> sharded -> file`).
//! `retry` and `fault` work in both places: above the layout they see block requests, below it
//! one store request at a time. Building lives in [`crate::pipeline`].

/// Where a stage may stand in a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Offset-addressed, above the layout.
    Layer,
    /// Turns block requests into object requests; exactly one.
    Layout,
    /// Wraps a store, between the layout and the store.
    StoreWrapper,
    /// The bottom; exactly one.
    Store,
}

/// A parameter of a stage, for `nbd-rs drivers` and the docs.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    /// The key in the stage's table.
    pub name: &'static str,
    /// What it means, with its default.
    pub doc: &'static str,
}

/// A stage.
#[derive(Debug, Clone, Copy)]
pub struct Stage {
    /// The name used in pipelines and as the parameter table's name.
    pub name: &'static str,
    /// Where it may stand.
    pub kinds: &'static [Kind],
    /// One line about what it does.
    pub summary: &'static str,
    /// Its parameters.
    pub params: &'static [Param],
}

const RETRY_PARAMS: &[Param] = &[
    Param {
        name: "attempts",
        doc: "tries in all, the first included (default 5)",
    },
    Param {
        name: "initial_delay",
        doc: "wait before the first retry, doubled each time, with jitter (default \"100ms\")",
    },
    Param {
        name: "max_delay",
        doc: "longest wait between tries (default \"2s\")",
    },
    Param {
        name: "budget",
        doc: "total time spent retrying one request (default \"20s\")",
    },
];

const FAULT_PARAMS: &[Param] = &[
    Param {
        name: "error_rate",
        doc: "probability (0 to 1) that a request fails (default 0)",
    },
    Param {
        name: "read_error_rate, write_error_rate, flush_error_rate, trim_error_rate, zero_error_rate",
        doc: "per operation kind, overriding error_rate",
    },
    Param {
        name: "error",
        doc: "\"transient\" (retry may succeed) or \"eio\" (permanent) (default \"transient\")",
    },
    Param {
        name: "delay, read_delay, write_delay",
        doc: "latency added to every request, or to reads or writes (default \"0s\")",
    },
    Param {
        name: "seed",
        doc: "random seed, for a reproducible run (default: from the clock)",
    },
];

/// Every stage, in the order `nbd-rs drivers` lists them.
pub const STAGES: &[Stage] = &[
    Stage {
        name: "cache",
        kinds: &[Kind::Layer],
        summary: "local-disk cache, write-back: writes acknowledged locally, uploaded in the background",
        params: &[
            Param {
                name: "path",
                doc: "cache directory (default: $STATE_DIRECTORY or /var/lib/nbd-rs, then cache/EXPORT)",
            },
            Param {
                name: "size",
                doc: "most bytes the cache holds on disk (default \"1GiB\")",
            },
            Param {
                name: "block_size",
                doc: "cache granularity, a power of two (default: the sharded chunk size, else \"4MiB\")",
            },
            Param {
                name: "mode",
                doc: "\"write-back\" or \"write-through\" (default \"write-back\")",
            },
            Param {
                name: "flush",
                doc: "where write-back FLUSH and FUA make data durable: \"store\" (default) or \"local\" (the cache's disk; uploads follow)",
            },
            Param {
                name: "max_dirty",
                doc: "most bytes written but not yet uploaded; writers wait beyond it (default: 256MiB or size/4)",
            },
            Param {
                name: "upload_concurrency",
                doc: "uploads in flight at once (default 8)",
            },
            Param {
                name: "journal",
                doc: "with flush = \"store\" over a sharded volume, FLUSH and FUA append one record of what changed to the volume's journal instead of uploading the blocks (default true)",
            },
        ],
    },
    Stage {
        name: "retry",
        kinds: &[Kind::Layer, Kind::StoreWrapper],
        summary: "retries transient failures with exponential backoff and jitter",
        params: RETRY_PARAMS,
    },
    Stage {
        name: "fault",
        kinds: &[Kind::Layer, Kind::StoreWrapper],
        summary: "injects errors and latency, for tests and drills",
        params: FAULT_PARAMS,
    },
    Stage {
        name: "raw",
        kinds: &[Kind::Layout],
        summary: "the disk is one image: a sparse memory disk, or a raw image file",
        params: &[],
    },
    Stage {
        name: "sharded",
        kinds: &[Kind::Layout],
        summary: "the disk is fixed-size chunks, objects NAME.{n}.chunk; unwritten chunks are holes",
        params: &[
            Param {
                name: "chunk_size",
                doc: "size of a chunk, a power of two from 4KiB to 1GiB (default \"4MiB\")",
            },
            Param {
                name: "name",
                doc: "object name prefix (default: the export's name)",
            },
            Param {
                name: "readahead",
                doc: "on S3, whole chunks fetched ahead of a stream of reads, up to 1GiB \
                      (default \"32MiB\"; \"0\" turns it off)",
            },
        ],
    },
    Stage {
        name: "memory",
        kinds: &[Kind::Store],
        summary: "RAM; the data is gone when the server stops",
        params: &[],
    },
    Stage {
        name: "file",
        kinds: &[Kind::Store],
        summary: "local files: an image file under raw, a directory of chunks under sharded",
        params: &[Param {
            name: "path",
            doc: "under raw: the image (a directory serves DIR/EXPORT); under sharded: the directory",
        }],
    },
    Stage {
        name: "s3",
        kinds: &[Kind::Store],
        summary: "objects in an S3 bucket (AWS or S3-compatible), under sharded",
        params: &[
            Param {
                name: "endpoint",
                doc: "http[s]://HOST[:PORT] of an S3-compatible server, path-style (default: AWS in region)",
            },
            Param {
                name: "region",
                doc: "region requests are signed for (default \"us-east-1\")",
            },
            Param {
                name: "bucket",
                doc: "the bucket; it must exist (required)",
            },
            Param {
                name: "prefix",
                doc: "where the volume's objects live in the bucket (default: the bucket's root)",
            },
            Param {
                name: "access_key_id, secret_access_key",
                doc: "credentials (default: credentials_file, then AWS_* environment variables)",
            },
            Param {
                name: "credentials_file, profile",
                doc: "an AWS shared credentials file and its profile (default \"default\")",
            },
            Param {
                name: "connect_timeout, request_timeout",
                doc: "time limits of a connection and of one request (default \"5s\", \"30s\")",
            },
        ],
    },
];

/// Looks a stage up by name.
pub fn stage(name: &str) -> Option<&'static Stage> {
    STAGES.iter().find(|s| s.name == name)
}

/// Names of the stages of a kind, for error messages: `memory, file`.
pub fn names_of(kind: Kind) -> String {
    STAGES
        .iter()
        .filter(|s| s.kinds.contains(&kind))
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The text of `nbd-rs drivers`.
pub fn describe() -> String {
    let mut out = String::new();
    for (kind, title) in [
        (Kind::Layer, "Block layers (above the layout)"),
        (Kind::Layout, "Layouts (exactly one)"),
        (
            Kind::StoreWrapper,
            "Store wrappers (between the layout and the store)",
        ),
        (Kind::Store, "Stores (exactly one, last)"),
    ] {
        out.push_str(title);
        out.push_str(":\n");
        for s in STAGES.iter().filter(|s| s.kinds.contains(&kind)) {
            out.push_str(&format!("  {:<8} {}\n", s.name, s.summary));
            if kind == Kind::StoreWrapper {
                continue;
            }
            for p in s.params {
                out.push_str(&format!("           {}: {}\n", p.name, p.doc));
            }
        }
        out.push('\n');
    }
    out.push_str(
        "A pipeline reads from the client down: block layers, one layout, store wrappers, one store,\n\
         for example \"cache -> retry -> sharded -> file\". Each stage's parameters go in the table\n\
         [exports.NAME.STAGE].\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_has_a_kind_and_a_summary() {
        for s in STAGES {
            assert!(!s.kinds.is_empty(), "{}", s.name);
            assert!(!s.summary.is_empty(), "{}", s.name);
        }
        assert_eq!(names_of(Kind::Store), "memory, file, s3");
        assert_eq!(names_of(Kind::Layout), "raw, sharded");
    }
}
