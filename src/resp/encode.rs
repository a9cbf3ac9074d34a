//! Replies and commands the proxy writes itself, encoded with
//! `redis-protocol` so that they follow the protocol exactly.

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::encode::extend_encode;
use redis_protocol::resp2::types::BytesFrame;

/// `-<text>\r\n`. Error replies are the same in RESP2 and RESP3. Line breaks
/// in `text` (e.g. from an OS error) are replaced so the frame stays valid.
pub fn error(text: &str) -> Bytes {
    let clean: String = text
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    encode(&BytesFrame::Error(clean.into()))
}

/// A command as a multibulk request.
pub fn command(args: &[&[u8]]) -> Bytes {
    let frame = BytesFrame::Array(
        args.iter()
            .map(|a| BytesFrame::BulkString(Bytes::copy_from_slice(a)))
            .collect(),
    );
    encode(&frame)
}

/// A command as a multibulk request, from words the caller already holds
/// as `Bytes` (shared, not copied).
pub fn command_of(words: impl IntoIterator<Item = Bytes>) -> Bytes {
    let frame = BytesFrame::Array(words.into_iter().map(BytesFrame::BulkString).collect());
    encode(&frame)
}

fn encode(frame: &BytesFrame) -> Bytes {
    let mut buf = BytesMut::new();
    extend_encode(&mut buf, frame, false).expect("encoding into a growable buffer cannot fail");
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_commands_are_valid_resp() {
        assert_eq!(&error("ERR bad\r\nthing")[..], b"-ERR bad  thing\r\n");
        assert_eq!(&command(&[b"GET", b"k"])[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        let words = [Bytes::from_static(b"GET"), Bytes::from_static(b"k")];
        assert_eq!(command_of(words), command(&[b"GET", b"k"]));
    }
}
