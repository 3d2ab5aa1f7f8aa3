// The dashboard: signs in once per tab, then shows the queue (counts, throughput, workers, jobs), one job
// (stages, progress, errors, logs, AI usage, results) and the pipelines (their DAGs), all from this API.

import { token, get, post, download, follow, AuthRequired, ApiFailure } from './api.js';
import { drawMermaid } from './graph.js';

const POLL_MS = 2000;
const FINAL = new Set(['completed', 'failed', 'cancelled']);
const STATES = ['waiting', 'delayed', 'active', 'completed', 'failed', 'cancelled'];

const $ = (id) => document.getElementById(id);
let session = null; // `{ canWrite, owner, authConfigured }` once signed in
let leave = () => {}; // stops the current view's timers and streams

/** An element: `h('p', { class: 'x' }, 'text', child)`; text is always text, never HTML. */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === false || value === null || value === undefined) continue;
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'hidden') node.hidden = Boolean(value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

const stateWord = (state) => h('span', { class: `state state-${state}`, 'data-state': state }, state || 'unknown');
const time = (iso) => (iso ? new Date(iso).toLocaleTimeString() : '—');
const dateTime = (iso) => (iso ? new Date(iso).toLocaleString() : '—');
const enc = encodeURIComponent;

function bar(percent, label) {
  const value = Math.max(0, Math.min(100, Math.round(percent || 0)));
  return h('span', { class: 'bar' },
    h('progress', { max: 100, value, 'aria-label': label }),
    h('span', { class: 'percent' }, `${value} %`));
}

function say(text) {
  $('status').textContent = text;
}

/** Failures of a view: a 401 brings the sign-in prompt back (and drops every shown datum), others are said. */
function failed(error) {
  if (error instanceof AuthRequired) {
    signOut(`The server refused the token: ${error.message}. Sign in again.`);
    return;
  }
  say(error instanceof ApiFailure ? `Error: ${error.message}` : `The server cannot be reached (${error.message}).`);
}

// ---------- sign in ----------

function showLogin(message) {
  leave();
  leave = () => {};
  session = null;
  $('view').replaceChildren();
  $('who').hidden = true;
  $('sign-out').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  $('token').focus();
}

function signOut(message) {
  token.clear();
  showLogin(message);
}

async function start() {
  try {
    const reply = await get('/api/session');
    session = { canWrite: reply.canWrite, owner: reply.owner || null, authConfigured: reply.authConfigured };
  } catch (error) {
    if (error instanceof AuthRequired) {
      showLogin(token.get() ? `The server refused the token: ${error.message}` : '');
      if (token.get()) token.clear();
      return;
    }
    showLogin(`The server cannot be reached: ${error.message}`);
    return;
  }
  $('login').hidden = true;
  const who = session.owner ? `Signed in as user ${session.owner}` : session.authConfigured ? 'Signed in with a service token' : 'Local access (no auth configured)';
  $('who').textContent = `${who}${session.canWrite ? '' : ' · read-only'}`;
  $('who').hidden = false;
  $('sign-out').hidden = !session.authConfigured;
  route();
}

$('login-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const value = $('token').value.trim();
  if (!value) return;
  token.set(value);
  $('token').value = '';
  start();
});
$('sign-out').addEventListener('click', () => signOut('Signed out.'));
window.addEventListener('hashchange', () => session && route());

// ---------- routing ----------

function route() {
  leave();
  leave = () => {};
  say('');
  const hash = location.hash.replace(/^#\/?/, '');
  const [view, ...rest] = hash.split('/');
  for (const link of document.querySelectorAll('nav a[data-view]')) {
    const current = link.dataset.view === (view || 'queue') || (view === 'job' && link.dataset.view === 'queue');
    if (current) link.setAttribute('aria-current', 'page'); else link.removeAttribute('aria-current');
  }
  if (view === 'job' && rest[0]) jobView(decodeURIComponent(rest[0]));
  else if (view === 'pipelines') pipelinesView();
  else queueView();
}

/** Runs `tick` now and every `ms` while the view is shown and the tab visible. */
function every(ms, tick) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    if (stopped) return;
    if (!document.hidden) await tick().catch(failed);
    if (!stopped) timer = setTimeout(run, ms);
  };
  run();
  return () => { stopped = true; clearTimeout(timer); };
}

// ---------- queue ----------

const filters = { state: '', pipeline: '', recording: '', cursor: null, previous: [] };

