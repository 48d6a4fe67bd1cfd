//! Exports: named block devices, and the table clients choose them from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::block::{BlockDevice, BlockSizes};

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
    /// The clients connected to it now.
    pub clients: Clients,
}

/// The clients of an export in the transmission phase, for reloads: who they are, and when the
/// last one has gone.
#[derive(Debug, Default)]
pub struct Clients {
    peers: Mutex<Vec<(u64, String)>>,
    next: AtomicU64,
    gone: Notify,
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
        let mut peers = c.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.retain(|(id, _)| *id != self.id);
        if peers.is_empty() {
            c.gone.notify_waiters();
        }
    }
}

impl Export {
    /// Records a client until the returned lease is dropped.
    pub fn lease(self: &Arc<Self>, peer: &str) -> Lease {
        let id = self.clients.next.fetch_add(1, Ordering::Relaxed);
        self.clients
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, peer.to_owned()));
        Lease {
            export: Arc::clone(self),
            id,
        }
    }

    /// The clients connected now.
    pub fn peers(&self) -> Vec<String> {
        self.clients
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, p)| p.clone())
            .collect()
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
}

/// The exports a server offers, in the order they were declared. The first one is also served
/// under the empty name `""`, which clients such as `nbdinfo nbd://host` ask for, unless
/// another default is named.
#[derive(Debug, Default)]
pub struct ExportTable {
    exports: Vec<Arc<Export>>,
    default: Option<String>,
}

impl ExportTable {
    /// A table of these exports, the first being the default.
    pub fn new(exports: Vec<Arc<Export>>) -> Self {
        ExportTable {
            exports,
            default: None,
        }
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
