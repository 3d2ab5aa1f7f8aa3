// The API as the page uses it: JSON calls with the tab's bearer token, downloads, and a job's server-sent
// events read with fetch() (EventSource cannot send an Authorization header, and a token never goes in a URL).

const KEY = 'echo-worker.token';

/** The token of this tab (sessionStorage: gone when the tab closes). */
export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

/** The server refused the credentials (401): the page shows the sign-in prompt. */
export class AuthRequired extends Error {}

/** Any other refusal: `status`, and the server's `{ error, code }`. */
export class ApiFailure extends Error {
  constructor(status, body, path) {
    super((body && body.error) || `the server answered ${status} to ${path}`);
    this.status = status;
    this.code = (body && body.code) || '';
    this.body = body;
  }
}

function headers(extra) {
  const all = { Accept: 'application/json', ...extra };
  const value = token.get();
  if (value) all.Authorization = `Bearer ${value}`;
  return all;
}

async function send(method, path, body, accept) {
  const init = { method, headers: headers(accept ? { Accept: accept } : {}), credentials: 'omit', cache: 'no-store' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    const refusal = await response.json().catch(() => null);
    throw new AuthRequired((refusal && refusal.error) || 'the server asks for credentials');
  }
  return response;
}

/** A JSON call; the parsed reply, or an `AuthRequired` / `ApiFailure`. */
export async function call(method, path, body) {
  const response = await send(method, path, body);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiFailure(response.status, data, path);
  return data;
}

export const get = (path) => call('GET', path);
export const post = (path, body) => call('POST', path, body);

/** A file from the API (transcript, subtitles) as a Blob, since a plain link would not carry the token. */
export async function download(path, accept) {
  const response = await send('GET', path, undefined, accept);
  if (!response.ok) throw new ApiFailure(response.status, await response.json().catch(() => null), path);
  return response.blob();
}

/** Splits a text/event-stream body into events: `{ id, event, data }` (blank-line separated, comments dropped). */
export function parseEvents(buffer) {
  const events = [];
  const blocks = buffer.replace(/\r\n?/g, '\n').split('\n\n');
  const rest = blocks.pop();
  for (const block of blocks) {
    const event = { id: null, event: 'message', data: [] };
    for (const line of block.split('\n')) {
      if (!line || line.startsWith(':')) continue;
      const at = line.indexOf(':');
      const field = at < 0 ? line : line.slice(0, at);
      const value = at < 0 ? '' : line.slice(at + 1).replace(/^ /, '');
      if (field === 'id') event.id = value;
      else if (field === 'event') event.event = value;
      else if (field === 'data') event.data.push(value);
      else if (field === 'retry' && /^\d+$/.test(value)) event.retry = Number(value);
    }
    if (event.data.length || event.id !== null) events.push({ ...event, data: event.data.join('\n') });
  }
  return { events, rest };
}

/**
 * Follows `path` (a job's events) until `onEvent` returns `true` (the job ended), `signal` aborts, or the server
 * ends the stream after the final state. Reconnects with `Last-Event-ID`, at most `MAX_RETRIES` times in a row.
 * Resolves with the last event id; rejects with `AuthRequired` or `ApiFailure` when the server refuses.
 */
export async function follow(path, onEvent, { signal, lastEventId = null } = {}) {
  const MAX_RETRIES = 8;
  let last = lastEventId;
  let wait = 1000;
  for (let failures = 0; failures <= MAX_RETRIES && !(signal && signal.aborted); ) {
    let response;
    try {
      const extra = { Accept: 'text/event-stream' };
      if (last) extra['Last-Event-ID'] = last;
      response = await fetch(path, { headers: headers(extra), credentials: 'omit', cache: 'no-store', signal });
    } catch (error) {
      if (signal && signal.aborted) return last;
      failures += 1;
      await pause(wait, signal);
      continue;
    }
    if (response.status === 401) throw new AuthRequired('the server asks for credentials');
    if (!response.ok) throw new ApiFailure(response.status, await response.json().catch(() => null), path);
    // 204: resumed after the final event; nothing more will come.
    if (response.status === 204 || !response.body) return last;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        failures = 0;
        buffer += decoder.decode(value, { stream: true });
        const { events, rest } = parseEvents(buffer);
        buffer = rest;
        for (const event of events) {
          if (event.retry) wait = event.retry;
          if (event.id) last = event.id;
          let data = null;
          try { data = event.data ? JSON.parse(event.data) : null; } catch { data = { text: event.data }; }
          if (onEvent({ id: event.id, event: event.event, data }) === true) {
            reader.cancel().catch(() => {});
            return last;
          }
        }
      }
      // The server closes the stream after the job's final state.
      return last;
    } catch (error) {
      if (signal && signal.aborted) return last;
      failures += 1;
      await pause(wait, signal);
    }
  }
  return last;
}

function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}
