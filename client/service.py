"""``async with`` for the client's long-running objects (Reader, Writer):
start ``run`` in a nursery owned by the block, ``stop`` it on the way out."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import trio


class NurseryService:
    """Mixin: subclasses provide ``async run(task_status=...)`` and ``async stop()``."""

    _exit_stack: AsyncExitStack | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        stack = AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(self.run)
        self._exit_stack = stack
        return self

    async def __aexit__(self, *exc_info: Any) -> bool:
        stack, self._exit_stack = self._exit_stack, None
        assert stack is not None
        try:
            await self.stop()
        finally:
            suppressed = await stack.__aexit__(*exc_info)
        return bool(suppressed)
