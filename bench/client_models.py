#!/usr/bin/env python3
"""Cache-aside consistency and cost per client model (driver of bench/client_models.sh).

`run` measures one cell (one target, one client model) and prints one JSON
object on stdout; `table` reads such objects (one file per cell) and prints
the report. See bench/README.md, "Client models".

The workload is the cache-aside loop of issue 14 against a real PostgreSQL:
`--rows` rows (id, version, value) in <schema>.users; `--readers` threads GET
user:<id> through the target and, on a miss, read the row and
`SET user:<id> <version>:<value> EX 60`; `--writers` threads UPDATE a random
row (version = version + 1) and then `DEL user:<id>` through the target, as
fast as they go or at --write-rate updates per second in all (an open-loop
schedule per writer).

Client models (what the cell varies; redis-py):
  thread  every thread its own redis.Redis whose pool holds one connection
  pool    every thread shares one redis.BlockingConnectionPool of
          --pool-size connections (fewer than threads: a GET and its SET
          often go out on different connections)
  fairpool  the same pool behind a FIFO hand-off of its slots: threads get a
          connection in the order they asked (redis-py's pool lets a thread
          that just released a connection take it straight back, so waiting
          threads, the writers above all, can starve)
  mux     every thread shares one redis.Connection; a lock is held from
          sending a command to reading its reply, so the misses and fills of
          all threads interleave on one connection

Consistency is judged by the client, not by the proxy's counters:
  stale read   a GET hit returning version v while a DEL for a write of a
               version > v had been acknowledged before the GET was sent (the
               floor is read right before the command goes out, after the
               model's lock or pool wait)
  stale key    after the writers stop and --settle seconds, a key cached in
               Redis whose version differs from the row's
Cost: reads/s, hit ratio, database reads (per second and per invalidation),
GET latency, Redis INFO commandstats and main-thread CPU (read from Redis
itself, --admin-port), and cachefence's CACHE.STATS when the target is the
proxy. A stampede test follows: --stampede-readers threads of the same model
GET one hot key right after it is invalidated, --stampede-rounds times;
database reads per invalidation.

Every loop is bounded by a count and by a deadline; every wait has a timeout.
"""

import argparse
import collections
import json
import os
import random
import statistics
import sys
import threading
import time

try:
    import psycopg
    import redis
except ImportError as e:  # pragma: no cover - the shell script installs them
    sys.exit("client_models: %s (pip install -r bench/requirements-client-models.txt)" % e)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MODELS = ("thread", "pool", "fairpool", "mux")
MAX_OPS_PER_THREAD = 5_000_000  # a bound on every loop, far above what 20 s can do
MAX_LATENCIES = 200_000  # GET latencies kept per thread


# ------------------------------------------------------------- the clients
class PooledClient:
    """Models `thread` and `pool`: a redis-py pool; one command per checkout.

    The command is sent and its reply read on the connection the pool hands
    out (what redis.Redis.execute_command does, without its retries: an
    error is counted, not hidden), so that `before_send` runs after the wait
    for a connection and right before the bytes go out.
    """

    def __init__(self, client):
        self.client = client  # the redis.Redis the model prescribes
        self.pool = client.connection_pool

    def call(self, args, before_send=None):
        conn = self.pool.get_connection()
        try:
            if before_send is not None:
                before_send()
            conn.send_command(*args)
            return conn.read_response()
        except redis.ResponseError:
            raise
        except BaseException:
            conn.disconnect()  # a reply may still be owed: never reuse it
            raise
        finally:
            self.pool.release(conn)

    def close(self):
        self.pool.disconnect()


