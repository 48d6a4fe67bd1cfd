//! The fixed-newstyle handshake: greeting, client flags and the option phase.
//!
//! Options are answered one at a time. Errors a client can recover from get an option error
//! reply and the next option is parsed normally; protocol violations (bad magic, unknown client
//! flags, an option longer than [`MAX_OPTION_DATA`], an EXPORT_NAME that cannot be satisfied)
//! end the connection, as the spec allows.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{
    BASE_ALLOCATION, BASE_ALLOCATION_ID, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, MAX_OPTION_DATA, MAX_STRING, NBDMAGIC,
    OPTION_REPLY_MAGIC, info, opt, rep, tflag,
};
use super::wire::ReplyMode;
use crate::block::DeviceInfo;
use arc_swap::ArcSwap;

use crate::export::{self, ClientId, Export, ExportTable, Lease};

/// Why a handshake ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed.
    #[error("i/o error during handshake: {0}")]
    Io(#[from] io::Error),
    /// The client closed the connection.
    #[error("client closed the connection during the handshake")]
    ClientGone,
    /// The client set flags this server does not know.
    #[error("client sent unknown handshake flags {0:#x}")]
    BadClientFlags(u32),
    /// An option did not start with IHAVEOPT.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// An option's data was longer than the server buffers.
    #[error("option {option} with {len} bytes of data is longer than the {max} bytes accepted")]
    OptionTooLong {
        /// The option.
        option: u32,
        /// Its announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// NBD_OPT_EXPORT_NAME named an export that does not exist (no error reply is possible).
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// NBD_OPT_EXPORT_NAME with a name that is not UTF-8 or too long.
    #[error("client sent an invalid export name with NBD_OPT_EXPORT_NAME")]
    BadExportName,
    /// NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS (no error reply is
    /// possible).
    #[error("client used NBD_OPT_EXPORT_NAME without TLS on a server that requires TLS")]
    TlsRequired,
    /// Bytes followed STARTTLS before the server's answer: they cannot be part of the TLS
    /// handshake.
    #[error("client sent data after NBD_OPT_STARTTLS before its reply")]
    DataAfterStartTls,
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// The handshake took longer than the handshake timeout.
    #[error("handshake not finished within {0:?}")]
    Timeout(std::time::Duration),
    /// NBD_OPT_EXPORT_NAME after extended headers were negotiated.
    #[error("client used NBD_OPT_EXPORT_NAME after negotiating extended headers")]
    ExportNameAfterExtendedHeaders,
}

/// How the handshake ended.
pub enum Outcome {
    /// Transmission begins with these settings.
    Transmission(Session),
    /// The client sent NBD_OPT_ABORT and was answered.
    Aborted,
    /// STARTTLS was acknowledged: the TLS handshake comes next, then more options.
    StartTls(tokio_rustls::TlsAcceptor),
}

/// What was agreed for the transmission phase.
#[derive(Debug)]
pub struct Session {
    /// The chosen export.
    pub export: Arc<Export>,
    /// The client's place among the export's clients, held until its last request is answered.
    pub lease: Lease,
    /// Reply framing.
    pub mode: ReplyMode,
    /// The transmission flags sent to the client.
    pub flags: u16,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
}

/// The transmission flags for a device in a given reply mode.
pub fn transmission_flags(info: &DeviceInfo, mode: ReplyMode) -> u16 {
    let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::SEND_CACHE;
    if info.read_only {
        f |= tflag::READ_ONLY;
    } else {
        f |= tflag::SEND_WRITE_ZEROES;
        if info.can_trim {
            f |= tflag::SEND_TRIM;
        }
        if info.can_fast_zero {
            f |= tflag::SEND_FAST_ZERO;
        }
    }
    if mode.structured() {
        f |= tflag::SEND_DF;
    }
    if info.multi_conn {
        f |= tflag::CAN_MULTI_CONN;
    }
    if info.rotational {
        f |= tflag::ROTATIONAL;
    }
    f
}

/// Negotiation state between options.
#[derive(Default)]
struct State {
    structured: bool,
    extended: bool,
    no_zeroes: bool,
    /// The export `SET_META_CONTEXT` selected `base:allocation` for, by name: a reload that
    /// replaces the export in between keeps the selection.
    meta: Option<String>,
}

impl State {
    fn mode(&self) -> ReplyMode {
        if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }

    fn session(&self, export: &Arc<Export>, lease: Lease) -> Session {
        let mode = self.mode();
        Session {
            export: Arc::clone(export),
            lease,
            mode,
            flags: transmission_flags(export.device.info(), mode),
            base_allocation: self.meta.as_ref().is_some_and(|m| *m == export.name),
        }
    }
}

/// Makes sure `buf` holds at least `n` bytes.
async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    n: usize,
) -> Result<(), HandshakeError> {
    while buf.len() < n {
        buf.reserve(n - buf.len());
        if rd.read_buf(buf).await? == 0 {
            return Err(HandshakeError::ClientGone);
        }
    }
    Ok(())
}

