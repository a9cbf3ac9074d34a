//! Differential conformance suite: every case in `proto-tests/cases/` is run
//! against a fresh Redis directly and, through the proxy, against an
//! identical fresh Redis; the replies must be byte-identical (after the
//! case's own explicit normalisers, if it has any). Every case runs through
//! the proxy twice — fences on (every key fenced, `on_write = "write"`:
//! testkit's `FENCE_EVERY_KEY`) and fences off — unless it pins `proxy fences = false` itself. A case marked
//! `differs <reason>` documents a known difference: it passes while the
//! proxy's replies differ, and fails once they no longer do.
//!
//! `cargo test --test proto` runs it; `PROTO_FILTER=substring` narrows it.
//! The case format is described in `proto-tests/README.md`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use testkit::{FENCE_EVERY_KEY, Proxy, RawClient, RedisServer, escape};

/// The suite must not shrink below this without someone noticing.
const MIN_CASES: usize = 150;
/// Cases run at once (each starts two redis-servers).
const PARALLEL: usize = 4;
/// Pause after opening a connection so the proxy's upstream connections are
/// opened in the client's order (client ids then match).
const CONNECT_SETTLE: Duration = Duration::from_millis(15);

#[derive(Debug, Clone)]
enum Step {
    /// Send these bytes on a connection.
    Send(String, Vec<u8>),
    /// Read this many frames.
    Read(String, usize),
    /// Read until the connection closes.
    Closed(String),
    /// Record whatever arrives within the time (normally nothing).
    Quiet(String, Duration),
    /// Read the RDB payload of a replication stream (see `rdb_summary`).
    Rdb(String),
    /// Send this command until its reply contains the text (see `until`).
    Until(String, Vec<u8>, Vec<u8>),
    Sleep(Duration),
}

