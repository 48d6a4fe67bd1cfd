//! The supervisor: loads and checks the configuration, builds every export's pipeline, and
//! reloads on SIGHUP without disturbing what did not change.
//!
//! A reload re-reads the file and the environment (the command line given at start still
//! applies over them) and checks everything before anything changes; a configuration with
//! any problem changes nothing. Then:
//! - unchanged exports keep their pipeline, their state and their connections;
//! - new exports are built and added;
//! - a changed or removed export takes no new client; its connected clients finish the
//!   requests they have sent, get their answers and are disconnected (a client that does not
//!   finish is cut after [`crate::nbd::DRAIN_GRACE`]), then its pipeline is flushed and closed;
//! - a changed export's new pipeline opens the storage only after the old one is closed, so two
//!   pipelines never write the same storage; clients asking for it meanwhile wait, then get the
//!   new one (qemu with `reconnect-delay` re-sends what was cut off);
//! - a change of size or of the read-only setting of an export with connected clients refuses
//!   the whole reload, naming the export and its clients: qemu aborts when an export it
//!   reconnects to has changed size and hangs when it has turned read-only, so such a change
//!   waits until they have disconnected (reload again then).
//!
//! Listen addresses cannot change at run time: a reload that changes them says so and keeps
//! the sockets it has.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::block::BlockSizes;
use crate::cli::ServeArgs;
use crate::config::adhoc::parse_exports;
use crate::config::model::{self, Config, ExportConfig};
use crate::config::size::human;
use crate::export::{Export, ExportTable};
use crate::pipeline::{self, BuildContext, Built};
use crate::server::SharedExports;

/// A checked configuration, its exports built (or, in a dry run, checked) and its TLS set up.
pub struct Configured {
    /// The configuration.
    pub config: Config,
    /// One per export, in order.
    pub built: Vec<Built>,
    /// The TLS acceptor, when `[server.tls]` is set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Things that work but should be fixed (a world-readable private key).
    pub warnings: Vec<String>,
}

/// Loads the file and the environment, merges the command line over them, checks the result
/// and builds (or, with `ctx.dry_run`, checks) every export. Every problem found anywhere is
/// returned together, each rendered with its place.
pub async fn configure(args: &ServeArgs, ctx: &BuildContext) -> Result<Configured, Vec<String>> {
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
    let mut tls = None;
    let mut warnings = Vec::new();
    if let Some(settings) = &config.tls {
        match crate::tls::acceptor(settings) {
            Ok((a, w)) => {
                tls = Some(a);
                warnings = w;
            }
            Err(ps) => problems.extend(
                ps.into_iter()
                    .map(|p| model::Problem::at(&["server", "tls", p.key], p.message)),
            ),
        }
    }
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
        return Ok(Configured {
            config,
            built,
            tls,
            warnings,
        });
    }
    built.clear();
    for e in &config.exports {
        match pipeline::build(e, ctx).await {
            Ok(b) => built.push(b),
            Err(p) => problems.extend(p),
        }
    }
    if problems.is_empty() {
        Ok(Configured {
            config,
            built,
            tls,
            warnings,
        })
    } else {
        Err(locator.render_all(&problems).0)
    }
}

/// The configured block sizes, never looser than what the pipeline itself needs.
pub fn merge_block_sizes(configured: Option<BlockSizes>, device: BlockSizes) -> BlockSizes {
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

/// An export from its configuration and its built pipeline.
pub fn export(e: &ExportConfig, b: Built) -> Result<Arc<Export>, String> {
    let Some(device) = b.device else {
        return Err(format!("export {:?} was not built", e.name));
    };
    info!(export = %e.name, "export ready: {}", b.summary);
    let block_sizes = merge_block_sizes(e.block_sizes, device.info().block_sizes);
    Ok(Arc::new(Export {
        name: e.name.clone(),
        description: e.description.clone(),
        device,
        block_sizes,
        allow: e.allow.clone(),
        allow_names: e.allow_names.clone(),
        clients: Default::default(),
    }))
}

/// What a reload did, for the log and `STATUS=`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Exports added.
    pub added: Vec<String>,
    /// Exports rebuilt with a new configuration.
    pub changed: Vec<String>,
    /// Exports removed (closed once their last client leaves).
    pub removed: Vec<String>,
    /// Exports left as they were.
    pub unchanged: Vec<String>,
}

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "added: {}; changed: {}; removed: {}; unchanged: {}",
            list(&self.added),
            list(&self.changed),
            list(&self.removed),
            list(&self.unchanged)
        )
    }
}

