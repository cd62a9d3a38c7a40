// Drives a server on 127.0.0.1:PORT: trivial POST latency / throughput, concurrent SSE streams,
// and a request the client abandons.
import http from 'node:http';
const port = Number(process.argv[2]);
const agent = new http.Agent({ keepAlive: true, maxSockets: 1000 });
function post() {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const req = http.request({ port, host: '127.0.0.1', path: '/ping', method: 'POST', agent,
      headers: { 'content-type': 'application/json' } }, res => {
      res.resume(); res.on('end', () => resolve(Number(process.hrtime.bigint() - t0) / 1e6));
    });
    req.on('error', reject); req.end('{"prompt":"hello","max_tokens":16}');
  });
}
const pct = (a, p) => a[Math.min(a.length - 1, Math.floor(a.length * p))];
async function load(concurrency, total) {
  const lat = []; let next = 0; const t0 = Date.now();
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (next++ < total) lat.push(await post());
  }));
  const secs = (Date.now() - t0) / 1000; lat.sort((a, b) => a - b);
  console.log(`c=${concurrency} n=${total}: ${(total / secs).toFixed(0)} req/s, p50 ${pct(lat, .5).toFixed(3)} ms, p99 ${pct(lat, .99).toFixed(3)} ms`);
}
function stream() {
  return new Promise((resolve, reject) => {
    const t0 = Date.now(); let first = -1;
    http.get({ port, host: '127.0.0.1', path: '/stream', agent: false }, res => {
      let body = '';
      res.on('data', d => { if (first < 0) first = Date.now() - t0; body += d; });
      res.on('end', () => resolve({ first, total: Date.now() - t0, done: body.includes('[DONE]') }));
    }).on('error', reject);
  });
}
await load(1, 3000);
await load(32, 20000);
agent.destroy();  // idle keep-alive sockets would hold a thread each
for (const n of [8, 64]) {
  const t0 = Date.now();
  const r = await Promise.all(Array.from({ length: n }, stream));
  const firsts = r.map(x => x.first).sort((a, b) => a - b);
  console.log(`${n} streams of 20 events x 50 ms: wall ${Date.now() - t0} ms, first event p50 ${pct(firsts, .5)} ms max ${firsts[firsts.length - 1]} ms, all done: ${r.every(x => x.done)}`);
}
// Abandon a held request after 100 ms.
await new Promise(resolve => {
  const req = http.get({ port, host: '127.0.0.1', path: '/hold', agent: false });
  req.on('error', () => resolve());
  setTimeout(() => { req.destroy(); resolve(); }, 100);
});
await new Promise(r => setTimeout(r, 3500));