fn put_reply(out: &mut BytesMut, option: u32, kind: u32, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(kind);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

fn put_error(out: &mut BytesMut, option: u32, kind: u32, message: &str) {
    put_reply(out, option, kind, message.as_bytes());
}

/// Sends the greeting and reads the client's flags; returns whether the client asked for no
/// zeroes (`NBD_FLAG_C_NO_ZEROES`).
pub async fn greet<S>(io: &mut S, buf: &mut BytesMut) -> Result<bool, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(18);
    out.put_u64(NBDMAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    io.write_all(&out).await?;

    fill(io, buf, 4).await?;
    let client_flags = buf.get_u32();
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::BadClientFlags(client_flags));
    }
    Ok(client_flags & FLAG_C_NO_ZEROES != 0)
}

/// Whether TLS is on for this part of the handshake.
#[derive(Clone, Copy)]
pub enum Tls<'a> {
    /// Not (yet) started; with an acceptor, it is required (the configuration as it was when
    /// the client connected: a reload does not change the rules in the middle of a handshake).
    Off(Option<&'a tokio_rustls::TlsAcceptor>),
    /// Started with STARTTLS: the options now travel over TLS.
    Active,
}

/// Runs the option phase for `client` (its address, and once TLS is active its certificate
/// names). `buf` keeps whatever the client sent beyond the handshake, for the transmission
/// phase.
///
/// Each option sees the table as it is when the option arrives; an option naming an export
/// that a reload is replacing waits for its successor. An export the client may not see is
/// answered as an unknown one. When `tls` is [`Tls::Off`] with an acceptor, every option but
/// STARTTLS and ABORT is refused with `NBD_REP_ERR_TLS_REQD`.
pub async fn options<S>(
    io: &mut S,
    buf: &mut BytesMut,
    shared: &ArcSwap<ExportTable>,
    peer: &str,
    client: &ClientId,
    no_zeroes: bool,
    tls: Tls<'_>,
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(256);
    let mut st = State {
        no_zeroes,
        ..State::default()
    };

    loop {
        fill(io, buf, 16).await?;
        let magic = buf.get_u64();
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        let option = buf.get_u32();
        let len = buf.get_u32();
        if len > MAX_OPTION_DATA {
            return Err(HandshakeError::OptionTooLong {
                option,
                len,
                max: MAX_OPTION_DATA,
            });
        }
        fill(io, buf, len as usize).await?;
        let data = buf.split_to(len as usize);

        // FORCEDTLS: before TLS, only STARTTLS and ABORT are answered (before any lookup, so
        // that nothing about the exports shows).
        let tls_required = matches!(tls, Tls::Off(Some(_)));
        if tls_required && !matches!(option, opt::STARTTLS | opt::ABORT) {
            if option == opt::EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            put_error(
                &mut out,
                option,
                rep::ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            );
            io.write_all(&out).await?;
            out.clear();
            continue;
        }
        let exports = match option {
            opt::EXPORT_NAME => export::settled(shared, &String::from_utf8_lossy(&data)).await,
            opt::INFO | opt::GO | opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let mut rest = &data[..];
                match take_string(&mut rest) {
                    Ok(name) => export::settled(shared, name).await,
                    Err(_) => shared.load_full(),
                }
            }
            _ => shared.load_full(),
        };
        match option {
            opt::EXPORT_NAME => {
                let mut table = exports;
                let (export, lease) = loop {
                    let export = export_name(&st, &data, &table, client)?;
                    if let Some(lease) = export.lease(peer) {
                        break (export, lease);
                    }
                    // Retired since the lookup: look again once its successor is in the table.
                    table = export::settled(shared, &String::from_utf8_lossy(&data)).await;
                };
                let session = st.session(&export, lease);
                out.put_u64(export.device.info().size);
                out.put_u16(session.flags);
                if !st.no_zeroes {
                    out.put_bytes(0, 124);
                }
                io.write_all(&out).await?;
                return Ok(Outcome::Transmission(session));
            }
            opt::ABORT => {
                put_reply(&mut out, option, rep::ACK, &[]);
                // The client may close without waiting for the ACK.
                let _ = io.write_all(&out).await;
                return Ok(Outcome::Aborted);
            }
            opt::LIST => {
                if !data.is_empty() {
                    put_error(
                        &mut out,
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    );
                } else {
                    for e in exports.iter().filter(|e| e.admits(client)) {
                        let mut d = BytesMut::new();
                        d.put_u32(e.name.len() as u32);
                        d.put_slice(e.name.as_bytes());
                        d.put_slice(e.description.as_bytes());
                        put_reply(&mut out, option, rep::SERVER, &d);
                    }
                    put_reply(&mut out, option, rep::ACK, &[]);
                }
            }
            opt::STARTTLS => {
                if !data.is_empty() {
                    put_error(
                        &mut out,
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_STARTTLS takes no data",
                    );
                } else if let Tls::Active = tls {
                    put_error(&mut out, option, rep::ERR_INVALID, "TLS is already active");
                } else if let Tls::Off(Some(acceptor)) = tls {
                    if !buf.is_empty() {
                        return Err(HandshakeError::DataAfterStartTls);
                    }
                    put_reply(&mut out, option, rep::ACK, &[]);
                    io.write_all(&out).await?;
                    return Ok(Outcome::StartTls(acceptor.clone()));
                } else {
                    put_error(
                        &mut out,
                        option,
                        rep::ERR_UNSUP,
                        "TLS is not configured on this server",
                    );
                }
            }
            opt::INFO | opt::GO => {
                let mut table = exports;
                loop {
                    let Some(export) = info_or_go(&mut out, &st, option, &data, &table, client)
                    else {
                        break;
                    };
                    if option != opt::GO {
                        break;
                    }
                    if let Some(lease) = export.lease(peer) {
                        io.write_all(&out).await?;
                        return Ok(Outcome::Transmission(st.session(&export, lease)));
                    }
                    // Retired between the lookup and now: answer again once its successor is
                    // in the table.
                    out.clear();
                    let mut rest = &data[..];
                    let name = take_string(&mut rest).unwrap_or_default();
                    table = export::settled(shared, name).await;
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    put_error(
                        &mut out,
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else if st.extended {
                    put_error(
                        &mut out,
                        option,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers are already in use",
                    );
                } else {
                    st.structured = true;
                    put_reply(&mut out, option, rep::ACK, &[]);
                }
            }
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    put_error(
                        &mut out,
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    );
                } else {
                    st.extended = true;
                    put_reply(&mut out, option, rep::ACK, &[]);
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(&mut out, &mut st, option, &data, &exports, client);
            }
            _ => put_error(&mut out, option, rep::ERR_UNSUP, "unknown option"),
        }
        io.write_all(&out).await?;
        out.clear();
    }
}