/// Owns the export table and the configuration it was built from.
pub struct Supervisor {
    args: ServeArgs,
    ctx: BuildContext,
    table: SharedExports,
    /// What the sockets and the connection limit were set up with: they stay.
    fixed: (Vec<crate::server::ListenAddr>, usize),
    /// The configuration the table was built from; `None` once the server is stopping.
    config: tokio::sync::Mutex<Option<Config>>,
}

impl Supervisor {
    /// A supervisor for a table built from `config`.
    pub fn new(args: ServeArgs, ctx: BuildContext, table: SharedExports, config: Config) -> Self {
        Supervisor {
            args,
            ctx,
            table,
            fixed: (config.listen.clone(), config.limits.max_connections),
            config: tokio::sync::Mutex::new(Some(config)),
        }
    }

    /// The table clients choose from.
    pub fn table(&self) -> &SharedExports {
        &self.table
    }

    /// The configuration's `[log] level`.
    pub async fn log_level(&self) -> Option<String> {
        self.config
            .lock()
            .await
            .as_ref()
            .and_then(|c| c.log_level.clone())
    }

    /// For a stopping server: waits for a reload under way and refuses the next ones. The
    /// exports in the table are the caller's to close (see [`drain`]).
    pub async fn stop(&self) {
        self.config.lock().await.take();
    }

