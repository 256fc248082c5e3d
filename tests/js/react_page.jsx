// The React test page (tests/test_react.py), bundled by esbuild from npm's react and
// react-dom and the taskpush package, rendered under <StrictMode>. window.__taskpush drives it.
import { StrictMode, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { TaskpushProvider, useConnection, useTask } from 'taskpush/react';

const renders = {}; // task id -> times its component rendered
window.__renders = renders;

function TaskView({ id }) {
  const task = useTask(id);
  renders[id] = (renders[id] || 0) + 1;
  return (
    <div data-testid={`task-${id}`} data-status={task ? task.status : 'none'}
         data-progress={task ? task.progress : -1}>
      {id}: {task ? `${task.status} ${task.progress}%` : 'unknown'}
    </div>
  );
}

function Connection() {
  const { state, transport } = useConnection();
  return <div data-testid="connection" data-state={state}>{transport || 'none'}</div>;
}

// Two providers of the same user (as two widgets of a page would be): one shared client.
function App({ userId }) {
  const [shown, setShown] = useState({ a: true, b: true });
  window.__hide = (id) => setShown((now) => ({ ...now, [id]: false }));
  const getToken = () => { // a new function each render: the latest one is asked
    window.__tokenCalls += 1;
    return window.__token;
  };
  const options = { minDelayMs: 50 };
  return (
    <>
      {shown.a ? (
        <TaskpushProvider userId={userId} getToken={getToken} options={options}>
          <Connection />
          <TaskView id="a" />
        </TaskpushProvider>
      ) : <p data-testid="gone-a">unmounted</p>}
      {shown.b ? (
        <TaskpushProvider userId={userId} getToken={getToken} options={options}>
          <TaskView id="b" />
        </TaskpushProvider>
      ) : <p data-testid="gone-b">unmounted</p>}
    </>
  );
}

window.__mount = (userId, token) => {
  window.__token = token;
  window.__tokenCalls = 0;
  const root = document.createElement('div');
  root.id = 'react-root';
  document.body.prepend(root);
  createRoot(root).render(<StrictMode><App userId={userId} /></StrictMode>);
};
