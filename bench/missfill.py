#!/usr/bin/env python3
"""Cache-aside miss->fill load generator (stdlib only), used by bench/fences.sh.

Every connection loops: GET k (k is a fresh key, so the reply is nil) and
then, on the same connection, SET k v EX 60 - through cachefence with fences
on that is a miss script followed by a fill script. One event loop
(selectors/epoll) drives all connections; each has one request in flight.

Around the timed loop it talks to the Redis server itself (--admin-port):
FLUSHALL (unless --no-flush) and CONFIG RESETSTAT before, INFO commandstats,
INFO cpu and INFO stats after. It prints `name=value` lines on stdout:

  pairs, seconds, pairs_per_s          completed GET->SET pairs, loop time
  errors, first_error, unexpected_hits error replies; GETs that were not nil
  redis_cpu_us_per_pair                Redis main-thread user+sys CPU / pairs
  cmd_us_per_pair                      top-level command time / pairs (see below)
  scripts_per_pair                     (EVALSHA + EVAL calls) / pairs
  <cmd>_calls, <cmd>_usec, <cmd>_upc   commandstats for get, set, evalsha, eval
  other                                any other command seen, "name:calls,..."
  bytes_per_pair                       Redis used_memory after the loop, less
                                       before it, / pairs (the keys' memory
                                       and, with fences on, what fences keep)

Commands that a Lua script runs (GET, SET, DEL, TIME, ...) are counted in
commandstats too, and their time is part of the script's time, so
cmd_us_per_pair adds only the top-level commands: EVALSHA + EVAL, plus the
client's own GETs (all of them reach Redis as GET) and, when no script ran
(fences off, direct Redis), its SETs, at their command's average
usec_per_call (which, with fences on, mixes in the scripts' own GETs).
Exit status: 0 if the loop ran without errors, 1 otherwise.
"""

import argparse
import os
import selectors
import socket
import sys
import time

from resp import ReplyError, encode, parse

ADMIN_COMMANDS = {"info", "config|resetstat", "flushall", "ping"}
# Commands only the fence script runs (their time is inside EVALSHA's).
SCRIPT_ONLY = {"time", "del", "hmget", "hset", "hget", "hdel", "hgetall", "pexpire"}


