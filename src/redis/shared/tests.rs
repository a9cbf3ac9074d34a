use bytes::BytesMut;
use tokio::sync::mpsc;

use super::*;

/// Feeds `input` in the given pieces and collects what each route received.
fn run(routes: &[(usize, bool)], pieces: &[&[u8]]) -> Result<Vec<Vec<String>>, MalformedReply> {
    let mut router = Router::default();
    let mut receivers = Vec::new();
    for &(frames, eof) in routes {
        let (tx, rx) = mpsc::unbounded_channel();
        let route = Route(tx);
        router.push(route, frames, eof);
        receivers.push(rx);
    }
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
            }
        }
    }
    Ok(receivers
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
        .collect())
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
