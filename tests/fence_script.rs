//! fence.lua's short paths (`fast`) against its full operations: every
//! scenario runs once with the script as the proxy sends it and once with
//! the short paths turned off, each in a database of its own on one scratch
//! Redis, and the replies and the state left (key, fence, whether each has
//! a TTL) must be the same, times aside. A third form, whose full
//! operations raise, shows which path each scenario took: a case said to
//! take a short path must not reach the full one, and one said not to must.

use testkit::{RawClient, RedisServer, cmd};

/// Times in replies and fences (16 digits) differ between two runs.
fn normalized(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        match digits.len() {
            16 if digits.bytes().all(|b| b == b'0') => out.push_str("<zero>"),
            16 => out.push_str("<time>"),
            _ => out.push_str(digits),
        }
        digits.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    out
}

/// The script with its short paths, without them, and with a full
/// operation that raises.
struct Forms {
    fast: String,
    full: String,
    strict: String,
}

const FULL_RAN: &str = "cachefence test: the full operation ran";

async fn load(redis: &mut RawClient, source: &str) -> String {
    redis.send(&cmd(&[b"SCRIPT", b"LOAD", source.as_bytes()])).await;
    let reply = redis.read_frame().await;
    let text = String::from_utf8(reply).expect("a SHA");
    text.lines().nth(1).expect("a bulk SHA").to_string()
}

async fn forms(redis: &mut RawClient) -> Forms {
    let source = cachefence::fence::script::source();
    let call = "local done, reply = fast(op)";
    let full_op = "full = full or library()";
    assert!(
        source.contains(call) && source.contains(full_op),
        "fence.lua's `run` changed"
    );
    Forms {
        fast: load(redis, source).await,
        full: load(redis, &source.replace(call, "local done, reply = false")).await,
        strict: load(redis, &source.replace(full_op, &format!("error('{FULL_RAN}')"))).await,
    }
}

/// One script call: its keys and arguments.
#[derive(Clone)]
struct Op {
    keys: Vec<String>,
    args: Vec<String>,
}

fn op(keys: &[&str], args: &[&str]) -> Op {
    Op {
        keys: keys.iter().map(|s| s.to_string()).collect(),
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

/// `ops` as one batch call (fence.lua's `batch`, nothing shared).
fn batch(ops: &[Op]) -> Op {
    let mut args = vec!["batch".to_string(), ops.len().to_string()];
    args.extend(
        ops.iter()
            .map(|o| (o.keys.len() * 100_000_000 + o.args.len() * 10_000).to_string()),
    );
    args.extend(ops.iter().flat_map(|o| o.args.clone()));
    Op {
        keys: ops.iter().flat_map(|o| o.keys.clone()).collect(),
        args,
    }
}

async fn call(redis: &mut RawClient, args: &[&[u8]]) -> Vec<u8> {
    redis.send(&cmd(args)).await;
    redis.read_frame().await
}

async fn evalsha(redis: &mut RawClient, sha: &str, op: &Op) -> Vec<u8> {
    let numkeys = op.keys.len().to_string();
    let mut words: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), numkeys.as_bytes()];
    words.extend(op.keys.iter().map(|k| k.as_bytes()));
    words.extend(op.args.iter().map(|a| a.as_bytes()));
    call(redis, &words).await
}

/// Redis' clock, µs.
async fn now_us(redis: &mut RawClient) -> u64 {
    let reply = String::from_utf8(call(redis, &[b"TIME"]).await).unwrap();
    let parts: Vec<u64> = reply.lines().filter_map(|l| l.parse().ok()).collect();
    parts[0] * 1_000_000 + parts[1]
}

const KEY: &str = "k";
const FENCE: &str = "cachefence:{k}";
const SCOPE: &str = "m|127.0.0.1|";
const LEASE_US: u64 = 10_000_000;

/// A fence's string: version, invalidation time, the previous one (the lag
/// window's), the herd lease (expiry, holder) and the misses (version,
/// time, name).
fn fence(v: u64, p: Option<u64>, herd: Option<(u64, &str)>, misses: &[(u64, u64, &str)]) -> String {
    let mut s = format!("{v:016} {:016}", 0);
    if let Some(p) = p {
        s += &format!("|{p:016}");
    }
    if let Some((he, h)) = herd {
        s += &format!(" {he:016} {h}");
    }
    for (mv, at, name) in misses {
        s += &format!("\n{mv:016} {at:016} {name}");
    }
    s
}

/// The `miss` arguments: the lease holder, the miss's name ('' for the
/// lease API), whether it waits for another's herd lease.
fn miss(holder: &str, name: &str) -> Op {
    miss_claiming(holder, name, "wait")
}