class Admin:
    """A blocking connection straight to Redis."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.buf = bytearray()

    def call(self, *args):
        self.sock.sendall(encode(*args))
        while True:
            r = parse(self.buf)
            if r is not None:
                value, used = r
                del self.buf[:used]
                if isinstance(value, ReplyError):
                    raise RuntimeError("redis: %s" % value)
                return value
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("redis closed the admin connection")
            self.buf += data

    def info(self, section):
        text = self.call("INFO", section).decode()
        out = {}
        for line in text.splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                out[k] = v
        return out


def commandstats(admin):
    stats = {}
    for k, v in admin.info("commandstats").items():
        if not k.startswith("cmdstat_"):
            continue
        fields = dict(f.split("=", 1) for f in v.split(","))
        stats[k[len("cmdstat_"):]] = (int(fields["calls"]), int(fields["usec"]))
    return stats


def cpu_seconds(admin):
    cpu = admin.info("cpu")
    if "used_cpu_sys_main_thread" in cpu:
        return float(cpu["used_cpu_sys_main_thread"]) + float(cpu["used_cpu_user_main_thread"])
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


class Conn:
    __slots__ = ("sock", "prefix", "i", "key", "buf", "state")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="target: cachefence or Redis")
    ap.add_argument("--admin-port", type=int, required=True, help="the Redis server itself")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--ttl", type=int, default=60)
    ap.add_argument("--tag", default=os.urandom(4).hex(), help="key prefix part, unique per run")
    ap.add_argument("--no-flush", action="store_true", help="do not FLUSHALL before the run")
    ap.add_argument("--stall", type=float, default=15.0, help="abort after this long without a reply")
    a = ap.parse_args()
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("missfill: loopback only")

    value = b"v" * a.value_size
    ttl = str(a.ttl).encode()
    set_tail = b"$%d\r\n%s\r\n$2\r\nEX\r\n$%d\r\n%s\r\n" % (len(value), value, len(ttl), ttl)

    def get_cmd(key):
        return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)

    def set_cmd(key):
        return b"*5\r\n$3\r\nSET\r\n$%d\r\n%s\r\n" % (len(key), key) + set_tail

    admin = Admin(a.host, a.admin_port)
    sel = selectors.DefaultSelector()
    conns = []
    for c in range(a.conns):
        s = socket.create_connection((a.host, a.port), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A PING makes the proxy open its upstream connection before the stats are reset.
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = s.recv(64)
            if not chunk:
                sys.exit("missfill: connection closed during PING")
            reply += chunk
        if reply != b"+PONG\r\n":
            sys.exit("missfill: PING answered %r" % reply)
        s.setblocking(False)
        conn = Conn()
        conn.sock, conn.prefix, conn.i, conn.buf, conn.state = s, b"mf:%s:%d:" % (a.tag.encode(), c), 0, bytearray(), "get"
        conns.append(conn)
        sel.register(s, selectors.EVENT_READ, conn)

    if not a.no_flush:
        admin.call("FLUSHALL")
    admin.call("CONFIG", "RESETSTAT")
    memory0 = int(admin.info("memory")["used_memory"])
    cpu0 = cpu_seconds(admin)

    def send(conn, data):
        sent = conn.sock.send(data)
        if sent != len(data):  # rare: fall back to a blocking write of the rest
            conn.sock.setblocking(True)
            conn.sock.sendall(data[sent:])
            conn.sock.setblocking(False)

    pairs = gets = errors = unexpected = 0
    first_error = ""
    start = time.perf_counter()
    deadline = start + a.seconds
    for conn in conns:
        conn.key = conn.prefix + b"0"
        send(conn, get_cmd(conn.key))
    active = len(conns)
    last_progress = start
    while active:
        events = sel.select(timeout=1.0)
        now = time.perf_counter()
        if not events:
            if now - last_progress > a.stall:
                print("missfill: no reply for %.0f s, %d connections waiting" % (a.stall, active), file=sys.stderr)
                errors += 1
                first_error = first_error or "stalled"
                break
            continue
        last_progress = now
        for key, _ in events:
            conn = key.data
            data = conn.sock.recv(1 << 16)
            if not data:
                print("missfill: the target closed a connection", file=sys.stderr)
                errors += 1
                first_error = first_error or "connection closed"
                sel.unregister(conn.sock)
                active -= 1
                continue
            conn.buf += data
            r = parse(conn.buf)
            if r is None:
                continue
            reply, used = r
            del conn.buf[:used]
            if isinstance(reply, ReplyError):
                errors += 1
                first_error = first_error or str(reply)
            if conn.state == "get":
                gets += 1
                if reply is not None and not isinstance(reply, ReplyError):
                    unexpected += 1
                conn.state = "set"
                send(conn, set_cmd(conn.key))
            else:
                if reply == "OK":
                    pairs += 1
                elif not isinstance(reply, ReplyError):
                    errors += 1
                    first_error = first_error or "SET answered %r" % (reply,)
                if now < deadline:
                    conn.i += 1
                    conn.key = conn.prefix + str(conn.i).encode()
                    conn.state = "get"
                    send(conn, get_cmd(conn.key))
                else:
                    sel.unregister(conn.sock)
                    active -= 1
    elapsed = time.perf_counter() - start

    cpu1 = cpu_seconds(admin)
    stats = commandstats(admin)
    memory1 = int(admin.info("memory")["used_memory"])
    for conn in conns:
        conn.sock.close()

    def cs(name):
        return stats.get(name, (0, 0))

    get_calls, get_usec = cs("get")
    set_calls, set_usec = cs("set")
    evalsha_calls, evalsha_usec = cs("evalsha")
    eval_calls, eval_usec = cs("eval")
    scripts = evalsha_calls + eval_calls
    # With fences on every pair is a GET, a miss script and a fill script:
    # no SET reaches Redis on its own. Without, every pair is a GET and a SET.
    top_sets = 0 if scripts else pairs
    upc = lambda calls, usec: usec / calls if calls else 0.0
    cmd_usec = (evalsha_usec + eval_usec
                + upc(get_calls, get_usec) * gets
                + upc(set_calls, set_usec) * min(top_sets, set_calls))
    other = []
    for name, (calls, usec) in sorted(stats.items()):
        if name in ("get", "set", "evalsha", "eval") or name in ADMIN_COMMANDS:
            continue
        other.append("%s:%d" % (name, calls))
        if name not in SCRIPT_ONLY:
            cmd_usec += usec

    p = max(pairs, 1)
    out = {
        "pairs": pairs,
        "gets": gets,
        "seconds": "%.3f" % elapsed,
        "pairs_per_s": "%.1f" % (pairs / elapsed if elapsed > 0 else 0),
        "errors": errors,
        "first_error": first_error.replace("\n", " ")[:200],
        "unexpected_hits": unexpected,
        "redis_cpu_us_per_pair": "%.3f" % ((cpu1 - cpu0) * 1e6 / p),
        "cmd_us_per_pair": "%.3f" % (cmd_usec / p),
        "scripts_per_pair": "%.3f" % (scripts / p),
        "bytes_per_pair": "%.1f" % ((memory1 - memory0) / p),
        "other": ",".join(other) or "-",
    }
    for name, calls, usec in (("get", get_calls, get_usec), ("set", set_calls, set_usec),
                              ("evalsha", evalsha_calls, evalsha_usec), ("eval", eval_calls, eval_usec)):
        out[name + "_calls"] = calls
        out[name + "_usec"] = usec
        out[name + "_upc"] = "%.3f" % upc(calls, usec)
        out[name + "_per_pair"] = "%.3f" % (calls / p)
    for k, v in out.items():
        print("%s=%s" % (k, v))
    return 1 if errors or unexpected or pairs == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
