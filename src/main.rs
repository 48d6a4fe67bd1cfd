//! The `nbd-rs` binary: parse the command line, load and check the configuration, serve until
//! a signal; or `check` a configuration, or list the `drivers`.

use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use nbd_rs::cli::{Cli, Command, ServeArgs};
use nbd_rs::export::ExportTable;
use nbd_rs::pipeline::BuildContext;
use nbd_rs::server::{ListenAddr, Listener};
use nbd_rs::supervisor::Supervisor;
use nbd_rs::systemd::{self, ListenFds, LogControl};
use nbd_rs::{registry, server, supervisor};

/// mimalloc keeps freed 1 MiB request buffers for reuse, where glibc's malloc returns them to
/// the kernel and takes page faults on every new one: that cost a third of the CPU of large
/// reads and writes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let (_, log) = systemd::init_logging(systemd::log_filter(None));
    raise_open_files_limit();
    // Taken before the runtime starts its threads: taking them edits the environment.
    let activated = match systemd::listen_fds() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nbd-rs: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    with_runtime(serve(cli.serve, activated, log))
}

/// Every connection is a file descriptor, and the usual soft limit (1024) is below the default
/// `max_connections` plus the files a pipeline keeps open: raise it to the hard limit, as most
/// servers do.
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let current = getrlimit(Resource::Nofile);
    if current.current < current.maximum {
        let raised = Rlimit {
            current: current.maximum,
            maximum: current.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!(error = %e, "cannot raise the open files limit");
        }
    }
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

/// Reloads the configuration on every SIGHUP, one at a time.
fn spawn_reloader(supervisor: Arc<Supervisor>, log: LogControl) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            error!(error = %e, "cannot handle SIGHUP: reloads are disabled");
            return;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!("SIGHUP: reloading the configuration");
            systemd::reloading();
            match supervisor.reload().await {
                Ok(r) => {
                    log.apply(supervisor.log_level().await.as_deref());
                    info!("configuration reloaded: {r}");
                    systemd::ready(&systemd::serving_status(&supervisor.table().load()));
                }
                Err(problems) => {
                    for p in &problems {
                        error!("reload refused: {p}");
                    }
                    error!("reload failed: serving on with the previous configuration");
                    let serving = systemd::serving_status(&supervisor.table().load());
                    systemd::ready(&format!(
                        "reload failed ({} problem(s), see the log); {serving}",
                        problems.len()
                    ));
                }
            }
        }
    });
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
    match supervisor::configure(&args, &ctx).await {
        Ok(supervisor::Configured {
            config,
            built,
            warnings,
            ..
        }) => {
            for w in &warnings {
                eprintln!("nbd-rs: warning: {w}");
            }
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

/// The sockets passed by the service manager when socket-activated, else `listen` bound.
async fn open_listeners(
    listen: &[ListenAddr],
    activated: Option<ListenFds>,
) -> Result<Vec<Listener>, String> {
    if let Some(passed) = activated {
        let configured: Vec<String> = listen.iter().map(ToString::to_string).collect();
        info!(
            sockets = passed.len(),
            "socket activation: serving on the passed sockets instead of the configured listen addresses ({})",
            configured.join(", ")
        );
        return passed.into_listeners();
    }
    let mut listeners = Vec::with_capacity(listen.len());
    for addr in listen {
        listeners.push(server::bind(addr).await?);
    }
    Ok(listeners)
}

async fn serve(args: ServeArgs, activated: Option<ListenFds>, log: LogControl) -> ExitCode {
    let ctx = BuildContext {
        dry_run: false,
        state_dir: BuildContext::state_dir_from_env(),
    };
    let supervisor::Configured {
        config,
        built,
        tls,
        warnings,
    } = match supervisor::configure(&args, &ctx).await {
        Ok(c) => c,
        Err(lines) => {
            report(&lines);
            return ExitCode::from(USAGE);
        }
    };
    log.apply(config.log_level.as_deref());
    for w in &warnings {
        warn!("{w}");
    }
    let mut exports = Vec::with_capacity(built.len());
    for (e, b) in config.exports.iter().zip(built) {
        match supervisor::export(e, b) {
            Ok(x) => exports.push(x),
            Err(m) => {
                report(&[m]);
                return ExitCode::FAILURE;
            }
        }
    }
    let exports = Arc::new(ArcSwap::from_pointee(
        ExportTable::new(exports)
            .with_default(config.default_export.clone())
            .with_tls(tls)
            .with_limits(config.limits),
    ));
    let supervisor = Arc::new(Supervisor::new(
        args.clone(),
        ctx.clone(),
        Arc::clone(&exports),
        config.clone(),
    ));
    spawn_reloader(Arc::clone(&supervisor), log);

    let listeners = match open_listeners(&config.listen, activated).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("nbd-rs: error: {e}");
            return ExitCode::FAILURE;
        }
    };

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
        systemd::stopping();
        info!("stopping: finishing requests in flight");
        trigger.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal: exiting at once");
        std::process::exit(1);
    });

    // Every listener is bound, every export built, the signals handled: ready.
    systemd::ready(&systemd::serving_status(&exports.load()));
    let liveness = server::Liveness::new();
    let _watchdog = systemd::spawn_watchdog(liveness.clone(), shutdown.clone());
    server::run_watched(
        listeners,
        Arc::clone(&exports),
        shutdown,
        liveness,
        config.limits.max_connections,
    )
    .await;
    supervisor.stop().await;

    let mut status = ExitCode::SUCCESS;
    for e in exports.load().iter() {
        // A connection cut at the end of its grace period may leave requests running: the
        // device is closed only once they have returned.
        supervisor::drain(e).await;
        if let Err(err) = e.device.close().await {
            error!(export = %e.name, error = %err, "closing the export failed: data may not be durable");
            status = ExitCode::FAILURE;
        }
    }
    info!("stopped");
    status
}
