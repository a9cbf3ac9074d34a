//! Property tests of the framing layer: any split of a valid pipeline gives
//! the same frames as the whole. Replies are generated and encoded with
//! `redis-protocol` (RESP2 and RESP3 types, nested, with attributes), which
//! is the oracle for where each frame ends.

use cachefence::resp::reply::ReplyScanner;
use cachefence::resp::request::{Args, RequestFramer};
use proptest::prelude::*;
use redis_protocol::resp3::types::{FrameMap, FrameSet, OwnedFrame, Resp3Frame, VerbatimStringFormat};

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 :._-]{0,12}"
}

fn blob() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..40)
}

fn key() -> impl Strategy<Value = OwnedFrame> {
    blob().prop_map(|data| OwnedFrame::BlobString {
        data,
        attributes: None,
    })
}

fn leaf() -> impl Strategy<Value = OwnedFrame> {
    prop_oneof![
        blob().prop_map(|data| OwnedFrame::BlobString {
            data,
            attributes: None
        }),
        text().prop_map(|s| OwnedFrame::SimpleString {
            data: s.into_bytes(),
            attributes: None
        }),
        text().prop_map(|s| OwnedFrame::SimpleError {
            data: format!("ERR {s}"),
            attributes: None
        }),
        any::<i64>().prop_map(|data| OwnedFrame::Number {
            data,
            attributes: None
        }),
        (-1e9f64..1e9).prop_map(|data| OwnedFrame::Double {
            data,
            attributes: None
        }),
        any::<bool>().prop_map(|data| OwnedFrame::Boolean {
            data,
            attributes: None
        }),
        Just(OwnedFrame::Null),
        "[1-9][0-9]{20,30}".prop_map(|s| OwnedFrame::BigNumber {
            data: s.into_bytes(),
            attributes: None
        }),
        blob().prop_map(|data| OwnedFrame::VerbatimString {
            data,
            format: VerbatimStringFormat::Text,
            attributes: None
        }),
        blob().prop_map(|data| OwnedFrame::BlobError {
            data,
            attributes: None
        }),
    ]
}

fn frame() -> impl Strategy<Value = OwnedFrame> {
    let nested = leaf().prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|data| OwnedFrame::Array {
                data,
                attributes: None
            }),
            prop::collection::vec(inner.clone(), 0..6).prop_map(|data| OwnedFrame::Push {
                data,
                attributes: None
            }),
            prop::collection::vec((key(), inner), 0..4).prop_map(|pairs| OwnedFrame::Map {
                data: pairs.into_iter().collect::<FrameMap<_, _>>(),
                attributes: None
            }),
            prop::collection::vec(key(), 0..4).prop_map(|keys| OwnedFrame::Set {
                data: keys.into_iter().collect::<FrameSet<_>>(),
                attributes: None
            }),
        ]
    });
    // Sometimes annotate a top-level frame with an attribute (`|1 ...`).
    (nested, any::<bool>(), key()).prop_map(|(frame, annotate, k)| match (frame, annotate) {
        (OwnedFrame::Array { data, .. }, true) => {
            let attributes = FrameMap::from_iter([(
                k,
                OwnedFrame::Number {
                    data: 1,
                    attributes: None,
                },
            )]);
            OwnedFrame::Array {
                data,
                attributes: Some(attributes),
            }
        }
        (frame, _) => frame,
    })
}

fn encode(frame: &OwnedFrame) -> Vec<u8> {
    let mut buf = vec![0u8; frame.encode_len(false)];
    let n = redis_protocol::resp3::encode::complete::encode(&mut buf, frame, false).expect("encodes");
    buf.truncate(n);
    buf
}

/// Chunk sizes that cover `len` bytes.
fn splits(len: usize, sizes: &[usize]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut covered = 0;
    let mut i = 0;
    while covered < len {
        let size = sizes.get(i % sizes.len().max(1)).copied().unwrap_or(len).max(1);
        out.push(size.min(len - covered));
        covered += size.min(len - covered);
        i += 1;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn reply_scanner_agrees_with_redis_protocol(
        frames in prop::collection::vec(frame(), 1..8),
        sizes in prop::collection::vec(1usize..64, 1..8),
        stream in any::<bool>(),
    ) {
        let encoded: Vec<Vec<u8>> = frames.iter().map(encode).collect();
        let wire: Vec<u8> = encoded.concat();
        let mut expected = Vec::new();
        let mut end = 0;
        for e in &encoded {
            end += e.len();
            expected.push(end);
        }

        let mut scanner = ReplyScanner::default();
        let mut buf: Vec<u8> = Vec::new();
        let mut base = 0; // bytes already dropped from the front (streamed)
        let mut fed = 0;
        let mut found = Vec::new();
        for size in splits(wire.len(), &sizes) {
            buf.extend_from_slice(&wire[fed..fed + size]);
            fed += size;
            while let Some(frame) = scanner.advance(&buf).unwrap() {
                found.push(base + frame.end);
            }
            if stream {
                // As the session does when streaming: drop what was scanned.
                let scanned = scanner.scanned();
                buf.drain(..scanned);
                scanner.consume(scanned);
                base += scanned;
            }
        }
        prop_assert_eq!(found, expected);
    }

    #[test]
    fn request_framer_gives_the_same_commands_for_any_split(
        commands in prop::collection::vec(prop::collection::vec(blob(), 1..6), 1..12),
        inline in prop::collection::vec("[a-z]{1,6}( [a-z0-9]{1,6}){0,3}", 0..4),
        sizes in prop::collection::vec(1usize..48, 1..8),
    ) {
        let mut wire = Vec::new();
        let mut expected: Vec<Vec<Vec<u8>>> = Vec::new();
        for (i, args) in commands.iter().enumerate() {
            wire.extend(format!("*{}\r\n", args.len()).bytes());
            for a in args {
                wire.extend(format!("${}\r\n", a.len()).bytes());
                wire.extend_from_slice(a);
                wire.extend_from_slice(b"\r\n");
            }
            expected.push(args.clone());
            if let Some(line) = inline.get(i) {
                wire.extend(format!("{line}\r\n").bytes());
                expected.push(line.split(' ').map(|w| w.as_bytes().to_vec()).collect());
            }
        }
        let mut framer = RequestFramer::new(1 << 20);
        let mut buf: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut found: Vec<Vec<Vec<u8>>> = Vec::new();
        for size in splits(wire.len(), &sizes) {
            buf.extend_from_slice(&wire[fed..fed + size]);
            fed += size;
            while let Some(frame) = framer.next(&buf).unwrap() {
                let request = &buf[..frame.len];
                let tracked = match &frame.args {
                    Args::Multibulk(_) => frame.argc.min(3),
                    Args::Inline(args) => args.len(),
                };
                found.push((0..tracked).map(|i| frame.arg(request, i).unwrap().to_vec()).collect());
                buf.drain(..frame.len);
            }
        }
        prop_assert!(buf.is_empty());
        // Multibulk requests expose their first three arguments.
        let first_three = |mut args: Vec<Vec<u8>>| {
            args.truncate(3);
            args
        };
        let expected: Vec<Vec<Vec<u8>>> = expected.into_iter().map(first_three).collect();
        let found: Vec<Vec<Vec<u8>>> = found.into_iter().map(first_three).collect();
        prop_assert_eq!(found, expected);
    }
}
