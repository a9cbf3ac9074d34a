#!/usr/bin/env python3
"""Cache-aside soak driver (stdlib only), run by bench/soak.sh.

Worker threads, each with one connection to the proxy, run the cache-aside
loop against a "database" that is a dict in this process (the source of
truth): a reader GETs k; on a miss it reads the database and fills with
SET k <value> EX <ttl> on the same connection. A writer (a --write-ratio
share of the operations) bumps the key's version in the database, then
DELs k. Values are "<key>|v<version>|<padding>", so a cached value names the
database version it was read from.

Every --check-every seconds a checker compares the cache with the database
over a direct connection to Redis (not through the proxy):

  stale key   Redis holds k with a version different from the database's,
              and the database's k was last written more than --grace (1 s)
              before the check began. So a value is only counted once the
              writer's DEL has had a full second to land; a key written
              during the check window is skipped, never counted. Any stale
              key means a fill of old data got in after an invalidation, or
              an invalidation was lost.

A GET hit is also checked as it happens ("stale reads": the value's
version differs from the database's and the database's k was written more
than --grace before the GET was sent).

Each minute one row goes to stdout: operations and ops/s, latency of one
command through the proxy (p50, p99, max; successful commands only), error
replies and connection failures (workers reconnect), stale keys (the most
seen by one check that minute) and stale reads, Redis restarts seen (its
run_id changes), keys in Redis, and the proxy's RSS. A summary follows.

Exit status: 0 if no stale key or stale read was seen and the proxy stayed
up, 1 otherwise.
"""

import argparse
import os
import random
import socket
import sys
import threading
import time

from resp import ReplyError, encode, parse


class Conn:
    """A blocking connection; call() returns the reply (ReplyError for an
    error reply) or raises OSError/ConnectionError when the link fails."""

    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def call(self, *args):
        self.sock.sendall(encode(*args))
        while True:
            r = parse(self.buf)
            if r is not None:
                value, used = r
                del self.buf[:used]
                return value
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("connection closed")
            self.buf += data

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Database:
    """The source of truth: key -> (version, time of the last write)."""

    def __init__(self, keys):
        self.lock = threading.Lock()
        self.rows = {k: (1, 0.0) for k in keys}
        # key -> why its latest DEL failed (cleared by a DEL that succeeds)
        self.failed_del = {}

    def del_result(self, key, error):
        with self.lock:
            if error is None:
                self.failed_del.pop(key, None)
            else:
                self.failed_del[key] = error

    def read(self, key):
        with self.lock:
            return self.rows[key]

    def write(self, key):
        with self.lock:
            version, _ = self.rows[key]
            self.rows[key] = (version + 1, time.monotonic())
            return version + 1

    def snapshot(self):
        with self.lock:
            return dict(self.rows), dict(self.failed_del)


class Stats:
    """Counters for the current minute, swapped out by the reporter."""

    FIELDS = ("ops", "reads", "hits", "fills", "writes", "errors", "conn_failures",
              "stale_reads", "fill_refused")

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.counts = dict.fromkeys(self.FIELDS, 0)
        self.latencies = []
        self.error_kinds = {}

    def take(self):
        with self.lock:
            out = (self.counts, self.latencies, self.error_kinds)
            self.reset()
            return out

    def add(self, latencies, **counts):
        with self.lock:
            self.latencies.extend(latencies)
            for k, v in counts.items():
                self.counts[k] += v

    def error(self, kind):
        with self.lock:
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def value_for(key, version, size):
    head = "%s|v%d|" % (key, version)
    return head + "x" * max(0, size - len(head))


def version_of(value):
    try:
        return int(value.split(b"|")[1][1:])
    except (IndexError, ValueError):
        return -1


def short(message):
    """An error message without the parts that vary (addresses, counts)."""
    words = [w for w in message.split() if not any(c.isdigit() for c in w)]
    return " ".join(words[:8])


