//! The transmission phase, through `serve_connection` (the real `Connection` split, the real
//! `MemoryImage` device). The first input byte chooses a fixed, valid handshake; the rest of the
//! input is the request stream that follows it.
//!
//! Selector byte:
//! - bits 0-1: 0 simple replies, 1 structured replies, 2 extended headers, 3 structured replies
//!   then extended headers;
//! - bit 2: export `b` (64 KiB, read-only, admitted by its allow list) instead of `a` (1 MiB);
//! - bit 3: do not select `base:allocation` (BLOCK_STATUS must then be refused);
//! - bit 4: enter transmission with NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO (not with
//!   extended headers, where EXPORT_NAME is forbidden);
//! - bit 5: the client does not set NBD_FLAG_C_NO_ZEROES (EXPORT_NAME answer padded).
//!
//! Checked beyond "no panic, no hang": the handshake is accepted, and in structured and extended
//! modes every byte the server sends belongs to a well-formed reply chunk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_rs::nbd::proto::{OPTION_REPLY_MAGIC, opt, rep};
use nbd_rs::nbd::serve_connection;
use nbd_rs::nbd::wire::ReplyMode;
use nbd_rs_fuzz::{
    CLIENT_ADDR, ChunkChecker, HANG, PIPE, Pipe, check_greeting, check_option_reply, exports,
    go_data, meta_data, put_option, runtime,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Prefix {
    bytes: Vec<u8>,
    /// The options sent, in order; the last one enters transmission.
    options: Vec<u32>,
    mode: ReplyMode,
    no_zeroes: bool,
}

fn prefix(sel: u8) -> Prefix {
    let (structured, extended) = match sel & 3 {
        0 => (false, false),
        1 => (true, false),
        2 => (false, true),
        _ => (true, true),
    };
    let name = if sel & 4 != 0 { "b" } else { "a" };
    let meta = sel & 8 == 0 && (structured || extended);
    let export_name = sel & 16 != 0 && !extended;
    let no_zeroes = sel & 32 == 0;

    let mut bytes = Vec::new();
    let flags: u32 = if no_zeroes { 3 } else { 1 };
    bytes.extend_from_slice(&flags.to_be_bytes());
    let mut options = Vec::new();
    let mut add = |b: &mut Vec<u8>, o: u32, d: &[u8]| {
        put_option(b, o, d);
        options.push(o);
    };
    if structured {
        add(&mut bytes, opt::STRUCTURED_REPLY, &[]);
    }
    if extended {
        add(&mut bytes, opt::EXTENDED_HEADERS, &[]);
    }
    if meta {
        add(&mut bytes, opt::SET_META_CONTEXT, &meta_data(name, &["base:allocation"]));
    }
    if export_name {
        add(&mut bytes, opt::EXPORT_NAME, name.as_bytes());
    } else {
        add(&mut bytes, opt::GO, &go_data(name));
    }
    let mode = if extended {
        ReplyMode::Extended
    } else if structured {
        ReplyMode::Structured
    } else {
        ReplyMode::Simple
    };
    Prefix {
        bytes,
        options,
        mode,
        no_zeroes,
    }
}

/// Reads the server's answers to the handshake prefix; panics if it was not accepted.
async fn read_handshake<R: AsyncRead + Unpin>(rd: &mut R, p: &Prefix) {
    let mut g = [0u8; 18];
    rd.read_exact(&mut g).await.expect("greeting");
    check_greeting(&g);
    for &o in &p.options {
        if o == opt::EXPORT_NAME {
            let mut a = vec![0u8; if p.no_zeroes { 10 } else { 134 }];
            rd.read_exact(&mut a)
                .await
                .expect("EXPORT_NAME of a valid export refused");
            break;
        }
        loop {
            let mut h = [0u8; 20];
            rd.read_exact(&mut h)
                .await
                .unwrap_or_else(|e| panic!("no reply to option {o}: {e}"));
            assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), OPTION_REPLY_MAGIC);
            let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            assert_eq!(option, o, "reply to the wrong option");
            let mut d = vec![0u8; len as usize];
            rd.read_exact(&mut d).await.expect("option reply data");
            check_option_reply(option, kind, &d);
            assert!(kind & 0x8000_0000 == 0, "valid option {o} refused: {kind:#x} {:?}", String::from_utf8_lossy(&d));
            if kind == rep::ACK {
                break;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, requests)) = data.split_first() else {
        return;
    };
    let p = prefix(sel);
    let rt = runtime();
    let table = exports();
    rt.block_on(async {
        let (peer, server) = tokio::io::duplex(PIPE);
        let (mut rd, mut wr) = tokio::io::split(peer);
        let mut input = p.bytes.clone();
        input.extend_from_slice(requests);
        tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        let serve = serve_connection(
            Pipe(server),
            "fuzz",
            Some(CLIENT_ADDR),
            &table,
            CancellationToken::new(),
        );
        let drain = async {
            read_handshake(&mut rd, &p).await;
            let mut check = (p.mode != ReplyMode::Simple).then(|| ChunkChecker::new(p.mode));
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = rd.read(&mut buf).await.expect("read replies");
                if n == 0 {
                    break;
                }
                if let Some(c) = &mut check {
                    c.feed(&buf[..n]);
                }
            }
            if let Some(c) = &check {
                c.finish();
            }
        };
        if tokio::time::timeout(HANG, async { tokio::join!(serve, drain) })
            .await
            .is_err()
        {
            panic!("HANG: connection still open {HANG:?} after the client closed");
        }
    });
});
