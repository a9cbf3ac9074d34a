"""A scratch redis-server for the Python benchmarks: a free loopback port,
nothing saved, pinned to CPU 0 when `taskset` is there. Needs redis-py
(bench/requirements-client-models.txt) and redis-server."""
import shutil, socket, subprocess, sys, time

import redis


def start():
    """(the server process, a client of it); exits if it does not answer."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    pin = ['taskset', '-c', '0'] if shutil.which('taskset') else []
    process = subprocess.Popen(pin + ['redis-server', '--bind', '127.0.0.1', '--port', str(port),
                                      '--save', '', '--appendonly', 'no'], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(50):
        try:
            client.ping()
            return process, client
        except redis.ConnectionError:
            time.sleep(0.1)
    process.terminate()
    sys.exit('redis-server did not start')
