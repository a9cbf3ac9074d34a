use bytes::BytesMut;
use tokio::sync::mpsc;

use super::*;

/// Feeds `input` in the given pieces and collects what each route received.
fn run(routes: &[(usize, bool)], pieces: &[&[u8]]) -> Result<Vec<Vec<String>>, MalformedReply> {
    let mut router = Router::default();
    let mut receivers = Vec::new();
    for &(frames, eof) in routes {
        let (route, rx) = route();
        router.push(route, frames, eof);
        receivers.push(rx);
    }
    feed(&mut router, pieces)?;
    Ok(received(&mut receivers))
}

fn route() -> (Route, mpsc::UnboundedReceiver<Chunk>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Route::new(tx, Arc::new(Backlog::new(0))), rx)
}

/// Hands `pieces` to `router` as the reader does.
fn feed(router: &mut Router, pieces: &[&[u8]]) -> Result<(), MalformedReply> {
    let mut buf = BytesMut::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            while let Some((to, chunk)) = router.pop_empty() {
                to.send(chunk);
            }
            match router.step(&buf)? {
                Step::More => break,
                Step::Deliver { upto, last } => {
                    let bytes = buf.split_to(upto).freeze();
                    let to = router.consumed(upto, last).unwrap();
                    to.send(Chunk::Data { bytes, last });
                }
                Step::Split { start, upto } => {
                    let frame = buf.split_to(upto).freeze();
                    router.split(&frame, start, |to, bytes| {
                        to.send(Chunk::Data { bytes, last: true })
                    });
                }
            }
        }
    }
    Ok(())
}

