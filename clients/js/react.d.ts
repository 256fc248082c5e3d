// Types of taskpush/react (react.js).
import type { ReactNode } from 'react';
import type {
  ConnectionState, Task, TaskNotificationClient, TaskNotificationOptions, Transport,
} from './index.js';

/** Returns a token, or a promise of one; called whenever a fresh token is needed. */
export type GetToken = () => string | Promise<string>;

export interface TaskpushProviderProps {
  userId: number | string;
  getToken: GetToken;
  options?: TaskNotificationOptions;
  children?: ReactNode;
}

export interface ConnectionInfo {
  readonly state: ConnectionState;
  readonly transport: Transport | null;
}

export declare function TaskpushProvider(props: TaskpushProviderProps): ReactNode;
export declare function useTaskpushClient(
  userId: number | string, getToken: GetToken, options?: TaskNotificationOptions,
): TaskNotificationClient;
export declare function useClient(client?: TaskNotificationClient | null): TaskNotificationClient;
export declare function useTask(
  taskId: string, client?: TaskNotificationClient | null): Task | undefined;
export declare function useTasks(client?: TaskNotificationClient | null): readonly Task[];
export declare function useConnection(client?: TaskNotificationClient | null): ConnectionInfo;
