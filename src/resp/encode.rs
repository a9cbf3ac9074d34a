//! Replies and commands the proxy writes itself, encoded with
//! `redis-protocol` so that they follow the protocol exactly (a command,
//! the hot one, is written directly and tested against it).

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
/// Written directly, into one buffer of the exact size: every fenced write
/// sends one, and redis-protocol's general encoder (which works out each
/// length twice, with `log10`) took 30% of the proxy's instructions per
/// fenced `SET` (callgrind, 50 clients). A test holds it byte for byte to
/// what redis-protocol encodes.
pub fn command(args: &[&[u8]]) -> Bytes {
    multibulk(args)
}

fn multibulk<W: AsRef<[u8]>>(args: &[W]) -> Bytes {
    let len = 3
        + digits(args.len())
        + args
            .iter()
            .map(|a| 5 + digits(a.as_ref().len()) + a.as_ref().len())
            .sum::<usize>();
    // A `Vec` of the exact size (which `Bytes` takes over without a copy):
    // its `extend_from_slice` is a bare copy, where `BytesMut`'s puts each
    // check for room again.
    let mut buf = Vec::with_capacity(len);
    buf.push(b'*');
    push_decimal(&mut buf, args.len());
    buf.extend_from_slice(b"\r\n");
    for arg in args {
        let arg = arg.as_ref();
        buf.push(b'$');
        push_decimal(&mut buf, arg.len());
        buf.extend_from_slice(b"\r\n");
        buf.extend_from_slice(arg);
        buf.extend_from_slice(b"\r\n");
    }
    debug_assert_eq!(buf.len(), len);
    Bytes::from(buf)
}

/// Decimal digits of `n`.
fn digits(n: usize) -> usize {
    match n {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        _ => n.ilog10() as usize + 1,
    }
}

pub(crate) fn push_decimal(buf: &mut Vec<u8>, n: usize) {
    match n {
        // Most lengths in a command: a digit or two.
        0..=9 => buf.push(b'0' + n as u8),
        10..=99 => buf.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]),
        _ => {
            let mut text = [0u8; 20];
            let (mut at, mut n) = (text.len(), n);
            loop {
                at -= 1;
                text[at] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            buf.extend_from_slice(&text[at..]);
        }
    }
}

/// A command as a multibulk request, from a slice of words.
pub fn command_words(words: &[Bytes]) -> Bytes {
    multibulk(words)
}

/// A command as a multibulk request, from words the caller already holds
/// as `Bytes`.
pub fn command_of(words: impl IntoIterator<Item = Bytes>) -> Bytes {
    let words: Vec<Bytes> = words.into_iter().collect();
    multibulk(&words)
}

fn encode(frame: &BytesFrame) -> Bytes {
    let mut buf = BytesMut::new();
    extend_encode(&mut buf, frame, false).expect("encoding into a growable buffer cannot fail");
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `command` writes what redis-protocol's encoder writes.
    #[test]
    fn commands_are_what_redis_protocol_encodes() {
        let long = vec![b'x'; 123_456];
        // Every length where the count of its digits changes.
        let edges: Vec<Vec<u8>> = [9, 10, 99, 100, 999, 1000].map(|n| vec![b'y'; n]).to_vec();
        let cases: Vec<Vec<&[u8]>> = vec![
            edges.iter().map(Vec::as_slice).collect(),
            vec![b"a"; 100],
            vec![b"a"; 1000],
            vec![],
            vec![b""],
            vec![b"PING"],
            vec![b"SET", b"k", b"v", b"", b"\r\n$3\r\n"],
            vec![b"GET"; 9],
            vec![b"GET"; 10],
            vec![b"a"; 101],
            vec![b"SET", b"key", &long],
        ];
        for args in cases {
            let frame = BytesFrame::Array(
                args.iter()
                    .map(|a| BytesFrame::BulkString(Bytes::copy_from_slice(a)))
                    .collect(),
            );
            assert_eq!(command(&args), encode(&frame), "{} args", args.len());
        }
    }

    #[test]
    fn errors_and_commands_are_valid_resp() {
        assert_eq!(&error("ERR bad\r\nthing")[..], b"-ERR bad  thing\r\n");
        assert_eq!(&command(&[b"GET", b"k"])[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        let words = [Bytes::from_static(b"GET"), Bytes::from_static(b"k")];
        assert_eq!(command_of(words), command(&[b"GET", b"k"]));
    }
}
