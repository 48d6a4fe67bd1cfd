//! The option phase: the input is everything a client sends after connecting (client flags,
//! then options), run through `handshake::greet` and `handshake::options` as `serve_connection`
//! does for a plain-TCP client at 192.0.2.7.
//!
//! Checked beyond "no panic, no hang": the server's output is a well-formed sequence of option
//! replies (or ends with the EXPORT_NAME answer), and export `c`, whose allow list excludes the
//! client, is never listed, described or granted.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_rs::export::ClientId;
use nbd_rs::nbd::handshake::{self, HandshakeError, Outcome, Tls};
use nbd_rs::nbd::proto::tflag;
use nbd_rs_fuzz::{CLIENT_ADDR, HANG, HIDDEN, PIPE, check_greeting, check_option_stream, exports, runtime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let rt = runtime();
    let table = exports();
    let client = ClientId {
        addr: Some(CLIENT_ADDR),
        names: Vec::new(),
    };
    let ((no_zeroes, result), out) = rt.block_on(async {
        let (peer, mut server) = tokio::io::duplex(PIPE);
        let (mut rd, mut wr) = tokio::io::split(peer);
        let input = data.to_vec();
        tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        let serve = async {
            let mut buf = BytesMut::with_capacity(4096);
            let nz = match handshake::greet(&mut server, &mut buf).await {
                Ok(nz) => nz,
                Err(e) => return (None, Err(e)),
            };
            let r = handshake::options(&mut server, &mut buf, &table, "fuzz", &client, nz, Tls::Off(None))
                .await;
            drop(server);
            (Some(nz), r)
        };
        let drain = async {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        match tokio::time::timeout(HANG, async { tokio::join!(serve, drain) }).await {
            Ok(r) => r,
            Err(_) => panic!("HANG: option phase still running {HANG:?} after the client closed"),
        }
    });

    let rest = check_greeting(&out);
    match no_zeroes {
        None => assert!(rest.is_empty(), "option replies after a failed greeting"),
        Some(nz) => {
            check_option_stream(rest, nz);
        }
    }
    match result {
        Ok(Outcome::Transmission(session)) => {
            let e = &session.export;
            assert_ne!(e.name, HIDDEN, "client got an export its allow list excludes");
            assert_eq!(
                session.flags & tflag::READ_ONLY != 0,
                e.device.info().read_only,
                "READ_ONLY flag does not match the device"
            );
            assert!(session.flags & tflag::HAS_FLAGS != 0);
        }
        Ok(Outcome::Aborted) => {}
        Ok(Outcome::StartTls(_)) => panic!("STARTTLS accepted on a server without TLS"),
        Err(HandshakeError::Timeout(_)) => panic!("handshake timeout outside serve_connection"),
        Err(_) => {}
    }
});
