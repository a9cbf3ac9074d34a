#!/usr/bin/env python3
"""Change-log invalidation latency: the driver of bench/changelog.sh.

Python standard library only. PostgreSQL is spoken directly (protocol 3.0,
simple queries; authentication trust, password or md5 - not SCRAM), Redis
directly over RESP2, all on one epoll loop so that every arrival is
timestamped when it happens.

One run, against a table `<schema>.items(id, n)` whose rows 1..--ids exist
and whose trigger (`cachefence pg install`) feeds an outbox consumed by a
running cachefence, in front of a Redis with `notify-keyspace-events`
including `Kg`:

  - a subscriber connection PSUBSCRIBEs `__keyspace@<db>__:item:*`;
  - at --rate updates/s for --seconds (open loop, spread over --conns
    PostgreSQL connections): pick the next id (cycling over 1..--ids,
    skipping an id whose previous update has not been invalidated yet, so
    every event maps to exactly one update), `SET item:<id> v` directly in
    Redis, and once Redis answered, `UPDATE items SET n = n + 1 WHERE id =
    <id>` (autocommit); record when the reply (CommandComplete +
    ReadyForQuery, i.e. COMMIT returned) arrives;
  - record when the `del` keyspace event of `item:<id>` arrives.

latency = del event - COMMIT returned. After the last update it waits up to
--grace seconds for the events still owed; an update without one is
"missing". Before the timed run one warm-up update (not counted) must be
invalidated, which proves the consumer is running.

Results go to stdout as key=value lines; progress and the slowest updates
to stderr. --raw FILE writes one CSV line per update.
"""

import argparse
import collections
import hashlib
import math
import selectors
import socket
import struct
import sys
import time
import urllib.parse

from resp import encode, parse


def log(msg):
    print(f"[changelog] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- PostgreSQL
class PgError(Exception):
    pass


def pg_error_text(body):
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return f"{fields.get('S', 'ERROR')}: {fields.get('M', '?')}"


class Pg:
    """One PostgreSQL connection: blocking start-up and `query`, or
    `start` + `on_readable` from an event loop (one query at a time)."""

    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("postgres", "postgresql"):
            raise ValueError(f"not a postgres:// url: {url}")
        self.user = urllib.parse.unquote(u.username or "postgres")
        self.password = urllib.parse.unquote(u.password) if u.password else None
        database = urllib.parse.unquote(u.path.lstrip("/")) or self.user
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 5432), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        params = b""
        for k, v in (("user", self.user), ("database", database), ("application_name", "cachefence-bench")):
            params += k.encode() + b"\0" + v.encode() + b"\0"
        params += b"\0"
        self.sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        while True:
            kind, body = self._read_blocking()
            if kind == b"R":
                self._authenticate(body)
            elif kind == b"E":
                raise PgError(pg_error_text(body))
            elif kind == b"Z":
                break
        self.sock.settimeout(None)
        self.busy = False
        self.tag = None
        self.error = None
        self.rows = []

    def _authenticate(self, body):
        code = struct.unpack_from("!i", body)[0]
        if code == 0:
            return
        if code in (3, 5) and self.password is None:
            raise PgError("the server asks for a password; put it in the url")
        if code == 3:
            secret = self.password.encode() + b"\0"
        elif code == 5:
            inner = hashlib.md5(self.password.encode() + self.user.encode()).hexdigest().encode()
            secret = b"md5" + hashlib.md5(inner + body[4:8]).hexdigest().encode() + b"\0"
        else:
            raise PgError(f"authentication method {code} is not supported by this driver (trust, password, md5 only)")
        self.sock.sendall(b"p" + struct.pack("!i", 4 + len(secret)) + secret)

    def _message(self):
        if len(self.buf) < 5:
            return None
        n = struct.unpack_from("!i", self.buf, 1)[0]
        if len(self.buf) < 1 + n:
            return None
        kind, body = bytes(self.buf[:1]), bytes(self.buf[5 : 1 + n])
        del self.buf[: 1 + n]
        return kind, body

    def _read_blocking(self):
        while True:
            m = self._message()
            if m is not None:
                return m
            data = self.sock.recv(65536)
            if not data:
                raise PgError("connection closed by the server")
            self.buf += data

    def start(self, sql):
        payload = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", 4 + len(payload)) + payload)
        self.busy, self.tag, self.error, self.rows = True, None, None, []

    def _handle(self, kind, body):
        """True when the query is over (ReadyForQuery)."""
        if kind == b"C":
            self.tag = body.rstrip(b"\0").decode()
        elif kind == b"E":
            self.error = pg_error_text(body)
        elif kind == b"D":
            (ncols,) = struct.unpack_from("!h", body)
            pos, row = 2, []
            for _ in range(ncols):
                (n,) = struct.unpack_from("!i", body, pos)
                pos += 4
                row.append(None if n < 0 else body[pos : pos + n].decode())
                pos += max(n, 0)
            self.rows.append(row)
        elif kind == b"Z":
            self.busy = False
            return True
        return False

    def on_readable(self):
        """Reads what arrived; True when the running query finished."""
        data = self.sock.recv(65536)
        if not data:
            raise PgError("connection closed by the server")
        self.buf += data
        done = False
        while (m := self._message()) is not None:
            done |= self._handle(*m)
        return done

    def query(self, sql):
        """Blocking: the rows of `sql` (text), raising on an error."""
        self.start(sql)
        while not self._handle(*self._read_blocking()):
            pass
        if self.error:
            raise PgError(f"{sql}: {self.error}")
        return self.rows


