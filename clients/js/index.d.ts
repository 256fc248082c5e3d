// Types of the taskpush client (static/taskpush.js) and of the server's messages (SPEC).

/** pending, running, progress are active; completed, failed, cancelled are terminal. */
export type ActiveStatus = 'pending' | 'running' | 'progress';
export type TerminalStatus = 'completed' | 'failed' | 'cancelled';
export type TaskStatus = ActiveStatus | TerminalStatus;

/** Any JSON value (a task's `result` and `metadata`). */
export type Json = string | number | boolean | null | Json[] | { [key: string]: Json };

/** A task as the server sends it. */
export interface Task {
  task_id: string;
  user_id: number;
  task_type: string;
  status: TaskStatus;
  /** 0-100 */
  progress: number;
  message: string | null;
  step: string | null;
  result: Json;
  error: string | null;
  error_type: string | null;
  metadata: Json;
  /** ISO-8601 UTC */
  created_at: string;
  /** ISO-8601 UTC */
  updated_at: string;
  /** global, strictly increasing event number; per task a client sees it only increase */
  seq: number;
  cancel_requested?: boolean;
}

// ---- server -> client messages (WebSocket frames; SSE events named after `type`) ----------

export interface ConnectedMessage {
  type: 'connected';
  connection_id: string;
  message: string;
  timestamp: string;
  /** the database's id: a different one means the client's seqs mean nothing there */
  epoch: string;
  /** the latest seq when the connection's snapshot was read */
  seq: number;
}
export interface ActiveTasksMessage { type: 'active_tasks'; tasks: Task[]; count: number }
export interface TaskStatusMessage extends Task { type: 'task_status' }
export interface TaskDeletedMessage { type: 'task_deleted'; task_id: string }
export interface ResyncMessage { type: 'resync' }
export interface PongMessage { type: 'pong'; timestamp: string }
export interface SubscribedMessage { type: 'subscribed'; task_id: string }
export interface UnsubscribedMessage { type: 'unsubscribed'; task_id: string }
export interface RefreshedMessage { type: 'refreshed'; expires_at: string | null }
export interface TokenExpiringMessage { type: 'token_expiring'; expires_in: number }
export interface ErrorMessage { type: 'error'; code: string; message: string }
/** SSE only: the last event of a stream that ends, with the WebSocket close code it stands for. */
export interface CloseMessage { type: 'close'; code: CloseCode | number; reason: string }

export type ServerMessage =
  | ConnectedMessage | ActiveTasksMessage | TaskStatusMessage | TaskDeletedMessage
  | ResyncMessage | PongMessage | SubscribedMessage | UnsubscribedMessage | RefreshedMessage
  | TokenExpiringMessage | ErrorMessage | CloseMessage;

// ---- client -> server messages (WebSocket only) --------------------------------------------

export interface PingRequest { type: 'ping' }
export interface SubscribeRequest { type: 'subscribe'; task_id: string }
export interface UnsubscribeRequest { type: 'unsubscribe'; task_id: string }
export interface RefreshRequest { type: 'refresh'; token: string }
export type ClientMessage = PingRequest | SubscribeRequest | UnsubscribeRequest | RefreshRequest;

/** 1000/1001/1006/1008/1009/1013 (standard), 4000 (client side), 4401/4403/4408/4409 (taskpush). */
export type CloseCode = 1000 | 1001 | 1006 | 1008 | 1009 | 1013 | 4000 | 4401 | 4403 | 4408 | 4409;

// ---- the client --------------------------------------------------------------------------

export type Transport = 'websocket' | 'sse' | 'polling';
export type ConnectionState = 'idle' | 'connecting' | 'connected' | 'polling' | 'closed';
export type TokenSource = string | (() => string | Promise<string>);

export interface DisconnectedEvent { code: number; reason: string; willReconnect: boolean }

