//! The command line: `nbd-rs [--config FILE] [--listen ADDR]... [-e NAME DRIVER CONN]...`,
//! plus `nbd-rs check` and `nbd-rs drivers`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::server::ListenAddr;

/// A Network Block Device server for disks in memory, in image files and in sharded volumes.
#[derive(Debug, Parser)]
#[command(
    name = "nbd-rs",
    version,
    about,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; without a command, serve.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// How to serve.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The commands besides serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a configuration as the server would, without serving; print each export's
    /// pipeline, or every problem found (exit status 1).
    Check(ServeArgs),
    /// List the pipeline stages with what they do and their parameters.
    Drivers,
}

/// The configuration: a file, with the command line over it.
#[derive(Debug, Args, Clone, Default)]
pub struct ServeArgs {
    /// The configuration file (TOML). NBD_RS_-prefixed environment variables override it.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on: HOST:PORT or unix:PATH. Repeatable; replaces the file's
    /// `listen`. Default 0.0.0.0:10809.
    #[arg(short = 'l', long = "listen", value_name = "ADDR")]
    pub listen: Vec<ListenAddr>,

    /// Serve an export: NAME, DRIVER (raw or sharded) and CONN ([LAYER:]...memory:SIZE or
    /// [LAYER:]...file:PATH, then ?size=SIZE&read_only=true&description=TEXT). Repeatable;
    /// replaces the file's export of the same name.
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
  nbd-rs --config /etc/nbd-rs.toml
  nbd-rs --listen 127.0.0.1:10809 -e vm1 raw file:/srv/images/ -e scratch raw memory:64MiB
  nbd-rs -e vol sharded 'cache:file:/srv/volumes/?size=100GiB'
  nbd-rs check --config /etc/nbd-rs.toml

Logging goes to standard error; RUST_LOG filters it (for example RUST_LOG=debug).";

impl ServeArgs {
    /// The `-e` triples, in order.
    pub fn export_triples(&self) -> Vec<[String; 3]> {
        self.export
            .chunks_exact(3)
            .map(|c| [c[0].clone(), c[1].clone(), c[2].clone()])
            .collect()
    }
}
