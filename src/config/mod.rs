//! Configuration: sizes, the ad-hoc `-e NAME DRIVER CONN` grammar, and building exports.

pub mod adhoc;
pub mod size;

pub use adhoc::{AdhocError, ExportSpec, Storage};
pub use size::{SizeError, parse_size};
