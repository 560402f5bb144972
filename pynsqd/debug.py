"""``/debug/*`` on nsqd: what Python can honestly show in place of Go's pprof.

- ``GET /debug/tasks``: the daemon's trio tasks, counted by name, plus the
  sizes of its main tables (a leak of connection tasks or channel timers
  shows up here first);
- ``GET /debug/stacks``: every trio task with the frames it is suspended in
  (the answer to "where is it stuck?").

Both walk the trio task tree from the root task at request time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio

from .http_server import Handler, Request, Response, respond

if TYPE_CHECKING:
    from .nsqd import NSQD


def iter_tasks(task: trio.lowlevel.Task | None = None) -> Iterator[trio.lowlevel.Task]:
    """Every task under ``task`` (default: the root task), depth first."""
    task = task if task is not None else trio.lowlevel.current_root_task()
    if task is None:
        return
    stack = [task]
    while stack:
        t = stack.pop()
        yield t
        for nursery in t.child_nurseries:
            stack.extend(nursery.child_tasks)


def _short_name(name: str) -> str:
    # "pynsqd.tcp.ConnectionV2._read_loop" -> "ConnectionV2._read_loop"
    parts = name.rsplit(".", 2)
    return ".".join(parts[-2:]) if len(parts) > 2 else name


def task_summary(nsqd: NSQD) -> dict[str, object]:
    names = Counter(_short_name(t.name) for t in iter_tasks())
    return {
        "tasks": sum(names.values()),
        "by_name": dict(names.most_common()),
        "clients": len(nsqd.clients),
        "topics": len(nsqd.topics),
        "channels": sum(len(t.channels) for t in nsqd.topics.values()),
    }


def stack_dump() -> str:
    out: list[str] = []
    for task in iter_tasks():
        out.append(f"task {task.name}")
        for frame, lineno in task.iter_await_frames():
            code = frame.f_code
            out.append(f"    {code.co_filename}:{lineno} in {code.co_name}")
        out.append("")
    return "\n".join(out)


def debug_routes(nsqd: NSQD) -> dict[str, Handler]:
    """path -> GET handler."""

    async def tasks(req: Request) -> Response:
        return respond(task_summary(nsqd))

    async def stacks(req: Request) -> Response:
        return Response(200, stack_dump().encode(), b"text/plain; charset=utf-8")

    return {"/debug/tasks": tasks, "/debug/stacks": stacks}
