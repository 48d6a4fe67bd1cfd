//! The command line: `nbd-rs [--listen ADDR]... [-e NAME DRIVER CONN]...`.

use clap::Parser;

use crate::server::{DEFAULT_LISTEN, ListenAddr};

/// A Network Block Device server for disks in memory, in image files and (soon) in object
/// storage.
#[derive(Debug, Parser)]
#[command(name = "nbd-rs", version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// Address to listen on: HOST:PORT or unix:PATH. Repeatable.
    #[arg(short = 'l', long = "listen", value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: Vec<ListenAddr>,

    /// Serve an export: NAME, DRIVER (raw) and CONN (memory:SIZE or file:PATH[?size=SIZE]).
    /// Repeatable; the first export is also the default one (export name "").
    #[arg(
        short = 'e',
        long = "export",
        num_args = 3,
        value_names = ["NAME", "DRIVER", "CONN"],
        action = clap::ArgAction::Append,
    )]
    pub export: Vec<String>,

    /// Serve every export read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
}

const EXAMPLES: &str = "Examples:
  nbd-rs -e disk raw memory:1GiB
  nbd-rs --listen 127.0.0.1:10809 -e vm1 raw file:/srv/images/ -e scratch raw memory:64MiB
  nbd-rs -e img raw 'file:/srv/disk.img?size=20GiB'

Logging goes to standard error; RUST_LOG filters it (for example RUST_LOG=debug).";

impl Cli {
    /// The `-e` triples, in order.
    pub fn export_triples(&self) -> Vec<[String; 3]> {
        self.export
            .chunks_exact(3)
            .map(|c| [c[0].clone(), c[1].clone(), c[2].clone()])
            .collect()
    }
}
