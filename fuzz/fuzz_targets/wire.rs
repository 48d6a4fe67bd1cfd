//! The request parser, `nbd::wire::parse_request`, on arbitrary bytes in compact and extended
//! mode: it must not panic, must consume exactly one header per request (re-encoding gives back
//! the bytes consumed), must leave the buffer alone when it returns `None` or an error, and must
//! derive the payload length as the spec says.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_rs::nbd::proto::{cflag, cmd};
use nbd_rs::nbd::wire::{ReplyMode, encode_request, parse_request};

fuzz_target!(|data: &[u8]| {
    for mode in [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended] {
        let mut buf = BytesMut::from(data);
        loop {
            let before = buf.clone();
            match parse_request(&mut buf, mode) {
                Ok(Some(r)) => {
                    let used = before.len() - buf.len();
                    assert_eq!(used, mode.request_len(), "consumed {used} bytes");
                    let mut again = BytesMut::new();
                    encode_request(&mut again, mode, &r);
                    assert_eq!(&again[..], &before[..used], "re-encoding differs");
                    let carries = r.kind == cmd::WRITE
                        || (mode == ReplyMode::Extended && r.flags & cflag::PAYLOAD_LEN != 0);
                    assert_eq!(r.payload, if carries { r.length } else { 0 });
                }
                Ok(None) => {
                    assert!(before.len() < mode.request_len());
                    assert_eq!(buf, before);
                    break;
                }
                Err(_) => {
                    assert_eq!(buf, before);
                    break;
                }
            }
        }
    }
});