function queueView() {
  const paused = h('span', { id: 'queue-running' }, '…');
  // The queue as a whole (figures, workers, controls) is for service tokens; a user sees their own jobs only.
  const wholeQueue = !session.owner;
  const buttons = h('span', { class: 'toolbar', hidden: !session.canWrite || !wholeQueue },
    h('button', { type: 'button', id: 'pause', onclick: () => act('/api/queue/pause', 'Queue paused.') }, 'Pause'),
    h('button', { type: 'button', id: 'resume', hidden: true, onclick: () => act('/api/queue/resume', 'Queue resumed.') }, 'Resume'),
    h('button', { type: 'button', id: 'retry-failed', onclick: retryAllFailed }, 'Retry all failed'));
  const counts = h('dl', { class: 'counts', id: 'counts' });
  const chart = h('figure', { class: 'chart' }, h('div', { id: 'chart' }),
    h('figcaption', { id: 'chart-caption' }, 'Completed (solid line, dots) and failed (dashed line, squares) jobs per minute.'));
  const workers = h('tbody', { id: 'workers' });
  const jobs = h('tbody', { id: 'jobs' });
  const stateSelect = h('select', { id: 'filter-state', name: 'state' }, h('option', { value: '' }, 'any'),
    STATES.map((s) => h('option', { value: s, selected: filters.state === s }, s)));
  const pipelineSelect = h('select', { id: 'filter-pipeline', name: 'pipeline' }, h('option', { value: '' }, 'any'));
  const search = h('input', { id: 'filter-recording', name: 'recording', type: 'search', value: filters.recording,
    placeholder: 'recording id', spellcheck: 'false' });
  const form = h('form', { class: 'filters', role: 'search', 'aria-label': 'Filter jobs' },
    h('label', {}, 'State', stateSelect), h('label', {}, 'Pipeline', pipelineSelect),
    h('label', {}, 'Recording', search), h('button', { type: 'submit' }, 'Search'));
  const pager = h('p', { class: 'toolbar' },
    h('button', { type: 'button', id: 'first-page', hidden: true, onclick: () => page(null) }, 'First page'),
    h('button', { type: 'button', id: 'next-page', hidden: true }, 'Next page'));
  const apply = () => {
    Object.assign(filters, { state: stateSelect.value, pipeline: pipelineSelect.value, recording: search.value.trim(), cursor: null });
    refresh().catch(failed);
  };
  form.addEventListener('submit', (event) => { event.preventDefault(); apply(); });
  stateSelect.addEventListener('change', apply);
  pipelineSelect.addEventListener('change', apply);

  $('view').replaceChildren(h('section', { 'aria-labelledby': 'queue-title' },
    h('h1', { id: 'queue-title' }, wholeQueue ? 'Queue' : 'Your jobs'),
    h('div', { hidden: !wholeQueue },
      h('p', { class: 'toolbar' }, h('span', {}, 'Queue: ', paused), buttons),
      h('h2', {}, 'Jobs by state'), counts,
      h('h2', {}, 'Throughput'), chart,
      h('h2', {}, 'Workers'),
      h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, ['Host', 'PID', 'Version', 'Concurrency', 'Running', 'Last heartbeat'].map((t) => h('th', { scope: 'col' }, t)))),
        workers))),
    h('h2', { id: 'jobs-title' }, 'Jobs'), form,
    h('div', { class: 'table-wrap' }, h('table', { 'aria-labelledby': 'jobs-title' },
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Job'), h('th', { scope: 'col' }, 'State'), h('th', { scope: 'col' }, 'Pipeline'),
        h('th', { scope: 'col' }, 'Recording'), h('th', { scope: 'col' }, 'Progress'), h('th', { scope: 'col' }, 'Stage'),
        h('th', { scope: 'col', class: 'hide-narrow' }, 'Queued'))),
      jobs)),
    pager));

  get('/api/pipelines').then((reply) => {
    for (const p of pipelineList(reply)) pipelineSelect.append(h('option', { value: p.name, selected: filters.pipeline === p.name }, p.name));
  }).catch(() => {});

  async function refresh() {
    const query = new URLSearchParams();
    if (filters.state) query.set('state', filters.state);
    if (filters.pipeline) query.set('pipeline', filters.pipeline);
    if (filters.recording) query.set('recordingId', filters.recording);
    if (filters.cursor) query.set('cursor', filters.cursor);
    const [stats, list] = await Promise.all([wholeQueue ? get('/api/queue/stats') : null, get(`/api/jobs?${query}`)]);
    if (stats) showStats(stats.stats || stats);
    showJobs(list);
  }

  function page(cursor) {
    filters.cursor = cursor;
    refresh().catch(failed);
  }

  function showStats(stats) {
    paused.replaceChildren(stateWord(stats.paused ? 'paused' : 'running'));
    $('pause').hidden = Boolean(stats.paused);
    $('resume').hidden = !stats.paused;
    counts.replaceChildren(...STATES.map((s) => h('div', { 'data-count': s }, h('dt', {}, s), h('dd', {}, String(stats[s] ?? 0)))));
    $('chart').replaceChildren(throughput(stats.perMinute || []));
    const list = stats.workers || [];
    workers.replaceChildren(...(list.length ? list.map((w) => h('tr', {},
      h('td', {}, w.host), h('td', { class: 'num' }, String(w.pid)), h('td', {}, w.version),
      h('td', { class: 'num' }, String(w.concurrency)), h('td', { class: 'num' }, String(w.running)),
      h('td', {}, time(w.lastHeartbeat))))
      : [h('tr', {}, h('td', { colspan: 6 }, 'No worker has sent a heartbeat recently.'))]));
  }

  function showJobs(list) {
    const rows = (list.jobs || []).map((job) => h('tr', { 'data-job': job.jobId, 'data-state': job.state },
      h('td', {}, h('a', { href: `#/job/${enc(job.jobId)}` }, h('code', {}, job.jobId.slice(0, 8)))),
      h('td', {}, stateWord(job.state)),
      h('td', {}, job.pipeline),
      h('td', {}, job.recordingId ? h('code', {}, job.recordingId) : '—'),
      h('td', {}, bar(job.progress, `Progress of job ${job.jobId}`)),
      h('td', {}, job.stage || '—'),
      h('td', { class: 'hide-narrow' }, time(job.createdAt))));
    jobs.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: 7 }, 'No job matches.'))]));
    const next = $('next-page');
    next.hidden = !list.nextCursor;
    next.onclick = () => page(list.nextCursor);
    $('first-page').hidden = !filters.cursor;
  }

  async function act(path, done) {
    try {
      await post(path);
      say(done);
      await refresh();
    } catch (error) { failed(error); }
  }

  async function retryAllFailed() {
    try {
      const reply = await post('/api/queue/retry-failed', filters.pipeline ? { pipeline: filters.pipeline } : {});
      say(`${reply.count ?? 0} failed job(s) queued again.`);
      await refresh();
    } catch (error) { failed(error); }
  }

  leave = every(POLL_MS, refresh);
}

