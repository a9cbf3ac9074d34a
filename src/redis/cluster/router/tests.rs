use super::*;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn words(line: &str) -> Vec<Bytes> {
    line.split(' ').map(b).collect()
}

/// `EVALSHA <sha> <numkeys> keys… args…` of `call`, as words.
fn evalsha(call: &ScriptCall) -> Vec<Bytes> {
    let mut args = vec![
        b("EVALSHA"),
        b(script::sha()),
        Bytes::from(call.keys.len().to_string()),
    ];
    args.extend(call.keys.iter().cloned());
    args.extend(call.args.iter().cloned());
    args
}

fn set_op(key: &str) -> ScriptCall {
    ScriptCall::new(
        vec![
            b(key),
            Bytes::from(crate::fence::script::fence_key(key.as_bytes())),
        ],
        words(&format!(
            "set 11000 m|1| 10000000 0 0 0 0 write 0 2 0 SET {key} v"
        )),
    )
}

#[test]
fn a_batch_decodes_into_the_calls_it_was_made_of() {
    let calls = vec![set_op("a"), set_op("b"), set_op("c")];
    let batch = script::batch(&calls);
    let (decoded, is_batch) = decode_fence_call(&evalsha(&batch)).expect("a fence call");
    assert!(is_batch);
    assert_eq!(decoded, calls);
    let (single, is_batch) = decode_fence_call(&evalsha(&calls[0])).expect("a fence call");
    assert!(!is_batch);
    assert_eq!(single, vec![calls[0].clone()]);
    assert!(is_fence_script(&evalsha(&batch)));
    assert!(!is_fence_script(&words("EVALSHA 0123 1 k")));
}

#[test]
fn a_batch_across_slots_is_split_by_slot_and_its_reply_rebuilt() {
    // "a" and "c" share no slot with "b" (15495, 7365, 7638).
    let calls = vec![set_op("a"), set_op("b"), set_op("a"), set_op("c")];
    let (groups, merge) = split_fence_ops(&calls, true);
    let slots: Vec<u16> = groups.iter().map(|(s, _)| *s).collect();
    assert_eq!(slots, vec![slot(b"a"), slot(b"b"), slot(b"c")]);
    assert_eq!(groups[0].1, vec![calls[0].clone(), calls[2].clone()]);
    // Each group answers its calls in order; the reply is in the batch's.
    let parts = vec![
        b("*2\r\n:1\r\n:3\r\n"),
        b("*1\r\n:2\r\n"),
        b("*1\r\n-ERR oops\r\n"),
    ];
    assert_eq!(
        merge_fence(&merge, &parts),
        b("*4\r\n:1\r\n:2\r\n:3\r\n-ERR oops\r\n")
    );
    // A group that failed whole (NOSCRIPT sent again, then still an error):
    // each of its calls gets that error.
    let parts = vec![b("-ERR down\r\n"), b("*1\r\n:2\r\n"), b("*1\r\n:4\r\n")];
    assert_eq!(
        merge_fence(&merge, &parts),
        b("*4\r\n-ERR down\r\n:2\r\n-ERR down\r\n:4\r\n")
    );
}

#[test]
fn an_invalidation_of_keys_in_several_slots_is_one_per_slot_and_counts_add_up() {
    let keys = [b("a"), b("b"), b("a2")];
    let (all, args) = script::invalidation(&keys, Duration::from_secs(10));
    let call = ScriptCall::new(all, args);
    let (groups, merge) = split_fence_ops(std::slice::from_ref(&call), false);
    assert_eq!(groups.len(), 3, "a, b and a2 are in three slots");
    for (s, calls) in &groups {
        let [op] = &calls[..] else {
            panic!("one op per slot")
        };
        assert!(
            op.keys.iter().all(|k| slot(k) == *s),
            "keys and fences of one slot"
        );
        assert_eq!(op.keys.len(), 2);
        assert_eq!(&op.args[2][..], b"1", "one fenced key");
        assert_eq!(&op.args[5][..], b"DEL");
        assert_eq!(op.args.len(), 7);
    }
    let parts = vec![b("*1\r\n:1\r\n"), b("*1\r\n:0\r\n"), b("*1\r\n:1\r\n")];
    assert_eq!(merge_fence(&merge, &parts), b(":2\r\n"));
}

