//! The probe, without Redis: which writes have a plain form, the `MGET` it
//! sends, and how its reply splits the run.
use std::time::Duration;

use super::*;
use crate::config::values::{LagWindow, Span};
use crate::fence::client::Client;
use crate::fence::plan::Plan;
use crate::fence::plan::tests::{client, fences};
use crate::fence::script::fence_key;
use crate::fence::{CacheSection, Fences, Scope};
use crate::resp::command::Command;
use crate::resp::encode::command;
use crate::resp::request::RequestFramer;

/// The script call and reply rule `line` is planned as, and the request
/// as the client sent it.
fn planned(client: &Client<'_>, line: &str) -> (ScriptCall, ScriptReply, Bytes) {
    let request = words(line);
    let frame = RequestFramer::new(1 << 20)
        .next(&request)
        .expect("a valid request")
        .expect("a whole request");
    let Command::CacheOp(op) = Command::classify(&frame, &request) else {
        panic!("{line} is not a cache command");
    };
    match client.plan(&client.fences.scope(), op, &frame, &request, false, 0) {
        Some(Plan::Rewrite { call, reply }) => (call, reply, request),
        other => panic!("{line}: expected a script call, got {other:?}"),
    }
}

fn plain(client: &Client<'_>, line: &str) -> Option<Plain> {
    let (call, reply, sent) = planned(client, line);
    Plain::of(&call, &reply, sent)
}

fn fence(key: &str) -> Bytes {
    fence_key(key.as_bytes()).into()
}

fn words(line: &str) -> Bytes {
    let words: Vec<&[u8]> = line.split(' ').map(str::as_bytes).collect();
    command(&words)
}

#[test]
fn a_ticketless_store_goes_as_the_client_sent_it_or_as_the_delete_it_becomes() {
    let fences = fences();
    let client = client(&fences);
    assert_eq!(
        plain(&client, "SET user:1 v EX 10"),
        Some(Plain {
            command: words("SET user:1 v EX 10"),
            kind: PlainKind::SetWrite,
            fences: vec![fence("user:1")],
        })
    );
    assert_eq!(
        plain(&client, "SETEX user:1 10 v").map(|p| (p.command, p.kind)),
        Some((words("SETEX user:1 10 v"), PlainKind::SetWrite))
    );
    // on_write = "invalidate": the DEL the script would have run.
    assert_eq!(
        plain(&client, "SET gone:1 v"),
        Some(Plain {
            command: words("DEL gone:1"),
            kind: PlainKind::SetInval,
            fences: vec![fence("gone:1")],
        })
    );
}

#[test]
fn writes_and_deletes_go_as_sent_and_name_only_their_fenced_keys() {
    let fences = fences();
    let client = client(&fences);
    assert_eq!(
        plain(&client, "DEL user:1 other user:2"),
        Some(Plain {
            command: words("DEL user:1 other user:2"),
            kind: PlainKind::Command,
            fences: vec![fence("user:1"), fence("user:2")],
        })
    );
    assert_eq!(
        plain(&client, "MSET user:1 a other b"),
        Some(Plain {
            command: words("MSET user:1 a other b"),
            kind: PlainKind::Command,
            fences: vec![fence("user:1")],
        })
    );
    assert_eq!(
        plain(&client, "INCR user:1").map(|p| p.command),
        Some(words("INCR user:1"))
    );
    // An MSET of caches only under invalidate is a DEL of them.
    assert_eq!(
        plain(&client, "MSET gone:1 a gone:2 b").map(|p| p.command),
        Some(words("DEL gone:1 gone:2"))
    );
    // SET … GET is a write whatever on_write says: as sent.
    assert_eq!(
        plain(&client, "SET gone:1 v GET").map(|p| (p.command, p.kind)),
        Some((words("SET gone:1 v GET"), PlainKind::Command))
    );
}