# --------------------------------------------------------------------- Redis
class Redis:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self.buf = bytearray()

    def send(self, *args):
        self.sock.sendall(encode(*args))

    def values(self):
        """Every complete value received so far (after a recv)."""
        out, pos = [], 0
        while pos < len(self.buf):
            parsed = parse(self.buf, pos)
            if parsed is None:
                break
            value, pos = parsed
            out.append(value)
        del self.buf[:pos]
        return out

    def on_readable(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("Redis closed the connection")
        self.buf += data
        return self.values()

    def call(self, *args):
        """Blocking request/reply (only while nothing else is in flight)."""
        self.send(*args)
        while True:
            values = self.on_readable()
            if values:
                return values[0]


# ---------------------------------------------------------------------- run
class Update:
    __slots__ = ("seq", "id", "sched", "set_sent", "set_ok", "commit", "dele", "failed", "pg")

    def __init__(self, seq, ident, sched):
        self.seq, self.id, self.sched = seq, ident, sched
        self.set_sent = self.set_ok = self.commit = self.dele = None
        self.failed = None
        self.pg = None


class Bench:
    def __init__(self, args):
        self.args = args
        self.cmd = Redis(args.redis_host, args.redis_port)
        self.sub = Redis(args.redis_host, args.redis_port)
        self.prefix = f"__keyspace@{args.db}__:{args.key_prefix}".encode()
        if args.db:
            if self.cmd.call("SELECT", args.db) != "OK":
                raise SystemExit("SELECT failed")
        reply = self.sub.call("PSUBSCRIBE", self.prefix + b"*")
        if not (isinstance(reply, list) and reply[0] == b"psubscribe"):
            raise SystemExit(f"PSUBSCRIBE failed: {reply!r}")
        self.pgs = [Pg(args.pg_url) for _ in range(args.conns)]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sub.sock, selectors.EVENT_READ, "sub")
        self.sel.register(self.cmd.sock, selectors.EVENT_READ, "cmd")
        for pg in self.pgs:
            self.sel.register(pg.sock, selectors.EVENT_READ, pg)
        self.cursor = 0
        self.inflight = {}  # id -> Update (SET sent, del event not seen yet)
        self.unexpected = 0

    def next_id(self):
        """The next id not in flight (and how many were skipped), or None."""
        skipped = 0
        for _ in range(self.args.ids):
            ident = self.cursor % self.args.ids + 1
            self.cursor += 1
            if ident not in self.inflight:
                return ident, skipped
            skipped += 1
        return None, skipped

    def phase(self, seconds, rate, max_updates, grace):
        """Issues updates for `seconds` at `rate` (at most `max_updates`),
        then waits up to `grace` s for their del events."""
        interval = int(1e9 / rate)
        free = list(self.pgs)
        set_fifo = collections.deque()
        owner = {}
        updates = []
        skipped = late = 0
        start = time.monotonic_ns()
        stop_issuing = start + int(seconds * 1e9)
        due = start
        deadline = None
        pending_sets = 0
        stalled = False  # every id in flight: wait for events
        while True:
            now = time.monotonic_ns()
            issuing = now < stop_issuing and len(updates) < max_updates
            while issuing and due <= now and free and len(updates) < max_updates:
                if now - due > 1_000_000_000:  # a backlog of > 1 s is dropped, not burst
                    late += (now - due) // interval
                    due = now
                ident, s = self.next_id()
                skipped += s
                stalled = ident is None
                if stalled:
                    break
                u = Update(len(updates), ident, due)
                u.pg = free.pop()
                self.inflight[ident] = u
                u.set_sent = time.monotonic_ns()
                self.cmd.send("SET", f"{self.args.key_prefix}{ident}", "cached")
                set_fifo.append(u)
                pending_sets += 1
                updates.append(u)
                due += interval
            busy = len(free) < len(self.pgs) or pending_sets
            if not issuing and deadline is None:
                deadline = time.monotonic_ns() + int(grace * 1e9)
            if not issuing and not busy and (not self.inflight or now >= deadline):
                break
            if not issuing and now >= deadline + 10_000_000_000:
                raise SystemExit("PostgreSQL or Redis stopped answering")
            if issuing and free and stalled:
                timeout = 0.01
            elif issuing and free:
                timeout = max(0.0, (due - now) / 1e9)
            elif issuing:
                timeout = 0.05
            else:
                timeout = max(0.0, min(0.1, (deadline - now) / 1e9)) if self.inflight else 0.1
            events = self.sel.select(timeout)
            t = time.monotonic_ns()
            for key, _ in events:
                what = key.data
                if what == "sub":
                    for msg in self.sub.on_readable():
                        self.on_event(msg, t)
                elif what == "cmd":
                    for reply in self.cmd.on_readable():
                        u = set_fifo.popleft()
                        pending_sets -= 1
                        if reply != "OK":
                            u.failed = f"SET: {reply!r}"
                            self.inflight.pop(u.id, None)
                            free.append(u.pg)
                            continue
                        u.set_ok = t
                        u.pg.start(f"UPDATE {self.args.table} SET n = n + 1 WHERE id = {u.id}")
                        owner[u.pg] = u
                else:
                    pg = what
                    if pg.on_readable():
                        u = owner.pop(pg)
                        u.commit = t
                        if pg.error or pg.tag != "UPDATE 1":
                            u.failed = f"UPDATE: {pg.error or pg.tag}"
                            if u.dele is None:
                                self.inflight.pop(u.id, None)
                        free.append(pg)
        return updates, skipped, late, start, stop_issuing

    def on_event(self, msg, t):
        if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == b"pmessage"):
            return
        channel, event = msg[2], msg[3]
        if event != b"del" or not channel.startswith(self.prefix):
            return
        try:
            ident = int(channel[len(self.prefix) :])
        except ValueError:
            self.unexpected += 1
            return
        u = self.inflight.pop(ident, None)
        if u is None:
            self.unexpected += 1
            return
        u.dele = t


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg-url", default="postgres://postgres@127.0.0.1:5432/test")
    ap.add_argument("--table", required=True, help="schema.items")
    ap.add_argument("--outbox", help="schema.outbox: rows left in it at the end (after up to --grace s) are reported")
    ap.add_argument("--redis-host", default="127.0.0.1")
    ap.add_argument("--redis-port", type=int, required=True)
    ap.add_argument("--db", type=int, default=0)
    ap.add_argument("--key-prefix", default="item:")
    ap.add_argument("--ids", type=int, default=1000, help="rows 1..ids exist")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--conns", type=int, default=4, help="PostgreSQL connections issuing updates")
    ap.add_argument("--grace", type=float, default=5, help="seconds to wait for late events")
    ap.add_argument("--warmup-timeout", type=float, default=15)
    ap.add_argument("--raw", help="write one CSV line per update here")
    args = ap.parse_args()

    bench = Bench(args)
    # Warm-up: one update that must be invalidated (the consumer runs).
    ups, *_ = bench.phase(seconds=args.warmup_timeout, rate=1000, max_updates=1, grace=args.warmup_timeout)
    w = ups[0]
    if w.failed or w.dele is None:
        raise SystemExit(f"warm-up update of id {w.id} was not invalidated within {args.warmup_timeout}s ({w.failed or 'no del event'})")
    log(f"warm-up: id {w.id} invalidated {(w.dele - w.commit) / 1e6:.1f} ms after COMMIT")

    log(f"running: {args.rate:g} updates/s for {args.seconds:g}s over ids 1..{args.ids}, {args.conns} PostgreSQL connections")
    updates, skipped, late, start, stop = bench.phase(args.seconds, args.rate, 1 << 62, args.grace)

    failed = [u for u in updates if u.failed]
    done = [u for u in updates if not u.failed and u.commit is not None]
    seen = [u for u in done if u.dele is not None]
    missing = [u for u in done if u.dele is None]
    lat = sorted((u.dele - u.commit) / 1e6 for u in seen)
    rtt = sorted((u.commit - u.set_ok) / 1e6 for u in done)
    span = (updates[-1].sched - updates[0].sched) / 1e9 if len(updates) > 1 else 0
    outbox_left = ""
    if args.outbox:
        # The consumer deletes its rows after Redis acknowledged the DELs:
        # give it until the grace period ends to commit that.
        until = time.monotonic() + args.grace
        while True:
            outbox_left = bench.pgs[0].query(f"SELECT count(*) FROM {args.outbox}")[0][0]
            if outbox_left == "0" or time.monotonic() >= until:
                break
            time.sleep(0.05)

    if args.raw:
        with open(args.raw, "w") as f:
            f.write("seq,id,sched_s,update_rtt_ms,latency_ms,failed\n")
            for u in updates:
                f.write(
                    f"{u.seq},{u.id},{(u.sched - start) / 1e9:.6f},"
                    f"{'' if u.commit is None or u.set_ok is None else f'{(u.commit - u.set_ok) / 1e6:.3f}'},"
                    f"{'' if u.dele is None or u.commit is None else f'{(u.dele - u.commit) / 1e6:.3f}'},"
                    f"{u.failed or ''}\n"
                )
    for u in sorted(seen, key=lambda u: u.commit - u.dele)[:5]:
        log(
            f"slowest: id {u.id} at +{(u.sched - start) / 1e9:.3f}s: {(u.dele - u.commit) / 1e6:.1f} ms "
            f"(UPDATE round trip {(u.commit - u.set_ok) / 1e6:.1f} ms)"
        )
    for u in missing[:5]:
        log(f"missing: id {u.id} updated at +{(u.sched - start) / 1e9:.3f}s, no del event")
    for u in failed[:5]:
        log(f"failed: id {u.id}: {u.failed}")

    out = {
        "updates": len(updates),
        "span_s": f"{span:.2f}",
        "rate": f"{(len(updates) - 1) / span:.1f}" if span > 0 else "0",
        "events": len(lat),
        "missing": len(missing),
        "failed": len(failed),
        "negative": sum(1 for v in lat if v < 0),
        "unexpected_events": bench.unexpected,
        "skipped_ids": skipped,
        "late_slots": late,
        "outbox_left": outbox_left,
    }
    for name, values in (("lat", lat), ("rtt", rtt)):
        out[f"{name}_min"] = f"{values[0]:.2f}" if values else ""
        for p in (50, 90, 99):
            out[f"{name}_p{p}"] = f"{percentile(values, p):.2f}" if values else ""
        out[f"{name}_max"] = f"{values[-1]:.2f}" if values else ""
        out[f"{name}_mean"] = f"{sum(values) / len(values):.2f}" if values else ""
    for k, v in out.items():
        print(f"{k}={v}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
