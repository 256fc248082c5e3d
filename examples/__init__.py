"""Backend integration examples of the original design, runnable against a real app.

Run one from the repository root: `python -m examples.decorator` (or `.manual`,
`.progress_context`). Each starts a demo-mode app on a temporary database, watches user 1's
WebSocket, runs the example and prints every update it pushes.
"""
