// Checked by `tsc --strict --noEmit` (tests/test_js_package.py): the declarations of the
// npm package type every message, task, event name and option; misuse does not compile.
import { TaskNotificationClient, isTerminal, TRANSPORTS } from 'taskpush';
import type {
  ServerMessage, Task, TaskNotificationOptions, TaskStatus, Transport, ClientMessage,
} from 'taskpush';
import { TaskpushProvider, useConnection, useTask, useTasks, useTaskpushClient } from 'taskpush/react';

const options: TaskNotificationOptions = {
  baseUrl: 'https://tasks.example',
  transports: ['websocket', 'sse', 'polling'],
  failuresBeforeFallback: 2,
  pollIntervalMs: 1000,
  storage: typeof sessionStorage === 'undefined' ? null : sessionStorage,
};
const client = new TaskNotificationClient(42, async () => 'jwt', options);

const offStatus: () => void = client.on('task_status', (task: Task) => {
  const status: TaskStatus = task.status;
  const progress: number = task.progress;
  if (isTerminal(status)) console.log(task.task_id, progress, task.result, task.seq);
});
offStatus();
client.on('transport', (transport: Transport | null) => console.log(transport));
client.on('disconnected', (e) => { if (!e.willReconnect) console.log(e.code, e.reason); });
client.on('connected', (m) => console.log(m.epoch.toUpperCase(), m.seq + 1));
client.on('active_tasks', (tasks) => tasks.map((t) => t.task_id));
client.on('task_deleted', (m) => m.task_id.length);
client.on('error', (err) => console.log('message' in err ? err.message : err));
client.on('message', (m: ServerMessage) => {
  switch (m.type) {
    case 'task_status': return m.progress;
    case 'close': return m.code;
    case 'token_expiring': return m.expires_in;
    default: return m.type;
  }
});
const ping: ClientMessage = { type: 'ping' };
const sent: boolean = client.send(ping);
const cached: Task | undefined = client.getTask('t1');
const first: Transport = TRANSPORTS[0];
console.log(sent, cached, first, client.state, client.lastSeq, client.tasks['t1']?.status);

// @ts-expect-error: not an event the client emits
client.on('task_finished', () => undefined);
// @ts-expect-error: a task_status handler gets a Task, whose status is not a number
client.on('task_status', (task: { status: number }) => task);
// @ts-expect-error: not a transport
const bad: TaskNotificationOptions = { transports: ['carrier-pigeon'] };
// @ts-expect-error: not a message the server accepts
client.send({ type: 'shout' });
console.log(bad);

function TaskRow({ id }: { id: string }) {
  const task = useTask(id);
  // @ts-expect-error: the task may not be known yet
  const shown: string = task.status;
  return <li>{id}: {task ? `${task.status} ${task.progress}%` : 'unknown'} {shown}</li>;
}

function Tasks() {
  const tasks: readonly Task[] = useTasks();
  const { state, transport } = useConnection();
  return <ul data-state={state} data-transport={transport ?? 'none'}>
    {tasks.map((t) => <TaskRow key={t.task_id} id={t.task_id} />)}
  </ul>;
}

export function App({ userId }: { userId: number }) {
  return <TaskpushProvider userId={userId} getToken={() => fetch('/token').then((r) => r.text())}
                           options={{ transports: ['sse', 'polling'] }}>
    <Tasks />
  </TaskpushProvider>;
}

export function Standalone() {
  const c = useTaskpushClient(7, () => 'jwt');
  return <span>{useTask('x', c)?.message ?? ''}</span>;
}
