//! Exports: named block devices, and the table clients choose them from.
//!
//! An export that a reload changes or removes is *retired*: it grants no new client, its
//! connected clients are told to finish the requests they have sent and leave, and clients
//! asking for it meanwhile wait until the table holds its successor (or no longer holds the
//! name), so that two pipelines never serve the same storage at once.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::block::{BlockDevice, BlockSizes};
use crate::config::model::{Allowed, Limits};

/// A block device served under a name.
#[derive(Debug)]
pub struct Export {
    /// The name clients ask for.
    pub name: String,
    /// A human-readable description, shown by `nbdinfo --list` (may be empty).
    pub description: String,
    /// The storage pipeline.
    pub device: Arc<dyn BlockDevice>,
    /// The constraints advertised to clients and enforced on their requests: the
    /// configuration's, or the device's own.
    pub block_sizes: BlockSizes,
    /// Who may see and use it (`None`: everyone): addresses and networks.
    pub allow: Option<Vec<Allowed>>,
    /// Who may see and use it (`None`: everyone): names in the client's certificate.
    pub allow_names: Option<Vec<String>>,
    /// The clients connected to it now.
    pub clients: Clients,
}

/// Who a client is, for allow lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientId {
    /// Its address (`None`: a Unix-socket client).
    pub addr: Option<IpAddr>,
    /// The names its TLS certificate vouches for (empty without one).
    pub names: Vec<String>,
}

/// The clients of an export in the transmission phase, for reloads: who they are, when the
/// last one has gone, and whether the export still takes new ones.
#[derive(Debug, Default)]
pub struct Clients {
    state: Mutex<ClientState>,
    next: AtomicU64,
    gone: Notify,
    /// Fired when the export is retired: connections stop reading requests.
    drain: CancellationToken,
    /// Fired once the table no longer holds the retired export.
    replaced: CancellationToken,
}

#[derive(Debug, Default)]
struct ClientState {
    peers: Vec<(u64, String)>,
    retired: bool,
}

/// A client's place in [`Clients`]; dropping it removes the client.
#[derive(Debug)]
pub struct Lease {
    export: Arc<Export>,
    id: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let c = &self.export.clients;
        let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
        st.peers.retain(|(id, _)| *id != self.id);
        if st.peers.is_empty() {
            c.gone.notify_waiters();
        }
    }
}

impl Export {
    /// True if `client` may see and use this export: it matches the address list and the
    /// certificate name list (ignoring ASCII case), each when set.
    pub fn admits(&self, client: &ClientId) -> bool {
        let by_addr = self
            .allow
            .as_ref()
            .is_none_or(|l| l.iter().any(|a| a.matches(client.addr)));
        let by_name = self.allow_names.as_ref().is_none_or(|l| {
            // Host names are case-insensitive, and so, in practice, are common names.
            l.iter()
                .any(|n| client.names.iter().any(|c| c.eq_ignore_ascii_case(n)))
        });
        by_addr && by_name
    }

    /// Records a client until the returned lease is dropped; `None` once the export is retired.
    pub fn lease(self: &Arc<Self>, peer: &str) -> Option<Lease> {
        let mut st = self.clients.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.retired {
            return None;
        }
        let id = self.clients.next.fetch_add(1, Ordering::Relaxed);
        st.peers.push((id, peer.to_owned()));
        Some(Lease {
            export: Arc::clone(self),
            id,
        })
    }

    /// The clients connected now.
    pub fn peers(&self) -> Vec<String> {
        let st = self.clients.state.lock().unwrap_or_else(|e| e.into_inner());
        st.peers.iter().map(|(_, p)| p.clone()).collect()
    }

    /// Waits until no client is connected.
    pub async fn idle(&self) {
        loop {
            let gone = self.clients.gone.notified();
            if self.peers().is_empty() {
                return;
            }
            gone.await;
        }
    }

    /// Takes no new client from now on, and tells the connected ones to finish their requests
    /// and leave.
    pub fn retire(&self) {
        self.clients
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retired = true;
        self.clients.drain.cancel();
    }

    /// True once [`Export::retire`] was called.
    pub fn is_retired(&self) -> bool {
        self.clients
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retired
    }

    /// Fires when the export is retired.
    pub fn draining(&self) -> &CancellationToken {
        &self.clients.drain
    }

