//! The `nbd-rs` binary: parse the command line, load and check the configuration, serve until
//! a signal; or `check` a configuration, or list the `drivers`.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use nbd_rs::block::BlockSizes;
use nbd_rs::cli::{Cli, Command, ServeArgs};
use nbd_rs::config::adhoc::parse_exports;
use nbd_rs::config::model::{self, Config};
use nbd_rs::export::{Export, ExportTable};
use nbd_rs::pipeline::{self, BuildContext};
use nbd_rs::{registry, server};

/// Exit status for a bad command line or configuration when serving.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Drivers) => {
            print!("{}", registry::describe());
            return ExitCode::SUCCESS;
        }
        Some(Command::Check(args)) => return with_runtime(check(args)),
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .init();
    with_runtime(serve(cli.serve))
}

/// `RUST_LOG`, or `info`; the HTTP and signing libraries under the S3 store are held at
/// `info` whatever is asked, because their debug output shows request headers with credentials.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let base = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let quiet = "rusoto_core=info,rusoto_signature=info,rusoto_credential=info,hyper=info";
    tracing_subscriber::EnvFilter::try_new(format!("{base},{quiet}"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("info,{quiet}")))
}

fn with_runtime(f: impl Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r.block_on(f),
        Err(e) => {
            eprintln!("nbd-rs: error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the file and the environment, merges the command line over them, checks the result
/// and builds (or, for `check`, dry-runs) every export. Every problem found anywhere is
/// returned together, each rendered with its place.
async fn configure(
    args: &ServeArgs,
    ctx: &BuildContext,
) -> Result<(Config, Vec<pipeline::Built>), Vec<String>> {
    let (mut config, mut problems, mut locator) = model::load(args.config.as_deref());
    let cli_exports = match parse_exports(&args.export_triples()) {
        Ok(e) => e,
        Err(e) => return Err(vec![e.to_string()]),
    };
    let listen = (!args.listen.is_empty()).then(|| args.listen.clone());
    model::apply_cli(&mut config, listen, cli_exports, &mut locator);
    if args.read_only {
        for e in &mut config.exports {
            e.read_only = true;
        }
    }
    model::check_whole(&config, &mut problems);
    if config.exports.is_empty() && problems.is_empty() {
        return Err(vec![match &args.config {
            Some(p) => format!(
                "{} declares no export: add an [exports.NAME] table, or -e NAME DRIVER CONN",
                p.display()
            ),
            None => "no export given: add -e NAME DRIVER CONN, for example -e disk raw memory:1GiB"
                .into(),
        }]);
    }
    // Every export is checked first, even when others are broken, so that one run reports
    // everything and a refused start creates nothing.
    let dry = BuildContext {
        dry_run: true,
        ..ctx.clone()
    };
    let mut built = Vec::new();
    for e in &config.exports {
        match pipeline::build(e, &dry).await {
            Ok(b) => built.push(b),
            Err(p) => problems.extend(p),
        }
    }
    if !problems.is_empty() {
        return Err(locator.render_all(&problems).0);
    }
    if ctx.dry_run {
        return Ok((config, built));
    }
    built.clear();
    for e in &config.exports {
        match pipeline::build(e, ctx).await {
            Ok(b) => built.push(b),
            Err(p) => problems.extend(p),
        }
    }
    if problems.is_empty() {
        Ok((config, built))
    } else {
        Err(locator.render_all(&problems).0)
    }
}

/// The configured block sizes, never looser than what the pipeline itself needs.
fn merge_block_sizes(configured: Option<BlockSizes>, device: BlockSizes) -> BlockSizes {
    let Some(c) = configured else {
        return device;
    };
    let minimum = c.minimum.max(device.minimum);
    let maximum = c.maximum.min(device.maximum);
    BlockSizes {
        minimum,
        preferred: c.preferred.max(minimum).min(maximum),
        maximum,
    }
}

fn report(lines: &[String]) {
    for l in lines {
        eprintln!("nbd-rs: error: {l}");
    }
}

async fn check(args: ServeArgs) -> ExitCode {
    let ctx = BuildContext {
        dry_run: true,
        state_dir: BuildContext::state_dir_from_env(),
    };
    match configure(&args, &ctx).await {
        Ok((config, built)) => {
            let source = args
                .config
                .as_ref()
                .map_or("the command line".to_owned(), |p| p.display().to_string());
            println!("{source} is valid: {} export(s)", built.len());
            for b in &built {
                println!("  {}", b.summary);
            }
            let listen: Vec<String> = config.listen.iter().map(ToString::to_string).collect();
            println!("listen: {}", listen.join(", "));
            ExitCode::SUCCESS
        }
        Err(lines) => {
            report(&lines);
            eprintln!("nbd-rs: {} problem(s) found", lines.len());
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let ctx = BuildContext {
        dry_run: false,
        state_dir: BuildContext::state_dir_from_env(),
    };
    let (config, built) = match configure(&args, &ctx).await {
        Ok(c) => c,
        Err(lines) => {
            report(&lines);
            return ExitCode::from(USAGE);
        }
    };
    let mut exports = Vec::with_capacity(built.len());
    for (e, b) in config.exports.iter().zip(built) {
        let Some(device) = b.device else {
            report(&[format!("export {:?} was not built", e.name)]);
            return ExitCode::FAILURE;
        };
        info!(export = %e.name, "export ready: {}", b.summary);
        let block_sizes = merge_block_sizes(e.block_sizes, device.info().block_sizes);
        exports.push(Arc::new(Export {
            name: e.name.clone(),
            description: e.description.clone(),
            device,
            block_sizes,
        }));
    }
    let exports = Arc::new(ExportTable::new(exports).with_default(config.default_export.clone()));

    let mut listeners = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
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
