// R7 (update-on-write) through ONE ioredis client shared by every request,
// with a cache-aside reader C in the middle. Usage: node r7.js PORT.
//   A: the database becomes 1;  B: the database becomes 2
//   B: SET user:x 2 (update the cache on write)
//   C: GET; on nil reads the database (2)
//   A: SET user:x 1 (its older write, late; C's miss may be outstanding)
//   C: SET 2 EX 60, only if its GET missed
// Prints {"db": ..., "c_got": ...}; the test reads the cache itself.
// Against plain Redis C hits B's 2 and A's 1 stays (stale); through
// cachefence with on_write = "invalidate" it must not.
"use strict";

const { port, turns, run } = require("./lib");

run(port("r7.js PORT"), async (redis) => {
  const db = {};
  const { turn, done } = turns();
  const writerA = (async () => {
    await turn(0);
    db.x = "1";
    done();
    await turn(4);
    await redis.set("user:x", "1");
    done();
  })();
  const writerB = (async () => {
    await turn(1);
    db.x = "2";
    done();
    await turn(2);
    await redis.set("user:x", "2");
    done();
  })();
  const readerC = (async () => {
    await turn(3);
    const got = await redis.get("user:x");
    const read = db.x;
    done();
    await turn(5);
    if (got === null) {
      await redis.set("user:x", read, "EX", 60);
    }
    done();
    return got;
  })();
  const [, , cGot] = await Promise.all([writerA, writerB, readerC]);
  return { db: db.x, c_got: cGot };
});