fn export_name(
    st: &State,
    data: &[u8],
    exports: &ExportTable,
    client: &ClientId,
) -> Result<Arc<Export>, HandshakeError> {
    if st.extended {
        return Err(HandshakeError::ExportNameAfterExtendedHeaders);
    }
    if data.len() > MAX_STRING {
        return Err(HandshakeError::BadExportName);
    }
    let name = std::str::from_utf8(data).map_err(|_| HandshakeError::BadExportName)?;
    exports
        .get_for(name, client)
        .cloned()
        .ok_or_else(|| HandshakeError::UnknownExport(name.to_owned()))
}

/// Parses a length-prefixed string (u32 length) from the front of `data`.
fn take_string<'a>(data: &mut &'a [u8]) -> Result<&'a str, &'static str> {
    if data.len() < 4 {
        return Err("truncated string length");
    }
    let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let rest = &data[4..];
    if n > rest.len() {
        return Err("string longer than the option data");
    }
    if n > MAX_STRING {
        return Err("string longer than 4096 bytes");
    }
    let s = std::str::from_utf8(&rest[..n]).map_err(|_| "string is not UTF-8")?;
    *data = &rest[n..];
    Ok(s)
}

/// Answers INFO or GO; returns the export when the answer ended in an ACK.
fn info_or_go(
    out: &mut BytesMut,
    st: &State,
    option: u32,
    data: &[u8],
    exports: &ExportTable,
    client: &ClientId,
) -> Option<Arc<Export>> {
    let mut rest = data;
    let name = match take_string(&mut rest) {
        Ok(n) => n,
        Err(why) => {
            put_error(out, option, rep::ERR_INVALID, why);
            return None;
        }
    };
    if rest.len() < 2 {
        put_error(
            out,
            option,
            rep::ERR_INVALID,
            "truncated information request count",
        );
        return None;
    }
    let count = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let requests = &rest[2..];
    if requests.len() != 2 * count {
        put_error(
            out,
            option,
            rep::ERR_INVALID,
            "information request count does not match the option length",
        );
        return None;
    }
    let Some(export) = exports.get_for(name, client) else {
        put_error(
            out,
            option,
            rep::ERR_UNKNOWN,
            &format!("unknown export {name:?}"),
        );
        return None;
    };
    let dev = export.device.info();
    let mode = st.mode();

    let mut d = BytesMut::with_capacity(64);
    d.put_u16(info::EXPORT);
    d.put_u64(dev.size);
    d.put_u16(transmission_flags(dev, mode));
    put_reply(out, option, rep::INFO, &d);

    let asked = |t: u16| {
        requests
            .chunks_exact(2)
            .any(|c| u16::from_be_bytes([c[0], c[1]]) == t)
    };
    if asked(info::NAME) {
        d.clear();
        d.put_u16(info::NAME);
        d.put_slice(export.name.as_bytes());
        put_reply(out, option, rep::INFO, &d);
    }
    if asked(info::DESCRIPTION) && !export.description.is_empty() {
        d.clear();
        d.put_u16(info::DESCRIPTION);
        d.put_slice(export.description.as_bytes());
        put_reply(out, option, rep::INFO, &d);
    }
    // Block sizes are always sent: they bind only clients that asked, and inform the others.
    d.clear();
    d.put_u16(info::BLOCK_SIZE);
    d.put_u32(export.block_sizes.minimum);
    d.put_u32(export.block_sizes.preferred);
    d.put_u32(export.block_sizes.maximum);
    put_reply(out, option, rep::INFO, &d);

    put_reply(out, option, rep::ACK, &[]);
    Some(Arc::clone(export))
}

