"""What the fence script costs Redis per miss+fill pair: an older version (a
git revision's src/fence/fence.lua) against the working tree's, and plain
GET+SET, in the same run on one scratch Redis (pinned to CPU 0 when
`taskset` is there). No proxy involved: this is the script's own cost
(#14, #17).

For each: the script's time from INFO commandstats (µs per miss and per
fill, the commands it runs included), Redis' whole CPU per pair from INFO
cpu (parsing and replies included; pipelines of 1000), and the fence's
bytes (MEMORY USAGE) with one miss outstanding and after the fill. Then
the working tree's Redis time per SET inside batches of 16 pipelined SETs
(one script call, #17) against plain SET, and Redis' whole CPU per SET for
the batch script, plain SETs, and one MGET of the batch's fences before plain
SETs (the check-then-write design #17 left for later).

Usage: python3 bench/fence_script_cost.py [REV] [ROUNDS]   (default REV:
9bf6780, the script before outstanding misses moved into the fence;
ROUNDS 12). Needs redis-py (bench/requirements-client-models.txt) and
redis-server.
"""
import os, subprocess, sys

from scratch_redis import start

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rev = sys.argv[1] if len(sys.argv) > 1 else '9bf6780'
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 12
scripts = {
    rev: subprocess.run(['git', '-C', root, 'show', f'{rev}:src/fence/fence.lua'],
                        check=True, capture_output=True, text=True).stdout,
    'working tree': open(os.path.join(root, 'src/fence/fence.lua')).read(),
}
p, r = start()
N, BATCH = 20000, 1000


class Script:
    """One fence.lua version and the argument layout it takes."""

    def __init__(self, source):
        self.sha = r.script_load(source)
        # Since #14 a plain SET is judged in the script (`op == 'set'`).
        self.judges_set = "op == 'set'" in source
        # Since #17 the value goes once: the script finds it in the command.
        self.value_by_position = 'where the value is' in source

    def miss(self, pipe, k, f, i):
        if self.judges_set:
            pipe.evalsha(self.sha, 2, k, f, 'miss', 11000, f'inst:1:{i}', 200, 'wait',
                         f'm|127.0.0.1|inst:1|{i}', 10000000, 'inst:1:')
        else:
            pipe.evalsha(self.sha, 2, k, f, 'miss', 11000, 'inst:1', 200, 'wait')

    def fill(self, pipe, k, f, miss, value):
        if self.judges_set:
            at = 2 if self.value_by_position else value
            pipe.evalsha(self.sha, 2, k, f, 'set', 11000, 'm|127.0.0.1|', 10000000, 0, 0, 0, 0,
                         'write', 0, at, 2, 'EX', 60, 'SET', k, value, 'EX', 60)
        else:
            pipe.evalsha(self.sha, 2, k, f, 'fill', 11000, miss[1], miss[3], 0, 0, 0, 'inst:1',
                         10000000, value, 'EX', 60)


def cpu():
    info = r.info('cpu')
    return info['used_cpu_user'] + info['used_cpu_sys']


def batches(send, label):
    """Runs send(pipe, i) for N keys in pipelines of BATCH; the replies."""
    out = []
    for start in range(0, N, BATCH):
        pipe = r.pipeline(transaction=False)
        for i in range(start, start + BATCH):
            send(pipe, i)
        out.extend(pipe.execute())
    return out


def measure(name, rnd):
    """(µs per miss, µs per fill, Redis CPU µs per pair) for one round."""
    value = 'v' * 100
    keys = [f'user:{name}:{rnd}:{i}' for i in range(N)]
    fences = ['cachefence:{' + k + '}' for k in keys]
    r.config_resetstat()
    before = cpu()
    if name == 'plain':
        batches(lambda pipe, i: pipe.get(keys[i]), name)
        batches(lambda pipe, i: pipe.set(keys[i], value, ex=60), name)
        stats = r.info('commandstats')
        per = lambda c: stats.get(f'cmdstat_{c}', {}).get('usec', 0) / N
        return per('get'), per('set'), (cpu() - before) * 1e6 / N
    script = loaded[name]
    misses = batches(lambda pipe, i: script.miss(pipe, keys[i], fences[i], i + 1), name)
    miss_us = r.info('commandstats')['cmdstat_evalsha']['usec'] / N
    r.config_resetstat()
    fills = batches(lambda pipe, i: script.fill(pipe, keys[i], fences[i], misses[i], value), name)
    # Stored: `{1}` up to stop 29, `1` since (a table in a reply costs Redis).
    assert all(o in ([1], 1) for o in fills), fills[:3]
    fill_us = r.info('commandstats')['cmdstat_evalsha']['usec'] / N
    return miss_us, fill_us, (cpu() - before) * 1e6 / N


loaded = {name: Script(source) for name, source in scripts.items()}
results = {name: [] for name in ['plain', *scripts]}
for rnd in range(rounds):
    order = list(results)
    if rnd % 2:
        order.reverse()
    for name in order:
        results[name].append(measure(name, rnd))
    r.flushall()


def summary(values):
    values = sorted(values)
    return f'{values[len(values) // 2]:6.2f} (min {values[0]:6.2f})'