def worker(args, index, db, stats, stop, rate):
    rng = random.Random(index * 7919 + 1)
    keys = ["soak:%d" % i for i in range(args.keys)]
    conn = None
    interval = 1.0 / rate if rate > 0 else 0.0
    next_op = time.monotonic()
    lat = []
    counts = dict.fromkeys(Stats.FIELDS, 0)
    last_flush = time.monotonic()

    def flush():
        nonlocal lat, counts, last_flush
        stats.add(lat, **counts)
        lat, counts = [], dict.fromkeys(Stats.FIELDS, 0)
        last_flush = time.monotonic()

    def timed(*cmd):
        t = time.perf_counter()
        reply = conn.call(*cmd)
        if isinstance(reply, ReplyError):
            counts["errors"] += 1
            stats.error("%s: %s" % (cmd[0], short(str(reply))))
        else:
            lat.append(time.perf_counter() - t)
        return reply

    while not stop.is_set():
        if interval:
            now = time.monotonic()
            if next_op > now:
                time.sleep(next_op - now)
            next_op = max(next_op + interval, time.monotonic() - 1.0)
        if time.monotonic() - last_flush > 0.25:
            flush()
        if conn is None:
            try:
                conn = Conn(args.host, args.port, args.timeout)
            except OSError as e:
                counts["conn_failures"] += 1
                stats.error("connect: %s" % type(e).__name__)
                time.sleep(0.1)
                continue
        key = keys[int(rng.paretovariate(1.2) * 7) % len(keys)] if args.skew else rng.choice(keys)
        try:
            counts["ops"] += 1
            if rng.random() < args.write_ratio:
                db.write(key)
                counts["writes"] += 1
                try:
                    reply = timed("DEL", key)
                except (OSError, ConnectionError, ValueError) as e:
                    db.del_result(key, "link: %s" % type(e).__name__)
                    raise
                db.del_result(key, short(str(reply)) if isinstance(reply, ReplyError) else None)
                continue
            counts["reads"] += 1
            sent = time.monotonic()
            reply = timed("GET", key)
            if isinstance(reply, bytes):
                counts["hits"] += 1
                version, written = db.read(key)
                if version_of(reply) != version and written < sent - args.grace:
                    counts["stale_reads"] += 1
            elif reply is None:
                version, _ = db.read(key)  # "read the database"
                filled = timed("SET", key, value_for(key, version, args.value_size), "EX", args.ttl)
                if filled == "OK":
                    counts["fills"] += 1
                elif isinstance(filled, ReplyError) and filled.startswith("STALE"):
                    counts["fill_refused"] += 1
        except (OSError, ConnectionError, ValueError) as e:
            counts["conn_failures"] += 1
            stats.error("link: %s" % type(e).__name__)
            conn.close()
            conn = None
            time.sleep(0.05)
    flush()
    if conn is not None:
        conn.close()


class Checker:
    """Compares Redis with the database over a direct connection."""

    def __init__(self, args, db):
        self.args, self.db = args, db
        self.conn = None
        self.run_id = None
        self.restarts = 0
        self.keys = ["soak:%d" % i for i in range(args.keys)]

    def _call(self, *cmd):
        if self.conn is None:
            self.conn = Conn(self.args.host, self.args.redis_port, 5)
        reply = self.conn.call(*cmd)
        if isinstance(reply, ReplyError):
            raise ConnectionError(str(reply))
        return reply

    def check(self):
        """(stale keys, keys cached, example) or None if Redis is down."""
        try:
            info = self._call("INFO", "server").decode()
            run_id = next(l.split(":", 1)[1] for l in info.splitlines() if l.startswith("run_id:"))
            if self.run_id is not None and run_id != self.run_id:
                self.restarts += 1
            self.run_id = run_id
            started = time.monotonic()
            cached = []
            for i in range(0, len(self.keys), 500):
                cached.extend(self._call("MGET", *self.keys[i:i + 500]))
        except (OSError, ConnectionError, ValueError, StopIteration):
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return None
        rows, failed = self.db.snapshot()
        stale, present, example, causes = 0, 0, None, {}
        for key, value in zip(self.keys, cached):
            if value is None:
                continue
            present += 1
            version, written = rows[key]
            if written < started - self.args.grace and version_of(value) != version:
                stale += 1
                cause = failed.get(key, "ok")
                causes[cause] = causes.get(cause, 0) + 1
                if example is None:
                    example = "%s cached v%d, database v%d since %.1f s (latest DEL: %s)" % (
                        key, version_of(value), version, started - written,
                        "succeeded" if cause == "ok" else "failed, " + cause)
        return stale, present, example, causes


