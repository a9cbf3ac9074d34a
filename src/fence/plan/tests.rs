//! The request rules, without Redis: what each command becomes.
use super::*;
use crate::fence::{CacheSection, Fences, TicketScope};
use crate::resp::command::Command;
use crate::resp::request::RequestFramer;

/// `user:*` fenced with `on_write = "write"`, `rejected:*` with `on_write = "reject"`,
/// `gone:*` with `on_write = "invalidate"`, `own:*` with
/// `ticket_scope = "connection"`; everything else passes through.
pub(in crate::fence) fn fences() -> Fences {
    let section = |pattern: &str, on_write, ticket_scope| CacheSection {
        pattern: Some(pattern.into()),
        on_write,
        ticket_scope,
        ..Default::default()
    };
    let sections = [
        section("user:*", Some(OnWrite::Write), None),
        section("rejected:*", Some(OnWrite::Reject), None),
        section("gone:*", Some(OnWrite::Invalidate), None),
        section("own:*", None, Some(TicketScope::Connection)),
    ];
    Fences::new(Scope::new(&sections).expect("valid sections"), None)
}

pub(in crate::fence) fn client(fences: &Fences) -> Client<'_> {
    Client::new(fences, "10.1.2.3".parse().unwrap())
}

fn plan(client: &Client<'_>, line: &str) -> Option<Plan> {
    let request = format!("{line}\r\n");
    let frame = RequestFramer::new(1 << 20)
        .next(request.as_bytes())
        .expect("a valid request")
        .expect("a whole request");
    let Command::CacheOp(op) = Command::classify(&frame, request.as_bytes()) else {
        panic!("{line} is not a cache command");
    };
    client.plan(&client.fences.scope(), op, &frame, request.as_bytes(), false, 0)
}

/// The script call and reply rule of a rewritten command.
fn rewritten(plan: Option<Plan>) -> (Vec<String>, Vec<Bytes>, ScriptReply) {
    match plan {
        Some(Plan::Rewrite { call, reply }) => {
            let args = call
                .args
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            (args, call.keys.clone(), reply)
        }
        other => panic!("expected a rewrite, got {other:?}"),
    }
}

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

#[test]
fn a_get_of_a_fenced_key_is_forwarded_and_others_pass_through() {
    let fences = fences();
    let client = client(&fences);
    match plan(&client, "GET user:1") {
        Some(Plan::Forward(Intercept::Get { key, policy: 0 })) => assert_eq!(key, b("user:1")),
        other => panic!("{other:?}"),
    }
    assert!(plan(&client, "GET other").is_none());
    assert!(plan(&client, "SET other v").is_none());
    assert!(plan(&client, "DEL other").is_none());
}

#[test]
fn a_plain_store_is_judged_in_redis_against_the_clients_misses() {
    let fences = fences();
    let client = client(&fences);
    let (args, keys, reply) = rewritten(plan(&client, "SET user:1 v EX 10"));
    assert_eq!(keys, vec![b("user:1"), Bytes::from(fence_key(b"user:1"))]);
    assert_eq!(
        reply,
        ScriptReply::Set {
            policy: 0,
            key: b("user:1")
        }
    );
    // op, fence ttl, scope, lease_ttl, lag, lag_refuse, nx, expect_fence,
    // on_write, pending_delete, where the value is in the command, expiry
    // words, the command (the value goes once).
    assert_eq!(args[0], "set");
    assert_eq!(args[2], "m|10.1.2.3|");
    assert_eq!(args[3], "10000000");
    assert_eq!(
        &args[6..],
        [
            "0", "0", "write", "0", "2", "2", "EX", "10", "SET", "user:1", "v", "EX", "10"
        ]
    );
    // Nothing counted yet: whether it was a fill or a write, Redis says.
    assert_eq!(fences.stats.writes.get(), 0);
}

#[test]
fn setex_psetex_and_nx_are_plain_stores_too() {
    let fences = fences();
    let client = client(&fences);
    let (args, ..) = rewritten(plan(&client, "SETEX user:1 5 v"));
    assert_eq!(&args[10..14], ["3", "2", "EX", "5"]);
    let (args, ..) = rewritten(plan(&client, "PSETEX user:1 5 v"));
    assert_eq!(&args[10..14], ["3", "2", "PX", "5"]);
    let (args, ..) = rewritten(plan(&client, "SET user:1 v NX"));
    assert_eq!((args[6].as_str(), args[11].as_str()), ("1", "0"));
}

#[test]
fn a_miss_here_makes_a_lost_fence_refuse_the_next_store() {
    let fences = fences();
    let client = client(&fences);
    fences.missed(client.connection, &b("user:1"), 7);
    assert_eq!(fences.tickets_outstanding(), 1);
    let (args, ..) = rewritten(plan(&client, "SET user:1 v"));
    assert_eq!(args[7], "1", "expect_fence");
    assert_eq!(
        fences.tickets_outstanding(),
        0,
        "remembered until one SET is judged"
    );
    let (args, ..) = rewritten(plan(&client, "SET user:1 v"));
    assert_eq!(args[7], "0");
}