plain_cpu = sorted(c for _, _, c in results['plain'])[rounds // 2]
print(f'Redis cost per miss+fill pair, median (min) of {rounds} rounds of {N} pairs')
print(f'{"":28s} {"miss µs":>18s} {"fill µs":>18s} {"Redis CPU µs/pair":>20s} {"CPU / plain":>12s}')
for name, rows in results.items():
    label = 'plain GET + SET' if name == 'plain' else f'script {name}'
    cpus = [c for _, _, c in rows]
    ratio = sorted(cpus)[rounds // 2] / plain_cpu
    print(f'{label:28s} {summary([m for m, _, _ in rows]):>18s} {summary([f for _, f, _ in rows]):>18s}'
          f' {summary(cpus):>20s} {ratio:12.2f}')

# Pipelined writes as one batch call (#17): Redis time per SET (no fence
# on the key, on_write = write) inside 16-SET batches of the working tree's
# script, against plain SET, from commandstats.
def batch_call(ops):
    """script.rs `batch`: shapes, then each op's arguments not shared."""
    keys, own, shapes, previous = [], [], [], []
    for op_keys, args in ops:
        args = [str(a) for a in args]
        shared = 0
        while shared < min(len(previous), len(args)) and previous[shared] == args[shared]:
            shared += 1
        shapes.append(str(len(op_keys) * 10**8 + len(args) * 10**4 + shared))
        keys += op_keys
        own += args[shared:]
        previous = args
    return keys, ['batch', str(len(ops)), *shapes, *own]


if 'batch' in scripts['working tree']:
    sha = loaded['working tree'].sha

    def send_batch(pipe, prefix, b):
        """Batch b: one script call with the 16 SETs of keys prefix:<16b..16b+15>."""
        ops = []
        for j in range(16):
            k = f'{prefix}:{b * 16 + j}'
            ops.append(([k, 'cachefence:{' + k + '}'],
                        ['set', 11000, 'm|127.0.0.1|', 10000000, 0, 0, 0, 0, 'write', 0, 2, 0, 'SET', k, 'xxx']))
        keys, args = batch_call(ops)
        pipe.evalsha(sha, len(keys), *keys, *args)

    per_set = {'batch of 16': [], 'plain SET': []}
    for rnd in range(rounds):
        r.flushall()
        r.config_resetstat()
        pipe = r.pipeline(transaction=False)
        for b in range(N // 16):
            send_batch(pipe, f'w:{rnd}', b)
        pipe.execute()
        per_set['batch of 16'].append(r.info('commandstats')['cmdstat_evalsha']['usec'] / N)
        r.config_resetstat()
        pipe = r.pipeline(transaction=False)
        for i in range(N):
            pipe.set(f'w:{rnd}:{i}', 'xxx')
        pipe.execute()
        per_set['plain SET'].append(r.info('commandstats')['cmdstat_set']['usec'] / N)
    for name, values in per_set.items():
        print(f'Redis µs per SET, {name:12s}: {summary(values)}')

    # Redis' whole CPU per SET (parsing and replies included), in pipelines
    # of 16-SET batches: the batch script; plain SETs; and the design #17
    # left for later, one MGET of the batch's fences, then the plain SETs
    # of the keys without one (none here have one).
    def batch_script(pipe, rnd, b):
        send_batch(pipe, f'c:{rnd}', b)

    def plain(pipe, rnd, b):
        for j in range(16):
            pipe.set(f'c:{rnd}:{b * 16 + j}', 'xxx')

    def check_then_set(pipe, rnd, b):
        pipe.mget(['cachefence:{' + f'c:{rnd}:{b * 16 + j}' + '}' for j in range(16)])
        plain(pipe, rnd, b)

    ways = {'plain SET': plain, 'batch script': batch_script, 'MGET fences + SET': check_then_set}
    cpu_per_set = {name: [] for name in ways}
    for rnd in range(rounds):
        for name, send in ways.items():
            r.flushall()
            before = cpu()
            for start in range(0, N // 16, BATCH // 16):
                pipe = r.pipeline(transaction=False)
                for b in range(start, min(start + BATCH // 16, N // 16)):
                    send(pipe, rnd, b)
                pipe.execute()
            cpu_per_set[name].append((cpu() - before) * 1e6 / N)
    plain_cpu_set = sorted(cpu_per_set['plain SET'])[rounds // 2]
    for name, values in cpu_per_set.items():
        ratio = sorted(values)[rounds // 2] / plain_cpu_set
        print(f'Redis CPU µs per SET, {name:18s}: {summary(values)}  ({ratio:.2f} x plain)')

# The fence's bytes: with one miss outstanding, and after the fill.
r.flushall()
for name, script in loaded.items():
    k = f'user:mem:{name.replace(" ", "-")}'
    f = 'cachefence:{' + k + '}'
    pipe = r.pipeline(transaction=False)
    script.miss(pipe, k, f, 1)
    miss = pipe.execute()[0]
    outstanding = r.memory_usage(f)
    pipe = r.pipeline(transaction=False)
    script.fill(pipe, k, f, miss, 'v')
    pipe.execute()
    after = r.memory_usage(f) if r.exists(f) else 0
    print(f'script {name}: fence bytes (MEMORY USAGE) with a miss outstanding {outstanding}, '
          f'after the fill {after}; the key itself {r.memory_usage(k)}')
p.terminate()