    /// Says that the table no longer holds this (retired) export: clients waiting for it look
    /// again.
    pub fn replaced(&self) {
        self.clients.replaced.cancel();
    }
}

/// The table as a client asking for `name` should see it: while the export of that name is
/// retired, waits until the table holds its successor or no longer holds the name.
pub async fn settled(shared: &ArcSwap<ExportTable>, name: &str) -> Arc<ExportTable> {
    loop {
        let table = shared.load_full();
        let retired = match table.get(name) {
            Some(e) if e.is_retired() => Arc::clone(e),
            _ => return table,
        };
        drop(table);
        retired.clients.replaced.cancelled().await;
    }
}

/// The exports a server offers, in the order they were declared. The first one is also served
/// under the empty name `""`, which clients such as `nbdinfo nbd://host` ask for, unless
/// another default is named.
#[derive(Default)]
pub struct ExportTable {
    exports: Vec<Arc<Export>>,
    default: Option<String>,
    /// When set, clients must start TLS before anything else.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Handshake and idle timeouts.
    pub limits: Limits,
}

impl std::fmt::Debug for ExportTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportTable")
            .field("exports", &self.exports)
            .field("default", &self.default)
            .field("tls", &self.tls.is_some())
            .field("limits", &self.limits)
            .finish()
    }
}

impl ExportTable {
    /// A table of these exports, the first being the default.
    pub fn new(exports: Vec<Arc<Export>>) -> Self {
        ExportTable {
            exports,
            ..ExportTable::default()
        }
    }

    /// Requires TLS of every client, with this acceptor.
    pub fn with_tls(mut self, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the timeouts.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The export `client` gets when asking for `name`: none if it may not see it.
    pub fn get_for(&self, name: &str, client: &ClientId) -> Option<&Arc<Export>> {
        self.get(name).filter(|e| e.admits(client))
    }

    /// Makes `name` the export the empty name selects (instead of the first).
    pub fn with_default(mut self, name: Option<String>) -> Self {
        self.default = name;
        self
    }

    /// The export a client asking for `name` gets.
    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return match &self.default {
                Some(d) => self.exports.iter().find(|e| &e.name == d),
                None => self.exports.first(),
            };
        }
        self.exports.iter().find(|e| e.name == name)
    }

    /// Every export, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.iter()
    }

    /// Number of exports.
    pub fn len(&self) -> usize {
        self.exports.len()
    }

    /// True if there are no exports.
    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::raw::MemoryImage;

    fn export(name: &str) -> Arc<Export> {
        let device: Arc<dyn BlockDevice> = Arc::new(MemoryImage::new(1 << 20, false));
        Arc::new(Export {
            name: name.into(),
            description: String::new(),
            block_sizes: device.info().block_sizes,
            device,
            allow: None,
            allow_names: None,
            clients: Clients::default(),
        })
    }

    #[tokio::test]
    async fn a_retired_export_grants_no_lease_and_drains_its_clients() {
        let e = export("a");
        let lease = e.lease("peer-1").unwrap();
        assert_eq!(e.peers(), ["peer-1"]);
        e.retire();
        assert!(e.draining().is_cancelled());
        assert!(e.lease("peer-2").is_none());
        let idle = tokio::spawn({
            let e = Arc::clone(&e);
            async move { e.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!idle.is_finished());
        drop(lease);
        idle.await.unwrap();
        assert!(e.peers().is_empty());
    }

    #[tokio::test]
    async fn clients_asking_for_a_retired_export_wait_for_its_successor() {
        let old = export("a");
        let shared = Arc::new(ArcSwap::from_pointee(ExportTable::new(vec![Arc::clone(
            &old,
        )])));
        old.retire();
        let waiter = tokio::spawn({
            let shared = Arc::clone(&shared);
            async move { settled(&shared, "a").await.get("a").map(Arc::clone) }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "a client got a retired export");
        let new = export("a");
        shared.store(Arc::new(ExportTable::new(vec![Arc::clone(&new)])));
        old.replaced();
        let got = waiter.await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&got, &new));

        // A removed export: the waiter finds no export of that name.
        new.retire();
        let waiter = tokio::spawn({
            let shared = Arc::clone(&shared);
            async move { settled(&shared, "a").await.get("a").is_none() }
        });
        shared.store(Arc::new(ExportTable::default()));
        new.replaced();
        assert!(waiter.await.unwrap());
    }
}
