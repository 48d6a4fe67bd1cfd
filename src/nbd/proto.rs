//! NBD wire constants, named as in the protocol specification (doc/proto.md).

/// First 8 bytes the server sends: "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle magic, and the magic of every option request: "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub mod opt {
    /// Choose an export and enter transmission (old way, no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End the handshake.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Start TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export.
    pub const INFO: u32 = 6;
    /// Ask about an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use 64-bit (extended) headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export in a LIST answer.
    pub const SERVER: u32 = 2;
    /// One piece of information in an INFO/GO answer.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown or unsupported option.
    pub const ERR_UNSUP: u32 = 0x8000_0001;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = 0x8000_0002;
    /// Invalid option data.
    pub const ERR_INVALID: u32 = 0x8000_0003;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = 0x8000_0004;
    /// TLS must be negotiated first.
    pub const ERR_TLS_REQD: u32 = 0x8000_0005;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = 0x8000_0006;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = 0x8000_0007;
    /// The client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
    /// Request too big.
    pub const ERR_TOO_BIG: u32 = 0x8000_0009;
    /// Extended headers are required.
    pub const ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;
}

/// Information types in `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Read-only export.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Seeks are slow.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// DF on reads is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see each other's flushes.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Request magic, compact (28-byte) requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Request magic, extended (32-byte) requests.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply chunk magic.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Do not punch holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// One extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail unless zeroing is fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// The length field is a payload length (extended headers).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply flag: last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1;

/// Structured reply chunk types.
pub mod reply {
    /// No payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status, 32-bit extents.
    pub const BLOCK_STATUS: u16 = 5;
    /// Block status, 64-bit extents.
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// An error.
    pub const ERROR: u16 = 0x8001;
}

/// The one metadata context served, and the id it is given when selected.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id of `base:allocation` once selected.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Longest string (export name, description, query) accepted, as the spec allows.
pub const MAX_STRING: usize = 4096;
/// Longest option data buffered; a longer option ends the connection.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
