/*
 * taskpush browser client: live task status over WebSocket, then Server-Sent Events where
 * WebSockets cannot connect, then HTTP polling; resume after a drop or a switch of transport
 * (`since`/`epoch`), token refresh. No dependencies.
 *
 * Loads three ways: a classic <script src="/static/taskpush.js"> (sets
 * globalThis.TaskNotificationClient), CommonJS require(), and as an ES module through
 * /static/taskpush.mjs. Usage and protocol details: docs/client.md.
 *
 * This file is the source of the npm package too: clients/js/build.mjs copies it there
 * (tests/test_js_package.py checks that the copy is identical).
 */
(function (root) {
  'use strict';

  const TERMINAL = Object.freeze(['completed', 'failed', 'cancelled']);
  const ACTIVE = Object.freeze(['pending', 'running', 'progress']);
  const TERMINAL_EVENT = { completed: 'task_completed', failed: 'task_failed', cancelled: 'task_cancelled' };
  const PASS_THROUGH = new Set(['pong', 'subscribed', 'unsubscribed', 'refreshed']);
  // Server-Sent Events named after the WebSocket's message types, plus `close` (the stream's
  // form of a close frame: {code, reason}).
  const SSE_EVENTS = ['connected', 'active_tasks', 'task_status', 'task_deleted', 'resync',
    'token_expiring', 'error', 'subscribed', 'close'];
  const TRANSPORTS = Object.freeze(['websocket', 'sse', 'polling']);
  const PROBE_EVERY = 5; // poll rounds between WebSocket/SSE attempts while polling
  const POLL_PAGE = 500; // tasks per poll answer (the server allows 1..500)
  const OPEN = 1; // WebSocket.OPEN
  const MAX_TIMER = 2 ** 31 - 1;
  const MIN_REFRESH_MS = 5000; // the least time between two token refreshes

  const DEFAULTS = {
    baseUrl: null, // default: the page's origin (http -> ws, https -> wss)
    reconnect: true,
    minDelayMs: 500,
    maxDelayMs: 30000,
    heartbeatMs: 30000,
    pollIntervalMs: 2000,
    transports: TRANSPORTS, // tried in this order; a subset turns the others off
    failuresBeforeFallback: 3, // attempts in a row that never open before the next transport
    wsFailuresBeforePolling: null, // the older name of failuresBeforeFallback (0: never fall back)
    refreshBeforeExpiryMs: 60000,
    connectTimeoutMs: 15000, // a socket not open by then counts as failed
    storage: null, // e.g. sessionStorage: keeps epoch, lastSeq and the cache across reloads
    storageKey: null, // default `taskpush:<userId>`
    WebSocket: null, // default globalThis.WebSocket (inject for Node or tests)
    EventSource: null, // default globalThis.EventSource (none in Node: SSE is skipped)
    fetch: null, // default globalThis.fetch
  };

  /** True for completed, failed and cancelled. */
  function isTerminal(status) {
    return TERMINAL.includes(status);
  }

  /** The payload of a JWT, decoded WITHOUT verification (null if it is not a JWT). */
  function decodeJwt(token) {
    try {
      let s = String(token).split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      s += '='.repeat((4 - (s.length % 4)) % 4);
      const utf8 = Array.from(atob(s), (c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0'));
      const payload = JSON.parse(decodeURIComponent(utf8.join('')));
      return payload && typeof payload === 'object' ? payload : null;
    } catch (_) {
      return null;
    }
  }

  const seqOf = (task) => (task && typeof task.seq === 'number' ? task.seq : null);

  function originBase() {
    const loc = root.location;
    return loc && loc.origin && loc.origin !== 'null' ? loc.origin : 'http://localhost:8000';
  }

  /**
   * Live task status for one user.
   * @example
   * const client = new TaskNotificationClient(42, () => fetchToken());
   * client.on('task_completed', (task) => console.log(task.result));
   * client.connect();
   */
  class TaskNotificationClient {
    /**
     * @param {number|string} userId  the user whose tasks to follow (the token's `sub`)
     * @param {string|function(): (string|Promise<string>)} tokenOrGetToken  a JWT, or a
     *   function returning one (sync or async); with a function the client refreshes itself
     * @param {object} [options]  see DEFAULTS above and docs/client.md
     */
    constructor(userId, tokenOrGetToken, options) {
      this.userId = userId;
      this.options = Object.assign({}, DEFAULTS, options || {});
      const base = String(this.options.baseUrl || originBase()).replace(/\/+$/, '');
      this._httpBase = base.replace(/^ws(s?):/i, 'http$1:');
      this._wsBase = base.replace(/^http(s?):/i, 'ws$1:');
      this._getToken = typeof tokenOrGetToken === 'function' ? tokenOrGetToken : null;
      this._token = this._getToken ? '' : tokenOrGetToken || '';
      this._needToken = !!this._getToken; // ask getToken() before the next connect
      this._handlers = new Map(); // event -> Set of handlers
      this._tasks = new Map(); // task_id -> latest task
      this._subs = new Set(); // task ids from subscribeTask()
      this._timers = {}; // name -> setTimeout id
      this._lastSeq = null;
      this._epoch = null;
      this._state = 'idle';
      this._stopped = true; // true before connect() and after disconnect() or a final close
      this._conn = null; // {kind, sock, opened, since, seq, ids, resynced}: the connection
      this._opening = this._polling = this._pollBusy = this._pollFailed = this._refreshing = false;
      this._attempt = this._failures = this._pollRound = this._lastRx = this._probes = 0;
      this._refreshedAt = 0;
      this._transport = null; // what delivers now: 'websocket' | 'sse' | 'polling' | null
      const order = (this.options.transports || TRANSPORTS).filter((t) => TRANSPORTS.includes(t));
      this._ladder = order.length ? order : TRANSPORTS.slice();
      this._rung = 0; // index in _ladder of the transport tried next
      this._storageKey = this.options.storageKey || `taskpush:${userId}`;
      this._onWake = this._onWake.bind(this);
      this._restore();
    }

    /** 'idle' | 'connecting' | 'connected' | 'polling' | 'closed' */
    get state() { return this._state; }
    /** A copy of the cache: { task_id: latest task }. */
    get tasks() { return Object.fromEntries(this._tasks); }
    /** The cached task (the same object until the task changes; do not modify it). */
    getTask(taskId) { return this._tasks.get(taskId); }
    /** The highest seq seen; sent as `since` when reconnecting. */
    get lastSeq() { return this._lastSeq; }
    /** The server database's epoch, from the last `connected` message. */
    get epoch() { return this._epoch; }
    /** What delivers updates now: 'websocket' | 'sse' | 'polling' | null (not connected). */
    get transport() { return this._transport; }

    /** Open the connection (again, after disconnect() or a final close). Returns this. */
    connect() {
      if (!this._stopped && this._state !== 'closed') return this;
      this._stopped = false;
      this._attempt = this._failures = this._rung = 0;
      if (root.document && root.document.addEventListener) {
        root.document.addEventListener('visibilitychange', this._onWake);
      }
      if (root.addEventListener) root.addEventListener('online', this._onWake);
      this._setState('connecting');
      this._openSocket();
      return this;
    }

    /** Close for good: no reconnect. The cache is kept, so connect() resumes from it. */
    disconnect() {
      this._halt(1000, 'client disconnect');
    }

    /**
     * Listen to an event; returns a function that removes the listener.
     * @param {string} event @param {function(*): void} handler @returns {function(): void}
     */
    on(event, handler) {
      if (!this._handlers.has(event)) this._handlers.set(event, new Set());
      this._handlers.get(event).add(handler);
      return () => this.off(event, handler);
    }

    /** Remove a listener added with on(). */
    off(event, handler) {
      const set = this._handlers.get(event);
      if (set) set.delete(handler);
    }

    /** Follow a task (kept across reconnects); the server pushes its current state at once. */
    subscribeTask(taskId) {
      const added = !this._subs.has(taskId);
      this._subs.add(taskId);
      if (this._state !== 'connected') return;
      if (this._isStream()) {
        if (added) this._reopenStream(); // a stream's subscriptions are in its URL
      } else {
        this.send({ type: 'subscribe', task_id: taskId });
      }
    }

    /** Stop following a task subscribed with subscribeTask(). */
    unsubscribeTask(taskId) {
      const had = this._subs.delete(taskId);
      if (this._isStream()) {
        if (had) this._reopenStream();
      } else {
        this.send({ type: 'unsubscribe', task_id: taskId });
      }
    }

    /** Send a JSON message if a WebSocket is open (an SSE stream only listens). */
    send(obj) {
      const conn = this._conn;
      if (!conn || !conn.opened || conn.kind !== 'websocket' || conn.sock.readyState !== OPEN) return false;
      conn.sock.send(JSON.stringify(obj));
      return true;
    }

    /** Use a new token from your own auth flow; sent as `refresh` if connected. */
    setToken(token) {
      this._setToken(token);
      this._needToken = false;
      this._sendRefresh();
    }

    // ---- events, state, timers --------------------------------------------------------

    _emit(event, data) {
      const set = this._handlers.get(event);
      if (!set) return;
      for (const handler of Array.from(set)) {
        try {
          handler(data);
        } catch (err) {
          if (root.console) root.console.error(`taskpush: "${event}" handler threw`, err);
        }
      }
    }

    _setState(state) {
      if (this._state === state) return;
      this._state = state;
      this._emit('state', state);
    }

    _setTransport(transport) {
      if (this._transport === transport) return;
      this._transport = transport;
      this._emit('transport', transport);
    }

    _setTimer(name, fn, ms) {
      this._clearTimer(name);
      const run = () => { delete this._timers[name]; fn(); };
      this._timers[name] = setTimeout(run, Math.min(Math.max(ms, 0), MAX_TIMER));
    }

    _clearTimer(name) {
      if (this._timers[name] !== undefined) clearTimeout(this._timers[name]);
      delete this._timers[name];
    }

    // ---- WebSocket --------------------------------------------------------------------

    async _currentToken() {
      if (this._getToken && this._needToken) {
        this._setToken(await this._getToken());
        this._needToken = false;
      }
      return this._token;
    }

    /** The transport the next attempt uses (SSE is skipped where there is no EventSource). */
    _kind() {
      let kind = this._ladder[Math.min(this._rung, this._ladder.length - 1)];
      if (kind === 'sse' && !this._EventSource()) {
        this._rung += 1;
        kind = this._ladder[Math.min(this._rung, this._ladder.length - 1)];
      }
      return kind;
    }

    _EventSource() { return this.options.EventSource || root.EventSource || null; }

    _isStream() { return !!this._conn && this._conn.kind === 'sse'; }

    async _openSocket(kind) {
      if (this._stopped || this._conn || this._opening) return;
      kind = kind || this._kind();
      if (kind === 'polling') return this._startPolling();
      this._opening = true;
      let token;
      try {
        token = await this._currentToken();
      } catch (err) {
        this._emit('error', err);
        if (!this._stopped && !this._polling) this._scheduleReconnect();
        return;
      } finally {
        this._opening = false;
      }
      if (this._stopped || this._conn) return;
      const since = this._lastSeq;
      let query = `?token=${encodeURIComponent(token)}`;
      if (since != null) {
        query += `&since=${since}`;
        if (this._epoch != null) query += `&epoch=${encodeURIComponent(this._epoch)}`;
      }
      const conn = { kind, sock: null, opened: false, since, seq: null, ids: new Set(), resynced: false };
      this._conn = conn;
      try {
        if (kind === 'sse') {
          for (const taskId of this._subs) query += `&task_id=${encodeURIComponent(taskId)}`;
          conn.sock = new (this._EventSource())(`${this._httpBase}/api/task/stream${query}`);
        } else {
          const path = `/api/task/ws/task/${encodeURIComponent(this.userId)}`;
          conn.sock = new (this.options.WebSocket || root.WebSocket)(this._wsBase + path + query);
        }
      } catch (err) {
        this._emit('error', err);
        this._onClose(conn, { code: 1006, reason: String((err && err.message) || err) });
        return;
      }
      this._setTimer('connect', () => this._dropSocket(4000, 'connect timeout'), this.options.connectTimeoutMs);
      const sock = conn.sock;
      sock.onopen = () => {
        if (this._conn !== conn) return;
        this._clearTimer('connect');
        conn.opened = true;
        this._failures = 0;
        this._lastRx = Date.now();
        if (kind === 'websocket') this._startHeartbeat(); // a stream cannot be pinged
      };
      if (kind === 'sse') {
        const onEvent = (ev) => {
          if (this._conn !== conn) return;
          if (ev.type === 'close') {
            let msg = null;
            try { msg = JSON.parse(ev.data); } catch (_) { /* keep the defaults */ }
            return this._dropSocket((msg && msg.code) || 1006, (msg && msg.reason) || '');
          }
          this._onMessage(conn, ev);
        };
        for (const name of SSE_EVENTS) {
          sock.addEventListener(name, (ev) => {
            // `error` is both the server's error message (with data) and the stream's failure
            if (name === 'error' && typeof ev.data !== 'string') return this._onStreamError(conn);
            onEvent(ev);
          });
        }
      } else {
        sock.onmessage = (ev) => this._onMessage(conn, ev);
        sock.onclose = (ev) => this._onClose(conn, ev);
        sock.onerror = () => {
          // No detail is given. Browsers follow with a close event; do not count on it.
          if (this._conn === conn && !conn.opened) this._dropSocket(1006, 'connection failed');
        };
      }
    }

    /** The stream failed or was cut: we reconnect ourselves (fresh token, `since`, backoff),
     *  not EventSource, which would reuse the old URL and token. */
    _onStreamError(conn) {
      if (this._conn !== conn) return;
      // EventSource hides the HTTP status: a stream that never opened may be a refused token
      if (!conn.opened && this._getToken) this._needToken = true;
      this._dropSocket(1006, conn.opened ? 'stream ended' : 'stream failed');
    }

    /** Open the stream again at once (new token or subscriptions), resuming with `since`. */
    _reopenStream() {
      const conn = this._conn;
      if (!conn || conn.kind !== 'sse') return;
      this._conn = null;
      this._clearTimer('connect');
      try { conn.sock.close(); } catch (_) { /* closed */ }
      this._openSocket('sse');
    }

    _sendRefresh() {
      if (this._isStream()) this._reopenStream();
      else this.send({ type: 'refresh', token: this._token });
    }

    _onMessage(conn, ev) {
      if (this._conn !== conn) return;
      this._lastRx = Date.now();
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (err) {
        this._emit('error', err);
        return;
      }
      if (!msg || typeof msg !== 'object') return;
      this._emit('message', msg);
      switch (msg.type) {
        case 'connected':
          return this._onConnected(conn, msg);
        case 'active_tasks': {
          const tasks = Array.isArray(msg.tasks) ? msg.tasks : [];
          for (const task of tasks) {
            conn.ids.add(task.task_id);
            this._apply(task, false);
          }
          return this._emit('active_tasks', tasks);
        }
        case 'task_status':
          conn.ids.add(msg.task_id);
          return this._apply(msg, true);
        case 'task_deleted':
          this._tasks.delete(msg.task_id);
          this._subs.delete(msg.task_id);
          this._saveSoon();
          this._emit('change', { task_id: msg.task_id });
          return this._emit('task_deleted', { task_id: msg.task_id });
        case 'resync':
          if (!conn.resynced) this._resync(conn);
          return;
        case 'token_expiring':
          this._emit('token_expiring', msg);
          return this._refreshToken();
        case 'error':
          return this._emit('error', msg);
        default:
          if (PASS_THROUGH.has(msg.type)) this._emit(msg.type, msg);
      }
    }

    _onConnected(conn, msg) {
      const epochChanged = this._epoch != null && msg.epoch != null && msg.epoch !== this._epoch;
      if (msg.epoch != null) this._epoch = msg.epoch;
      conn.seq = seqOf(msg);
      if (epochChanged) {
        this._resync(conn); // another database: our seqs mean nothing there
      } else if (conn.since == null && conn.seq != null) {
        // A fresh start: active_tasks follows, and live updates come after conn.seq.
        this._lastSeq = Math.max(this._lastSeq == null ? conn.seq : this._lastSeq, conn.seq);
      }
      this._attempt = this._failures = 0;
      this._rung = Math.max(0, this._ladder.indexOf(conn.kind));
      this._stopPolling();
      this._setTransport(conn.kind);
      this._setState('connected');
      if (conn.kind === 'websocket') {
        for (const taskId of this._subs) this.send({ type: 'subscribe', task_id: taskId });
      }
      this._saveSoon();
      this._emit('connected', msg);
    }

    /** The server starts over: drop every cached task it has not sent on this connection. */
    _resync(conn) {
      conn.resynced = true;
      for (const id of Array.from(this._tasks.keys())) if (!conn.ids.has(id)) this._tasks.delete(id);
      this._lastSeq = conn.seq; // may go down: it counts in another database
      for (const task of this._tasks.values()) this._bumpSeq(seqOf(task));
      this._saveSoon();
      this._emit('change', { task_id: null });
      this._emit('resync', { epoch: this._epoch });
    }

    _onClose(conn, ev) {
      if (this._conn !== conn) return;
      this._conn = null;
      this._clearTimer('heartbeat');
      this._clearTimer('connect');
      if (this._stopped) return;
      const code = (ev && ev.code) || 1006;
      const reason = (ev && ev.reason) || '';
      if (conn.opened) {
        this._rung = 0; // it worked: after a drop, the best transport is tried first again
        this._failures = 0;
      } else if (!this._polling) {
        this._failures += 1;
      }
      if (!this._polling) this._setTransport(null);
      if (code === 4401 && this._getToken) this._needToken = true;
      if (code === 4403 || (code === 4401 && !this._getToken) || !this.options.reconnect) {
        return this._halt(code, reason); // forbidden, or no way to get a better token
      }
      if (code === 4409) {
        // Too many connections for this user and we were the oldest: wait until the page
        // is looked at again, so background tabs do not keep evicting each other.
        this._stopPolling();
        this._setState('closed');
        return this._emit('disconnected', { code, reason, willReconnect: false });
      }
      if (this._polling) return; // polling goes on and retries the others itself
      this._emit('disconnected', { code, reason, willReconnect: true });
      const legacy = this.options.wsFailuresBeforePolling;
      const limit = legacy != null ? legacy : this.options.failuresBeforeFallback;
      if (limit > 0 && this._failures >= limit && this._rung < this._ladder.length - 1) {
        this._rung += 1; // this transport does not get through: the next one
        this._failures = 0;
        if (this._kind() === 'polling') {
          if (this.options.fetch || root.fetch) return this._startPolling();
          this._rung -= 1;
        }
      }
      this._setState('connecting');
      this._scheduleReconnect();
    }

    /** Exponential backoff with full jitter: random(0, min(max, min * 2^attempt)). */
    _scheduleReconnect() {
      const { minDelayMs, maxDelayMs } = this.options;
      const cap = Math.min(maxDelayMs, minDelayMs * 2 ** this._attempt);
      this._attempt += 1;
      this._setTimer('reconnect', () => this._openSocket(), Math.random() * cap);
    }

    /** While polling: try the transports above it in turn (WebSocket, then SSE, ...). */
    _probe() {
      const above = this._ladder.filter((t) => t !== 'polling' && (t !== 'sse' || this._EventSource()));
      if (above.length) this._openSocket(above[this._probes++ % above.length]);
    }

    _startHeartbeat() {
      const ms = this.options.heartbeatMs;
      if (!(ms > 0)) return;
      this._setTimer('heartbeat', () => {
        if (!this._conn || !this._conn.opened) return;
        // Nothing heard for three rounds: a dead link the OS has not noticed yet.
        if (Date.now() - this._lastRx > 3 * ms) return this._dropSocket(4000, 'heartbeat timeout');
        this.send({ type: 'ping' });
        this._startHeartbeat();
      }, ms);
    }

    /** Abandon the socket now rather than wait for a closing handshake that may never come. */
    _dropSocket(code, reason) {
      const conn = this._conn;
      if (!conn) return;
      try { conn.sock.close(code, reason); } catch (_) { /* already closing */ }
      this._onClose(conn, { code, reason });
    }

    /** The page became visible or the network came back: reconnect now, not after backoff. */
    _onWake() {
      if (this._stopped || (root.document && root.document.visibilityState === 'hidden')) return;
      const conn = this._conn;
      if (conn && conn.sock && conn.sock.readyState === OPEN) return void this.send({ type: 'ping' });
      if (conn && !conn.opened) return; // still opening
      if (conn) this._dropSocket(4000, 'stale socket');
      if (this._stopped) return;
      this._clearTimer('reconnect');
      this._attempt = 0;
      if (this._state === 'closed') this._setState('connecting');
      if (this._polling) this._poll();
      else this._openSocket();
    }

    _halt(code, reason) {
      const wasRunning = !this._stopped;
      this._stopped = true;
      this._stopPolling();
      for (const name of Object.keys(this._timers)) this._clearTimer(name);
      this._saveNow();
      const conn = this._conn;
      this._conn = null;
      if (conn && conn.sock) {
        conn.sock.onopen = conn.sock.onmessage = conn.sock.onclose = conn.sock.onerror = null;
        try { conn.sock.close(1000, 'client disconnect'); } catch (_) { /* ignore */ }
      }
      if (root.document && root.document.removeEventListener) {
        root.document.removeEventListener('visibilitychange', this._onWake);
      }
      if (root.removeEventListener) root.removeEventListener('online', this._onWake);
      const wasClosed = this._state === 'closed';
      this._setTransport(null);
      this._setState('closed');
      if (wasRunning && !wasClosed) this._emit('disconnected', { code, reason, willReconnect: false });
    }

    // ---- cache ------------------------------------------------------------------------

    _bumpSeq(seq) {
      if (seq != null && (this._lastSeq == null || seq > this._lastSeq)) this._lastSeq = seq;
    }

    /** Keep a task if it is newer than the cached one (by seq); emit events if asked. */
    _apply(task, emit) {
      if (!task || task.task_id == null) return false;
      const prev = this._tasks.get(task.task_id);
      const seq = seqOf(task);
      this._bumpSeq(seq);
      if (prev && seq != null && seqOf(prev) != null && seq <= prev.seq) return false; // stale
      const next = Object.assign({}, task);
      delete next.type;
      this._tasks.set(next.task_id, next);
      this._saveSoon();
      this._emit('change', { task_id: next.task_id });
      if (emit) {
        this._emit('task_status', next);
        if (isTerminal(next.status) && !(prev && isTerminal(prev.status))) {
          this._emit(TERMINAL_EVENT[next.status], next);
        }
      }
      return true;
    }

    _restore() {
      const storage = this.options.storage;
      if (!storage) return;
      try {
        const saved = JSON.parse(storage.getItem(this._storageKey) || 'null');
        if (!saved) return;
        this._epoch = saved.epoch == null ? null : saved.epoch;
        this._lastSeq = typeof saved.lastSeq === 'number' ? saved.lastSeq : null;
        for (const t of saved.tasks || []) if (t && t.task_id != null) this._tasks.set(t.task_id, t);
      } catch (_) { /* unreadable: start empty */ }
    }

    _saveSoon() {
      if (this.options.storage && this._timers.save === undefined) {
        this._setTimer('save', () => this._saveNow(), 250);
      }
    }

    _saveNow() {
      this._clearTimer('save');
      if (!this.options.storage) return;
      const data = { epoch: this._epoch, lastSeq: this._lastSeq, tasks: Array.from(this._tasks.values()) };
      try {
        this.options.storage.setItem(this._storageKey, JSON.stringify(data));
      } catch (_) { /* quota or private mode: the cache just does not persist */ }
    }

    // ---- tokens -----------------------------------------------------------------------

    _setToken(token) {
      this._token = token || '';
      this._clearTimer('refresh');
      const payload = this._getToken && decodeJwt(this._token);
      if (!payload || typeof payload.exp !== 'number') return;
      const left = payload.exp * 1000 - Date.now();
      // A minute before exp; a short-lived token at half its remaining life; never a busy loop.
      const delay = Math.max(left - this.options.refreshBeforeExpiryMs, left / 2, 5000);
      this._setTimer('refresh', () => this._refreshToken(), delay);
    }

    async _refreshToken() {
      if (!this._getToken || this._refreshing || this._stopped) return;
      // A token that is itself near its end makes the server say `token_expiring` again
      // at once: ask at most every few seconds rather than in a loop.
      if (Date.now() - this._refreshedAt < MIN_REFRESH_MS) return;
      this._refreshedAt = Date.now();
      this._refreshing = true;
      try {
        this._setToken(await this._getToken());
        this._needToken = false;
        this._sendRefresh();
      } catch (err) {
        this._emit('error', err);
      } finally {
        this._refreshing = false;
      }
    }

    // ---- HTTP polling fallback --------------------------------------------------------

    _startPolling() {
      this._polling = true;
      this._pollRound = 0;
      this._pollFailed = false;
      this._setTransport('polling');
      this._setState('polling');
      this._poll();
    }

    _stopPolling() {
      this._polling = false;
      this._clearTimer('poll');
    }

    async _poll() {
      if (!this._polling || this._stopped || this._pollBusy) return;
      this._clearTimer('poll');
      this._pollBusy = true;
      let ok = false;
      try {
        await this._pollOnce();
        ok = true;
      } catch (err) {
        this._emit('error', err);
      } finally {
        this._pollBusy = false;
      }
      if (!this._polling || this._stopped) return;
      this._pollRound += 1;
      // Retry the WebSocket every few rounds, and at once when the server answers again
      // (it was down, e.g. restarting, rather than the WebSocket being blocked).
      if (this._pollRound % PROBE_EVERY === 0 || (ok && this._pollFailed)) this._probe();
      this._pollFailed = !ok;
      this._setTimer('poll', () => this._poll(), this.options.pollIntervalMs);
    }

    async _pollOnce() {
      const initial = this._lastSeq == null;
      const token = await this._currentToken();
      // First poll: the newest tasks and the current seq (like a fresh socket's snapshot);
      // then every change after the last seq seen, in seq order.
      const url = initial
        ? `${this._httpBase}/api/task/tasks?limit=${POLL_PAGE}`
        : `${this._httpBase}/api/task/tasks?since=${this._lastSeq}&limit=${POLL_PAGE}`;
      const headers = { Authorization: `Bearer ${token}`, Accept: 'application/json' };
      const res = await (this.options.fetch || root.fetch).call(root, url, { headers });
      if (!this._polling || this._stopped) return;
      if (res.status === 401 && this._getToken) return void (this._needToken = true);
      if (res.status === 401 || res.status === 403) {
        return this._halt(res.status === 401 ? 4401 : 4403, `HTTP ${res.status}`);
      }
      const body = await res.json().catch(() => null);
      if (!res.ok || !body || body.code !== 0 || !body.data) {
        throw new Error(`taskpush: polling failed: ${(body && body.message) || 'HTTP ' + res.status}`);
      }
      const data = body.data;
      const epochChanged = this._epoch != null && data.epoch != null && data.epoch !== this._epoch;
      if (data.epoch != null) this._epoch = data.epoch;
      if (!initial && (data.resync || epochChanged)) {
        // Another database, or history we asked for is gone: start over like a fresh socket.
        this._tasks.clear();
        this._lastSeq = null;
        this._saveSoon();
        this._emit('change', { task_id: null });
        this._emit('resync', { epoch: this._epoch });
        return this._pollOnce();
      }
      const tasks = (Array.isArray(data.tasks) ? data.tasks : []).slice();
      tasks.sort((a, b) => (seqOf(a) || 0) - (seqOf(b) || 0));
      if (initial) {
        // Like a fresh WebSocket: the current state, without replaying old terminal events.
        for (const task of tasks) this._apply(task, false);
        this._emit('active_tasks', tasks.filter((task) => !isTerminal(task.status)));
        if (typeof data.seq === 'number') this._bumpSeq(data.seq);
        return;
      }
      for (const task of tasks) this._apply(task, true);
      for (const task of tasks) this._bumpSeq(seqOf(task));
      // Nothing changed up to data.seq; a non-empty (maybe capped) answer must not skip ahead.
      if (!tasks.length && typeof data.seq === 'number') this._bumpSeq(data.seq);
    }
  }

  Object.assign(TaskNotificationClient, {
    TERMINAL, ACTIVE, TRANSPORTS, isTerminal, decodeJwt, DEFAULTS: Object.freeze(Object.assign({}, DEFAULTS)),
  });

  root.TaskNotificationClient = TaskNotificationClient;
  if (typeof module === 'object' && module && module.exports) {
    module.exports = TaskNotificationClient;
    module.exports.TaskNotificationClient = TaskNotificationClient;
  }
})(typeof globalThis !== 'undefined' ? globalThis : this);