    /// Re-reads and applies the configuration. On any problem nothing changes and every
    /// problem is returned.
    pub async fn reload(&self) -> Result<ReloadReport, Vec<String>> {
        // One reload at a time.
        let mut guard = self.config.lock().await;
        let Some(current) = guard.as_ref() else {
            return Err(vec!["the server is stopping".into()]);
        };
        let dry = BuildContext {
            dry_run: true,
            ..self.ctx.clone()
        };
        let Configured {
            config: next,
            built: checked,
            tls,
            warnings,
        } = configure(&self.args, &dry).await?;
        for w in &warnings {
            warn!("{w}");
        }
        if next.limits.max_connections != self.fixed.1 {
            warn!(
                "max_connections cannot change while running: restart nbd-rs to apply {}",
                next.limits.max_connections
            );
        }
        if next.listen != self.fixed.0 {
            let listen: Vec<String> = next.listen.iter().map(ToString::to_string).collect();
            warn!(
                listen = %listen.join(", "),
                "listen addresses cannot change while running: restart nbd-rs to apply them"
            );
        }

        let table = self.table.load_full();
        let old: BTreeMap<&str, &ExportConfig> = current
            .exports
            .iter()
            .map(|e| (e.name.as_str(), e))
            .collect();
        // Refuse before touching anything: a size or a read-only setting changing under
        // connected clients.
        let mut refusals = Vec::new();
        for (e, b) in next.exports.iter().zip(&checked) {
            let Some(before) = old.get(e.name.as_str()) else {
                continue;
            };
            let Some(live) = table.get(&e.name) else {
                continue;
            };
            let peers = live.peers();
            if *before == e || peers.is_empty() {
                continue;
            }
            let mut what = Vec::new();
            let size = live.device.info().size;
            if let Some(new) = b.size.filter(|n| *n != size) {
                what.push(format!("its size from {} to {}", human(size), human(new)));
            }
            if before.read_only != e.read_only {
                what.push(if e.read_only {
                    "it to read-only".to_owned()
                } else {
                    "it to writable".to_owned()
                });
            }
            if !what.is_empty() {
                refusals.push(format!(
                    "export {:?} has clients ({}): a reload cannot change {} under them; the change applies once they have disconnected (reload again then)",
                    e.name,
                    peers.join(", "),
                    what.join(" and ")
                ));
            }
        }
        if !refusals.is_empty() {
            return Err(refusals);
        }

        // Retire what changes or goes: no new clients from now on, and the connected ones
        // finish their requests and are closed. Clients asking for a changed export wait for
        // its successor.
        let mut report = ReloadReport::default();
        let mut retired: Vec<Arc<Export>> = Vec::new();
        for (name, before) in &old {
            let same = next.exports.iter().any(|e| e.name == *name && e == *before);
            if same {
                continue;
            }
            if let Some(live) = table.get(name) {
                live.retire();
                retired.push(Arc::clone(live));
            }
        }

        // Every retired export is drained and closed before anything opens: a renamed export,
        // or two that swap their storage, must never have two pipelines on one storage.
        futures::future::join_all(retired.iter().map(|r| drain(r))).await;
        for r in &retired {
            let gone = !next.exports.iter().any(|e| e.name == r.name);
            match r.device.close().await {
                Ok(()) if gone => info!(export = %r.name, "removed export closed"),
                Ok(()) => {}
                Err(err) => {
                    error!(export = %r.name, error = %err, "closing the old pipeline failed: data may not be durable");
                }
            }
        }

        let mut next = next;
        let mut exports: Vec<Arc<Export>> = Vec::with_capacity(next.exports.len());
        for slot in next.exports.iter_mut() {
            let e = &*slot;
            let Some(before) = old.get(e.name.as_str()) else {
                report.added.push(e.name.clone());
                if let Some(x) = self.open(e).await {
                    exports.push(x);
                }
                continue;
            };
            if *before == e
                && let Some(kept) = table.get(&e.name)
            {
                report.unchanged.push(e.name.clone());
                exports.push(Arc::clone(kept));
                continue;
            }
            report.changed.push(e.name.clone());
            match self.open(e).await {
                Some(x) => {
                    let new = x.device.info().size;
                    if let Some(live) = table.get(&e.name)
                        && live.device.info().size != new
                    {
                        warn!(export = %e.name, "the export's size changed from {} to {}", human(live.device.info().size), human(new));
                    }
                    exports.push(x);
                }
                None => {
                    // The storage could not be opened with the new settings: serve on with
                    // the old ones if they still open, and remember that they are what runs,
                    // so that the next reload tries the new ones again.
                    warn!(export = %e.name, "serving the export with its previous configuration");
                    let before = (*before).clone();
                    if let Some(x) = self.open(&before).await {
                        exports.push(x);
                    }
                    *slot = before;
                }
            }
        }
        for name in old.keys() {
            if !next.exports.iter().any(|e| e.name == *name) {
                report.removed.push((*name).to_owned());
            }
        }
        let table_next = ExportTable::new(exports)
            .with_default(next.default_export.clone())
            .with_tls(tls)
            .with_limits(next.limits);
        let default_of = |t: &ExportTable| t.get("").map(|e| e.name.clone());
        if let (Some(was), Some(now)) = (default_of(&table), default_of(&table_next))
            && was != now
        {
            warn!(
                "the empty export name now selects {now:?} instead of {was:?}: a client that connected with nbd://host/ and reconnects gets another disk (set [server] default_export to pin it)"
            );
        }
        self.table.store(Arc::new(table_next));
        // Clients waiting for retired exports look again: they find the successors, or no
        // export by that name.
        for r in &retired {
            r.replaced();
        }
        *guard = Some(next);
        Ok(report)
    }

    /// Builds an export; on failure logs why and returns `None`. The configuration was checked,
    /// so a failure here is the storage's.
    async fn open(&self, e: &ExportConfig) -> Option<Arc<Export>> {
        let built = pipeline::build(e, &self.ctx).await.map_err(|p| {
            p.into_iter()
                .map(|p| format!("export {:?}: {}", e.name, p.message))
                .collect::<Vec<_>>()
        });
        match built.and_then(|b| export(e, b).map_err(|m| vec![m])) {
            Ok(x) => Some(x),
            Err(problems) => {
                for p in &problems {
                    error!(export = %e.name, "{p}: the export is not served");
                }
                None
            }
        }
    }
}

/// Retires an export and waits until its connections have finished their requests and closed
/// (each is cut after [`crate::nbd::DRAIN_GRACE`] at most) and every request they started has
/// returned, saying who is awaited. After it, nothing uses the export's device.
pub async fn drain(e: &Export) {
    e.retire();
    let mut waited = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), e.idle()).await {
            Ok(()) => return,
            Err(_) => {
                waited += 5;
                info!(export = %e.name, clients = %e.peers().join(", "), "waiting {waited} s for clients to finish their requests");
            }
        }
    }
}
