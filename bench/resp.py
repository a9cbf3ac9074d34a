"""RESP for the bench scripts: encode a command, parse one reply.

Shared by soak.py, missfill.py and changelog_latency.py (each runs as a
standalone script from bench/, so this module sits beside them).
"""


class ReplyError(str):
    """An error reply (`-ERR ...`), as its text."""


def encode(*args):
    """A command as a RESP multibulk; str and int arguments are encoded."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def parse(buf, pos=0):
    """One reply from buf[pos:]: (value, next_pos), or None if incomplete.

    Simple strings come back as str, errors as ReplyError, integers as int,
    bulk strings as bytes, arrays as lists, and nil (RESP2 or RESP3) as None.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, line = buf[pos:pos + 1], bytes(buf[pos + 1:end])
    nxt = end + 2
    if kind == b"+":
        return line.decode(errors="replace"), nxt
    if kind == b"-":
        return ReplyError(line.decode(errors="replace")), nxt
    if kind == b":":
        return int(line), nxt
    if kind == b"_":
        return None, nxt
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            return None
        return bytes(buf[nxt:nxt + n]), nxt + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, nxt
        items = []
        for _ in range(n):
            r = parse(buf, nxt)
            if r is None:
                return None
            item, nxt = r
            items.append(item)
        return items, nxt
    raise ValueError("unexpected reply %r" % bytes(buf[pos:pos + 40]))
