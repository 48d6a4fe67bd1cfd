//! Exports: named block devices, and the table clients choose them from.

use std::sync::Arc;

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
