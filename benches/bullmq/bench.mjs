// BullMQ's side of `cargo bench --bench queue` (benches/queue.rs runs this script; see README.md, "What the
// queue costs"). The same scenarios as echo-worker's side, on the same Redis, each on its own key prefix,
// removed at the end. Every scenario prints one JSON line on stdout; progress notes go to stderr.
//
//   node bench.mjs SCENARIO '{"prefix": "...", ...}'
//
// SCENARIO: throughput | add | latency | idle | worker (the worker process the other scenarios start).
// Jobs do no I/O: the processor returns at once, or after `progress` calls to job.updateProgress.
// Every setting is BullMQ's default (lock 30 s, stalled check every 30 s, drainDelay 5 s, completed jobs kept).

import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { Queue, QueueEvents, Worker } from 'bullmq';
import IORedis from 'ioredis';

const [scenario, rawOptions] = process.argv.slice(2);
const options = JSON.parse(rawOptions ?? '{}');
const redisUrl = new URL(options.redis ?? 'redis://127.0.0.1:6379');
const connection = { host: redisUrl.hostname, port: Number(redisUrl.port || 6379) };
const prefix = options.prefix ?? `echo-bench-${process.pid}`;
const name = options.queue ?? 'noop';
const BATCH = 1000;
const POLL_MS = 10;

const note = (text) => process.stderr.write(`[bullmq] ${text}\n`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => Number(process.hrtime.bigint()) / 1e6; // ms, monotonic

function peakRssKib() {
  const status = readFileSync('/proc/self/status', 'utf8');
  const line = status.split('\n').find((l) => l.startsWith('VmHWM:'));
  return line ? Number.parseInt(line.replace(/[^0-9]/g, ''), 10) : 0;
}

function jobData(index) {
  return { pipeline: 'bench', index };
}

async function fill(queue, jobs) {
  for (let done = 0; done < jobs; done += BATCH) {
    const batch = [];
    for (let i = done; i < Math.min(jobs, done + BATCH); i++) batch.push({ name: 'noop', data: jobData(i) });
    await queue.addBulk(batch);
  }
}

/// The Redis server's CPU time so far (INFO cpu: used_cpu_user + used_cpu_sys), ms.
async function redisCpuMs() {
  const redis = new IORedis(connection);
  const info = await redis.info('cpu');
  await redis.quit();
  let seconds = 0;
  for (const line of info.split('\n')) {
    const [key, value] = line.trim().split(':');
    if (key === 'used_cpu_user' || key === 'used_cpu_sys') seconds += Number.parseFloat(value);
  }
  return Math.round(seconds * 1000);
}

async function unfinished(queue) {
  const counts = await queue.getJobCounts('wait', 'active', 'prioritized', 'delayed', 'paused', 'waiting-children');
  return Object.values(counts).reduce((sum, n) => sum + n, 0);
}

/// Deletes every key of this run's prefix.
async function clean() {
  const redis = new IORedis(connection);
  let removed = 0;
  let cursor = '0';
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
    cursor = next;
    if (keys.length > 0) removed += await redis.unlink(...keys);
  } while (cursor !== '0');
  await redis.quit();
  return removed;
}

/// A worker process (this script, role `worker`): says `ready`, starts on `go`, and on `stop` (or when stdin
/// closes) reports its peak RSS and closes.
function startWorker(concurrency, progress) {
  const child = spawn(
    process.execPath,
    [fileURLToPath(import.meta.url), 'worker', JSON.stringify({ ...options, concurrency, progress })],
    { stdio: ['pipe', 'pipe', 'inherit'] },
  );
  const lines = createInterface({ input: child.stdout });
  const pending = [];
  const queued = [];
  lines.on('line', (line) => (pending.length > 0 ? pending.shift()(line) : queued.push(line)));
  const nextLine = () =>
    queued.length > 0 ? Promise.resolve(queued.shift()) : new Promise((resolve) => pending.push(resolve));
  const exited = new Promise((resolve) => child.on('exit', resolve));
  return {
    pid: child.pid,
    ready: async () => {
      const line = await nextLine();
      if (line !== 'ready') throw new Error(`worker said ${line}`);
    },
    go: () => child.stdin.write('go\n'),
    stop: async () => {
      child.stdin.write('stop\n');
      const line = await Promise.race([nextLine(), sleep(20000).then(() => '{}')]);
      child.stdin.end();
      await Promise.race([exited, sleep(15000).then(() => child.kill('SIGKILL'))]);
      return JSON.parse(line);
    },
  };
}

async function workerRole() {
  const progress = options.progress ?? 0;
  const worker = new Worker(
    name,
    async (job) => {
      for (let step = 1; step <= progress; step++) await job.updateProgress(Math.round((step * 100) / progress));
      return { ok: true };
    },
    { connection, prefix, concurrency: options.concurrency ?? 1, autorun: false },
  );
  worker.on('error', (error) => note(`worker error: ${error.message}`));
  await worker.waitUntilReady();
  process.stdout.write('ready\n');
  const lines = createInterface({ input: process.stdin });
  let running = null;
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    const { user, system } = process.cpuUsage();
    process.stdout.write(`${JSON.stringify({ rss_kib: peakRssKib(), cpu_ms: Math.round((user + system) / 1000) })}\n`);
    await worker.close();
    await running;
    process.exit(0);
  };
  lines.on('line', (line) => {
    if (line === 'go' && !running) running = worker.run();
    if (line === 'stop') stop();
  });
  lines.on('close', stop);
}