def rss_mib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def pct(sorted_values, p):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(round(p * (len(sorted_values) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="the proxy")
    ap.add_argument("--redis-port", type=int, required=True, help="Redis itself (checks only)")
    ap.add_argument("--proxy-pid", type=int, required=True)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--report-every", type=float, default=60, help="seconds per row")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rate", type=float, default=4000, help="total ops/s (0: as fast as possible)")
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--write-ratio", type=float, default=0.1)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--ttl", type=int, default=300, help="EX of every fill, seconds")
    ap.add_argument("--grace", type=float, default=1.0)
    ap.add_argument("--check-every", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=5.0, help="socket timeout per command")
    ap.add_argument("--skew", action="store_true", help="Pareto-skewed keys instead of uniform")
    args = ap.parse_args()

    db = Database("soak:%d" % i for i in range(args.keys))
    stats = Stats()
    stop = threading.Event()
    per_worker = args.rate / args.workers if args.rate > 0 else 0
    threads = [threading.Thread(target=worker, args=(args, i, db, stats, stop, per_worker), daemon=True)
               for i in range(args.workers)]
    for t in threads:
        t.start()
    checker = Checker(args, db)

    header = ("%-6s %9s %8s %8s %8s %8s %7s %6s %6s %6s %7s %8s %8s"
              % ("minute", "ops", "ops/s", "p50_ms", "p99_ms", "max_ms", "errors", "conn", "stale",
                 "s_rds", "restart", "cached", "rss_MiB"))
    print(header)
    print("-" * len(header))
    sys.stdout.flush()
    began = time.monotonic()
    end = began + args.minutes * 60
    next_check = began + args.check_every
    next_row = began + args.report_every
    row = 0
    totals = dict.fromkeys(Stats.FIELDS, 0)
    all_errors = {}
    worst_stale, stale_example, checks_failed, stale_checks = 0, None, 0, 0
    worst_causes = {}
    minute_stale, last_present = 0, 0
    rss_max, proxy_alive = 0.0, True
    while True:
        now = time.monotonic()
        if now >= next_check:
            result = checker.check()
            if result is None:
                checks_failed += 1
            else:
                stale, last_present, example, causes = result
                minute_stale = max(minute_stale, stale)
                if stale:
                    stale_checks += 1
                    if stale >= worst_stale:
                        worst_stale, stale_example, worst_causes = stale, example, causes
            next_check += args.check_every
        rss = rss_mib(args.proxy_pid)
        if rss is None:
            proxy_alive = False
        else:
            rss_max = max(rss_max, rss)
        if now >= next_row or now >= end:
            counts, latencies, errors = stats.take()
            span = now - (next_row - args.report_every)
            latencies.sort()
            row += 1
            for k in totals:
                totals[k] += counts[k]
            for k, v in errors.items():
                all_errors[k] = all_errors.get(k, 0) + v
            print("%-6d %9d %8.0f %8.2f %8.2f %8.1f %7d %6d %6d %6d %7d %8d %8s" % (
                row, counts["ops"], counts["ops"] / span if span > 0 else 0,
                pct(latencies, 0.5) * 1e3, pct(latencies, 0.99) * 1e3,
                (latencies[-1] if latencies else float("nan")) * 1e3,
                counts["errors"], counts["conn_failures"], minute_stale, counts["stale_reads"],
                checker.restarts, last_present, "%.1f" % rss if rss is not None else "gone"))
            sys.stdout.flush()
            minute_stale = 0
            next_row += args.report_every
            if now >= end or not proxy_alive:
                break
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    counts, _, errors = stats.take()
    for k in totals:
        totals[k] += counts[k]
    for k, v in errors.items():
        all_errors[k] = all_errors.get(k, 0) + v
    final = checker.check()

    elapsed = time.monotonic() - began
    print()
    print("summary: %d ops in %.0f s (%.0f ops/s): %d reads (%d hits, %d fills, %d fills answered STALE), "
          "%d writes" % (totals["ops"], elapsed, totals["ops"] / elapsed, totals["reads"], totals["hits"],
                         totals["fills"], totals["fill_refused"], totals["writes"]))
    print("errors: %d error replies, %d connection failures%s" % (
        totals["errors"], totals["conn_failures"],
        "".join("\n  %6d  %s" % (v, k) for k, v in sorted(all_errors.items(), key=lambda kv: -kv[1]))))
    print("stale: worst check %d keys (%d of the checks saw any), %d stale reads; final check: %s%s" % (
        worst_stale, stale_checks, totals["stale_reads"],
        "Redis down" if final is None else "%d stale of %d cached" % (final[0], final[1]),
        "\n  e.g. %s" % stale_example if stale_example else ""))
    for cause, n in sorted(worst_causes.items(), key=lambda kv: -kv[1]):
        print("  %6d  stale keys whose latest DEL %s" % (n, "succeeded" if cause == "ok" else "failed: " + cause))
    print("redis restarts seen: %d; checks while Redis was down: %d; proxy RSS max %.1f MiB%s" % (
        checker.restarts, checks_failed, rss_max, "" if proxy_alive else "; PROXY EXITED"))
    ok = proxy_alive and worst_stale == 0 and totals["stale_reads"] == 0 and (final is None or final[0] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
