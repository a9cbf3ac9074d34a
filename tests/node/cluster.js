// ioredis' cluster client (Redis.Cluster) pointed at cachefence in front of
// a Redis Cluster: it asks CLUSTER SLOTS, learns a one-node cluster at the
// proxy's address owning every slot, and sends everything there. Usage:
// node cluster.js PORT. Prints JSON: the masters the client knows and what
// it read back; exits 0.
"use strict";

const Redis = require("ioredis");

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error("usage: node cluster.js PORT");
  process.exit(2);
}

const timer = setTimeout(() => {
  console.error("cluster.js: no result within 20 s");
  process.exit(1);
}, 20000);

(async () => {
  const cluster = new Redis.Cluster([{ host: "127.0.0.1", port }], {
    clusterRetryStrategy: () => null,
    redisOptions: { maxRetriesPerRequest: 0, connectTimeout: 5000, commandTimeout: 10000 },
  });
  cluster.on("node error", (e) => console.error("node error", e.message));
  await new Promise((resolve, reject) => {
    cluster.once("ready", resolve);
    cluster.once("error", reject);
  });
  const masters = cluster.nodes("master").map((n) => `${n.options.host}:${n.options.port}`);
  const keys = Array.from({ length: 20 }, (_, i) => `ioredis:${i}`);
  for (const key of keys) {
    if ((await cluster.set(key, `v-${key}`)) !== "OK") throw new Error(`SET ${key}`);
  }
  const values = [];
  for (const key of keys) values.push(await cluster.get(key));
  // One command, keys of many slots: a plain client's MGET, split by the proxy.
  const mget = await cluster.mget(keys[0], keys[5], "ioredis:none", keys[19]);
  const pipeline = await cluster.pipeline(keys.slice(0, 5).map((k) => ["get", k])).exec();
  await cluster.quit();
  clearTimeout(timer);
  console.log(JSON.stringify({ masters, values, mget, pipeline: pipeline.map(([e, v]) => (e ? String(e) : v)) }));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