class FairBlockingConnectionPool(redis.BlockingConnectionPool):
    """A BlockingConnectionPool whose connections go to waiters first come, first served.

    A FIFO of waiting threads guards the pool's max_connections slots; a
    released slot is handed to the oldest waiter, so a thread that has just
    released a connection cannot take it back ahead of it.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._fair_lock = threading.Lock()
        self._fair_free = self.max_connections
        self._fair_waiters = collections.deque()
        self._fair_local = threading.local()  # did the parent release during get_connection?

    def get_connection(self, *args, **kwargs):
        with self._fair_lock:
            if self._fair_free > 0 and not self._fair_waiters:
                self._fair_free -= 1
                turn = None
            else:
                turn = threading.Event()
                self._fair_waiters.append(turn)
        if turn is not None and not turn.wait(self.timeout):
            with self._fair_lock:
                if turn in self._fair_waiters:
                    self._fair_waiters.remove(turn)
                    raise redis.ConnectionError("No connection available (fair pool).")
            # handed a slot just as the wait timed out: keep it
        local = self._fair_local
        local.released = False
        local.getting = True
        try:
            return super().get_connection(*args, **kwargs)
        except BaseException:
            if not local.released:  # the parent gives a failed connection back itself
                self._fair_release_slot()
            raise
        finally:
            local.getting = False

    def release(self, connection):
        try:
            super().release(connection)
        finally:
            if getattr(self._fair_local, "getting", False):
                self._fair_local.released = True
            self._fair_release_slot()

    def _fair_release_slot(self):
        with self._fair_lock:
            if self._fair_waiters:
                self._fair_waiters.popleft().set()
            else:
                self._fair_free += 1


class LockedConnection:
    """Model `mux`: one connection, one lock held from send to reply."""

    def __init__(self, host, port, timeout):
        self.conn = redis.Connection(host=host, port=port, socket_timeout=timeout,
                                     socket_connect_timeout=timeout, protocol=2)
        self.lock = threading.Lock()
        self.timeout = timeout

    def call(self, args, before_send=None):
        if not self.lock.acquire(timeout=self.timeout):
            raise TimeoutError("waited %.0f s for the shared connection's lock" % self.timeout)
        try:
            if before_send is not None:
                before_send()
            self.conn.send_command(*args)
            return self.conn.read_response()
        except redis.ResponseError:
            raise
        except BaseException:
            self.conn.disconnect()
            raise
        finally:
            self.lock.release()

    def close(self):
        self.conn.disconnect()


def make_clients(model, n, host, port, pool_size, timeout):
    """n per-thread handles on the target, shaped as `model` prescribes."""
    common = dict(host=host, port=port, socket_timeout=timeout,
                  socket_connect_timeout=timeout, protocol=2)
    if model == "thread":
        return [PooledClient(redis.Redis(connection_pool=redis.ConnectionPool(max_connections=1, **common)))
                for _ in range(n)]
    if model == "pool":
        shared = PooledClient(redis.Redis(connection_pool=redis.BlockingConnectionPool(
            max_connections=pool_size, timeout=timeout, **common)))
        return [shared] * n
    if model == "fairpool":
        shared = PooledClient(redis.Redis(connection_pool=FairBlockingConnectionPool(
            max_connections=pool_size, timeout=timeout, **common)))
        return [shared] * n
    if model == "mux":
        return [LockedConnection(host, port, timeout)] * n
    raise ValueError(model)


def close_all(clients):
    for c in {id(c): c for c in clients}.values():
        try:
            c.close()
        except Exception:
            pass


# ------------------------------------------------------------------ Redis
def admin_client(a):
    return redis.Redis(host=a.host, port=a.admin_port, socket_timeout=30, protocol=2)


def commandstats(admin):
    out = {}
    for name, v in admin.info("commandstats").items():
        if name.startswith("cmdstat_"):
            out[name[len("cmdstat_"):]] = {"calls": int(v["calls"]), "usec": int(v["usec"])}
    return out


def main_thread_cpu(admin):
    cpu = admin.info("cpu")
    if "used_cpu_sys_main_thread" in cpu:
        return float(cpu["used_cpu_sys_main_thread"]) + float(cpu["used_cpu_user_main_thread"])
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def cache_stats(a):
    """cachefence's CACHE.STATS through the target, or None (direct Redis)."""
    if not a.proxy:
        return None
    r = redis.Redis(host=a.host, port=a.port, socket_timeout=10, protocol=2)
    try:
        flat = r.execute_command("CACHE.STATS")
    finally:
        r.close()
    return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}


# -------------------------------------------------------------- the database
def pg_connect(a):
    return psycopg.connect(a.pg_url, autocommit=True, connect_timeout=10)


