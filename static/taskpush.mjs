// ES module entry: `import { TaskNotificationClient } from '/static/taskpush.mjs'`.
import './taskpush.js';

export const TaskNotificationClient = globalThis.TaskNotificationClient;
export default TaskNotificationClient;
