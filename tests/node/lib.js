// Shared by the race scripts (r1.js, lag.js, r7.js, r8.js): one ioredis
// client for all the concurrent requests of a script, the step-ordering
// helper, and a bounded run that prints the script's result as JSON.
"use strict";

const Redis = require("ioredis");

// The first argument is the port of plain Redis or cachefence on loopback.
function port(usage) {
  const port = Number(process.argv[2]);
  if (!Number.isInteger(port) || port <= 0) {
    console.error(`usage: node ${usage}`);
    process.exit(2);
  }
  return port;
}

// One ioredis client: it multiplexes every command on one connection. The
// command timeout stays above cachefence's herd hold (2 s in R8).
function client(port) {
  return new Redis({
    host: "127.0.0.1",
    port,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
    connectTimeout: 5000,
    commandTimeout: 10000,
  });
}

// Steps run in a fixed order across the concurrent requests: `turn(n)`
// resolves once steps 0..n-1 are done; `done()` ends the current step.
function turns() {
  let step = 0;
  const waiting = [];
  function wake() {
    for (const w of waiting.filter((w) => w.n === step)) {
      waiting.splice(waiting.indexOf(w), 1);
      w.resolve();
    }
  }
  return {
    turn(n) {
      return new Promise((resolve) => {
        waiting.push({ n, resolve });
        wake();
      });
    },
    done() {
      step += 1;
      wake();
    },
    get step() {
      return step;
    },
  };
}

function expect(what, got, want) {
  if (got !== want) {
    throw new Error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Runs `script(redis)` with one shared client, for at most 20 s; prints
// what it returns as JSON and exits 0, or exits 1 on failure or timeout.
// `where()`, if given, says after "timed out" where the script was stuck.
function run(port, script, where = () => "") {
  const redis = client(port);
  const timeout = setTimeout(() => {
    console.error(`timed out${where()}`);
    process.exit(1);
  }, 20000);
  script(redis)
    .then((result) => {
      clearTimeout(timeout);
      console.log(JSON.stringify(result));
      redis.disconnect();
    })
    .catch((e) => {
      console.error(e.stack || String(e));
      process.exit(1);
    });
}

module.exports = { port, client, turns, expect, sleep, run };