/** Every event `on()` accepts, with its payload. */
export interface TaskNotificationEvents {
  state: ConnectionState;
  transport: Transport | null;
  connected: ConnectedMessage;
  active_tasks: Task[];
  task_status: Task;
  task_completed: Task;
  task_failed: Task;
  task_cancelled: Task;
  task_deleted: { task_id: string };
  /** the cache changed: one task, or (task_id null) all of it */
  change: { task_id: string | null };
  resync: { epoch: string | null };
  disconnected: DisconnectedEvent;
  error: ErrorMessage | Error;
  pong: PongMessage;
  subscribed: SubscribedMessage;
  unsubscribed: UnsubscribedMessage;
  refreshed: RefreshedMessage;
  token_expiring: TokenExpiringMessage;
  message: ServerMessage;
}
export type TaskNotificationEvent = keyof TaskNotificationEvents;

/** The Storage subset the client uses (sessionStorage, localStorage or your own). */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

export interface TaskNotificationOptions {
  /** server address, http(s):// or ws(s)://; default: the page's origin */
  baseUrl?: string | null;
  /** reconnect after a drop (default true) */
  reconnect?: boolean;
  /** backoff base in ms (default 500) */
  minDelayMs?: number;
  /** backoff ceiling in ms (default 30000) */
  maxDelayMs?: number;
  /** WebSocket ping interval in ms; 0 turns it off (default 30000) */
  heartbeatMs?: number;
  /** polling interval in ms (default 2000) */
  pollIntervalMs?: number;
  /** transports tried in this order (default websocket, sse, polling) */
  transports?: readonly Transport[];
  /** attempts in a row that never open before the next transport (default 3; 0: never) */
  failuresBeforeFallback?: number;
  /** @deprecated the older name of failuresBeforeFallback */
  wsFailuresBeforePolling?: number | null;
  /** ms before `exp` that a new token is fetched (default 60000) */
  refreshBeforeExpiryMs?: number;
  /** a connection not open by then counts as failed (default 15000) */
  connectTimeoutMs?: number;
  /** keeps epoch, lastSeq and the cache across reloads */
  storage?: StorageLike | null;
  /** key in storage (default `taskpush:<userId>`) */
  storageKey?: string | null;
  /** WebSocket implementation (default globalThis.WebSocket) */
  WebSocket?: (new (url: string) => WebSocket) | null;
  /** EventSource implementation (default globalThis.EventSource; none: SSE is skipped) */
  EventSource?: (new (url: string) => EventSource) | null;
  /** fetch implementation (default globalThis.fetch) */
  fetch?: typeof fetch | null;
}

export declare class TaskNotificationClient {
  constructor(userId: number | string, token: TokenSource, options?: TaskNotificationOptions);
  readonly userId: number | string;
  readonly options: Required<TaskNotificationOptions>;
  readonly state: ConnectionState;
  readonly transport: Transport | null;
  /** a copy of the cache */
  readonly tasks: Record<string, Task>;
  readonly lastSeq: number | null;
  readonly epoch: string | null;
  /** the cached task, the same object until it changes (read only) */
  getTask(taskId: string): Task | undefined;
  connect(): this;
  disconnect(): void;
  on<E extends TaskNotificationEvent>(
    event: E, handler: (payload: TaskNotificationEvents[E]) => void): () => void;
  off<E extends TaskNotificationEvent>(
    event: E, handler: (payload: TaskNotificationEvents[E]) => void): void;
  subscribeTask(taskId: string): void;
  unsubscribeTask(taskId: string): void;
  /** false unless a WebSocket is open (an SSE stream only listens) */
  send(message: ClientMessage): boolean;
  setToken(token: string): void;

  static readonly TERMINAL: readonly TerminalStatus[];
  static readonly ACTIVE: readonly ActiveStatus[];
  static readonly TRANSPORTS: readonly Transport[];
  static readonly DEFAULTS: Readonly<Required<TaskNotificationOptions>>;
  static isTerminal(status: string): status is TerminalStatus;
  static decodeJwt(token: string): Record<string, unknown> | null;
}

export declare const TERMINAL: readonly TerminalStatus[];
export declare const ACTIVE: readonly ActiveStatus[];
export declare const TRANSPORTS: readonly Transport[];
export declare function isTerminal(status: string): status is TerminalStatus;
export declare function decodeJwt(token: string): Record<string, unknown> | null;
export default TaskNotificationClient;
