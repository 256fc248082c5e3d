// ES module entry: `import { TaskNotificationClient } from 'taskpush'`.
// taskpush.js is the script-tag client (a copy of static/taskpush.js); it defines the class.
import './taskpush.js';

export const TaskNotificationClient = globalThis.TaskNotificationClient;
export const { TERMINAL, ACTIVE, TRANSPORTS, isTerminal, decodeJwt } = TaskNotificationClient;
export default TaskNotificationClient;
