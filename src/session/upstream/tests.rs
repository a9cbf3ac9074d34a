use super::*;
use crate::resp::request::RequestFramer;

fn place(input: &[u8], db: u32) -> Placement {
    let frame = RequestFramer::new(1 << 20).next(input).unwrap().unwrap();
    placement(Command::classify(&frame, input), &frame, input, db)
}

#[test]
fn stateless_commands_share_connections() {
    for input in [
        &b"GET k\r\n"[..],
        b"SET k v\r\n",
        b"MGET a b\r\n",
        b"EVALSHA abc 0\r\n",
        b"PUBLISH ch m\r\n",
        b"UNWATCH\r\n",
        b"EXEC\r\n",
        b"SCRIPT LOAD x\r\n",
        b"FUNCTION LIST\r\n",
        b"SELECT 0\r\n",
        b"SELECT x\r\n",
        b"CACHE.STATS\r\n",
        b"clientx\r\n",
    ] {
        assert_eq!(
            place(input, 0),
            Placement::Shared,
            "{}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn connection_state_moves_the_session_to_its_own() {
    for input in [
        &b"MULTI\r\n"[..],
        b"WATCH k\r\n",
        b"subscribe ch\r\n",
        b"PUNSUBSCRIBE\r\n",
        b"SSUBSCRIBE s\r\n",
        b"BLPOP l 0\r\n",
        b"XREAD STREAMS s 0\r\n",
        b"HELLO 3 AUTH default pw\r\n",
        b"HELLO 2 SETNAME x\r\n",
        b"HELLO 4\r\n",
        b"AUTH pw\r\n",
        b"RESET\r\n",
        b"MONITOR\r\n",
        b"CLIENT ID\r\n",
        b"CLIENT REPLY OFF\r\n",
        b"CLIENT TRACKING on\r\n",
        b"READONLY\r\n",
        b"READWRITE\r\n",
        b"ASKING\r\n",
        b"SYNC\r\n",
        b"PSYNC ? -1\r\n",
        b"REPLCONF listening-port 1\r\n",
        b"SELECT 1\r\n",
        b"SHUTDOWN NOSAVE\r\n",
        b"script kill\r\n",
        b"FUNCTION KILL\r\n",
        b"SCRIPT DEBUG sync\r\n",
    ] {
        assert_eq!(
            place(input, 0),
            Placement::Own,
            "{}",
            String::from_utf8_lossy(input)
        );
    }
    // The database the session is in already needs nothing.
    assert_eq!(place(b"SELECT 3\r\n", 3), Placement::Shared);
    assert_eq!(place(b"SELECT 0\r\n", 3), Placement::Own);
}

#[test]
fn wait_carries_the_sessions_writes_over() {
    assert_eq!(place(b"WAIT 1 0\r\n", 0), Placement::OwnAfterWrites);
    assert_eq!(place(b"waitaof 1 0 0\r\n", 0), Placement::OwnAfterWrites);
}

#[test]
fn client_names_go_shared_and_are_remembered() {
    assert_eq!(place(b"client setname x\r\n", 0), Placement::Remembered);
    assert_eq!(
        place(b"CLIENT SETINFO LIB-NAME redis-py\r\n", 0),
        Placement::Remembered
    );
    assert_eq!(place(b"CLIENT GETNAME\r\n", 0), Placement::Own);
}

#[test]
fn the_latest_names_are_kept_in_order() {
    let mut kept = Vec::new();
    for n in 0..20 {
        remember(&mut kept, format!("CLIENT SETNAME n{n}\r\n").as_bytes());
    }
    assert_eq!(kept.len(), REMEMBERED);
    assert_eq!(&kept[0][..], b"CLIENT SETNAME n4\r\n");
    assert_eq!(&kept[15][..], b"CLIENT SETNAME n19\r\n");
}

#[test]
fn a_protocol_alone_goes_to_the_shared_connection_of_it() {
    assert_eq!(place(b"HELLO 3\r\n", 0), Placement::Protocol { resp3: true });
    assert_eq!(place(b"hello 2\r\n", 0), Placement::Protocol { resp3: false });
    assert_eq!(place(b"HELLO\r\n", 0), Placement::Shared);
}

#[test]
fn quit_is_answered_by_the_proxy() {
    assert_eq!(place(b"QUIT\r\n", 0), Placement::Quit);
    assert_eq!(place(b"*1\r\n$4\r\nquit\r\n", 0), Placement::Quit);
}

/// A session behind Sentinel whose shared connection is gone (its queue
/// closed, as a revocation leaves it), owed nothing.
fn behind_sentinel() -> (Arc<App>, SharedTx) {
    let toml = "upstream = \"redis-sentinel://127.0.0.1:1/mymaster\"\nconnect_timeout = \"50ms\"\n";
    let settings = crate::config::parse_settings(toml).unwrap();
    let config = crate::config::Config::resolve(settings, None).unwrap();
    let app = Arc::new(App::new(config, None));
    let (queue, _) = mpsc::channel(1);
    let (_, tx) = shared_halves(app.clone(), 0, queue);
    (app, tx)
}

fn failovers(app: &App) -> &crate::fence::failover::Failovers {
    &app.config.upstream.sentinel.as_ref().unwrap().failovers
}

/// Requests planned before a failover (a fill without its bound) are not
/// sent to the new master when the send finds the connection revoked; planned after
/// it, or with nothing planned, the session goes on on a new connection
/// (here none can be made: no sentinel listens).
#[tokio::test]
async fn requests_planned_before_a_failover_do_not_follow_it() {
    let (app, mut tx) = behind_sentinel();
    tx.planning();
    failovers(&app).record();
    let error = tx.send(b"SET k v\r\n", 1, None).await.unwrap_err();
    assert!(error.to_string().contains("master changed"), "{error}");

    for planned_after in [true, false] {
        let (app, mut tx) = behind_sentinel();
        failovers(&app).record();
        match planned_after {
            true => tx.planning(),
            false => tx.planned_sent(),
        }
        let error = tx.send(b"SET k v\r\n", 1, None).await.unwrap_err();
        assert!(!error.to_string().contains("master changed"), "{error}");
    }
}
