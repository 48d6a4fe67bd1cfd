//! The `nbd-rs` binary: parse the command line, start logging, serve until a signal.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use nbd_rs::cli::Cli;
use nbd_rs::config::adhoc::parse_exports;
use nbd_rs::export::{Export, ExportTable};
use nbd_rs::server;

/// Exit status for a bad command line or configuration.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nbd-rs: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("nbd-rs: error: {msg}");
    ExitCode::from(USAGE)
}

async fn run(cli: Cli) -> ExitCode {
    let mut specs = match parse_exports(&cli.export_triples()) {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    if specs.is_empty() {
        return usage_error(
            "no export given: add -e NAME DRIVER CONN, for example -e disk raw memory:1GiB",
        );
    }
    let mut exports = Vec::with_capacity(specs.len());
    for spec in &mut specs {
        spec.read_only |= cli.read_only;
        let device = match spec.build() {
            Ok(d) => d,
            Err(e) => return usage_error(e),
        };
        info!(export = %spec.name, size = device.info().size, read_only = spec.read_only, "export ready");
        exports.push(Arc::new(Export {
            name: spec.name.clone(),
            description: spec.description.clone(),
            device,
        }));
    }
    let exports = Arc::new(ExportTable::new(exports));

    let mut listeners = Vec::with_capacity(cli.listen.len());
    for addr in &cli.listen {
        match server::bind(addr).await {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("nbd-rs: error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }

    let shutdown = CancellationToken::new();
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("nbd-rs: error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("stopping: finishing requests in flight");
        trigger.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal: exiting at once");
        std::process::exit(1);
    });

    server::run(listeners, Arc::clone(&exports), shutdown).await;

    let mut status = ExitCode::SUCCESS;
    for e in exports.iter() {
        if let Err(err) = e.device.close().await {
            error!(export = %e.name, error = %err, "closing the export failed: data may not be durable");
            status = ExitCode::FAILURE;
        }
    }
    info!("stopped");
    status
}
