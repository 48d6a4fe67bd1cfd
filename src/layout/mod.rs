//! Layouts: how a disk's bytes are laid out in its store (`raw` now; `sharded` later).

pub mod raw;