def reset_tables(a):
    s = a.schema
    with pg_connect(a) as db:
        db.execute("CREATE SCHEMA IF NOT EXISTS %s" % s)
        db.execute("DROP TABLE IF EXISTS %s.users, %s.hot" % (s, s))
        db.execute("CREATE TABLE %s.users (id int PRIMARY KEY, version int NOT NULL, value text NOT NULL)" % s)
        db.execute("CREATE TABLE %s.hot (id int PRIMARY KEY, version int NOT NULL, value text NOT NULL)" % s)
        db.execute("INSERT INTO %s.users SELECT g, 1, 'row-' || g || '-' || repeat('x', %d) "
                   "FROM generate_series(1, %d) g" % (s, a.value_pad, a.rows))
        db.execute("INSERT INTO %s.hot VALUES (1, 1, 'hot')" % s)
    if a.replica_url:  # the replica replays the new tables before the clock starts
        deadline = time.monotonic() + 60
        with psycopg.connect(a.replica_url, autocommit=True, connect_timeout=10) as replica:
            while True:
                try:
                    if replica.execute("SELECT count(*) FROM %s.hot" % s).fetchone()[0] == 1:
                        break
                except psycopg.Error:
                    pass
                if time.monotonic() > deadline:
                    sys.exit("client_models: the replica did not replay the tables within 60 s")
                time.sleep(0.1)


# ------------------------------------------------------------ the workload
class Shared:
    """What the threads share: the acknowledged-invalidation floors and the stop time."""

    def __init__(self, rows, deadline):
        self.acked = [0] * (rows + 1)  # acked[id]: highest version whose DEL was acknowledged
        # ack_log[id]: (perf_counter when the DEL was acknowledged, version), in that order
        self.ack_log = [[] for _ in range(rows + 1)]
        self.lost = [0] * (rows + 1)  # lost[id]: highest committed version whose DEL failed
        self.ack_lock = threading.Lock()
        self.deadline = deadline


def new_stats():
    return {"reads": 0, "hits": 0, "misses": 0, "db_reads": 0, "fills": 0, "stale_reads": 0,
            "stale_by_max": 0, "updates": 0, "invalidations": 0, "errors": 0, "first_error": None,
            "lat": [], "wait": [], "upd": [], "ops": 0, "write_slots_skipped": 0,
            "del_failures": 0, "replica_reads": 0, "stale_beyond_window": 0, "stale_age_max": 0.0,
            "stale_ages": []}


def note_error(st, e):
    st["errors"] += 1
    st.setdefault("error_times", []).append(time.monotonic())
    if st["first_error"] is None:
        st["first_error"] = "%s: %s" % (type(e).__name__, e)


def reader(a, i, client, shared, st):
    rng = random.Random(a.seed * 1000 + i)
    users = "%s.users" % a.schema
    try:
        db = pg_connect(a)
        replica = psycopg.connect(a.replica_url, autocommit=True, connect_timeout=10) if a.replica_url else None
    except Exception as e:
        note_error(st, e)
        return
    floor = [0]
    sent = [0.0]
    try:
        while st["ops"] < MAX_OPS_PER_THREAD and time.monotonic() < shared.deadline:
            st["ops"] += 1
            rid = rng.randint(1, a.rows)
            key = "user:%d" % rid

            def snap(rid=rid):
                floor[0] = shared.acked[rid]
                sent[0] = time.perf_counter()

            t0 = time.perf_counter()
            try:
                v = client.call(("GET", key), snap)
            except Exception as e:
                note_error(st, e)
                continue
            if len(st["lat"]) < MAX_LATENCIES:
                st["lat"].append(time.perf_counter() - t0)
                st["wait"].append(sent[0] - t0)
            st["reads"] += 1
            if v is not None:
                st["hits"] += 1
                version = int(v.split(b":", 1)[0])
                if version < floor[0]:
                    st["stale_reads"] += 1
                    st["stale_by_max"] = max(st["stale_by_max"], floor[0] - version)
                    age = staleness(shared, rid, version, sent[0])
                    st["stale_ages"].append(age)
                    st["stale_age_max"] = max(st["stale_age_max"], age)
                    if age > a.window:
                        st["stale_beyond_window"] += 1
                continue
            st["misses"] += 1
            source = db
            if replica is not None and rng.random() < a.replica_share:
                source = replica
                st["replica_reads"] += 1
            try:
                version, value = source.execute("SELECT version, value FROM %s WHERE id = %%s" % users,
                                            (rid,)).fetchone()
            except Exception as e:
                note_error(st, e)
                continue
            st["db_reads"] += 1
            try:
                client.call(("SET", key, "%d:%s" % (version, value), "EX", a.ttl))
                st["fills"] += 1
            except Exception as e:
                note_error(st, e)
    finally:
        db.close()
        if replica is not None:
            replica.close()


def staleness(shared, rid, version, sent):
    """How long before `sent` the first DEL of a version newer than `version` was acknowledged."""
    with shared.ack_lock:
        log = list(shared.ack_log[rid])
    first = min((t for t, v in log if v > version and t <= sent), default=sent)
    return sent - first


