//! Configuration: the TOML file and environment (figment), the pipeline grammar, the `-e`
//! grammar of the command line, and sizes.

pub mod adhoc;
pub mod model;
pub mod pipeline;
pub mod size;

pub use model::{Config, ExportConfig, Locator, Origin, Problem, Problems};
pub use size::{SizeError, parse_size};
