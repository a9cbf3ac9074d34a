// R1 (read/write race) through ONE ioredis client, the way an application
// shares it between concurrent requests (ioredis multiplexes every command
// on one connection). Usage: node r1.js PORT. Prints the cached value of
// user:x at the end as JSON (null when absent) and exits 0.
//
// The interleaving is the mux sequence of issue 14:
//   A: GET on X -> nil, reads the database (1)
//   W: the database becomes 2, DEL (a writer on its own client)
//   B: GET on X -> nil, reads the database (2)
//   B: SET 2 on X;  A: SET 1 on X
// Against plain Redis the cache ends "1" (stale); through cachefence it
// must not.
"use strict";

const { port, client, turns, expect, run } = require("./lib");

const target = port("r1.js PORT");

// The database stand-in.
const db = { x: "1" };

const t = turns();
const { turn, done } = t;

// `shared` (requests A and B) is run's client; W writes on its own.
run(
  target,
  async (shared) => {
    const writer = client(target); // W
    const requestA = (async () => {
      await turn(0);
      expect("A: GET", await shared.get("user:x"), null);
      const read = db.x;
      done();
      await turn(4);
      expect("A: SET", await shared.set("user:x", read, "EX", 60), "OK");
      done();
    })();
    const writeW = (async () => {
      await turn(1);
      db.x = "2";
      await writer.del("user:x");
      done();
    })();
    const requestB = (async () => {
      await turn(2);
      expect("B: GET", await shared.get("user:x"), null);
      const read = db.x;
      done();
      await turn(3);
      expect("B: SET", await shared.set("user:x", read, "EX", 60), "OK");
      done();
    })();
    await Promise.all([requestA, writeW, requestB]);
    const value = await writer.get("user:x");
    writer.disconnect();
    return value;
  },
  () => ` at step ${t.step}`,
);