def writer(a, i, client, shared, st):
    rng = random.Random(a.seed * 1000 + 500 + i)
    users = "%s.users" % a.schema
    interval = a.writers / a.write_rate if a.write_rate > 0 else 0.0
    try:
        db = pg_connect(a)
    except Exception as e:
        note_error(st, e)
        return
    next_at = time.monotonic() + rng.random() * interval  # writers spread over one interval
    if interval > 0:
        time.sleep(next_at - time.monotonic())
    try:
        while st["ops"] < MAX_OPS_PER_THREAD and time.monotonic() < shared.deadline:
            st["ops"] += 1
            rid = rng.randint(1, a.rows)
            t0 = time.perf_counter()
            try:
                (version,) = db.execute(
                    "UPDATE %s SET version = version + 1, value = 'row-' || id || '-w' || (version + 1) "
                    "|| '-' || repeat('x', %d) WHERE id = %%s RETURNING version" % (users, a.value_pad),
                    (rid,)).fetchone()
            except Exception as e:
                note_error(st, e)
                continue
            st["updates"] += 1  # autocommit: committed once execute() returned
            t1 = time.perf_counter()
            try:
                client.call(("DEL", "user:%d" % rid))
                st["upd"].append(t1 - t0)
                st["lat"].append(time.perf_counter() - t1)
            except Exception as e:
                note_error(st, e)  # not acknowledged: no floor moves
                st["del_failures"] += 1
                with shared.ack_lock:
                    shared.lost[rid] = max(shared.lost[rid], version)
                continue
            acked_at = time.perf_counter()
            with shared.ack_lock:
                if version > shared.acked[rid]:
                    shared.acked[rid] = version
                shared.ack_log[rid].append((acked_at, version))
            st["invalidations"] += 1
            if interval > 0:  # open-loop schedule; more than 1 s behind: skip ahead
                next_at += interval
                now = time.monotonic()
                if next_at > now:
                    time.sleep(max(0.0, min(next_at, shared.deadline) - now))
                elif now - next_at > 1.0:
                    st["write_slots_skipped"] += int((now - next_at) / interval)
                    next_at = now
    finally:
        db.close()


def run_threads(targets, join_timeout):
    threads = [threading.Thread(target=f, args=args, daemon=True) for f, args in targets]
    for t in threads:
        t.start()
    end = time.monotonic() + join_timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return sum(t.is_alive() for t in threads)


def stale_keys(a, admin, shared):
    """Compare every cached user:<id> (read from Redis itself) with its row.

    A stale key older than a write whose DEL failed (a pool timeout, say) is
    counted apart too: no cache can know of that write.
    """
    with pg_connect(a) as db:
        rows = dict(db.execute("SELECT id, version FROM %s.users" % a.schema).fetchall())
    pipe = admin.pipeline(transaction=False)
    for rid in range(1, a.rows + 1):
        pipe.get("user:%d" % rid)
    cached = stale = newer = lost = 0
    for rid, v in zip(range(1, a.rows + 1), pipe.execute()):
        if v is None:
            continue
        cached += 1
        version = int(v.split(b":", 1)[0])
        if version != rows[rid]:
            stale += 1
            newer += version > rows[rid]
            lost += shared.lost[rid] > version
    return {"cached_keys": cached, "stale_keys": stale, "keys_newer_than_row": newer,
            "stale_keys_after_failed_del": lost}