/** Completed and failed per minute as two lines; a solid and a dashed one so that colour is not needed. */
function throughput(minutes) {
  const W = 360, H = 110, L = 28, B = 18;
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  const add = (name, attrs, text) => {
    const node = document.createElementNS('http://www.w3.org/2000/svg', name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('role', 'img');
  const total = (key) => minutes.reduce((sum, m) => sum + (m[key] || 0), 0);
  const summary = `Last ${minutes.length} minute(s): ${total('completed')} completed, ${total('failed')} failed.`;
  svg.setAttribute('aria-label', summary);
  add('title', {}, summary);
  const top = Math.max(1, ...minutes.map((m) => Math.max(m.completed || 0, m.failed || 0)));
  add('line', { x1: L, y1: H - B, x2: W, y2: H - B, class: 'axis' });
  add('line', { x1: L, y1: 4, x2: L, y2: H - B, class: 'axis' });
  add('text', { x: 2, y: 12 }, String(top));
  add('text', { x: 2, y: H - B }, '0');
  if (minutes.length) {
    add('text', { x: L, y: H - 4 }, time(minutes[0].minute));
    add('text', { x: W - 2, y: H - 4, 'text-anchor': 'end' }, time(minutes[minutes.length - 1].minute));
  }
  const x = (i) => L + (minutes.length < 2 ? (W - L) / 2 : (i * (W - L - 4)) / (minutes.length - 1));
  const y = (v) => H - B - (v / top) * (H - B - 8);
  for (const key of ['completed', 'failed']) {
    const points = minutes.map((m, i) => `${x(i).toFixed(1)},${y(m[key] || 0).toFixed(1)}`).join(' ');
    if (points) add('polyline', { points, class: key });
    // Markers too, so a single minute shows: a filled circle for completed, a hollow square for failed.
    minutes.forEach((m, i) => (key === 'completed'
      ? add('circle', { cx: x(i), cy: y(m.completed || 0), r: 3, class: 'completed dot' })
      : add('rect', { x: x(i) - 3, y: y(m.failed || 0) - 3, width: 6, height: 6, class: 'failed' })));
  }
  return svg;
}

// ---------- one job ----------

function jobView(id) {
  const controller = new AbortController();
  const live = { events: [], stages: new Map(), history: [], lastEventId: null, status: null, following: false };
  const title = h('h1', {}, 'Job ', h('code', {}, id));
  const summary = h('dl', { class: 'facts', id: 'job-facts' });
  const progress = h('p', { id: 'job-progress', 'aria-live': 'polite' });
  const cancel = h('button', { type: 'button', id: 'cancel', class: 'danger', hidden: true, onclick: () => act('cancel') }, 'Cancel');
  const retry = h('button', { type: 'button', id: 'retry', hidden: true, onclick: () => act('retry') }, 'Retry');
  const failure = h('div', { id: 'job-error' });
  const timeline = h('ol', { class: 'timeline', id: 'timeline' });
  const history = h('ul', { id: 'history' });
  const usage = h('dl', { class: 'facts', id: 'usage' });
  const results = h('p', { class: 'toolbar', id: 'results' });
  const logs = h('pre', { class: 'log', id: 'logs', tabindex: 0, 'aria-label': 'Log lines' });
  $('view').replaceChildren(h('article', {},
    h('p', {}, h('a', { href: '#/queue' }, '← Queue')),
    title, summary, progress, h('p', { class: 'toolbar' }, cancel, retry), failure,
    h('h2', {}, 'Stages'), timeline,
    h('h2', {}, 'State changes'), history,
    h('h2', {}, 'AI usage so far'), usage,
    h('h2', {}, 'Results'), results,
    h('h2', {}, 'Log'), logs));
  let pipelineStages = [];

  async function load() {
    const reply = await get(`/api/job/${enc(id)}/status`);
    live.status = reply;
    const job = reply.job;
    if (!pipelineStages.length) {
      get(`/api/pipelines/${enc(job.pipeline)}`).then((p) => {
        pipelineStages = stagesOf(p).map((s) => s.id);
        showTimeline();
      }).catch(() => {});
    }
    showJob();
    showTimeline();
    const [logReply, usageReply] = await Promise.all([
      get(`/api/job/${enc(id)}/logs`).catch((e) => (e instanceof AuthRequired ? Promise.reject(e) : null)),
      get(`/api/job/${enc(id)}/usage`).catch((e) => (e instanceof AuthRequired ? Promise.reject(e) : null)),
    ]);
    if (logReply) logs.textContent = (logReply.logs || []).map((l) => `${time(l.at)}  ${l.line}`).join('\n') || 'No log lines.';
    if (usageReply) showUsage(usageReply.usage || usageReply);
  }

  function showJob() {
    const { job, failedStage } = live.status;
    summary.replaceChildren(
      h('dt', {}, 'State'), h('dd', { id: 'job-state' }, stateWord(job.state), job.cancelRequested && !FINAL.has(job.state) ? ' (cancel requested)' : ''),
      h('dt', {}, 'Pipeline'), h('dd', {}, h('a', { href: `#/pipelines` }, job.pipeline)),
      h('dt', {}, 'Recording'), h('dd', {}, job.recordingId ? h('code', {}, job.recordingId) : '—'),
      h('dt', {}, 'Attempts'), h('dd', {}, `${job.attempts} of ${job.maxAttempts}${job.stalls ? ` (${job.stalls} stalled)` : ''}`),
      h('dt', {}, 'Queued'), h('dd', {}, dateTime(job.createdAt)),
      h('dt', {}, 'Started'), h('dd', {}, dateTime(job.startedAt)),
      h('dt', {}, 'Ended'), h('dd', {}, dateTime(job.finishedAt)),
      h('dt', {}, 'Worker'), h('dd', {}, job.worker || '—'));
    progress.replaceChildren(bar(job.progress, 'Job progress'), ' ', h('span', { class: 'message', id: 'job-message' },
      [job.stage, job.message].filter(Boolean).join(': ')));
    cancel.hidden = !session.canWrite || FINAL.has(job.state);
    retry.hidden = !session.canWrite || !(job.state === 'failed' || job.state === 'cancelled');
    // A completed job's `error` is an earlier attempt's: the state changes below keep it.
    const heading = job.state === 'failed' || job.state === 'cancelled' ? 'Error' : 'Error of an earlier attempt';
    failure.replaceChildren(...(job.error && job.state !== 'completed' ? [h('h2', {}, heading),
      h('p', { class: 'error' }, failedStage ? `Stage ${failedStage} failed: ` : '', job.error)] : []));
    results.replaceChildren(...(job.state === 'completed' && job.recordingId ? [
      fileButton('Transcript (text)', `/api/recording/${enc(job.recordingId)}/transcript`, 'text/plain', `${job.recordingId}.txt`),
      fileButton('Subtitles (SRT)', `/api/recording/${enc(job.recordingId)}/subtitles.srt`, 'application/x-subrip', `${job.recordingId}.srt`),
      fileButton('Subtitles (VTT)', `/api/recording/${enc(job.recordingId)}/subtitles.vtt`, 'text/vtt', `${job.recordingId}.vtt`),
    ] : [h('span', {}, job.state === 'completed' ? 'This job has no recording to read results from.' : 'Results appear when the job completes.')]));
  }

  function showTimeline() {
    const reported = new Map((live.status?.stages || []).map((s) => [s.id, s]));
    const ids = [...new Set([...pipelineStages, ...reported.keys(), ...live.stages.keys()])];
    timeline.replaceChildren(...ids.map((stage) => {
      const seen = live.stages.get(stage) || {};
      const report = reported.get(stage) || {};
      const status = seen.status || report.status || 'pending';
      const facts = [];
      if (seen.start) facts.push(`started ${new Date(seen.start).toLocaleTimeString()}`);
      if (seen.end) facts.push(`ended ${new Date(seen.end).toLocaleTimeString()}`);
      const ms = report.durationMs ?? (seen.start && seen.end ? seen.end - seen.start : null);
      if (ms !== null && ms !== undefined) facts.push(`took ${(ms / 1000).toFixed(1)} s`);
      if (report.attempts) facts.push(`${report.attempts} attempt(s)${report.attempts > 1 ? `, ${report.attempts - 1} retried` : ''}`);
      return h('li', { class: `state-${status}`, 'data-stage': stage },
        h('strong', {}, stage), ' ', stateWord(status),
        h('div', { class: 'meta' }, facts.join(' · ') || 'not started'),
        report.reason ? h('div', { class: 'meta' }, `Reason: ${report.reason}`) : null);
    }));
  }

  function showUsage(u) {
    const rows = [['Audio transcribed', u.audioSeconds !== undefined ? `${Number(u.audioSeconds).toFixed(1)} s` : '—'],
      ['Prompt tokens', u.promptTokens ?? '—'], ['Completion tokens', u.completionTokens ?? '—'],
      ['AI requests', u.requests ?? '—']];
    usage.replaceChildren(...rows.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))]));
  }

  function fileButton(label, path, accept, name) {
    return h('button', { type: 'button', onclick: async () => {
      try {
        const blob = await download(path, accept);
        const url = URL.createObjectURL(blob);
        const link = h('a', { href: url, download: name });
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      } catch (error) { failed(error); }
    } }, label);
  }

  function onEvent({ id: eventId, data }) {
    if (!data) return false;
    const type = data.type;
    const at = Date.parse(data.at) || Date.now();
    if (type === 'progress' && live.status) {
      const p = data.progress || {};
      Object.assign(live.status.job, { progress: p.percent ?? live.status.job.progress, stage: p.stage ?? live.status.job.stage, message: p.message ?? '' });
      if (live.status.job.state === 'waiting' || live.status.job.state === 'delayed') live.status.job.state = 'active';
      showJob();
    } else if (type === 'stage') {
      const entry = live.stages.get(data.stage) || {};
      if (data.status === 'running') Object.assign(entry, { start: at, end: null, status: 'running' });
      else Object.assign(entry, { end: at, status: data.status });
      live.stages.set(data.stage, entry);
      showTimeline();
    } else if (type === 'state') {
      history.append(h('li', {}, `${new Date(at).toLocaleTimeString()}: `, stateWord(data.state), data.reason ? ` — ${data.reason}` : ''));
      if (live.status) { live.status.job.state = data.state; showJob(); }
      if (FINAL.has(data.state)) {
        load().catch(failed);
        return true;
      }
    }
    return false;
  }

  async function stream() {
    if (live.following || controller.signal.aborted) return;
    live.following = true;
    try {
      live.lastEventId = await follow(`/api/job/${enc(id)}/events`, onEvent, { signal: controller.signal, lastEventId: live.lastEventId });
    } catch (error) {
      if (error instanceof AuthRequired) { failed(error); return; }
      // No event stream (or it failed): poll the status instead, until the job ends.
      poll();
    } finally {
      live.following = false;
    }
  }

  let stopPoll = () => {};
  function poll() {
    stopPoll();
    stopPoll = every(POLL_MS, async () => {
      await load();
      if (FINAL.has(live.status.job.state)) stopPoll();
    });
  }

  async function act(what) {
    try {
      const reply = await post(`/api/job/${enc(id)}/${what}`);
      say(reply.message || `${what} asked.`);
      await load();
      if (what === 'retry') stream();
    } catch (error) { failed(error); }
  }

  load().then(() => { if (!FINAL.has(live.status.job.state)) stream(); }).catch(failed);
  leave = () => { controller.abort(); stopPoll(); };
}

