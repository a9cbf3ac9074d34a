#!/usr/bin/env python3
"""Builds the seed corpus of the fuzz targets from proto-tests/cases/*.cases.

    python3 fuzz/seed.py            # writes fuzz/corpus/{request_framing,reply_framing}/
    python3 fuzz/seed.py --no-redis # request seeds and hand-written reply seeds only
    python3 fuzz/seed.py --no-cmin  # keep every seed (no `cargo fuzz cmin`)

request_framing: for each case and connection, the bytes the case sends on
that connection (`a:`/`a>` steps encoded as multibulk requests, `raw`
steps as they are), plus a few hand-written edge cases.

reply_framing: the same byte streams are sent to a fresh local
redis-server (one per case, on a Unix socket, with the case's `redis`
arguments) and what comes back on each connection is recorded; plus
hand-written RESP3 frames Redis does not send on its own (streamed strings
and aggregates, nested attributes) and a few malformed ones.

Every seed is a fuzz input: a control byte and cut points (see
tests/fuzz_checks/mod.rs, `Input`), chosen from a hash of the payload so
that the corpus is the same on every run for the same payloads, then the
payload, truncated to MAX_PAYLOAD bytes. Files are named by the SHA-1 of
their content, as libFuzzer names them. The directories are emptied first:
they hold seeds only (scripts/fuzz.sh lets libFuzzer write what it finds to
fuzz/work/, which git ignores). Replies carry run ids, ports and times, so
re-running with Redis changes some reply seeds.

Last, when cargo-fuzz is installed, `cargo fuzz cmin` keeps only the seeds
that add coverage (a few hundred files in all instead of ~850).
"""

import argparse
import hashlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")
CASES = os.path.join(ROOT, "proto-tests", "cases")
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
MAX_PAYLOAD = 2048
# Reply bytes kept per connection (the rest is read and dropped).
MAX_CAPTURE = 4096


# --- the case format (proto-tests/README.md, proto-tests/runner.rs) ---------

def split_args(line: bytes):
    """Redis' sdssplitargs, as resp::request::split_args; None if unbalanced."""
    space = b" \n\r\t\x0b\x0c"
    hexdigits = b"0123456789abcdefABCDEF"
    args, p, n = [], 0, len(line)
    while True:
        while p < n and line[p] in space:
            p += 1
        if p >= n:
            return args
        cur, in_dq, in_sq = bytearray(), False, False
        while True:
            c = line[p] if p < n else None
            if in_dq:
                if c is None:
                    return None
                if (c == 0x5C and p + 3 < n and line[p + 1] == ord("x")
                        and line[p + 2] in hexdigits and line[p + 3] in hexdigits):
                    cur.append(int(line[p + 2:p + 4], 16))
                    p += 3
                elif c == 0x5C and p + 1 < n:
                    p += 1
                    cur.append({ord("n"): 10, ord("r"): 13, ord("t"): 9,
                                ord("b"): 8, ord("a"): 7}.get(line[p], line[p]))
                elif c == ord('"'):
                    if p + 1 < n and line[p + 1] not in space:
                        return None
                    p += 1
                    break
                else:
                    cur.append(c)
            elif in_sq:
                if c is None:
                    return None
                if c == 0x5C and p + 1 < n and line[p + 1] == ord("'"):
                    p += 1
                    cur.append(ord("'"))
                elif c == ord("'"):
                    if p + 1 < n and line[p + 1] not in space:
                        return None
                    p += 1
                    break
                else:
                    cur.append(c)
            else:
                if c is None or c in space:
                    break
                if c == ord('"'):
                    in_dq = True
                elif c == ord("'"):
                    in_sq = True
                else:
                    cur.append(c)
            p += 1
        args.append(bytes(cur))


def unescape(s: str) -> bytes:
    """The escapes of a `raw` step: \\r \\n \\t \\0 \\\\ \\xHH."""
    out, i, b = bytearray(), 0, s.encode()
    while i < len(b):
        if b[i] != 0x5C:
            out.append(b[i])
            i += 1
            continue
        e = chr(b[i + 1])
        i += 2
        if e == "x":
            out.append(int(b[i:i + 2], 16))
            i += 2
        else:
            out.append({"r": 13, "n": 10, "t": 9, "0": 0, "\\": 0x5C}[e])
    return bytes(out)


