// The JS client's HTTP polling fallback against a real server (WebSocket blocked).
// Usage: node polling_fallback.js BASE_URL API_KEY -> prints one JSON line with what it saw.
const TaskNotificationClient = require('../../static/taskpush.js');

const BASE = process.argv[2];
const API_KEY = process.argv[3];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class BlockedWebSocket {  // every attempt fails before it opens, as behind a hostile proxy
  constructor() { this.readyState = 0; setTimeout(() => this.onerror && this.onerror({}), 5); }
  close() {}
}

async function api(method, path, body, token) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const res = await fetch(BASE + path, { method, headers, body: body && JSON.stringify(body) });
  return (await res.json()).data;
}

(async () => {
  const getToken = async () => (await api('POST', '/api/demo/login', { user_id: 3 })).token;
  const token = await getToken();
  // history: more finished tasks than one poll page of the old client held
  const produce = (path, body) => fetch(BASE + path, {
    method: 'POST', headers: { 'content-type': 'application/json', 'x-api-key': API_KEY },
    body: JSON.stringify(body) });
  const events = [];
  for (let n = 0; n < 120; n += 1) {
    await produce('/api/task/tasks', { task_id: `old${n}`, user_id: 3, task_type: 'history' });
    events.push({ task_id: `old${n}`, status: 'failed', error: 'long ago' });
  }
  await produce('/api/task/events', { events });
  const old = { task_id: 'old0' };
  const running = await api('POST', '/api/demo/tasks', { kind: 'long' }, token);
  const client = new TaskNotificationClient(3, getToken, {
    baseUrl: BASE, WebSocket: BlockedWebSocket, minDelayMs: 10, maxDelayMs: 20,
    pollIntervalMs: 200,
  });
  const out = { states: [], active: [], completed: [], failed: [] };
  client.on('state', (state) => out.states.push(state));
  client.on('active_tasks', (tasks) => out.active.push(tasks.map((t) => t.task_id)));
  client.on('task_completed', (task) => out.completed.push(task.task_id));
  client.on('task_failed', (task) => out.failed.push(task.task_id));
  client.on('task_status', (task) => { if (task.task_id.startsWith('old')) out.replayed += 1; });
  out.replayed = 0;
  client.connect();
  const deadline = Date.now() + 15000;
  while (!out.active.length && Date.now() < deadline) await sleep(20);
  const quick = await api('POST', '/api/demo/tasks', { kind: 'success' }, token);
  while (!out.completed.includes(quick.task_id) && Date.now() < deadline) await sleep(50);
  out.old = old.task_id;
  out.running = running.task_id;
  out.quick = quick.task_id;
  out.known = Object.values(client.tasks).map((t) => `${t.task_id}:${t.status}`);
  client.disconnect();
  console.log(JSON.stringify(out));
})().catch((err) => { console.error(err); process.exit(1); });