// ---------- pipelines ----------

function pipelineList(reply) {
  const list = reply.pipelines || reply;
  return Array.isArray(list) ? list : Object.entries(list).map(([name, p]) => ({ name, ...p }));
}

function stagesOf(reply) {
  const p = reply.pipeline || reply;
  const stages = p.stages || [];
  return Array.isArray(stages) ? stages : Object.entries(stages).map(([id, s]) => ({ id, ...s }));
}

async function pipelinesView() {
  const list = h('div', { id: 'pipelines' }, h('p', {}, 'Loading…'));
  $('view').replaceChildren(h('section', { 'aria-labelledby': 'pipelines-title' },
    h('h1', { id: 'pipelines-title' }, 'Pipelines'), list));
  try {
    const names = pipelineList(await get('/api/pipelines')).map((p) => p.name);
    const details = await Promise.all(names.map((name) => get(`/api/pipelines/${enc(name)}`)));
    list.replaceChildren(...details.map((reply, i) => pipelineCard(names[i], reply)));
    if (!names.length) list.replaceChildren(h('p', {}, 'No pipeline is loaded.'));
  } catch (error) { failed(error); }
}

function pipelineCard(name, reply) {
  const p = reply.pipeline || reply;
  const stages = stagesOf(reply);
  const mermaid = p.mermaid || reply.mermaid || '';
  const slug = name.replace(/\W/g, '-');
  return h('section', { class: 'pipeline', 'data-pipeline': name, 'aria-labelledby': `p-${slug}` },
    h('h2', { id: `p-${slug}` }, name),
    p.description ? h('p', {}, p.description) : null,
    h('div', { class: 'dag' }, mermaid ? drawMermaid(mermaid, `Stages of pipeline ${name}`) : h('p', {}, 'No graph given.')),
    h('div', { class: 'table-wrap' }, h('table', {},
      h('caption', { class: 'message' }, `Stages of ${name}`),
      h('thead', {}, h('tr', {}, ['Stage', 'Kind', 'Needs', 'Parameters'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, stages.map((s) => h('tr', { 'data-stage': s.id },
        h('td', {}, h('strong', {}, s.id)),
        h('td', {}, s.uses || '—', s.kind ? h('span', { class: 'message' }, ` (${s.pluginKind ? `plugin: ${s.pluginKind}` : s.kind})`) : null),
        h('td', {}, (s.needs || []).join(', ') || '—'),
        h('td', {}, paramsOf(s))))))));
}

function paramsOf(stage) {
  const params = { ...(stage.with || {}) };
  if (stage.if) params.if = stage.if;
  if (stage.forEach) params.for_each = stage.forEach;
  if (stage.trigger && stage.trigger !== 'all_success') params.trigger = stage.trigger;
  if (stage.timeout) params.timeout = stage.timeout;
  const entries = Object.entries(params);
  if (!entries.length) return '—';
  return h('dl', { class: 'facts' }, entries.flatMap(([k, v]) => [h('dt', {}, k),
    h('dd', {}, h('code', {}, typeof v === 'string' ? v : JSON.stringify(v)))]));
}

start();