def multibulk(args) -> bytes:
    out = b"*%d\r\n" % len(args)
    for a in args:
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def load_cases():
    cases = []
    for name in sorted(os.listdir(CASES)):
        if not name.endswith(".cases"):
            continue
        with open(os.path.join(CASES, name), encoding="utf-8") as f:
            for raw in f:
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith("case "):
                    cases.append({"name": line[5:].strip(), "redis": [], "steps": []})
                    continue
                case = cases[-1]
                word, _, rest = line.partition(" ")
                rest = rest.strip()
                if word == "redis":
                    case["redis"] += rest.split()
                elif word == "sleep":
                    case["steps"].append(("sleep", None, int(rest)))
                elif word in ("proxy", "norm", "differs"):
                    pass
                elif word.endswith(":") or word.endswith(">"):
                    args = split_args(rest.encode())
                    case["steps"].append(("send", word[:-1], multibulk(args)))
                    if word.endswith(":"):
                        case["steps"].append(("read", word[:-1], 1))
                else:
                    verb, _, arg = rest.partition(" ")
                    if verb == "raw":
                        case["steps"].append(("send", word, unescape(arg.strip())))
                    elif verb == "read":
                        case["steps"].append(("read", word, int(arg)))
                    elif verb == "closed":
                        case["steps"].append(("read", word, 1))
                    elif verb == "quiet":
                        case["steps"].append(("read", word, 0))
    return cases


def sent_streams(case):
    """What the case sends on each connection, in order of first use."""
    streams = {}
    for kind, conn, data in case["steps"]:
        if kind == "send":
            streams[conn] = streams.get(conn, b"") + data
    return streams


# --- replies from a real redis-server -----------------------------------------

def drain(sock, idle, into):
    """Reads until nothing arrives for `idle` seconds (or EOF)."""
    sock.settimeout(idle)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except (socket.timeout, OSError):
            return
        if not chunk:
            return
        room = MAX_CAPTURE - len(into)
        if room > 0:
            into += chunk[:room]