#[test]
fn the_ticket_scope_is_a_prefix_of_every_miss_field() {
    let fences = fences();
    let client = client(&fences);
    let field = client.miss_field(3);
    for scope in [TicketScope::All, TicketScope::Client, TicketScope::Connection] {
        assert!(
            field.as_bytes().starts_with(&client.scope_prefix(scope)),
            "{scope:?}"
        );
    }
    let other = Client::new(&fences, "10.1.2.3".parse().unwrap());
    assert!(
        other
            .miss_field(3)
            .as_bytes()
            .starts_with(&client.scope_prefix(TicketScope::Client))
    );
    assert!(
        !other
            .miss_field(3)
            .as_bytes()
            .starts_with(&client.scope_prefix(TicketScope::Connection))
    );
    let (args, ..) = rewritten(plan(&client, "SET own:1 v"));
    assert_eq!(args[2], client.scope_prefix(TicketScope::Connection));
    // The herd lease holder of a miss names the miss, not only the connection.
    assert_ne!(client.holder(1), client.holder(2));
    assert_eq!(field, format!("m|10.1.2.3|{}|3", client.holder(0)));
    assert_eq!(client.holder(3), format!("{}:3", client.holder(0)));
}

#[test]
fn set_with_xx_or_get_is_a_write_without_judgement() {
    let fences = fences();
    let client = client(&fences);
    for line in ["SET user:1 v XX", "SET user:1 v GET"] {
        let (args, _, reply) = rewritten(plan(&client, line));
        assert_eq!(args[0], "write", "{line}");
        assert_eq!(
            reply,
            ScriptReply::Command {
                keys: vec![b("user:1")],
                invalidation: None
            }
        );
    }
    assert_eq!(fences.stats.writes.get(), 2);
}

#[test]
fn a_delete_invalidates_every_key_and_fences_the_fenced_ones() {
    let fences = fences();
    let client = client(&fences);
    let (args, keys, reply) = rewritten(plan(&client, "DEL user:1 other"));
    assert_eq!(args[0], "inval");
    assert_eq!(
        keys,
        vec![b("user:1"), b("other"), Bytes::from(fence_key(b"user:1"))]
    );
    assert_eq!(
        reply,
        ScriptReply::Command {
            keys: vec![b("user:1"), b("other")],
            invalidation: Some(Source::Client)
        }
    );
    assert_eq!(fences.stats.keys_invalidated_client.get(), 2);
}

#[test]
fn on_write_travels_with_a_plain_store_and_decides_other_writes_here() {
    let fences = fences();
    let client = client(&fences);
    assert_eq!(rewritten(plan(&client, "SET rejected:1 v")).0[8], "reject");
    assert_eq!(rewritten(plan(&client, "SET gone:1 v")).0[8], "inval");
    // Its reply depends on the value: it cannot become a delete.
    assert_eq!(rewritten(plan(&client, "SET gone:1 v NX")).0[8], "write");
    let (args, _, reply) = rewritten(plan(&client, "MSET gone:1 a gone:2 b"));
    assert_eq!(args[0], "inval");
    assert_eq!(
        reply,
        ScriptReply::Ok {
            keys: vec![b("gone:1"), b("gone:2")]
        }
    );
    // A key that is not a cache is never deleted with the cache keys.
    let (args, _, _) = rewritten(plan(&client, "MSET gone:1 a session:1 b"));
    assert_eq!(args[0], "write");
    // No connection's own misses are taken back (the scope is per client).
    assert_eq!(&args[4..], ["", "MSET", "gone:1", "a", "session:1", "b"]);
    // The strictest rule among the keys wins.
    match plan(&client, "MSET user:1 a rejected:1 b") {
        Some(Plan::Local(Reply::Error(text))) => assert!(
            text.starts_with("ERR cachefence: writes to 'user:1' are rejected"),
            "{text}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_arity_goes_as_it_is_for_redis_own_error() {
    let fences = fences();
    let client = client(&fences);
    for line in [
        "SETEX user:1 10",
        "MSET user:1",
        "INCR user:1 2",
        "GETDEL user:1 user:2",
    ] {
        assert!(plan(&client, line).is_none(), "{line}");
    }
}

#[test]
fn a_write_under_connection_scope_takes_back_the_connections_own_misses() {
    let fences = fences();
    let client = client(&fences);
    let own = String::from_utf8(client.scope_prefix(TicketScope::Connection).to_vec()).unwrap();
    let (args, ..) = rewritten(plan(&client, "DEL own:1"));
    assert_eq!(&args[4..], [own.as_str(), "DEL", "own:1"]);
    // Not when a key of another scope is in the same command.
    let (args, ..) = rewritten(plan(&client, "DEL own:1 user:1"));
    assert_eq!(&args[4..], ["", "DEL", "own:1", "user:1"]);
}
