//! nbd-rs: a Network Block Device server.
//!
//! A client's request travels through these modules:
//! - [`server`]: listeners and accept loops; one task per connection.
//! - [`nbd`]: the protocol. [`nbd::handshake`] negotiates options and picks an export,
//!   [`nbd::transmission`] validates and runs requests, [`nbd::wire`] encodes the bytes.
//! - [`export`]: the table of named exports.
//! - [`block`]: the [`block::BlockDevice`] trait every storage stage implements.
//! - [`layout`]: how a disk maps onto storage (`raw`, `sharded`).
//! - [`store`]: key-addressed object stores under a layout (`memory`, `file`).
//! - [`config`]: sizes and the command line's `-e NAME DRIVER CONN` grammar.
//! - [`cli`]: the command-line definition.

pub mod block;
pub mod cli;
pub mod config;
pub mod export;
pub mod layout;
mod le;
pub mod nbd;
pub mod pipeline;
pub mod registry;
pub mod server;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod tls;
