"""What single Lua steps cost inside Redis, the figures the fence script is
written by (#14, #17): each step runs 10 000 times in a loop inside one
EVAL on a scratch Redis (pinned to CPU 0), and the EVAL's own time from
INFO commandstats, divided by 10 000, is printed in ns (best of 5).

Usage: python3 bench/lua_costs.py   (needs redis-py,
bench/requirements-client-models.txt, and redis-server)
"""
from scratch_redis import start

STEPS = {
    'empty loop': "x = i",
    'string.format %016.0f': "x = string.format('%016.0f', now + i)",
    'string.format %.0f': "x = string.format('%.0f', now + i)",
    'concatenation + string.sub': "x = clock[1] .. string.sub('00000' .. clock[2], -6)",
    'tonumber': "x = tonumber(clock[1])",
    'tostring': "x = tostring(i)",
    'string.sub': "x = string.sub(clock[1], 1, 5)",
    'string.find (plain)': "x = string.find('1733500000000000 0000000000000000 h', ' h', 1, true)",
    'string.match, 5 captures': "x = string.match('1733500000000000 0000000000000000 1733500000200000 inst:1', "
                                "'^(%d+) (%d+) (%d+) (%S*)(.*)$')",
    'string compare (16 digits)': "x = (clock[1] .. '123456' < '1999999999999999')",
    'closure': "local function f() return now end x = f",
    'table of 5 fields': "x = {v = clock[1], t = clock[2], he = clock[1], h = '', rest = ''}",
    'table of 15 from ARGV (unpack)': "x = {unpack(ARGV, 1, 15)}",
    'pcall': "x = pcall(type, i)",
    'redis.call TIME': "x = redis.call('TIME')",
    'redis.call GET (missing key)': "x = redis.call('GET', 'nokey')",
    'redis.call SET': "x = redis.call('SET', 'k', 'v')",
}
PRELUDE = ("local clock = redis.call('TIME') "
           "local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2]) local x\n")
ARGS = [str(i) for i in range(15)]

p, r = start()
try:
    base = None
    for name, body in STEPS.items():
        script = PRELUDE + "for i = 1, 10000 do " + body + " end return 1"
        best = float('inf')
        for _ in range(5):
            r.config_resetstat()
            r.eval(script, 0, *ARGS)
            best = min(best, r.info('commandstats')['cmdstat_eval']['usec'] / 10000 * 1000)
        if base is None:
            base = best
        print(f'{name:34s} {best:8.1f} ns   ({best - base:7.1f} ns over the empty loop)')
finally:
    p.terminate()