#[test]
fn a_call_across_slots_that_cannot_be_split_is_crossslot() {
    let call = ScriptCall::new(vec![b("a"), b("b")], words("write 11000 0 0 x RENAME a b"));
    let (groups, merge) = split_fence_ops(std::slice::from_ref(&call), true);
    assert!(groups.is_empty());
    assert_eq!(
        merge_fence(&merge, &[]),
        b("*1\r\n-CROSSSLOT Keys in request don't hash to the same slot\r\n")
    );
}

#[test]
fn split_replies_merge_as_one_redis_answers() {
    let mget = Merge::Positions(vec![vec![0, 2], vec![1]], 3);
    assert_eq!(
        merge(&mget, vec![b("*2\r\n$1\r\na\r\n$-1\r\n"), b("*1\r\n$1\r\nb\r\n")]),
        b("*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n")
    );
    assert_eq!(merge(&Merge::Sum, vec![b(":2\r\n"), b(":3\r\n")]), b(":5\r\n"));
    assert_eq!(
        merge(&Merge::Sum, vec![b(":2\r\n"), b("-WRONGTYPE x\r\n")]),
        b("-WRONGTYPE x\r\n")
    );
    assert_eq!(
        merge(
            &Merge::Concat,
            vec![b("*1\r\n$1\r\na\r\n"), b("*0\r\n"), b("*1\r\n$1\r\nb\r\n")]
        ),
        b("*2\r\n$1\r\na\r\n$1\r\nb\r\n")
    );
    assert_eq!(
        merge(&Merge::First, vec![b("+OK\r\n"), b("+OK\r\n")]),
        b("+OK\r\n")
    );
}

#[test]
fn a_scan_cursor_carries_its_master() {
    let reply = |cursor: &str| {
        b(&format!(
            "*2\r\n${}\r\n{cursor}\r\n*1\r\n$1\r\nk\r\n",
            cursor.len()
        ))
    };
    // Master 1 of 3, its cursor 17: 17 << 8 | 1.
    assert_eq!(scan_reply(&reply("17"), 1, 3), Some(reply("4353")));
    // Done with master 1: the next one's start.
    assert_eq!(scan_reply(&reply("0"), 1, 3), Some(reply("2")));
    // Done with the last: 0.
    assert_eq!(scan_reply(&reply("0"), 2, 3), Some(reply("0")));
}

