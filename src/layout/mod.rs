//! Layouts: how a disk's bytes are laid out in its store: `raw` (one image) and `sharded` (chunks).

pub mod journal;
pub mod raw;
mod readahead;
pub mod sharded;
