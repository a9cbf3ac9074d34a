// R3 (one writer) and R4 (two writers) with a lagging replica, through ONE
// ioredis client shared by every request. Usage: node lag.js PORT VALUE...
// (R3: `lag.js PORT 2`; R4: `lag.js PORT 2 3`). The order:
//   W1..Wn: the primary becomes VALUE, DEL user:x (each a request)
//   A: GET -> nil, reads the replica (still 1)
//   B: GET -> nil, reads the replica (still 1)
//   A: SET 1 EX 60;  B: SET 1 EX 60
// Prints {"primary": ..., "replica": ...}; the test reads the cache itself.
// Against plain Redis the replica's 1 stays cached for 60 s; through
// cachefence with lag_window it is refused or cut to the window.
"use strict";

const { port, turns, expect, run } = require("./lib");

const writes = process.argv.slice(3);
const target = port("lag.js PORT VALUE...");
if (writes.length === 0) {
  console.error("usage: node lag.js PORT VALUE...");
  process.exit(2);
}

run(target, async (redis) => {
  const db = { primary: "1", replica: "1" }; // replicates only after the test
  const { turn, done } = turns();
  const writers = writes.map(async (value, n) => {
    await turn(n);
    db.primary = value;
    await redis.del("user:x");
    done();
  });
  const first = writes.length;
  const readers = ["A", "B"].map(async (name, i) => {
    await turn(first + i);
    expect(`${name}: GET`, await redis.get("user:x"), null);
    const read = db.replica;
    done();
    await turn(first + 2 + i);
    expect(`${name}: SET`, await redis.set("user:x", read, "EX", 60), "OK");
    done();
  });
  await Promise.all([...writers, ...readers]);
  return db;
});