# ------------------------------------------------------------- the stampede
def stampede(a):
    """--stampede-readers threads GET hot:1 together right after each invalidation."""
    n = a.stampede_readers
    clients = make_clients(a.model, n + 1, a.host, a.port, a.pool_size, a.timeout)
    barrier = threading.Barrier(n + 1, timeout=a.stampede_round_timeout)
    stop = [False]
    per_round = []  # db reads per round
    lat = []
    errs = {"errors": 0, "first_error": None}
    lock = threading.Lock()
    current = [0]  # hot:1's version as committed (and its DEL acknowledged) this round

    def one_reader(i):
        client = clients[i]
        try:
            db = pg_connect(a)
        except Exception as e:
            with lock:
                note_error(errs, e)
            stop[0] = True
            try:
                barrier.abort()
            except Exception:
                pass
            return
        try:
            for _ in range(a.stampede_rounds + 1):
                barrier.wait()
                if stop[0]:
                    return
                t0 = time.perf_counter()
                try:
                    v = client.call(("GET", "hot:1"))
                    with lock:
                        lat.append(time.perf_counter() - t0)
                    if v is None:
                        version, value = db.execute("SELECT version, value FROM %s.hot WHERE id = 1"
                                                    % a.schema).fetchone()
                        with lock:
                            per_round[-1] += 1
                        client.call(("SET", "hot:1", "%d:%s" % (version, value), "EX", a.ttl))
                    elif int(v.split(b":", 1)[0]) < current[0]:
                        with lock:
                            errs["stale_hits"] = errs.get("stale_hits", 0) + 1
                except Exception as e:
                    with lock:
                        note_error(errs, e)
                barrier.wait()
        except threading.BrokenBarrierError:
            pass
        finally:
            db.close()

    threads = [threading.Thread(target=one_reader, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    writer_client = clients[n]
    rounds = 0
    broken = None
    end = time.monotonic() + a.stampede_seconds
    t_start = time.monotonic()
    try:
        with pg_connect(a) as db:
            while rounds < a.stampede_rounds and time.monotonic() < end:
                (version,) = db.execute("UPDATE %s.hot SET version = version + 1 WHERE id = 1 "
                                        "RETURNING version" % a.schema).fetchone()
                writer_client.call(("DEL", "hot:1"))
                current[0] = version
                per_round.append(0)
                barrier.wait()  # go
                barrier.wait()  # every reader done
                rounds += 1
            stop[0] = True
            barrier.wait()  # release the readers, who see stop
    except threading.BrokenBarrierError:
        broken = "a round took longer than %.0f s" % a.stampede_round_timeout
    except Exception as e:
        broken = "%s: %s" % (type(e).__name__, e)
    stop[0] = True
    barrier.abort()
    alive = 0
    for t in threads:
        t.join(a.timeout + 5)
        alive += t.is_alive()
    close_all(clients)
    done = per_round[:rounds]
    lat.sort()
    return {
        "rounds": rounds, "seconds": round(time.monotonic() - t_start, 2), "broken": broken,
        "threads_stuck": alive,
        "db_reads_per_inv_mean": round(statistics.mean(done), 2) if done else None,
        "db_reads_per_inv_max": max(done) if done else None,
        "db_reads_per_inv_min": min(done) if done else None,
        "get_ms_p50": round(1000 * lat[len(lat) // 2], 2) if lat else None,
        "get_ms_max": round(1000 * lat[-1], 2) if lat else None,
        "stale_hits": errs.get("stale_hits", 0), "errors": errs["errors"], "first_error": errs["first_error"],
    }


# ------------------------------------------------------------------- run
def percentile(sorted_values, q):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def cmd_run(a):
    if a.host not in LOOPBACK:
        sys.exit("client_models: loopback only")
    reset_tables(a)
    admin = admin_client(a)
    admin.flushall()
    clients_r = make_clients(a.model, a.readers + a.writers, a.host, a.port, a.pool_size, a.timeout)
    for c in {id(c): c for c in clients_r}.values():  # connect before the clock starts
        if c.call(("PING",)) not in (b"PONG", "PONG"):
            sys.exit("client_models: PING through the target failed")
    admin.config_resetstat()
    stats0 = cache_stats(a)
    cpu0 = main_thread_cpu(admin)

    t0 = time.monotonic()
    shared = Shared(a.rows, t0 + a.seconds)
    rst = [new_stats() for _ in range(a.readers)]
    wst = [new_stats() for _ in range(a.writers)]
    jobs = [(reader, (a, i, clients_r[i], shared, rst[i])) for i in range(a.readers)]
    jobs += [(writer, (a, i, clients_r[a.readers + i], shared, wst[i])) for i in range(a.writers)]
    stuck = run_threads(jobs, a.seconds + 2 * a.timeout + 10)
    elapsed = time.monotonic() - t0
    cpu1 = main_thread_cpu(admin)
    cstats = commandstats(admin)
    stats1 = cache_stats(a)
    close_all(clients_r)

    time.sleep(a.settle)  # fills still in flight land (or not) before the keys are compared
    keys = stale_keys(a, admin, shared)

    for st in wst:
        st["del"] = st.pop("lat")
    tot = new_stats()
    tot["del"] = []
    for st in rst + wst:
        for k, v in st.items():
            if k in ("lat", "wait", "upd", "del", "stale_ages"):
                tot[k].extend(v)
            elif k == "error_times":
                continue
            elif k == "first_error":
                tot[k] = tot[k] or v
            elif k in ("stale_by_max", "stale_age_max"):
                tot[k] = max(tot[k], v)
            else:
                tot[k] += v
    lat = sorted(tot["lat"])
    wait = sorted(tot["wait"])
    upd = sorted(tot["upd"])
    dels = sorted(tot["del"])
    scripts = {c: cstats.get(c, {"calls": 0, "usec": 0}) for c in ("evalsha", "eval", "get", "set", "del")}
    script_calls = scripts["evalsha"]["calls"] + scripts["eval"]["calls"]
    script_usec = scripts["evalsha"]["usec"] + scripts["eval"]["usec"]
    out = {
        "target": a.label, "model": a.model, "seconds": round(elapsed, 2),
        "readers": a.readers, "writers": a.writers, "rows": a.rows, "pool_size": a.pool_size,
        "write_rate": a.write_rate,
        "reads": tot["reads"], "hits": tot["hits"], "misses": tot["misses"], "db_reads": tot["db_reads"],
        "fills_sent": tot["fills"], "updates": tot["updates"], "invalidations": tot["invalidations"],
        "reads_per_s": round(tot["reads"] / elapsed, 1),
        "hit_ratio": round(tot["hits"] / tot["reads"], 4) if tot["reads"] else None,
        "db_reads_per_s": round(tot["db_reads"] / elapsed, 1),
        "db_reads_per_inv": round(tot["db_reads"] / tot["invalidations"], 3) if tot["invalidations"] else None,
        "invalidations_per_s": round(tot["invalidations"] / elapsed, 1),
        "stale_reads": tot["stale_reads"], "stale_by_max_versions": tot["stale_by_max"],
        "replica_reads": tot["replica_reads"], "window_s": a.window,
        "stale_reads_beyond_window": tot["stale_beyond_window"],
        "stale_age_max_s": round(tot["stale_age_max"], 3),
        "stale_age_s_p50": round(percentile(sorted(tot["stale_ages"]), 0.5), 3) if tot["stale_ages"] else None,
        "get_ms_p50": round(1000 * percentile(lat, 0.5), 3) if lat else None,
        "get_ms_p99": round(1000 * percentile(lat, 0.99), 3) if lat else None,
        "get_ms_max": round(1000 * lat[-1], 3) if lat else None,
        "gets_over_100ms": sum(x > 0.1 for x in lat),
        "get_wait_ms_p50": round(1000 * percentile(wait, 0.5), 3) if wait else None,
        "get_wait_ms_p99": round(1000 * percentile(wait, 0.99), 3) if wait else None,
        "write_slots_skipped": tot["write_slots_skipped"],
        "update_ms_p50": round(1000 * percentile(upd, 0.5), 3) if upd else None,
        "update_ms_p99": round(1000 * percentile(upd, 0.99), 3) if upd else None,
        "del_ms_p50": round(1000 * percentile(dels, 0.5), 3) if dels else None,
        "del_ms_p99": round(1000 * percentile(dels, 0.99), 3) if dels else None,
        "stale_reads_per_1k_inv": round(1000 * tot["stale_reads"] / tot["invalidations"], 2)
        if tot["invalidations"] else None,
        "errors": tot["errors"], "first_error": tot["first_error"], "threads_stuck": stuck,
        "reader_errors": sum(st["errors"] for st in rst), "writer_errors": sum(st["errors"] for st in wst),
        "del_failures": tot["del_failures"],
        "reads_by_reader": [st["reads"] for st in rst],
        "error_times_s": sorted(round(x - t0, 2) for st in rst + wst for x in st.get("error_times", [])),
        "invalidations_by_writer": [st["invalidations"] for st in wst],
        "redis_cpu_us_per_read": round((cpu1 - cpu0) * 1e6 / tot["reads"], 2) if tot["reads"] else None,
        "script_calls": script_calls,
        "script_usec_per_call": round(script_usec / script_calls, 2) if script_calls else None,
        "evalsha_usec_per_call": round(scripts["evalsha"]["usec"] / scripts["evalsha"]["calls"], 2)
        if scripts["evalsha"]["calls"] else None,
        "eval_calls": scripts["eval"]["calls"],
        "get_usec_per_call": round(scripts["get"]["usec"] / scripts["get"]["calls"], 2) if scripts["get"]["calls"] else None,
        "set_usec_per_call": round(scripts["set"]["usec"] / scripts["set"]["calls"], 2) if scripts["set"]["calls"] else None,
        "commandstats": cstats,
        **keys,
    }
    # Redis command time of one miss + fill: two fence scripts through the
    # proxy (the miss script and the fill script), GET + SET directly.
    if script_calls:
        out["missfill_redis_us"] = round(2 * script_usec / script_calls, 2)
    elif out["get_usec_per_call"] is not None and out["set_usec_per_call"] is not None:
        out["missfill_redis_us"] = round(out["get_usec_per_call"] + out["set_usec_per_call"], 2)
    if stats1 is not None:
        out["cache_stats"] = {k: stats1[k] - stats0.get(k, 0) for k in stats1}
    if a.stampede_rounds > 0:
        s_before = cache_stats(a)
        out["stampede"] = stampede(a)
        s_after = cache_stats(a)
        if s_after is not None:
            out["stampede"]["cache_stats"] = {k: s_after[k] - s_before.get(k, 0) for k in s_after
                                              if s_after[k] != s_before.get(k, 0)}
    admin.close()
    print(json.dumps(out, sort_keys=True))
    return 0 if (tot["errors"] == 0 and stuck == 0) else 1


# ------------------------------------------------------------------ table
def fmt(v, spec="{}"):
    return "-" if v is None else spec.format(v)


def cmd_table(a):
    cells = []
    for path in a.files:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    cells.append(json.loads(line))
    if not cells:
        sys.exit("client_models table: no results in %s" % " ".join(a.files))
    base = {c["target"]: c["hit_ratio"] for c in cells if c["model"] == "thread"}
    cols = ["target", "model", "reads/s", "hit", "hit/thr", "db/s", "db/inv", "inv/s",
            "stale rd", "/1k inv", "stale key", "p50 ms", "p99 ms", ">100ms", "wait p99", "DEL p99", "errs", "missfill us"]
    rows = []
    for c in cells:
        b = base.get(c["target"])
        rows.append([c["target"], c["model"], fmt(c["reads_per_s"], "{:.0f}"), fmt(c["hit_ratio"], "{:.3f}"),
                     fmt(c["hit_ratio"] / b if b and c["hit_ratio"] is not None else None, "{:.3f}"),
                     fmt(c["db_reads_per_s"], "{:.0f}"), fmt(c["db_reads_per_inv"], "{:.2f}"),
                     fmt(c["invalidations_per_s"], "{:.0f}"), c["stale_reads"],
                     fmt(c["stale_reads_per_1k_inv"], "{:.1f}"),
                     "%d/%d%s" % (c["stale_keys"], c["cached_keys"],
                                  " (%d lost DEL)" % c["stale_keys_after_failed_del"]
                                  if c.get("stale_keys_after_failed_del") else ""),
                     fmt(c["get_ms_p50"], "{:.2f}"),
                     fmt(c["get_ms_p99"], "{:.1f}"), c["gets_over_100ms"], fmt(c["get_wait_ms_p99"], "{:.1f}"),
                     fmt(c.get("del_ms_p99"), "{:.1f}"), c["errors"] + c["threads_stuck"],
                     fmt(c.get("missfill_redis_us"), "{:.1f}")])
    print_table(cols, rows)
    if any(c.get("replica_reads") for c in cells):
        print()
        cols = ["target", "model", "replica rd", "window s", "stale rd", "stale > window", "stale age p50 s",
                "stale age max s", "hit", "refused lag_window", "fills ok"]
        rows = []
        for c in cells:
            cs = c.get("cache_stats") or {}
            rows.append([c["target"], c["model"], c.get("replica_reads"), fmt(c.get("window_s")),
                         c["stale_reads"], c.get("stale_reads_beyond_window"), fmt(c.get("stale_age_s_p50")),
                         fmt(c.get("stale_age_max_s")), fmt(c["hit_ratio"], "{:.3f}"),
                         cs.get("fills_refused_lag_window", "-"), cs.get("fills_accepted", "-")])
        print_table(cols, rows)
    if any("stampede" in c for c in cells):
        print()
        cols = ["target", "model", "rounds", "secs", "db/inv mean", "min", "max", "GET p50 ms", "GET max ms",
                "holds", "timed out", "stale", "errs"]
        rows = []
        for c in cells:
            s = c.get("stampede")
            if not s:
                continue
            cs = s.get("cache_stats") or {}
            rows.append([c["target"], c["model"], s["rounds"], s["seconds"], fmt(s["db_reads_per_inv_mean"]),
                         fmt(s["db_reads_per_inv_min"]), fmt(s["db_reads_per_inv_max"]), fmt(s["get_ms_p50"]),
                         fmt(s["get_ms_max"]), cs.get("holds", 0) if c.get("cache_stats") else "-",
                         cs.get("holds_timed_out", 0) if c.get("cache_stats") else "-",
                         s["stale_hits"], s["errors"] + s["threads_stuck"] + (1 if s["broken"] else 0)])
        print_table(cols, rows)
    print()
    keys = ["fills_accepted", "fills_refused_fence_moved", "fills_refused_older_miss_outstanding",
            "fills_refused_expired", "writes", "holds", "holds_served", "holds_timed_out"]
    cols = ["target", "model"] + [k.replace("fills_refused_", "refused_") for k in keys]
    rows = [[c["target"], c["model"]] + [c["cache_stats"].get(k, "-") for k in keys]
            for c in cells if c.get("cache_stats")]
    if rows:
        print("CACHE.STATS during the timed workload:")
        print_table(cols, rows)
    for c in cells:
        notes = []
        if c["errors"]:
            notes.append("%d errors (readers %s, writers %s, failed DELs %s), first: %s"
                         % (c["errors"], c.get("reader_errors", "?"), c.get("writer_errors", "?"),
                            c.get("del_failures", "?"), c["first_error"]))
        if c["threads_stuck"]:
            notes.append("%d threads still running at the join deadline" % c["threads_stuck"])
        s = c.get("stampede") or {}
        if s.get("broken"):
            notes.append("stampede stopped: %s" % s["broken"])
        if s.get("errors"):
            notes.append("stampede: %d errors, first: %s" % (s["errors"], s["first_error"]))
        if c.get("keys_newer_than_row"):
            notes.append("%d cached keys NEWER than their row" % c["keys_newer_than_row"])
        if notes:
            print("note %s/%s: %s" % (c["target"], c["model"], "; ".join(notes)))


def print_table(cols, rows):
    widths = [max(len(str(x)) for x in [col] + [r[i] for r in rows]) for i, col in enumerate(cols)]
    print("  ".join(str(col).rjust(w) if i > 1 else str(col).ljust(w) for i, (col, w) in enumerate(zip(cols, widths))))
    for r in rows:
        print("  ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure one (target, client model) cell; one JSON object on stdout")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, required=True, help="the target: Redis or cachefence")
    r.add_argument("--admin-port", type=int, required=True, help="the Redis server itself")
    r.add_argument("--label", required=True, help="the target's name in the report")
    r.add_argument("--proxy", action="store_true", help="the target is cachefence (read CACHE.STATS)")
    r.add_argument("--model", choices=MODELS, required=True)
    r.add_argument("--pg-url", required=True)
    r.add_argument("--schema", required=True, help="scratch schema (tables are recreated in it)")
    r.add_argument("--seconds", type=float, default=20.0)
    r.add_argument("--rows", type=int, default=200)
    r.add_argument("--readers", type=int, default=16)
    r.add_argument("--writers", type=int, default=4)
    r.add_argument("--pool-size", type=int, default=8)
    r.add_argument("--write-rate", type=float, default=0.0,
                   help="updates per second, all writers together (0: as fast as they go)")
    r.add_argument("--value-pad", type=int, default=40, help="bytes of padding in each row's value")
    r.add_argument("--ttl", type=int, default=60)
    r.add_argument("--settle", type=float, default=2.0, help="seconds between the writers' stop and the key check")
    r.add_argument("--timeout", type=float, default=10.0, help="socket, pool and lock timeout (s)")
    r.add_argument("--seed", type=int, default=os.getpid())
    r.add_argument("--replica-url", help="a streaming replica of --pg-url: readers read it on a share of misses")
    r.add_argument("--replica-share", type=float, default=0.5, help="share of misses read from --replica-url")
    r.add_argument("--window", type=float, default=0.0,
                   help="lag window (s): a stale read is also counted when it is staler than this")
    r.add_argument("--stampede-readers", type=int, default=32)
    r.add_argument("--stampede-rounds", type=int, default=20, help="0: no stampede test")
    r.add_argument("--stampede-seconds", type=float, default=45.0, help="stop starting rounds after this long")
    r.add_argument("--stampede-round-timeout", type=float, default=30.0)
    t = sub.add_parser("table", help="print the report from the JSON files of `run`")
    t.add_argument("files", nargs="+")
    a = ap.parse_args()
    return cmd_run(a) if a.cmd == "run" else cmd_table(a)


if __name__ == "__main__":
    sys.exit(main())