/// What each receiver got, a piece that ends its job marked `|`.
fn received(receivers: &mut [mpsc::UnboundedReceiver<Chunk>]) -> Vec<Vec<String>> {
    receivers
        .iter_mut()
        .map(|rx| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|chunk| match chunk {
                    Chunk::Data { bytes, last } => {
                        format!(
                            "{}{}",
                            String::from_utf8_lossy(&bytes),
                            if last { "|" } else { "…" }
                        )
                    }
                    Chunk::Eof => "EOF".to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .collect()
}

#[test]
fn each_job_gets_its_own_frames_in_order() {
    let got = run(
        &[(1, false), (2, false), (1, false)],
        &[b"+OK\r\n$1\r\na\r\n:1\r\n-ERR x\r\n"],
    )
    .unwrap();
    assert_eq!(
        got,
        [vec!["+OK\r\n|"], vec!["$1\r\na\r\n:1\r\n|"], vec!["-ERR x\r\n|"]]
    );
}

#[test]
fn frames_split_across_reads_wait_for_their_end() {
    let got = run(
        &[(1, false), (1, false)],
        &[b"*2\r\n$1\r\na", b"\r\n$1\r\nb\r\n+O", b"K\r\n"],
    )
    .unwrap();
    assert_eq!(got, [vec!["*2\r\n$1\r\na\r\n$1\r\nb\r\n|"], vec!["+OK\r\n|"]]);
}

#[test]
fn a_push_goes_with_the_reply_after_it() {
    let got = run(
        &[(1, false), (1, false)],
        &[b">2\r\n$1\r\na\r\n:1\r\n+OK\r\n", b"+B\r\n"],
    )
    .unwrap();
    assert_eq!(got, [vec![">2\r\n$1\r\na\r\n:1\r\n+OK\r\n|"], vec!["+B\r\n|"]]);
}

#[test]
fn jobs_owed_nothing_are_answered_in_their_place() {
    // An empty inline line owes no reply; a half-close ends the session's
    // stream only after the replies before it.
    let got = run(
        &[(1, false), (0, false), (0, true), (1, false)],
        &[b"+A\r\n", b"+B\r\n"],
    )
    .unwrap();
    assert_eq!(got, [vec!["+A\r\n|"], vec!["|"], vec!["EOF"], vec!["+B\r\n|"]]);
}

#[test]
fn a_large_frame_streams_to_its_session() {
    let value = vec![b'v'; 3 * STREAM_PARTIAL];
    let mut frame = format!("${}\r\n", value.len()).into_bytes();
    frame.extend_from_slice(&value);
    frame.extend_from_slice(b"\r\n");
    let (head, tail) = frame.split_at(2 * STREAM_PARTIAL);
    let got = run(&[(1, false), (1, false)], &[head, tail, b"+OK\r\n"]).unwrap();
    assert_eq!(got[0].len(), 2, "streamed in two pieces: {:?}", got[0].len());
    assert!(got[0][0].ends_with('…') && got[0][1].ends_with('|'));
    let joined: String = got[0].iter().map(|s| s.trim_end_matches(['…', '|'])).collect();
    assert_eq!(joined.as_bytes(), frame.as_slice());
    assert_eq!(got[1], ["+OK\r\n|"]);
}

#[test]
fn a_reply_nobody_asked_for_fails_the_connection() {
    assert!(run(&[(1, false)], &[b"+OK\r\n+EXTRA\r\n"]).is_err());
    assert!(run(&[], &[b">2\r\n$7\r\nmessage\r\n"]).is_err());
    assert_eq!(run(&[], &[b""]).unwrap(), Vec::<Vec<String>>::new());
}

/// A merged batch call's array: each session gets its element, whole, as
/// the one frame its call alone would have got; an error for the whole
/// call goes to each; a push before it goes with the first.
#[test]
fn a_merged_call_reply_is_split_among_its_sessions() {
    let mut router = Router::default();
    let (a, ra) = route();
    let (b, rb) = route();
    let (c, rc) = route();
    let (d, rd) = route();
    let (e, re) = route();
    let (f, rf) = route();
    let (g, rg) = route();
    router.push(a, 1, false);
    router.push_merged(vec![b, c, d]);
    router.push_merged(vec![e, f]);
    router.push(g, 1, false);
    feed(
        &mut router,
        &[
            b"+A\r\n*3\r\n+OK\r\n-ERR not",
            b" an integer\r\n$-",
            b"1\r\n-NOSCRIPT No matching script.\r\n>2\r\n$1\r\np\r\n:1\r\n+G\r\n",
        ],
    )
    .unwrap();
    let got = received(&mut [ra, rb, rc, rd, re, rf, rg]);
    assert_eq!(
        got,
        [
            vec!["+A\r\n|"],
            vec!["+OK\r\n|"],
            vec!["-ERR not an integer\r\n|"],
            vec!["$-1\r\n|"],
            vec!["-NOSCRIPT No matching script.\r\n|"],
            vec!["-NOSCRIPT No matching script.\r\n|"],
            vec![">2\r\n$1\r\np\r\n:1\r\n+G\r\n|"],
        ]
    );
    let mut router = Router::default();
    let (b, rb) = route();
    let (c, rc) = route();
    router.push_merged(vec![b, c]);
    feed(&mut router, &[b">2\r\n$1\r\np\r\n:1\r\n*2\r\n*1\r\n:1\r\n:2\r\n"]).unwrap();
    assert_eq!(
        received(&mut [rb, rc]),
        [vec![">2\r\n$1\r\np\r\n:1\r\n*1\r\n:1\r\n|"], vec![":2\r\n|"]]
    );
    // Small, each reply is a slice of the one copy; big (values), each is
    // a copy of its own: no slow client keeps the others' values alive.
    for (value, sliced) in [(8, true), (8 * 1024, false)] {
        let mut router = Router::default();
        let (b, _rb) = route();
        let (c, _rc) = route();
        router.push_merged(vec![b, c]);
        let value = "v".repeat(value);
        let frame = Bytes::from(format!("*2\r\n+OK\r\n${}\r\n{value}\r\n", value.len()));
        assert!(matches!(router.step(&frame), Ok(Step::Split { start: 0, .. })));
        let mut got = Vec::new();
        router.split(&frame, 0, |_, bytes| got.push(bytes));
        assert_eq!(got[0], "+OK\r\n");
        assert_eq!(got[1], format!("${}\r\n{value}\r\n", value.len()));
        let inside = |b: &Bytes| frame.as_ptr_range().contains(&b.as_ptr());
        assert_eq!(got.iter().all(inside), sliced, "{} bytes", frame.len());
    }
}

/// Jobs that are one script call each, next to each other, become one
/// batch call; any other job keeps its place between them, and a failed
/// connection answers every merged session.
/// A fence script call of the shape of a write of `key`.
fn call(key: &str) -> crate::fence::script::ScriptCall {
    crate::fence::script::ScriptCall::new(
        vec![
            Bytes::from(key.to_string()),
            Bytes::from(format!("cachefence:{{{key}}}")),
        ],
        vec![
            Bytes::from_static(b"write"),
            Bytes::from_static(b"11000"),
            Bytes::from(key.to_string()),
        ],
    )
}

#[test]
fn calls_next_to_each_other_are_merged_in_order() {
    use crate::fence::script::{ScriptCall, batch};
    let job = |call: Option<ScriptCall>, route: Route| Job {
        bytes: match &call {
            Some(call) => call.encode(false),
            None => Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"),
        },
        frames: 1,
        eof: false,
        route,
        call,
    };
    let router = Mutex::new(Router::default());
    let metrics = Metrics::default();
    let mut receivers = Vec::new();
    let mut jobs = Vec::new();
    for call in [
        Some(call("a")),
        Some(call("b")),
        None,
        Some(call("c")),
        Some(call("d")),
        Some(call("e")),
    ] {
        let (to, rx) = route();
        receivers.push(rx);
        jobs.push(job(call, to));
    }
    let mut outgoing = Outgoing::default();
    merge(&router, &mut jobs, &mut outgoing, &metrics, true);
    assert_eq!(
        outgoing.bytes(),
        [
            batch(&[call("a"), call("b")]).encode(false),
            Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"),
            batch(&[call("c"), call("d"), call("e")]).encode(false),
        ]
        .concat()
    );
    assert_eq!(metrics.shared_merged.get(), 5);
    let mut router = router.into_inner().unwrap();
    feed(&mut router, &[b"*2\r\n+OK\r\n:1\r\n+PONG\r\n*3\r\n:3\r\n:4\r\n"]).unwrap();
    // The last merged call's reply has not come: its sessions get `Lost`.
    for to in router.drain() {
        to.send(Chunk::Lost("gone".into()));
    }
    let got = received(&mut receivers);
    assert_eq!(got[..3], [vec!["+OK\r\n|"], vec![":1\r\n|"], vec!["+PONG\r\n|"]]);
    for lost in &got[3..] {
        assert_eq!(lost, &["Lost(\"gone\")"]);
    }
}

/// A session's lone call sent unencoded is written as its `EVALSHA` where
/// the connection writes it alone (no neighbour to merge with, merging
/// off, first in line), and merged like an encoded one otherwise.
#[test]
fn unencoded_calls_are_encoded_where_they_are_written_alone() {
    use crate::fence::script::{ScriptCall, batch};
    let ping = Bytes::from_static(b"*1\r\n$4\r\nPING\r\n");
    let unencoded = |call: ScriptCall, route: Route| Job {
        bytes: Bytes::new(),
        frames: 1,
        eof: false,
        route,
        call: Some(call),
    };
    for may in [true, false] {
        let router = Mutex::new(Router::default());
        let metrics = Metrics::default();
        let mut jobs = Vec::new();
        for key in ["a", "", "b", "c"] {
            let (to, _rx) = route();
            jobs.push(match key {
                "" => Job {
                    bytes: ping.clone(),
                    frames: 1,
                    eof: false,
                    route: to,
                    call: None,
                },
                key => unencoded(call(key), to),
            });
        }
        assert_eq!(jobs[0].size(), call("a").weight() + 64);
        let mut outgoing = Outgoing::default();
        merge(&router, &mut jobs, &mut outgoing, &metrics, may);
        let expected = match may {
            true => vec![
                call("a").encode(false),
                ping.clone(),
                batch(&[call("b"), call("c")]).encode(false),
            ],
            false => vec![
                call("a").encode(false),
                ping.clone(),
                call("b").encode(false),
                call("c").encode(false),
            ],
        };
        assert_eq!(outgoing.bytes(), expected.concat(), "merging allowed: {may}");
    }
    let router = Mutex::new(Router::default());
    let (to, _rx) = route();
    let mut outgoing = Outgoing::default();
    super::route(&router, unencoded(call("d"), to), &mut outgoing);
    assert_eq!(outgoing.bytes(), call("d").encode(false));
    // One job's bytes alone are written as they are; a buffer grown big
    // for one write is not kept.
    let (to, _rx) = route();
    let big = Bytes::from(vec![b'x'; 2 << 20]);
    let job = Job {
        bytes: big.clone(),
        frames: 1,
        eof: false,
        route: to,
        call: None,
    };
    outgoing.clear();
    super::route(&router, job, &mut outgoing);
    assert_eq!(outgoing.bytes().as_ptr(), big.as_ptr());
    outgoing.buffer().extend_from_slice(b"more");
    assert_eq!(outgoing.bytes().len(), big.len() + 4);
    outgoing.clear();
    assert_eq!(outgoing.out.capacity(), 0);
}

/// A connection to a master that a Sentinel failover replaced is not
/// handed to a session that comes after the failover, though it is still
/// open (answering what it owes): that session goes to the new master.
#[tokio::test]
async fn a_connection_revoked_by_a_failover_is_not_live() {
    let revoker = Arc::new(crate::net::Revoker::default());
    let (ours, _theirs) = tokio::io::duplex(64);
    let stream = revoker.wrap(crate::net::Stream::Pipe(Box::new(ours)), revoker.generation());
    let (tx, _rx) = mpsc::channel(1);
    let slot = Slot::default();
    *slot.queue.lock().unwrap() = Some((tx, stream.currency()));
    assert!(slot.live().is_some());
    revoker.revoke();
    assert!(slot.live().is_none(), "revoked, though its queue is open");
    // Without a revoker (one Redis, a cluster's pipe), open is live.
    let (plain, _other) = tokio::io::duplex(64);
    let (tx, _rx) = mpsc::channel(1);
    *slot.queue.lock().unwrap() = Some((tx, crate::net::Stream::Pipe(Box::new(plain)).currency()));
    assert!(slot.live().is_some());
}
