"""Redis CPU per miss+fill pair of the fence script: an older version (a
git revision's src/fence/fence.lua) against the working tree's, in the same
run on one scratch Redis, from INFO commandstats; plus the fence's bytes
after a fill. No proxy involved: this is the script's own cost (#14, #17).

Usage: python3 bench/fence_script_cost.py [REV]   (default REV: 9bf6780,
the script before outstanding misses moved into the fence). Needs redis-py
(bench/requirements-client-models.txt) and redis-server.
"""
import os, socket, subprocess, sys, time

import redis

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rev = sys.argv[1] if len(sys.argv) > 1 else '9bf6780'
old = subprocess.run(['git', '-C', root, 'show', f'{rev}:src/fence/fence.lua'],
                     check=True, capture_output=True, text=True).stdout
new = open(os.path.join(root, 'src/fence/fence.lua')).read()
with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
p = subprocess.Popen(['redis-server', '--bind', '127.0.0.1', '--port', str(port), '--save', '', '--appendonly', 'no'],
                     stdout=subprocess.DEVNULL)
r = redis.Redis(port=port)
for _ in range(50):
    try:
        r.ping()
        break
    except redis.ConnectionError:
        time.sleep(0.1)
sha_old = r.script_load(old); sha_new = r.script_load(new)
N = 20000
def run(kind, rounds):
    r.config_resetstat()
    pipe = r.pipeline(transaction=False)
    for i in range(N):
        k = f'user:{kind}:{rounds}:{i}'; f = 'cachefence:{' + k + '}'
        if kind == 'old':
            pipe.evalsha(sha_old, 2, k, f, 'miss', 11000, 'inst:1', 200, 'wait')
        else:
            pipe.evalsha(sha_new, 2, k, f, 'miss', 11000, f'inst:1:{i+1}', 200, 'wait', f'm|127.0.0.1|inst:1|{i+1}', 10000000, 'inst:1:')
    res = pipe.execute()
    pipe = r.pipeline(transaction=False)
    for i in range(N):
        k = f'user:{kind}:{rounds}:{i}'; f = 'cachefence:{' + k + '}'
        version, miss_us = res[i][1], res[i][3]
        if kind == 'old':
            pipe.evalsha(sha_old, 2, k, f, 'fill', 11000, version, miss_us, 0, 0, 0, 'inst:1', 10000000, 'v' * 100, 'EX', 60)
        else:
            pipe.evalsha(sha_new, 2, k, f, 'set', 11000, 'm|127.0.0.1|', 10000000, 0, 0, 0, 0, 'write', 0, 'v' * 100, 2, 'EX', 60, 'SET', k, 'v' * 100, 'EX', 60)
    out = pipe.execute()
    assert all(o == [1] for o in out), out[:3]
    s = r.info('commandstats')['cmdstat_evalsha']
    return s['usec'] / N, s['calls']
results = {'old': [], 'new': []}
for rnd in range(8):
    for kind in (['old', 'new'] if rnd % 2 == 0 else ['new', 'old']):
        usec, calls = run(kind, rnd)
        results[kind].append(usec)
for kind, v in results.items():
    v.sort()
    print(f'{kind} ({rev if kind == "old" else "working tree"}): Redis µs per miss+fill pair: '
          f'median {v[len(v) // 2]:.2f}, min {v[0]:.2f}, all {[round(x, 2) for x in v]}')
# bytes per fenced key after a fill
r.flushall()
for kind in ('old', 'new'):
    k = f'user:mem:{kind}'; f = 'cachefence:{' + k + '}'
    if kind == 'old':
        m = r.evalsha(sha_old, 2, k, f, 'miss', 11000, 'inst:1', 200, 'wait')
        r.evalsha(sha_old, 2, k, f, 'fill', 11000, m[1], m[3], 0, 0, 0, 'inst:1', 10000000, 'v', 'EX', 60)
    else:
        m = r.evalsha(sha_new, 2, k, f, 'miss', 11000, 'inst:1:1', 200, 'wait', 'm|127.0.0.1|inst:1|1', 10000000, 'inst:1:')
        r.evalsha(sha_new, 2, k, f, 'set', 11000, 'm|127.0.0.1|', 10000000, 0, 0, 0, 0, 'write', 0, 'v', 2, 'EX', 60, 'SET', k, 'v', 'EX', 60)
    print(kind, 'fence bytes (MEMORY USAGE) after miss+fill:', r.memory_usage(f), 'fields:', r.hlen(f))
p.terminate()