#[derive(Debug, Clone, Default)]
struct Case {
    name: String,
    origin: String,
    redis_args: Vec<String>,
    proxy_toml: String,
    steps: Vec<Step>,
    norms: Vec<(regex::Regex, String)>,
    /// A documented, known difference from Redis.
    differs: Option<String>,
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto-tests/cases");
    let mut cases = load_cases(&dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    assert!(
        !cases.is_empty(),
        "no proto-test cases found in {}",
        dir.display()
    );
    let total = cases.len();
    let filter = std::env::var("PROTO_FILTER").ok();
    if let Some(f) = &filter {
        cases.retain(|c| c.name.contains(f.as_str()));
    } else {
        assert!(
            total >= MIN_CASES,
            "only {total} proto-test cases; the suite keeps at least {MIN_CASES}"
        );
    }
    println!("proto-tests: {} cases from {}", cases.len(), dir.display());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = runtime.block_on(run_all(cases));
    let mut failed = 0;
    for (case, outcome) in &results {
        match outcome {
            Ok(()) => match &case.differs {
                None => println!("ok   {} ({})", case.name, case.origin),
                Some(reason) => println!(
                    "ok   {} ({}) -- known difference: {reason}",
                    case.name, case.origin
                ),
            },
            Err(diff) => {
                failed += 1;
                println!("FAIL {} ({})\n{diff}", case.name, case.origin);
            }
        }
    }
    let passed = results.len() - failed;
    println!("\nproto-tests: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

async fn run_all(cases: Vec<Case>) -> Vec<(Case, Result<(), String>)> {
    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut tasks = Vec::new();
    for case in cases {
        let limit = limit.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.unwrap();
            let outcome = run_case(&case).await;
            (case, outcome)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("case task"));
    }
    results
}

async fn run_case(case: &Case) -> Result<(), String> {
    let pinned = case
        .proxy_toml
        .lines()
        .any(|l| l.trim_start().starts_with("fences"));
    // Every key fenced unless the case says which keys are a cache itself.
    let declares_cache = case.proxy_toml.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("cache") || l.starts_with("[[cache]]")
    });
    let fences_on = match declares_cache {
        true => case.proxy_toml.clone(),
        false => format!("{}{FENCE_EVERY_KEY}", case.proxy_toml),
    };
    let mut modes = vec![("fences on", fences_on)];
    if !pinned {
        modes.push(("fences off", format!("{}fences = false\n", case.proxy_toml)));
    }
    // Every mode with one upstream connection per client, and again with
    // the clients' commands on one shared upstream connection, unless the
    // case pins the connection model itself.
    let shares = case
        .proxy_toml
        .lines()
        .any(|l| l.trim_start().starts_with("shared_connections"));
    if !shares {
        let per_client = modes
            .iter()
            .map(|(mode, toml)| (*mode, format!("shared_connections = 0\n{toml}")));
        let shared = modes
            .iter()
            .map(|(mode, toml)| (shared_label(mode), format!("shared_connections = 1\n{toml}")));
        modes = per_client.chain(shared).collect();
    }
    let mut failures = String::new();
    for (mode, toml) in modes {
        let outcome = compare(case, &toml, mode.starts_with("shared")).await;
        match (&case.differs, outcome) {
            (None, Ok(())) => {}
            (None, Err(diff)) => {
                let label = match (pinned, mode.starts_with("shared")) {
                    (true, true) => "pinned, shared",
                    (true, false) => "pinned",
                    (false, _) => mode,
                };
                failures += &format!("  [{label}]\n{diff}")
            }
            (Some(_), Err(_)) => {}
            (Some(reason), Ok(())) => {
                failures += &format!("  [{mode}] documented difference no longer occurs: {reason}\n")
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}

fn shared_label(mode: &str) -> &'static str {
    match mode {
        "fences on" => "shared, fences on",
        _ => "shared, fences off",
    }
}

/// Runs the case directly and through a proxy configured with `toml`.
/// `shared`: the proxy's shared upstream connection took a connection id,
/// so the ids of the connections opened after it are one higher than
/// direct; they are masked in both transcripts (cases that use an id's
/// value run with `shared_connections = 0`).
async fn compare(case: &Case, toml: &str, shared: bool) -> Result<(), String> {
    let (direct, proxied) = tokio::join!(run_side(case, None), run_side(case, Some(toml)));
    let mut norms: Vec<(regex::Regex, String)> = case.norms.clone();
    if shared {
        norms.push((
            regex::Regex::new(r"id\\r\\n:[0-9]+").unwrap(),
            "id\\r\\n:<id>".to_string(),
        ));
        norms.push((
            regex::Regex::new(r"id=[0-9]+ addr=").unwrap(),
            "id=<id> addr=".to_string(),
        ));
    }
    let render = |t: &[(String, Vec<u8>)]| -> Vec<String> {
        t.iter()
            .map(|(who, bytes)| {
                if norms.is_empty() {
                    format!("{who} {}", escape(bytes))
                } else {
                    let mut text = escape(&strip_lengths(bytes));
                    for (re, with) in &norms {
                        text = re.replace_all(&text, with.as_str()).into_owned();
                    }
                    format!("{who} {text}")
                }
            })
            .collect()
    };
    let (want, got) = (render(&direct), render(&proxied));
    if want == got {
        return Ok(());
    }
    let mut diff = String::new();
    for i in 0..want.len().max(got.len()) {
        let (w, g) = (want.get(i), got.get(i));
        if w != g {
            diff += &format!(
                "  step {i}\n    redis: {}\n    proxy: {}\n",
                w.map_or("(nothing)", String::as_str),
                g.map_or("(nothing)", String::as_str)
            );
        }
    }
    Err(diff)
}

/// Runs the steps against one fresh Redis, directly or through a proxy, and
/// returns what each read saw.
async fn run_side(case: &Case, via_proxy: Option<&str>) -> Vec<(String, Vec<u8>)> {
    let args = case.redis_args.clone();
    let redis = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        RedisServer::start_with(&args)
    })
    .await
    .expect("starting redis-server");
    let proxy = match via_proxy {
        Some(toml) => Some(Proxy::start(&redis.addr(), toml).await),
        None => None,
    };
    let target = proxy.as_ref().map_or(redis.addr(), |p| p.addr.to_string());
    let mut conns: HashMap<String, RawClient> = HashMap::new();
    let mut transcript = Vec::new();
    for step in &case.steps {
        let name = match step {
            Step::Send(c, _)
            | Step::Read(c, _)
            | Step::Closed(c)
            | Step::Quiet(c, _)
            | Step::Rdb(c)
            | Step::Until(c, _, _) => Some(c.clone()),
            Step::Sleep(_) => None,
        };
        if let Some(name) = name.as_ref().filter(|n| !conns.contains_key(*n)) {
            conns.insert(name.clone(), RawClient::connect(&target).await);
            tokio::time::sleep(CONNECT_SETTLE).await;
        }
        let conn = name.as_ref().and_then(|n| conns.get_mut(n));
        match (step, conn) {
            (Step::Send(_, bytes), Some(c)) => {
                // A peer may already have closed; that shows in later reads.
                let _ = tokio::io::AsyncWriteExt::write_all(&mut c.stream, bytes).await;
            }
            (Step::Read(who, n), Some(c)) => {
                for _ in 0..*n {
                    match c.read_frame_within(testkit::WAIT).await {
                        Some(frame) => transcript.push((who.clone(), frame)),
                        None => {
                            transcript.push((who.clone(), b"(no reply: closed or timed out)".to_vec()));
                            break;
                        }
                    }
                }
            }
            (Step::Closed(who), Some(c)) => {
                let (bytes, closed) = c.read_to_close().await;
                transcript.push((who.clone(), bytes));
                transcript.push((
                    who.clone(),
                    if closed {
                        b"(closed)".to_vec()
                    } else {
                        b"(still open)".to_vec()
                    },
                ));
            }
            (Step::Quiet(who, wait), Some(c)) => {
                let bytes = c.read_quiet(*wait).await;
                transcript.push((
                    who.clone(),
                    if bytes.is_empty() {
                        b"(silence)".to_vec()
                    } else {
                        bytes
                    },
                ));
            }
            (Step::Rdb(who), Some(c)) => {
                let summary = c
                    .read_rdb_within(testkit::WAIT)
                    .await
                    .map(|rdb| rdb_summary(&rdb));
                let summary =
                    summary.unwrap_or_else(|| b"(no rdb: closed, timed out or not an RDB)".to_vec());
                transcript.push((who.clone(), summary));
            }
            (Step::Until(who, command, text), Some(c)) => {
                transcript.push((who.clone(), until(c, command, text).await));
            }
            (Step::Sleep(d), _) => tokio::time::sleep(*d).await,
            _ => unreachable!("every connection step has a connection"),
        }
    }
    drop(conns);
    if let Some(proxy) = proxy {
        proxy.shutdown().await;
    }
    drop(redis);
    transcript
}