#[test]
fn a_store_missed_here_lately_and_keys_under_a_lag_window_keep_the_script() {
    let fences = fences();
    let client = client(&fences);
    // A SET of a key this proxy saw missed is likely its fill, and a lost
    // fence must refuse it: the script judges it.
    fences.missed(client.connection, &Bytes::from_static(b"user:1"), 7);
    assert_eq!(plain(&client, "SET user:1 v"), None);
    // The memory of the miss went with that SET.
    assert!(plain(&client, "SET user:1 v").is_some());

    let section = CacheSection {
        pattern: Some("lag:*".into()),
        lag_window: Some(LagWindow::Fixed(Span(Duration::from_secs(1)))),
        ..Default::default()
    };
    let lagged = Fences::new(Scope::new(&[section]).expect("valid sections"), None);
    let client = crate::fence::plan::tests::client(&lagged);
    // The invalidation time is recorded even without a miss.
    assert_eq!(plain(&client, "SET lag:1 v"), None);
    assert_eq!(plain(&client, "DEL lag:1"), None);
}

/// The probe of a run of `lines`, as the session would hand it over.
fn probe(client: &Client<'_>, lines: &[&str]) -> Result<Probe, (Vec<ScriptCall>, Vec<ScriptReply>)> {
    let planned: Vec<_> = lines.iter().map(|line| planned(client, line)).collect();
    let sent: Vec<Bytes> = planned.iter().map(|(_, _, sent)| sent.clone()).collect();
    let (mut calls, mut replies): (Vec<_>, Vec<_>) =
        planned.into_iter().map(|(call, reply, _)| (call, reply)).unzip();
    let probe = Probe::of(&mut calls, &mut replies, sent.into_iter());
    // Taken whole, or left whole.
    assert_eq!(calls.is_empty(), probe.is_some());
    probe.ok_or((calls, replies))
}

#[test]
fn a_run_is_probed_with_one_mget_of_the_fences_of_its_plain_forms() {
    let fences = fences();
    let client = client(&fences);
    fences.missed(client.connection, &Bytes::from_static(b"user:9"), 7);
    let probe = probe(&client, &["SET user:1 a", "SET user:9 b", "DEL user:2 user:3"])
        .expect("two writes with a plain form");
    assert_eq!(
        probe.request(),
        command(&[b"MGET", &fence("user:1"), &fence("user:2"), &fence("user:3")])
    );
    assert_eq!(probe.replies(), 3);
    assert_eq!(
        probe.invalidated_keys(),
        Some(vec![Bytes::from_static(b"user:2"), Bytes::from_static(b"user:3")])
    );
}

#[test]
fn a_lone_write_or_too_many_fences_is_not_worth_a_probe() {
    let fences = fences();
    let client = client(&fences);
    assert!(probe(&client, &["SET user:1 a"]).is_err());
    // Only one of two has a plain form.
    fences.missed(client.connection, &Bytes::from_static(b"user:9"), 7);
    let (calls, _) = probe(&client, &["SET user:1 a", "SET user:9 b"]).expect_err("one plain form");
    assert_eq!(calls.len(), 2, "handed back untouched");
    let many: Vec<String> = (0..PROBE_MAX_FENCES).map(|i| format!("user:{i}")).collect();
    let del = format!("DEL {}", many.join(" "));
    assert!(
        probe(&client, &[&del, "SET user:x a"]).is_err(),
        "more than PROBE_MAX_FENCES fences"
    );
}

fn kinds(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .map(|step| match step {
            Step::Plain { command, .. } => {
                format!("plain {}", String::from_utf8_lossy(command).replace("\r\n", " "))
            }
            Step::Script {
                reply: ScriptReply::Batch(items),
                ..
            } => format!("batch of {}", items.len()),
            Step::Script { call, .. } => format!("script {}", String::from_utf8_lossy(&call.args[0])),
        })
        .collect()
}