#[test]
fn redirects_are_read() {
    assert!(matches!(
        Redirect::of(b"-MOVED 3999 127.0.0.1:6381\r\n"),
        Some(Redirect::Moved(3999, (h, 6381))) if h == "127.0.0.1"
    ));
    assert!(matches!(
        Redirect::of(b"-ASK 3999 [::1]:6381\r\n"),
        Some(Redirect::Ask((h, 6381))) if h == "::1"
    ));
    assert!(matches!(
        Redirect::of(b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"),
        Some(Redirect::TryAgain)
    ));
    assert!(Redirect::of(b"-ERR wrong\r\n").is_none());
}

#[test]
fn fills_sent_after_a_failover_are_judged_with_its_bound() {
    let fill = ScriptCall::new(
        vec![b("k"), b("cachefence:{k}")],
        words("fill 11000 1700000000000000 1700000000000000 0 0 0 h:1:0 10000000 value"),
    );
    let mut ops = vec![
        set_op("k"),
        fill.clone(),
        ScriptCall::new(vec![b("k")], words("miss 11000 h 200")),
    ];
    let failovers = Failovers::default();
    assert!(!rebound(&failovers, &mut ops), "no failover: nothing changes");
    failovers.record();
    assert!(rebound(&failovers, &mut ops));
    // Within the clock skew after the failover, every ticket is too old.
    assert_eq!(&ops[0].args[3][..], b"10000000,0");
    assert_eq!(&ops[1].args[8][..], b"0");
    assert_eq!(
        ops[2],
        ScriptCall::new(vec![b("k")], words("miss 11000 h 200")),
        "a miss is no fill"
    );
    // A request as sent, one op or a batch.
    let single = fill.encode(false);
    let again = rebound_request(&failovers, &single).expect("rebuilt");
    assert_eq!(
        again,
        ScriptCall::new(fill.keys.clone(), {
            let mut args = fill.args.clone();
            args[8] = b("0");
            args
        })
        .encode(false)
    );
    assert_eq!(rebound_request(&failovers, &command(&[b"GET", b"k"])), None);
}

#[test]
fn a_fence_call_with_counts_that_do_not_fit_is_not_decoded() {
    // A client may call the script itself: counts off the wire never
    // allocate or index past what is there.
    let sha = script::sha();
    for line in [
        format!("EVALSHA {sha} 0 batch 100000000000000"),
        format!("EVALSHA {sha} 0 batch 1 10002"),
        format!("EVALSHA {sha} 18446744073709551615 batch"),
        format!("EVALSHA {sha} 0 batch 1 9999999999999999999"),
    ] {
        assert_eq!(decode_fence_call(&words(&line)), None, "{line}");
    }
}

#[test]
fn a_fence_out_of_its_keys_slot_moves_in_an_operation_of_its_own() {
    // `a}b` has no tag: its fence is `cachefence::a}b`, in another slot.
    let keys = [b("a}b"), b("c")];
    let (all, args) = script::invalidation(&keys, Duration::from_secs(10));
    let call = ScriptCall::new(all, args);
    let (groups, merge) = split_fence_ops(std::slice::from_ref(&call), false);
    let ops: Vec<&ScriptCall> = groups.iter().flat_map(|(_, calls)| calls).collect();
    let moved: Vec<&Bytes> = ops
        .iter()
        .flat_map(|op| op.keys.iter())
        .filter(|k| k.starts_with(b"cachefence"))
        .collect();
    assert_eq!(moved.len(), 2, "both fences move: {ops:?}");
    let stray = ops
        .iter()
        .find(|op| op.args.len() == 5)
        .expect("a fence-only operation");
    assert_eq!(stray.keys, vec![Bytes::from(script::fence_key(b"a}b"))]);
    assert_eq!(&stray.args[2][..], b"1");
    for (s, calls) in &groups {
        assert!(calls.iter().all(|op| op.keys.iter().all(|k| slot(k) == *s)));
    }
    // The fence-only operation answers 0: the count is the DELs'.
    let parts: Vec<Bytes> = groups.iter().map(|_| b("*1\r\n:1\r\n")).collect();
    let stray_group = groups
        .iter()
        .position(|(_, calls)| calls[0].args.len() == 5)
        .unwrap();
    let mut parts = parts;
    parts[stray_group] = b("*1\r\n:0\r\n");
    assert_eq!(merge_fence(&merge, &parts), b(":2\r\n"));
}

#[test]
fn unsubscribing_from_nothing_is_answered_as_redis_does() {
    assert_eq!(
        unsubscribed(b"unsubscribe", &[], false),
        b("*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n")
    );
    assert_eq!(
        unsubscribed(b"punsubscribe", &[b("a"), b("bc")], false),
        b("*3\r\n$12\r\npunsubscribe\r\n$1\r\na\r\n:0\r\n*3\r\n$12\r\npunsubscribe\r\n$2\r\nbc\r\n:0\r\n")
    );
    assert_eq!(
        unsubscribed(b"sunsubscribe", &[], true),
        b(">3\r\n$12\r\nsunsubscribe\r\n_\r\n:0\r\n")
    );
}