def capture_replies(case, workdir):
    """Runs the case's sends against a fresh redis-server; replies per connection."""
    path = os.path.join(workdir, "redis.sock")
    if os.path.exists(path):
        os.unlink(path)
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", path, "--save", "",
         "--appendonly", "no", "--daemonize", "no", "--logfile", "",
         "--enable-debug-command", "yes", "--dir", workdir] + case["redis"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not os.path.exists(path):
            if time.monotonic() > deadline or server.poll() is not None:
                return {}
            time.sleep(0.005)
        conns, replies = {}, {}
        for kind, conn, data in case["steps"]:
            if kind == "sleep":
                time.sleep(min(data, 200) / 1000)
                continue
            if conn not in conns:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                except OSError:
                    # The case shut the server down (SHUTDOWN, limits).
                    s.close()
                    break
                conns[conn], replies[conn] = s, bytearray()
            if kind == "send":
                try:
                    conns[conn].sendall(data)
                except OSError:
                    pass
            drain(conns[conn], 0.03, replies[conn])
        for conn, s in conns.items():
            drain(s, 0.03, replies[conn])
            s.close()
        return {c: bytes(r) for c, r in replies.items() if r}
    finally:
        server.kill()
        server.wait()


# --- hand-written seeds -----------------------------------------------------------

EXTRA_REQUESTS = [
    b"",
    b"\r\n",
    b"\n",
    b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n",
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n",
    b"*1\r\n$4\r\nPI\x00G\r\n",
    b"PING\x00\r\n",
    b'SET "a\\x41\\n" \'it\\\'s\' plain\n',
    b"SUBSCRIBE a b c\r\nUNSUBSCRIBE\r\nCLIENT REPLY SKIP\r\nHELLO 3\r\nSELECT 2\r\n",
    b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n",
    b"*2\r\n$6\r\nSELECT\r\n$10\r\n4294967296\r\n",
    b"*9223372036854775807\r\n",
    b"*1\r\n$9223372036854775807\r\n",
    b"*1\r\n$-9223372036854775808\r\n",
    b"*1\r\n$4\rxPING\r\n",
    b"*1\r\r\n$4\r\nPING\r\n",
]

EXTRA_REPLIES = [
    b"+OK\r\n-ERR x\r\n:1\r\n$-1\r\n*-1\r\n$0\r\n\r\n*0\r\n",
    b"_\r\n,1.5\r\n,inf\r\n#t\r\n#f\r\n(3492890328409238509324850943850943825024385\r\n",
    b"!21\r\nSYNTAX invalid syntax\r\n=15\r\ntxt:Some string\r\n",
    b"%2\r\n+a\r\n:1\r\n+b\r\n:2\r\n~2\r\n+x\r\n+y\r\n",
    b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n*2\r\n:2039123\r\n:9543892\r\n",
    b"*3\r\n:1\r\n|1\r\n+ttl\r\n:3\r\n:2\r\n",
    b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n+OK\r\n",
    b"$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;1\r\nd\r\n;0\r\n",
    b"*?\r\n:1\r\n:2\r\n*?\r\n+a\r\n.\r\n.\r\n",
    b"%?\r\n+a\r\n:1\r\n+b\r\n:2\r\n.\r\n~?\r\n$?\r\n;1\r\nx\r\n;0\r\n.\r\n",
    b"*2\r\n$?\r\n;2\r\nab\r\n;0\r\n*?\r\n.\r\n",
    b"$6\r\na\r\nb\r\n\r\n:7\r\n",
    b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
    # Malformed on purpose.
    b"hello\r\n",
    b"$x\r\n",
    b"+OK\n",
    b";3\r\nabc\r\n",
    b".\r\n",
    b"*?\r\n;0\r\n",
    b"$?\r\n.\r\n",
    b"$-2\r\n",
    b"%9999999999999999999\r\n",
    b"|9223372036854775807\r\n",
    b"$9999999999999999999\r\nabc",
    b"$18446744073709551615\r\n",
]


# --- writing ----------------------------------------------------------------------

def seed_input(payload: bytes, target: str) -> bytes:
    payload = payload[:MAX_PAYLOAD]
    rng = random.Random(hashlib.sha1(target.encode() + payload).digest())
    cuts = [rng.randrange(len(payload) + 1) for _ in range(rng.randint(1, 4))]
    if target == "request_framing":
        # Mostly the large proto-max-bulk-len, modes 0-6 (no inflation).
        bulk = rng.choice([0, 0, 0, 0, 0, 7, 3, 5])
        mode = rng.choice([0, 0, 0, 1, 2, 3, 4, 5])
        control = (mode << 5) | (bulk << 2)
    else:
        control = rng.randrange(3) << 2
    control |= len(cuts) - 1
    return bytes([control]) + b"".join(c.to_bytes(2, "little") for c in cuts) + payload


def write(target, payloads):
    out = os.path.join(CORPUS, target)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    names = set()
    for payload in payloads:
        data = seed_input(payload, target)
        name = hashlib.sha1(data).hexdigest()
        if name in names:
            continue
        names.add(name)
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    return len(names)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-redis", action="store_true", help="do not run redis-server")
    parser.add_argument("--no-cmin", action="store_true", help="do not minimise with cargo fuzz cmin")
    args = parser.parse_args()
    cases = load_cases()
    requests, replies = list(EXTRA_REQUESTS), list(EXTRA_REPLIES)
    seen = set()
    for case in cases:
        for stream in sent_streams(case).values():
            if stream[:MAX_PAYLOAD] not in seen:
                seen.add(stream[:MAX_PAYLOAD])
                requests.append(stream)
    use_redis = not args.no_redis and shutil.which("redis-server")
    if not use_redis:
        print("seed.py: no redis-server; reply seeds are the hand-written ones", file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory(prefix="cachefence-seed-") as workdir:
            for case in cases:
                for reply in capture_replies(case, workdir).values():
                    replies.append(reply)
    counts = {"request_framing": write("request_framing", requests),
              "reply_framing": write("reply_framing", replies)}
    print(f"seed.py: {len(cases)} cases -> {counts['request_framing']} request seeds, "
          f"{counts['reply_framing']} reply seeds in {CORPUS}")
    have_cargo_fuzz = subprocess.run(["cargo", "fuzz", "--version"], capture_output=True).returncode == 0
    if args.no_cmin or not have_cargo_fuzz:
        return
    for target in counts:
        # The build and cmin flags of scripts/fuzz.sh.
        subprocess.run(["cargo", "fuzz", "cmin", "--sanitizer", "none", target,
                        os.path.join("corpus", target)],
                       cwd=FUZZ, check=True, capture_output=True)
        kept = len(os.listdir(os.path.join(CORPUS, target)))
        print(f"seed.py: cargo fuzz cmin {target}: {counts[target]} -> {kept} seeds")


if __name__ == "__main__":
    main()
