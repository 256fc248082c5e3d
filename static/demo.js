/* taskpush demo page: log in (demo mode), start simulated tasks, watch them live. */
(function () {
  'use strict';

  const Client = window.TaskNotificationClient;
  const SESSION_KEY = 'taskpush.demo.session';
  const TRANSPORT_KEY = 'taskpush.demo.transport';
  const TRANSPORT_NAMES = { websocket: 'WebSocket', sse: 'SSE', polling: 'polling' };
  const LIST_LIMIT = 50;

  const $ = (id) => document.getElementById(id);
  const connBox = $('conn');
  const connText = $('conn-state');
  const transportText = $('conn-transport');
  const nodeText = $('conn-node');
  let nodeName = null; // cluster mode: the node holding the socket or stream (`connected`)
  const transportPick = $('transport-pick');
  const list = $('tasks');
  const empty = $('empty');
  const toastBox = $('toast');
  const starters = Array.from(document.querySelectorAll('[data-kind]'));

  let session = null; // {userId, token}
  let client = null;
  let everConnected = false;
  let reloginPromise = null;
  let toastTimer = null;
  const view = new Map(); // task_id -> latest task shown
  const cards = new Map(); // task_id -> card element

  // ---- HTTP ---------------------------------------------------------------------------

  /** Call the REST API; resolves to the envelope's `data`, rejects with its `message`. */
  async function api(method, path, body, retried) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const authed = session && path !== '/api/demo/login';
    if (authed) headers.Authorization = `Bearer ${session.token}`;
    let res;
    try {
      res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      throw new Error('Network error: the server cannot be reached');
    }
    if (res.status === 401 && authed && !retried) {
      await relogin(); // the token expired or the server's secret changed
      return api(method, path, body, true);
    }
    const text = await res.text();
    let envelope = null;
    try { envelope = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
    if (!res.ok || (envelope && envelope.code !== 0)) {
      throw new Error((envelope && envelope.message) || `${res.status} ${res.statusText || 'error'}`);
    }
    return envelope ? envelope.data : null;
  }

  async function login(userId) {
    const data = await api('POST', '/api/demo/login', { user_id: userId });
    return { userId: data.user_id != null ? data.user_id : userId, token: data.token };
  }

  /** A fresh token for the current user; concurrent callers share one request. */
  function relogin() {
    if (!session) return Promise.reject(new Error('not logged in'));
    if (!reloginPromise) {
      const userId = session.userId;
      reloginPromise = login(userId)
        .then((fresh) => {
          if (session && session.userId === userId) {
            session.token = fresh.token;
            saveSession();
          }
          return fresh.token;
        })
        .finally(() => { reloginPromise = null; });
    }
    return reloginPromise;
  }

  function saveSession() {
    try {
      if (session) sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
      else sessionStorage.removeItem(SESSION_KEY);
    } catch (_) { /* storage disabled: the session lasts as long as the page */ }
  }

  function loadSession() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || 'null');
      return saved && saved.token && saved.userId != null ? saved : null;
    } catch (_) {
      return null;
    }
  }

  // ---- session --------------------------------------------------------------------------

  function startSession(s) {
    endSession();
    session = s;
    saveSession();
    everConnected = false;
    $('login-user').value = String(s.userId);
    $('who').textContent = `Signed in as user ${s.userId}`;
    $('who').hidden = false;
    $('logout-button').hidden = false;
    starters.forEach((b) => { b.disabled = false; });
    renderEmpty(); // 'No tasks yet' until the list says otherwise

    let first = true; // the stored token first; later calls mean "this one is used up"
    const getToken = () => {
      if (first) {
        first = false;
        return session.token;
      }
      return relogin();
    };
    let storage = null;
    try { storage = window.sessionStorage; } catch (_) { /* disabled */ }
    // The switch: auto (WebSocket, then SSE, then polling), or one transport only.
    const pick = transportPick.value;
    const transports = pick === 'auto' ? undefined : [pick];
    const c = new Client(s.userId, getToken, { storage, transports });
    client = c;
    c.on('transport', renderConn);
    // Seed from the client's cache (kept in sessionStorage across reloads).
    Object.values(c.tasks).forEach(upsert);
    c.on('state', renderConn);
    c.on('connected', (msg) => {
      if (everConnected) loadList(); // back after a drop: reconcile (e.g. deletions)
      everConnected = true;
      nodeName = (msg && typeof msg.node === 'string') ? msg.node : null;
      renderConn();
    });
    c.on('active_tasks', (tasks) => tasks.forEach(upsert));
    c.on('task_status', upsert);
    c.on('task_deleted', (msg) => removeTask(msg.task_id));
    c.on('resync', () => {
      // The server's database was replaced: start over from what it sends now.
      view.clear();
      cards.forEach((card) => card.remove());
      cards.clear();
      Object.values(c.tasks).forEach(upsert);
      renderEmpty();
      loadList();
    });
    c.on('disconnected', (d) => {
      if (client !== c || d.willReconnect || d.code === 1000) return;
      if (d.code === 4403) toast('This token may not watch that user. Log in again.');
      else if (d.code === 4401) toast('Session expired. Log in again.');
      else if (d.code === 4409) toast('Too many open tabs for this user; this one paused.', 'info');
    });
    c.on('error', (err) => {
      if (client !== c) return;
      if (err && err.type === 'error') toast(`Server: ${err.message || err.code}`);
      else console.warn('taskpush:', err); // transport trouble shows in the indicator
    });
    renderConn();
    c.connect();
    loadList();
  }

  function endSession() {
    if (client) client.disconnect();
    client = null;
    session = null;
    view.clear();
    cards.forEach((card) => card.remove());
    cards.clear();
    $('who').hidden = true;
    $('logout-button').hidden = true;
    starters.forEach((b) => { b.disabled = true; });
    renderConn();
    renderEmpty();
  }

  /** Finished tasks from before, and a reconciliation after being away. */
  async function loadList() {
    const c = client;
    let data;
    try {
      data = await api('GET', `/api/task/tasks?limit=${LIST_LIMIT}`);
    } catch (err) {
      if (client === c) toast(`Could not load tasks: ${err.message}`);
      return;
    }
    if (client !== c || !data) return;
    const tasks = Array.isArray(data.tasks) ? data.tasks : [];
    tasks.forEach(upsert);
    if (data.next_before == null && tasks.length < LIST_LIMIT) {
      // The list is complete: a task we show that it lacks was deleted meanwhile
      // (unless it is newer than the list itself).
      const ids = new Set(tasks.map((t) => t.task_id));
      const top = Math.max(0, ...tasks.map((t) => t.seq || 0));
      for (const [id, task] of view) if (!ids.has(id) && (task.seq || 0) <= top) removeTask(id);
    }
  }

  // ---- task view ------------------------------------------------------------------------

  function upsert(task) {
    if (!task || task.task_id == null) return;
    const prev = view.get(task.task_id);
    if (prev && typeof prev.seq === 'number' && typeof task.seq === 'number' && task.seq <= prev.seq) return;
    view.set(task.task_id, task);
    let card = cards.get(task.task_id);
    if (!card) {
      card = buildCard(task.task_id);
      cards.set(task.task_id, card);
      card.dataset.created = String(timeOf(task.created_at));
      placeCard(card);
    }
    updateCard(card, task);
    renderEmpty();
  }

  function removeTask(taskId) {
    view.delete(taskId);
    const card = cards.get(taskId);
    if (card) card.remove();
    cards.delete(taskId);
    renderEmpty();
  }

  function timeOf(iso) {
    const t = Date.parse(iso);
    return Number.isNaN(t) ? 0 : t;
  }

  /** Newest first by created_at. */
  function placeCard(card) {
    const created = Number(card.dataset.created);
    for (const other of list.children) {
      if (Number(other.dataset.created) < created) return list.insertBefore(card, other);
    }
    list.appendChild(card);
  }

  function el(tag, className, attrs) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  function buildCard(taskId) {
    const card = el('article', 'card', { 'data-testid': 'task-card', 'data-task-id': taskId });
    const head = el('div', 'card-head');
    const title = el('div', 'card-title');
    const type = el('span', 'type');
    const id = el('code', 'id');
    id.textContent = taskId;
    title.append(type, id);
    const badge = el('span', 'badge', { 'data-testid': 'status' });
    head.append(title, badge);
    const row = el('div', 'progress-row');
    const bar = el('div', 'bar', {
      'data-testid': 'progress', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100',
      'aria-label': 'Progress',
    });
    const fill = el('div', 'fill');
    bar.append(fill);
    const pct = el('span', 'pct');
    row.append(bar, pct);
    const step = el('p', 'step', { 'data-testid': 'step' });
    const message = el('p', 'message', { 'data-testid': 'message' });
    const foot = el('div', 'card-foot');
    const time = el('time');
    const actions = el('div', 'actions');
    foot.append(time, actions);
    card.append(head, row, step, message, foot);
    card._parts = { type, badge, bar, fill, pct, step, message, foot, time, actions };
    return card;
  }

  function updateCard(card, task) {
    const p = card._parts;
    const status = String(task.status || 'pending');
    const progress = Math.max(0, Math.min(100, Number(task.progress) || 0));
    const terminal = Client.isTerminal(status);
    card.dataset.status = status;
    p.type.textContent = task.task_type || 'task';
    p.badge.textContent = status;
    p.bar.dataset.progress = String(progress);
    p.bar.setAttribute('aria-valuenow', String(progress));
    p.fill.style.width = `${progress}%`;
    p.pct.textContent = `${Math.round(progress)}%`;
    p.step.textContent = task.step || '';
    p.message.textContent = task.message || '';
    const stamp = task.updated_at || task.created_at;
    p.time.dateTime = stamp || '';
    p.time.textContent = stamp ? new Date(stamp).toLocaleTimeString() : '';

    setSlot(card, 'note', !terminal && task.cancel_requested, () => el('p', 'note'), (n) => {
      n.textContent = 'Cancellation requested…';
    });
    setSlot(card, 'error', status === 'failed' || (terminal && task.error), () => el('p', 'error', { 'data-testid': 'error' }), (n) => {
      n.textContent = '';
      if (task.error_type) {
        const t = el('span', 'etype');
        t.textContent = `${task.error_type}: `;
        n.append(t);
      }
      n.append(document.createTextNode(task.error || 'failed'));
    });
    setSlot(card, 'result', status === 'completed', () => {
      const d = el('details', 'result', { 'data-testid': 'result' });
      d.append(el('summary'), el('pre'));
      d.firstChild.textContent = 'Result';
      return d;
    }, (d) => {
      const text = JSON.stringify(task.result === undefined ? null : task.result, null, 2);
      if (d.lastChild.textContent !== text) d.lastChild.textContent = text;
    });

    const kind = terminal ? 'delete' : 'cancel';
    if (p.actions.dataset.kind !== kind) {
      p.actions.dataset.kind = kind;
      p.actions.textContent = '';
      p.actions.append(terminal ? actionButton('delete', 'Delete', task.task_id, deleteTask)
                                : actionButton('cancel', 'Cancel', task.task_id, cancelTask));
    }
  }

  /** Show (creating it once) or remove an optional part of a card, just above its footer. */
  function setSlot(card, name, show, create, fill) {
    let node = card._parts[name];
    if (!show) {
      if (node) node.remove();
      card._parts[name] = null;
      return;
    }
    if (!node) {
      node = create();
      card._parts[name] = node;
      card.insertBefore(node, card._parts.foot);
    }
    fill(node);
  }

  function actionButton(testid, label, taskId, handler) {
    const b = el('button', testid === 'delete' ? 'danger' : '', { type: 'button', 'data-testid': testid });
    b.textContent = label;
    b.addEventListener('click', async () => {
      b.disabled = true;
      try {
        await handler(taskId);
      } catch (err) {
        toast(err.message);
      } finally {
        b.disabled = false;
      }
    });
    return b;
  }

  async function cancelTask(taskId) {
    const task = await api('POST', `/api/task/task/${encodeURIComponent(taskId)}/cancel`);
    if (task && task.task_id != null) upsert(task);
  }

  async function deleteTask(taskId) {
    await api('DELETE', `/api/task/task/${encodeURIComponent(taskId)}`);
    removeTask(taskId);
  }

  // ---- chrome ---------------------------------------------------------------------------

  function renderConn() {
    const state = client ? client.state : 'closed';
    let text = 'offline';
    if (state === 'connected') text = 'connected';
    else if (state === 'polling') text = 'polling';
    else if (state === 'connecting') text = everConnected ? 'reconnecting' : 'connecting';
    connText.textContent = text;
    connBox.dataset.state = text;
    const transport = client ? client.transport : null;
    transportText.textContent = transport ? TRANSPORT_NAMES[transport] : 'none';
    transportText.dataset.transport = transport || 'none';
    // polling is answered by whichever node the proxy picks: no node to show then
    const node = state === 'connected' && transport !== 'polling' ? nodeName : null;
    nodeText.hidden = !node;
    nodeText.textContent = node ? `node ${node}` : '';
  }

  // The transport switch: remembered for the tab; a change reconnects with the same cache.
  try { transportPick.value = sessionStorage.getItem(TRANSPORT_KEY) || 'auto'; } catch (_) { /* */ }
  transportPick.addEventListener('change', () => {
    try { sessionStorage.setItem(TRANSPORT_KEY, transportPick.value); } catch (_) { /* */ }
    if (session) startSession(session);
  });

  function renderEmpty() {
    empty.hidden = view.size > 0;
    empty.textContent = session ? 'No tasks yet. Start one above.' : 'Log in to see your tasks.';
  }

  function toast(message, kind) {
    toastBox.textContent = message;
    toastBox.dataset.kind = kind || 'error';
    toastBox.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { toastBox.hidden = true; }, 6000);
  }

  // ---- wiring ---------------------------------------------------------------------------

  $('login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const raw = $('login-user').value.trim();
    if (!/^\d+$/.test(raw)) {
      toast('The user id is a whole number, e.g. 1.');
      return;
    }
    const button = $('login-button');
    button.disabled = true;
    try {
      startSession(await login(Number(raw)));
    } catch (err) {
      toast(`Login failed: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  });

  $('logout-button').addEventListener('click', () => {
    endSession();
    saveSession();
  });

  starters.forEach((button) => {
    button.addEventListener('click', async () => {
      if (!session) return;
      button.disabled = true;
      try {
        upsert(await api('POST', '/api/demo/tasks', { kind: button.dataset.kind }));
      } catch (err) {
        toast(`Could not start the task: ${err.message}`);
      } finally {
        button.disabled = !session;
      }
    });
  });

  toastBox.addEventListener('click', () => { toastBox.hidden = true; });

  const saved = loadSession();
  if (saved) startSession(saved);
  else renderEmpty();
})();
