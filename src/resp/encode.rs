//! Replies and commands the proxy writes itself, encoded with
//! `redis-protocol` so that they follow the protocol exactly (a command,
//! the hot one, is written directly and tested against it).

use bytes::{BufMut, Bytes, BytesMut};
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

/// `*<n>\r\n` at the end of `out`: the header of a command of `n` words
/// whose words [`put_word`] then appends (no buffer of its own, for one
/// that is reused).
pub fn put_command_header(out: &mut impl BufMut, n: usize) {
    out.put_u8(b'*');
    put_decimal(out, n);
    out.put_slice(b"\r\n");
}

/// `$<len>\r\n<word>\r\n` at the end of `out`.
pub fn put_word(out: &mut impl BufMut, word: &[u8]) {
    out.put_u8(b'$');
    put_decimal(out, word.len());
    out.put_slice(b"\r\n");
    out.put_slice(word);
    out.put_slice(b"\r\n");
}

/// `n` in decimal as a command's word, at the end of `out`.
pub fn put_number_word(out: &mut impl BufMut, n: usize) {
    let mut text = [0u8; 20];
    let at = decimal_at(&mut text, n);
    put_word(out, &text[at..]);
}

fn put_decimal(out: &mut impl BufMut, n: usize) {
    match n {
        0..=9 => out.put_u8(b'0' + n as u8),
        _ => {
            let mut text = [0u8; 20];
            let at = decimal_at(&mut text, n);
            out.put_slice(&text[at..]);
        }
    }
}

/// Writes `n` at the end of `text`; returns where it starts.
fn decimal_at(text: &mut [u8; 20], mut n: usize) -> usize {
    let mut at = text.len();
    loop {
        at -= 1;
        text[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return at;
        }
    }
}

pub(crate) fn push_decimal(buf: &mut Vec<u8>, n: usize) {
    match n {
        // Most lengths in a command: a digit or two.
        0..=9 => buf.push(b'0' + n as u8),
        10..=99 => buf.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]),
        _ => {
            let mut text = [0u8; 20];
            let at = decimal_at(&mut text, n);
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
            // The same, word by word into a reused buffer.
            let mut out = BytesMut::from(&b"before"[..]);
            put_command_header(&mut out, args.len());
            args.iter().for_each(|a| put_word(&mut out, a));
            assert_eq!(out[6..], encode(&frame)[..], "{} args, put", args.len());
        }
        let mut out = Vec::new();
        for n in [0, 7, 10, 99, 12_345, usize::MAX] {
            put_number_word(&mut out, n);
        }
        let words: Vec<String> = ["0", "7", "10", "99", "12345", &usize::MAX.to_string()]
            .iter()
            .map(|n| format!("${}\r\n{n}\r\n", n.len()))
            .collect();
        assert_eq!(String::from_utf8(out).unwrap(), words.concat());
    }

    #[test]
    fn errors_and_commands_are_valid_resp() {
        assert_eq!(&error("ERR bad\r\nthing")[..], b"-ERR bad  thing\r\n");
        assert_eq!(&command(&[b"GET", b"k"])[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        let words = [Bytes::from_static(b"GET"), Bytes::from_static(b"k")];
        assert_eq!(command_of(words), command(&[b"GET", b"k"]));
    }
}