/// Answers LIST_META_CONTEXT or SET_META_CONTEXT.
fn meta_context(
    out: &mut BytesMut,
    st: &mut State,
    option: u32,
    data: &[u8],
    exports: &ExportTable,
    client: &ClientId,
) {
    let set = option == opt::SET_META_CONTEXT;
    if set {
        // A SET replaces the earlier selection even when it fails.
        st.meta = None;
        if !st.structured && !st.extended {
            put_error(
                out,
                option,
                rep::ERR_INVALID,
                "negotiate structured replies or extended headers first",
            );
            return;
        }
    }
    let mut rest = data;
    let parsed = (|| {
        let name = take_string(&mut rest)?;
        if rest.len() < 4 {
            return Err("truncated query count");
        }
        let count = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        rest = &rest[4..];
        let mut queries = Vec::new();
        for _ in 0..count {
            queries.push(take_string(&mut rest)?);
        }
        if !rest.is_empty() {
            return Err("trailing bytes after the queries");
        }
        Ok((name, queries))
    })();
    let (name, queries) = match parsed {
        Ok(p) => p,
        Err(why) => {
            put_error(out, option, rep::ERR_INVALID, why);
            return;
        }
    };
    let Some(export) = exports.get_for(name, client) else {
        put_error(
            out,
            option,
            rep::ERR_UNKNOWN,
            &format!("unknown export {name:?}"),
        );
        return;
    };
    let matches = if set {
        queries.contains(&BASE_ALLOCATION)
    } else {
        queries.is_empty()
            || queries
                .iter()
                .any(|q| *q == BASE_ALLOCATION || *q == "base:")
    };
    if matches {
        let mut d = BytesMut::new();
        d.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
        d.put_slice(BASE_ALLOCATION.as_bytes());
        put_reply(out, option, rep::META_CONTEXT, &d);
        if set {
            st.meta = Some(export.name.clone());
        }
    }
    put_reply(out, option, rep::ACK, &[]);
}
