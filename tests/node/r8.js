// R8 (stampede) through ONE ioredis client shared by every request. Usage:
// node r8.js PORT READERS. READERS requests GET user:x at once; each that
// gets nil counts a database read, takes it (200 ms) and fills "from-db".
// Prints {"reads": n, "got": [what each GET got]}. Against plain Redis every
// reader reads the database; through cachefence with `hold` one does and
// the others are answered with its fill.
"use strict";

const { port, sleep, run } = require("./lib");

const target = port("r8.js PORT READERS");
const readers = Number(process.argv[3]);
if (!Number.isInteger(readers) || readers <= 0 || readers > 1000) {
  console.error("usage: node r8.js PORT READERS (1..1000)");
  process.exit(2);
}

run(target, async (redis) => {
  // Connected, and pipelined once, before the readers start together: a
  // long-lived shared client has carried concurrent requests before, and
  // until it has, cachefence treats its connection as used one request at
  // a time (misses never wait for a leader on it; docs/consistency.md).
  // One pipeline is one write: four separate pings could reach the proxy
  // one at a time on a loaded machine, each answered before the next (a
  // CI run saw six readers go to the database that way).
  const warm = await redis.pipeline().ping().ping().ping().ping().exec();
  if (warm.some(([error, pong]) => error || pong !== "PONG")) {
    throw new Error(`warm-up pings failed: ${JSON.stringify(warm)}`);
  }
  let reads = 0;
  const reader = async () => {
    const got = await redis.get("user:x");
    if (got === null) {
      reads += 1;
      await sleep(200);
      await redis.set("user:x", "from-db", "EX", 60);
    }
    return got;
  };
  const got = await Promise.all(Array.from({ length: readers }, reader));
  return { reads, got };
});