/// Sends `command` every 10 ms until its reply contains `text`, for a
/// state that Redis reaches on its own time (its cron) and that no reply
/// waits for: records whether it came within the usual 10 s, not the
/// replies (they show the state on the way).
async fn until(c: &mut RawClient, command: &[u8], text: &[u8]) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + testkit::WAIT;
    let found = loop {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut c.stream, command).await;
        let Some(reply) = c.read_frame_within(deadline - tokio::time::Instant::now()).await else {
            break false;
        };
        if reply.windows(text.len()).any(|w| w == text) {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let outcome = if found { "seen" } else { "not seen within 10 s" };
    format!("(until {}: {outcome})", escape(text)).into_bytes()
}

/// What is comparable in an RDB payload sent by two servers: its format
/// (`$<len>` or diskless `$EOF:`), version, and whether it arrived intact
/// (its CRC64). The bytes themselves are not: they hold each server's
/// replication id, creation time and memory use; the keepalive newlines
/// before the payload depend on timing and are not recorded either.
fn rdb_summary(rdb: &testkit::RdbTransfer) -> Vec<u8> {
    format!(
        "(rdb {} {} checksum {})",
        if rdb.eof_marked { "$EOF:<mark>" } else { "$<len>" },
        escape(rdb.version()),
        if rdb.checksum_ok() { "ok" } else { "BAD" }
    )
    .into_bytes()
}

/// A frame with its bulk-length headers replaced by `$*`, so that a
/// normaliser may change a value's length.
fn strip_lengths(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len());
    let mut pos = 0;
    while pos < frame.len() {
        let Some(rel) = frame[pos..].windows(2).position(|w| w == b"\r\n") else {
            out.extend_from_slice(&frame[pos..]);
            break;
        };
        let line = &frame[pos..pos + rel];
        match line.first() {
            Some(b'$' | b'=' | b'!') if line != b"$-1" => {
                let len: usize = std::str::from_utf8(&line[1..])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                out.push(line[0]);
                out.extend_from_slice(b"*\r\n");
                let body_end = (pos + rel + 2 + len + 2).min(frame.len());
                out.extend_from_slice(&frame[pos + rel + 2..body_end]);
                pos = body_end;
            }
            _ => {
                out.extend_from_slice(&frame[pos..pos + rel + 2]);
                pos += rel + 2;
            }
        }
    }
    out
}