fn miss_claiming(holder: &str, name: &str, claim: &str) -> Op {
    op(
        &[KEY, FENCE],
        &[
            "miss",
            "11000",
            holder,
            "200",
            claim,
            name,
            &LEASE_US.to_string(),
            "inst:1:",
        ],
    )
}

/// A `GET` sent as the miss script (`fence::direct`).
fn direct_read(holder: &str, name: &str) -> Op {
    let mut read = miss(holder, name);
    read.args.push("get".to_string());
    read
}

/// The `set` arguments: scope, lease (or `<lease>,<bound>`), lag, nx,
/// expect_fence, on_write, pending delete, and the client's command after
/// its expiry words.
struct Set<'a> {
    lease: &'a str,
    lag: &'a str,
    nx: bool,
    expect: bool,
    on_write: &'a str,
    pending: bool,
    command: &'a [&'a str],
}

const SET: Set<'static> = Set {
    lease: "10000000",
    lag: "0",
    nx: false,
    expect: false,
    on_write: "write",
    pending: false,
    command: &["SET", KEY, "v1", "EX", "60"],
};

fn set(s: Set<'_>) -> Op {
    let flag = |on: bool| if on { "1" } else { "0" };
    // Expiry words: what follows the value in a SET.
    let expiry: Vec<&str> = s.command[3..]
        .iter()
        .copied()
        .filter(|w| !w.eq_ignore_ascii_case("NX"))
        .collect();
    let (value_at, n) = ("2".to_string(), expiry.len().to_string());
    let mut args = vec![
        "set",
        "11000",
        SCOPE,
        s.lease,
        s.lag,
        "0",
        flag(s.nx),
        flag(s.expect),
        s.on_write,
        flag(s.pending),
        &value_at,
        &n,
    ];
    args.extend(expiry);
    args.extend(s.command);
    op(&[KEY, FENCE], &args)
}

