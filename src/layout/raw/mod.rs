//! The `raw` layout: the disk is one image, in memory or in a file.

mod file;
mod memory;

pub use file::{FileImage, OpenError};
pub use memory::MemoryImage;