/// Fills the queue with `jobs` jobs, then times one worker process draining it; `marks` are the numbers of
/// finished jobs at which the elapsed time is noted too.
async function throughput() {
  const { jobs, concurrency, progress = 0, marks = [] } = options;
  const queue = new Queue(name, { connection, prefix });
  const filling = now();
  await fill(queue, jobs);
  const fillSeconds = (now() - filling) / 1000;
  const worker = startWorker(concurrency, progress);
  await worker.ready();
  const redisCpu = await redisCpuMs();
  const start = now();
  worker.go();
  const marked = [];
  const pendingMarks = [...marks].sort((a, b) => a - b);
  for (;;) {
    const left = await unfinished(queue);
    const finished = jobs - left;
    while (pendingMarks.length > 0 && finished >= pendingMarks[0]) {
      marked.push({ jobs: pendingMarks.shift(), seconds: (now() - start) / 1000 });
    }
    if (left === 0) break;
    await sleep(POLL_MS);
  }
  const seconds = (now() - start) / 1000;
  const redisCpuUsed = (await redisCpuMs()) - redisCpu;
  const { rss_kib, cpu_ms } = await worker.stop();
  await queue.close();
  return {
    jobs,
    concurrency,
    progress,
    seconds,
    rate: jobs / seconds,
    fill_seconds: fillSeconds,
    marks: marked,
    rss_kib,
    cpu_ms,
    redis_cpu_ms: redisCpuUsed,
  };
}

/// Adding jobs: one `add` after another (each awaited), then `addBulk` in batches of 1,000.
async function add() {
  const { jobs } = options;
  const queue = new Queue(name, { connection, prefix });
  await queue.waitUntilReady();
  let start = now();
  for (let i = 0; i < jobs; i++) await queue.add('noop', jobData(i));
  const one = (now() - start) / 1000;
  await queue.close();
  const bulkQueue = new Queue(`${name}-bulk`, { connection, prefix });
  await bulkQueue.waitUntilReady();
  start = now();
  await fill(bulkQueue, jobs);
  const bulk = (now() - start) / 1000;
  await bulkQueue.close();
  return { jobs, one_by_one_rate: jobs / one, bulk_rate: jobs / bulk, batch: BATCH };
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/// Enqueue-to-completion latency at a steady rate, as a client sees it: from just before `add` to the
/// `completed` event (QueueEvents, a blocking read of BullMQ's event stream).
async function latency() {
  const { jobs, rate, concurrency } = options;
  const queue = new Queue(name, { connection, prefix });
  const events = new QueueEvents(name, { connection, prefix });
  await Promise.all([queue.waitUntilReady(), events.waitUntilReady()]);
  const sent = new Map();
  const done = new Map();
  let resolveAll;
  const all = new Promise((resolve) => (resolveAll = resolve));
  events.on('completed', ({ jobId }) => {
    done.set(jobId, now());
    if (done.size >= jobs) resolveAll();
  });
  const worker = startWorker(concurrency, 0);
  await worker.ready();
  worker.go();
  await sleep(500);
  const start = now();
  const adds = [];
  let next = 0;
  while (next < jobs) {
    const due = Math.min(jobs, Math.floor(((now() - start) * rate) / 1000) + 1);
    for (; next < due; next++) {
      const at = now();
      adds.push(queue.add('noop', jobData(next)).then((job) => sent.set(job.id, at)));
    }
    await sleep(1);
  }
  const sending = (now() - start) / 1000;
  await Promise.all(adds);
  await Promise.race([all, sleep(60000)]);
  const latencies = [];
  for (const [id, at] of sent) if (done.has(id)) latencies.push(done.get(id) - at);
  latencies.sort((a, b) => a - b);
  await worker.stop();
  await events.close();
  await queue.close();
  return {
    jobs,
    completed: latencies.length,
    offered_rate: jobs / sending,
    p50_ms: percentile(latencies, 50),
    p99_ms: percentile(latencies, 99),
    max_ms: latencies.length ? latencies[latencies.length - 1] : null,
  };
}

/// One idle worker: prints its pid, so that the caller can count the commands its connections send, and
/// stops when the caller writes `stop`.
async function idle() {
  const { concurrency } = options;
  const worker = startWorker(concurrency, 0);
  await worker.ready();
  worker.go();
  process.stdout.write(`${JSON.stringify({ worker_pid: worker.pid })}\n`);
  const lines = createInterface({ input: process.stdin });
  await new Promise((resolve) => {
    lines.on('line', (line) => line === 'stop' && resolve());
    lines.on('close', resolve);
  });
  const { rss_kib } = await worker.stop();
  return { rss_kib };
}

const scenarios = { throughput, add, latency, idle };

if (scenario === 'worker') {
  await workerRole();
} else if (scenarios[scenario]) {
  let result;
  try {
    result = await scenarios[scenario]();
  } finally {
    const removed = await clean();
    note(`${scenario}: removed ${removed} keys under ${prefix}:`);
  }
  process.stdout.write(`${JSON.stringify({ scenario, bullmq: pkgVersion(), ...result })}\n`);
  process.exit(0);
} else {
  process.stderr.write(`usage: node bench.mjs throughput|add|latency|idle|worker '{json options}'\n`);
  process.exit(2);
}

function pkgVersion() {
  const url = new URL('./node_modules/bullmq/package.json', import.meta.url);
  return JSON.parse(readFileSync(url, 'utf8')).version;
}