fn load_cases(dir: &Path) -> Result<Vec<Case>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cases"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.cases files in {}", dir.display());
    let mut cases: Vec<Case> = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
        let short = file.file_name().unwrap().to_string_lossy().into_owned();
        for (i, line) in text.lines().enumerate() {
            let at = format!("{short}:{}", i + 1);
            parse_line(line.trim(), &at, &mut cases).map_err(|e| format!("{at}: {e}"))?;
        }
    }
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("duplicate case name `{}`", w[0]));
    }
    if let Some(empty) = cases.iter().find(|c| {
        !c.steps.iter().any(|s| {
            matches!(
                s,
                Step::Read(..) | Step::Closed(_) | Step::Quiet(..) | Step::Rdb(_) | Step::Until(..)
            )
        })
    }) {
        return Err(format!(
            "case `{}` ({}) reads nothing, so it cannot fail",
            empty.name, empty.origin
        ));
    }
    Ok(cases)
}

fn parse_line(line: &str, at: &str, cases: &mut Vec<Case>) -> Result<(), String> {
    if line.is_empty() || line.starts_with('#') {
        return Ok(());
    }
    if let Some(name) = line.strip_prefix("case ") {
        cases.push(Case {
            name: name.trim().to_string(),
            origin: at.to_string(),
            ..Default::default()
        });
        return Ok(());
    }
    let case = cases.last_mut().ok_or("a step before any `case` line")?;
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    let millis = |s: &str| {
        s.parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("bad milliseconds `{s}`"))
    };
    match word {
        "redis" => case.redis_args.extend(rest.split_whitespace().map(String::from)),
        "proxy" => {
            case.proxy_toml.push_str(rest);
            case.proxy_toml.push('\n');
        }
        "sleep" => case.steps.push(Step::Sleep(millis(rest)?)),
        "differs" if !rest.is_empty() => case.differs = Some(rest.to_string()),
        "norm" => {
            let (re, with) = rest
                .split_once(" => ")
                .ok_or("norm needs `<regex> => <replacement>`")?;
            let re = regex::Regex::new(re).map_err(|e| e.to_string())?;
            case.norms.push((re, with.to_string()));
        }
        _ if word.ends_with(':') || word.ends_with('>') => {
            let conn = connection(&word[..word.len() - 1])?;
            let args = cachefence::resp::request::split_args(rest.as_bytes()).ok_or("unbalanced quotes")?;
            if args.is_empty() {
                return Err("a command needs at least a name".into());
            }
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            case.steps.push(Step::Send(conn.clone(), testkit::cmd(&refs)));
            if word.ends_with(':') {
                case.steps.push(Step::Read(conn, 1));
            }
        }
        _ => {
            let conn = connection(word)?;
            let (verb, arg) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let step = match verb {
                "raw" => Step::Send(conn, unescape(arg.trim())?),
                "read" => Step::Read(
                    conn,
                    arg.trim().parse().map_err(|_| format!("bad count `{arg}`"))?,
                ),
                "closed" => Step::Closed(conn),
                "quiet" => Step::Quiet(conn, millis(arg.trim())?),
                "rdb" => Step::Rdb(conn),
                "until" => {
                    let args =
                        cachefence::resp::request::split_args(arg.as_bytes()).ok_or("unbalanced quotes")?;
                    let [text, command @ ..] = args.as_slice() else {
                        return Err("until needs `<text> <command …>`".into());
                    };
                    if text.is_empty() || command.is_empty() {
                        return Err("until needs `<text> <command …>`".into());
                    }
                    let refs: Vec<&[u8]> = command.iter().map(Vec::as_slice).collect();
                    Step::Until(conn, testkit::cmd(&refs), text.clone())
                }
                other => {
                    return Err(format!(
                        "unknown step `{other}` (want raw, read, closed, quiet, rdb, until)"
                    ));
                }
            };
            case.steps.push(step);
        }
    }
    Ok(())
}

fn connection(name: &str) -> Result<String, String> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    ok.then(|| name.to_string())
        .ok_or_else(|| format!("bad connection name `{name}` (want e.g. a, b, sub1)"))
}

/// `\r \n \t \0 \\ \xHH` escapes; `\*N\*` repeats nothing (kept simple).
fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let escaped = *bytes.get(i + 1).ok_or("dangling backslash")?;
        i += 2;
        out.push(match escaped {
            b'r' => b'\r',
            b'n' => b'\n',
            b't' => b'\t',
            b'0' => 0,
            b'\\' => b'\\',
            b'x' => {
                let hex = s.get(i..i + 2).ok_or("short \\x escape")?;
                i += 2;
                u8::from_str_radix(hex, 16).map_err(|_| format!("bad \\x{hex}"))?
            }
            other => return Err(format!("unknown escape \\{}", other as char)),
        });
    }
    Ok(out)
}
