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

const Redis = require("ioredis");

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error("usage: node r1.js PORT");
  process.exit(2);
}
const options = {
  host: "127.0.0.1",
  port,
  maxRetriesPerRequest: 0,
  retryStrategy: () => null,
  connectTimeout: 5000,
  commandTimeout: 10000,
};

// The database stand-in.
const db = { x: "1" };

// Steps run in a fixed order across the concurrent requests: `turn(n)`
// resolves once steps 0..n-1 are done; `done()` ends the current step.
let step = 0;
const waiting = [];
function turn(n) {
  return new Promise((resolve) => {
    waiting.push({ n, resolve });
    wake();
  });
}
function done() {
  step += 1;
  wake();
}
function wake() {
  for (const w of waiting.filter((w) => w.n === step)) {
    waiting.splice(waiting.indexOf(w), 1);
    w.resolve();
  }
}

function expect(what, got, want) {
  if (got !== want) {
    throw new Error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
}

async function main() {
  const shared = new Redis(options); // requests A and B
  const writer = new Redis(options); // W
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
  const timeout = setTimeout(() => {
    console.error(`timed out at step ${step}`);
    process.exit(1);
  }, 20000);
  await Promise.all([requestA, writeW, requestB]);
  const value = await writer.get("user:x");
  clearTimeout(timeout);
  console.log(JSON.stringify(value));
  shared.disconnect();
  writer.disconnect();
}

main().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
