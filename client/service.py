"""``async with`` for the client's long-running objects (Reader, Writer):
start ``run`` in a task group owned by the block, ``stop`` it on the way out.

What comes out of the block is what a caller expects, not the task group's
plumbing: an exception raised in the body comes out as itself, and a failure
of the object's own tasks as one :class:`BackgroundTaskError` (never an
``ExceptionGroup``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from .errors import BackgroundTaskError, NotRunningError


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def background_failure(group: BaseException, what: str, exclude: BaseException | None = None) -> BaseException | None:
    """What to raise for a failure of our own tasks, found in ``group``
    (``exclude``, the caller's exception, is not ours): ``None`` if it was
    only cancellation, KeyboardInterrupt/SystemExit as themselves, anything
    else as one BackgroundTaskError."""
    cancelled = anyio.get_cancelled_exc_class()
    real = [e for e in leaves(group) if not isinstance(e, cancelled) and e is not exclude]
    if not real:
        return None
    for e in real:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            return e
    if len(real) == 1 and isinstance(real[0], BackgroundTaskError):
        return real[0]
    error = BackgroundTaskError(f"{what} failed: {real[0]!r}" + (f" (and {len(real) - 1} more)" if len(real) > 1 else ""))
    error.__cause__ = real[0] if len(real) == 1 else BaseExceptionGroup("background task failures", real)
    return error


@contextlib.contextmanager
def internal_failures_reported(what: str, log: logging.LoggerAdapter) -> Iterator[None]:  # type: ignore[type-arg]
    """Around a ``run()``'s own task group: a failure of its tasks leaves as
    one BackgroundTaskError (logged with its traceback), cancellation as is."""
    try:
        yield
    except BaseException as group:
        failure = background_failure(group, what)
        if failure is None:
            raise
        log.error("stopped by an internal error", exc_info=failure.__cause__ or failure)
        raise failure from failure.__cause__


class NurseryService:
    """Mixin: subclasses provide ``async run(task_status=...)`` and ``async stop()``."""

    _task_group: anyio.abc.TaskGroup | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self.run)
        except BaseException as exc:
            # run() refused to start (it runs once): leave the group, report plainly
            with contextlib.suppress(BaseException):
                await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._task_group = tg
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        tg, self._task_group = self._task_group, None
        assert tg is not None, "__aexit__ without __aenter__"
        body_cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
        own: BaseException | None = None
        try:
            if not body_cancelled:
                # graceful, also when the body raised; a cancellation of the
                # block from outside is abrupt
                await self.stop()
        except BaseException as stop_exc:
            own = stop_exc
        tg.cancel_scope.cancel()
        pending = exc if exc is not None else own
        failure: BaseException | None = None
        try:
            await tg.__aexit__(type(pending) if pending else None, pending, pending.__traceback__ if pending else None)
        except BaseException as group:
            failure = background_failure(group, type(self).__name__, exclude=exc)
        if failure is not None and isinstance(exc, NotRunningError):
            # the body only learnt that we stopped: say why
            raise failure from failure.__cause__
        if exc is not None and not body_cancelled:
            return False  # the caller's own exception, as itself; ours was logged
        if failure is not None:
            raise failure
        if exc is not None:
            return False  # a cancellation from outside, unwrapped
        if own is not None:
            raise own
        return False