#[test]
fn the_reply_sends_writes_whose_fences_are_missing_plain_and_the_rest_to_the_script_in_order() {
    let fences = fences();
    let client = client(&fences);
    let lines = [
        "SET user:1 a",
        "SET user:2 b",
        "SET user:3 c",
        "DEL user:4 user:5",
        "SET user:6 d",
    ];
    let probe = probe(&client, &lines).expect("a probe");
    // user:2 and user:3 have fences; user:5 has one (so the DEL needs the
    // script too); user:1 and user:6 have none.
    let reply = b"*6\r\n$-1\r\n$3\r\nabc\r\n$3\r\nabc\r\n$-1\r\n$1\r\nx\r\n$-1\r\n";
    let steps = probe.clone().steps(reply, false);
    assert_eq!(
        kinds(&steps),
        [
            "plain *3 $3 SET $6 user:1 $1 a ",
            "batch of 3",
            "plain *3 $3 SET $6 user:6 $1 d "
        ]
    );
    // The batch holds the three in their order, as one batch call.
    let Step::Script { call, reply } = &steps[1] else {
        unreachable!()
    };
    let (calls, replies): (Vec<ScriptCall>, Vec<ScriptReply>) = probe.ops[1..4]
        .iter()
        .map(|op| (op.call.clone(), op.reply.clone()))
        .unzip();
    assert_eq!(call, &batch(&calls));
    assert_eq!(reply, &ScriptReply::Batch(replies));

    // RESP3 nils; every fence missing: every write plain.
    let reply = b"*6\r\n_\r\n_\r\n_\r\n_\r\n_\r\n_\r\n";
    assert_eq!(
        kinds(&probe.clone().steps(reply, true)),
        [
            "plain *3 $3 SET $6 user:1 $1 a ",
            "plain *3 $3 SET $6 user:2 $1 b ",
            "plain *3 $3 SET $6 user:3 $1 c ",
            "plain *3 $3 DEL $6 user:4 $6 user:5 ",
            "plain *3 $3 SET $6 user:6 $1 d "
        ]
    );
    // A lone scripted write is one call, not a batch of one.
    let reply = b"*6\r\n$-1\r\n$1\r\nx\r\n$-1\r\n$-1\r\n$-1\r\n$-1\r\n";
    assert_eq!(kinds(&probe.clone().steps(reply, false))[1], "script set");
}

#[test]
fn an_error_or_a_reply_of_another_shape_sends_every_write_to_the_script() {
    let fences = fences();
    let client = client(&fences);
    let probe = probe(&client, &["SET user:1 a", "SET user:2 b"]).expect("a probe");
    for reply in [
        &b"-LOADING Redis is loading the dataset in memory\r\n"[..],
        b"*1\r\n$-1\r\n",
        b"*3\r\n$-1\r\n$-1\r\n$-1\r\n",
        b"+OK\r\n",
    ] {
        assert_eq!(
            kinds(&probe.clone().steps(reply, false)),
            ["batch of 2"],
            "{reply:?}"
        );
    }
}

/// The `MGET` reply read off the frame says what decoding it says, and
/// anything but an array of nils and bulks of the asked length is left to
/// the decoder.
#[test]
fn an_mget_reply_is_scanned_as_it_decodes() {
    let decoded = |frame: &[u8], resp3: bool| -> Option<Vec<bool>> {
        match Value::decode(frame, resp3) {
            Some(Value::Array(items)) => Some(items.iter().map(|v| *v == Value::Nil).collect()),
            _ => None,
        }
    };
    let read: [(&[u8], bool); 6] = [
        (b"*3\r\n$-1\r\n$-1\r\n$-1\r\n", false),
        (b"*3\r\n_\r\n_\r\n_\r\n", true),
        (b"*4\r\n$-1\r\n$3\r\nabc\r\n$0\r\n\r\n$-1\r\n", false),
        (b"*2\r\n$4\r\na\r\nb\r\n_\r\n", true),
        (b"*1\r\n$20\r\n00000000000000000001\r\n", false),
        (b"*0\r\n", false),
    ];
    for (frame, resp3) in read {
        let asked = decoded(frame, resp3).expect("an array").len();
        assert_eq!(scan_missing(frame, asked), decoded(frame, resp3), "{frame:?}");
    }
    let left: [(&[u8], usize); 9] = [
        (b"-ERR unknown command\r\n", 1),
        (b"-LOADING Redis is loading\r\n", 2),
        (b"*2\r\n$-1\r\n$-1\r\n", 3),
        (b"*2\r\n$-1\r\n", 2),
        (b"*2\r\n$-1\r\n$5\r\nab\r\n", 2),
        (b"*1\r\n:1\r\n", 1),
        (b"*1\r\n$-1\r\n+OK\r\n", 1),
        (b"*1\r\n$3\r\nabcXY", 1),
        (b"*1\r\n$18446744073709551587\r\n", 1),
    ];
    for (frame, asked) in left {
        assert_eq!(scan_missing(frame, asked), None, "{frame:?}");
    }
}