/// How the state before a scenario is made: the key's value, the fence's
/// string (made from Redis' time now), or a hash in the fence's place.
enum Before {
    Key(&'static str),
    Fence(Box<dyn Fn(u64) -> String>),
    FenceHash,
    KeyHash,
}

struct Scenario {
    name: &'static str,
    before: Vec<Before>,
    ops: Vec<Op>,
    /// `Some(true)`: every operation takes a short path; `Some(false)`: one
    /// at least runs in full; `None`: not checked (a batch that mixes them).
    fast: Option<bool>,
}

/// Runs `scenario` in database `db` with script `sha`: each reply, then
/// the key and the fence (value, and whether it has a TTL).
async fn run(redis: &mut RawClient, db: u32, sha: &str, scenario: &Scenario) -> Vec<String> {
    let db = db.to_string();
    assert_eq!(call(redis, &[b"SELECT", db.as_bytes()]).await, b"+OK\r\n");
    assert_eq!(call(redis, &[b"FLUSHDB"]).await, b"+OK\r\n");
    let now = now_us(redis).await;
    for before in &scenario.before {
        let reply = match before {
            Before::Key(value) => call(redis, &[b"SET", KEY.as_bytes(), value.as_bytes()]).await,
            Before::Fence(make) => {
                let s = make(now);
                call(redis, &[b"SET", FENCE.as_bytes(), s.as_bytes(), b"PX", b"60000"]).await
            }
            Before::FenceHash => call(redis, &[b"HSET", FENCE.as_bytes(), b"f", b"v"]).await,
            Before::KeyHash => call(redis, &[b"HSET", KEY.as_bytes(), b"f", b"v"]).await,
        };
        assert!(!reply.starts_with(b"-"), "{}", String::from_utf8_lossy(&reply));
    }
    let mut transcript = Vec::new();
    for op in &scenario.ops {
        transcript.push(normalized(&evalsha(redis, sha, op).await));
    }
    for key in [KEY, FENCE] {
        let kind = call(redis, &[b"TYPE", key.as_bytes()]).await;
        let value = match &kind[..] {
            b"+string\r\n" => call(redis, &[b"GET", key.as_bytes()]).await,
            _ => kind,
        };
        let ttl = String::from_utf8(call(redis, &[b"PTTL", key.as_bytes()]).await).unwrap();
        let ttl = match ttl.trim_start_matches(':').trim_end() {
            "-2" => "none",
            "-1" => "no ttl",
            _ => "ttl",
        };
        transcript.push(format!("{key}: {} ({ttl})", normalized(&value)));
    }
    transcript
}

fn case(name: &'static str, before: Vec<Before>, ops: Vec<Op>, fast: Option<bool>) -> Scenario {
    Scenario {
        name,
        before,
        ops,
        fast,
    }
}

/// A fence whose herd lease another proxy's live miss holds.
fn another_leads() -> Before {
    Before::Fence(Box::new(|now| {
        fence(
            now - 5_000,
            None,
            Some((now + 5_000_000, "inst:2:1:1")),
            &[(now - 5_000, now - 4_000, "m|127.0.0.2|inst:2:1|1")],
        )
    }))
}

fn scenarios() -> Vec<Scenario> {
    let live = |now: u64| now - 1_000;
    // Past the lease, and past twice the lease (swept).
    let old = |now: u64| now - LEASE_US - 3_000_000;
    let gone = |now: u64| now - 2 * LEASE_US - 3_000_000;
    let name = "m|127.0.0.1|inst:1:7|1";
    let one = |at: fn(u64) -> u64| -> Box<dyn Fn(u64) -> String> {
        Box::new(move |now| {
            fence(
                now - 5_000,
                None,
                None,
                &[(now - 5_000, at(now), "m|127.0.0.1|inst:1:7|1")],
            )
        })
    };
    let s = |f: fn(&mut Set<'static>)| {
        let mut set = SET;
        f(&mut set);
        set
    };
    vec![
        case(
            "miss, nothing there",
            vec![],
            vec![miss("inst:1:7:1", name)],
            Some(true),
        ),
        case(
            "miss, the value is there",
            vec![Before::Key("v0")],
            vec![miss("inst:1:7:1", name)],
            Some(true),
        ),
        case(
            "miss of the lease API (no name)",
            vec![],
            vec![miss("inst:1:7:1", "")],
            Some(true),
        ),
        case("miss, no lease holder", vec![], vec![miss("", name)], Some(true)),
        case(
            "miss, a fence with another's herd lease",
            vec![another_leads()],
            vec![miss("inst:1:7:1", name)],
            Some(false),
        ),
        case(
            "direct read, nothing there",
            vec![],
            vec![direct_read("inst:1:7:1", name)],
            Some(true),
        ),
        case(
            "direct read, the value there",
            vec![Before::Key("v0")],
            vec![direct_read("inst:1:7:1", name)],
            Some(true),
        ),
        case(
            "direct read of a hash",
            vec![Before::KeyHash],
            vec![direct_read("inst:1:7:1", name)],
            Some(true),
        ),
        case(
            "direct read, a hash where the fence goes",
            vec![Before::FenceHash],
            vec![direct_read("inst:1:7:1", name)],
            Some(false),
        ),
        case(
            "direct read, a fence with another's herd lease",
            vec![another_leads()],
            vec![direct_read("inst:1:7:1", name)],
            Some(false),
        ),
        case(
            "direct read then its fill",
            vec![],
            vec![direct_read("inst:1:7:1", name), set(SET)],
            Some(true),
        ),
        case(
            "two misses then their fill",
            vec![],
            vec![
                miss("inst:1:7:1", name),
                miss_claiming("inst:1:7:2", "m|127.0.0.1|inst:1:7|2", "force"),
                set(SET),
            ],
            Some(false),
        ),
        case(
            "miss then its fill",
            vec![],
            vec![miss("inst:1:7:1", name), set(SET)],
            Some(true),
        ),
        case(
            "write, no fence",
            vec![Before::Key("v0")],
            vec![set(SET)],
            Some(true),
        ),
        case(
            "write NX, no fence, the key there",
            vec![Before::Key("v0")],
            vec![set(s(|s| {
                s.nx = true;
                s.command = &["SET", KEY, "v1", "NX", "EX", "60"]
            }))],
            Some(true),
        ),
        case(
            "write turned into a delete, no fence",
            vec![Before::Key("v0")],
            vec![set(s(|s| s.on_write = "inval"))],
            Some(true),
        ),
        case(
            "write rejected, no fence",
            vec![Before::Key("v0")],
            vec![set(s(|s| s.on_write = "reject"))],
            Some(true),
        ),
        case(
            "write, no fence where one was expected",
            vec![],
            vec![set(s(|s| s.expect = true))],
            Some(false),
        ),
        case(
            "write with a bad expiry, no fence",
            vec![],
            vec![set(s(|s| s.command = &["SET", KEY, "v1", "EX", "-5"]))],
            Some(true),
        ),
        case(
            "write under the lag window, no fence",
            vec![],
            vec![set(s(|s| s.lag = "1000000"))],
            Some(false),
        ),
        case(
            "fill of the one live miss",
            vec![Before::Fence(one(live))],
            vec![set(SET)],
            Some(true),
        ),
        case(
            "fill, the herd lease the miss's",
            vec![Before::Fence(Box::new(|now| {
                fence(
                    now - 5_000,
                    None,
                    Some((now + 5_000_000, "inst:1:7:1")),
                    &[(now - 5_000, now - 1_000, "m|127.0.0.1|inst:1:7|1")],
                )
            }))],
            vec![set(SET)],
            Some(true),
        ),
        case(
            "fill, a previous invalidation kept",
            vec![Before::Fence(Box::new(|now| {
                fence(
                    now - 5_000,
                    Some(now - 9_000),
                    None,
                    &[(now - 5_000, now - 1_000, "m|127.0.0.1|inst:1:7|1")],
                )
            }))],
            vec![set(SET)],
            Some(true),
        ),
        case(
            "fill NX, the key absent",
            vec![Before::Fence(one(live))],
            vec![set(s(|s| {
                s.nx = true;
                s.command = &["SET", KEY, "v1", "NX", "EX", "60"]
            }))],
            Some(true),
        ),
        case(
            "fill NX, the key there",
            vec![Before::Key("v0"), Before::Fence(one(live))],
            vec![set(s(|s| {
                s.nx = true;
                s.command = &["SET", KEY, "v1", "NX", "EX", "60"]
            }))],
            Some(false),
        ),
        case(
            "fill with a bad expiry",
            vec![Before::Fence(one(live))],
            vec![set(s(|s| s.command = &["SET", KEY, "v1", "EX", "-5"]))],
            Some(true),
        ),
        case(
            "fill, the fence moved since the miss",
            vec![Before::Fence(Box::new(|now| {
                fence(
                    now - 2_000,
                    None,
                    None,
                    &[(now - 5_000, now - 1_000, "m|127.0.0.1|inst:1:7|1")],
                )
            }))],
            vec![set(SET)],
            Some(false),
        ),
        case(
            "fill, the miss past its lease",
            vec![Before::Fence(one(old))],
            vec![set(SET)],
            Some(false),
        ),
        case(
            "fill, the miss past twice its lease",
            vec![Before::Fence(one(gone))],
            vec![set(SET)],
            Some(false),
        ),
        case(
            "store, the miss in another scope",
            vec![Before::Fence(Box::new(|now| {
                fence(
                    now - 5_000,
                    None,
                    None,
                    &[(now - 5_000, now - 1_000, "m|127.0.0.9|inst:1:7|1")],
                )
            }))],
            vec![set(SET)],
            Some(false),
        ),
        case(
            "fill, a delete pending",
            vec![Before::Fence(one(live))],
            vec![set(s(|s| s.pending = true))],
            Some(false),
        ),
        case(
            "fill after a failover (lease and bound)",
            vec![Before::Fence(one(live))],
            vec![set(s(|s| s.lease = "10000000,5000000"))],
            Some(false),
        ),
        case(
            "fill under the lag window",
            vec![Before::Fence(one(live))],
            vec![set(s(|s| s.lag = "1000000"))],
            Some(false),
        ),
        case(
            "store, a hash where the fence goes",
            vec![Before::FenceHash],
            vec![set(SET)],
            Some(false),
        ),
        case(
            "a batch of misses, fills and writes",
            vec![],
            vec![batch(&[
                miss("inst:1:7:1", name),
                set(SET),
                set(SET),
                miss("inst:1:7:2", "m|127.0.0.1|inst:1:7|2"),
                miss("inst:1:7:3", "m|127.0.0.1|inst:1:7|3"),
                set(s(|s| s.on_write = "inval")),
                set(s(|s| s.command = &["SET", KEY, "v1", "EX", "-5"])),
                set(SET),
                set(s(|s| s.on_write = "inval")),
                direct_read("inst:1:7:4", "m|127.0.0.1|inst:1:7|4"),
                set(SET),
                direct_read("inst:1:7:5", "m|127.0.0.1|inst:1:7|5"),
            ])],
            None,
        ),
    ]
}

#[tokio::test]
async fn short_paths_answer_and_leave_what_the_full_operations_do() {
    let server = RedisServer::start();
    let mut redis = RawClient::connect(server.addr()).await;
    let forms = forms(&mut redis).await;
    for scenario in scenarios() {
        let fast = run(&mut redis, 0, &forms.fast, &scenario).await;
        let full = run(&mut redis, 1, &forms.full, &scenario).await;
        assert_eq!(
            fast, full,
            "{}: the short paths differ from the full operations",
            scenario.name
        );
        let Some(expected) = scenario.fast else { continue };
        let strict = run(&mut redis, 2, &forms.strict, &scenario).await;
        let reached_full = strict.iter().any(|line| line.contains(FULL_RAN));
        assert_eq!(
            reached_full,
            !expected,
            "{}: expected the {} path, got {strict:?}",
            scenario.name,
            if expected { "short" } else { "full" }
        );
    }
}
