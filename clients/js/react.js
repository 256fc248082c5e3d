// React hooks over one shared TaskNotificationClient per user (per baseUrl and user id):
// every component of that user, in any root, uses the same connection. It is reference
// counted by the effects that use it and closed a moment after the last one lets go, so
// StrictMode's mount-unmount-mount opens one socket, not two. A component re-renders only
// when a task it reads changes (useSyncExternalStore over the client's `change` event).
import {
  createContext, createElement, useCallback, useContext, useEffect, useSyncExternalStore,
} from 'react';
import { TaskNotificationClient } from './index.js';

const CLOSE_DELAY_MS = 0; // after the last release: a remount in the same commit keeps it
const shared = new Map(); // key -> {key, client, refs, closeTimer, getToken}
const ClientContext = createContext(null);

function entryFor(userId, getToken, options) {
  const key = `${(options && options.baseUrl) || ''}|${userId}`;
  let entry = shared.get(key);
  if (!entry) {
    entry = { key, client: null, refs: 0, closeTimer: null, getToken: null };
    // the latest callback given is the one asked, whichever render gave it
    entry.client = new TaskNotificationClient(userId, () => entry.getToken(), options);
    shared.set(key, entry);
  }
  entry.getToken = typeof getToken === 'function' ? getToken : () => getToken;
  return entry;
}

function acquire(entry) {
  entry.refs += 1;
  if (entry.closeTimer !== null) {
    clearTimeout(entry.closeTimer);
    entry.closeTimer = null;
  }
  if (entry.refs === 1 && ['idle', 'closed'].includes(entry.client.state)) entry.client.connect();
}

function release(entry) {
  entry.refs -= 1;
  if (entry.refs > 0) return;
  entry.closeTimer = setTimeout(() => {
    entry.closeTimer = null;
    if (entry.refs > 0) return;
    entry.client.disconnect();
    if (shared.get(entry.key) === entry) shared.delete(entry.key);
  }, CLOSE_DELAY_MS);
}

/**
 * The shared client of this user, connected while at least one component uses it.
 * `getToken` is called for the first token and whenever a fresh one is needed (expiry,
 * a refused token): return a string or a promise of one.
 */
export function useTaskpushClient(userId, getToken, options) {
  const entry = entryFor(userId, getToken, options);
  useEffect(() => {
    acquire(entry);
    return () => release(entry);
  }, [entry]);
  return entry.client;
}

/** Gives its children the shared client of `userId` (see useTaskpushClient). */
export function TaskpushProvider({ userId, getToken, options, children }) {
  const client = useTaskpushClient(userId, getToken, options);
  return createElement(ClientContext.Provider, { value: client }, children);
}

/** The client given, or the nearest TaskpushProvider's. */
export function useClient(client) {
  const context = useContext(ClientContext);
  const found = client || context;
  if (!found) throw new Error('taskpush: no client (use <TaskpushProvider> or pass one)');
  return found;
}

/** One task, or undefined until it is known; re-renders only when this task changes. */
export function useTask(taskId, client) {
  const c = useClient(client);
  const subscribe = useCallback((notify) => c.on('change', (change) => {
    if (change.task_id === taskId || change.task_id === null) notify();
  }), [c, taskId]);
  const read = () => c.getTask(taskId);
  return useSyncExternalStore(subscribe, read, read);
}

const lists = new WeakMap(); // client -> {list}: one array per cache version

function taskList(c) {
  let slot = lists.get(c);
  if (!slot) {
    slot = { list: null };
    lists.set(c, slot);
    c.on('change', () => { slot.list = null; });
  }
  if (slot.list === null) slot.list = Object.values(c.tasks);
  return slot.list;
}

/** Every known task of the user (an array, the same one until any task changes). */
export function useTasks(client) {
  const c = useClient(client);
  const subscribe = useCallback((notify) => c.on('change', notify), [c]);
  const read = () => taskList(c);
  return useSyncExternalStore(subscribe, read, read);
}

const connections = new WeakMap(); // client -> Map("state|transport" -> the same object)

/** {state, transport} of the connection; re-renders when either changes. */
export function useConnection(client) {
  const c = useClient(client);
  const subscribe = useCallback((notify) => {
    const offs = [c.on('state', notify), c.on('transport', notify)];
    return () => offs.forEach((off) => off());
  }, [c]);
  const read = () => {
    let seen = connections.get(c);
    if (!seen) connections.set(c, (seen = new Map()));
    const key = `${c.state}|${c.transport}`;
    if (!seen.has(key)) seen.set(key, Object.freeze({ state: c.state, transport: c.transport }));
    return seen.get(key);
  };
  return useSyncExternalStore(subscribe, read, read);
}
