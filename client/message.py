"""A message delivered to a Reader's handler."""

from __future__ import annotations

from typing import Protocol

import attrs

from .errors import AlreadyResponded


class Responder(Protocol):
    """What a message reports its fate to (the connection it came on)."""

    def finish(self, message: Message) -> None: ...

    def requeue(self, message: Message, delay: float | None, backoff: bool) -> None: ...

    def touch(self, message: Message) -> None: ...


@attrs.define(eq=False)
class Message:
    """One delivery: ``body``, ``id`` (16 ASCII hex bytes), ``attempts``
    (1 on the first delivery), ``timestamp`` (ns since the epoch, when it
    was published) and the nsqd ``address`` it came from.

    The Reader finishes the message when the handler returns and requeues it
    when the handler raises.  Call :meth:`disable_auto_response` to answer
    later yourself (from another task), with :meth:`finish` or
    :meth:`requeue`; :meth:`touch` asks nsqd for more time meanwhile.
    The methods only queue a command for the connection, so they are plain
    (not async); they can be called from any task of the Reader's event
    loop and from any thread (a sync handler's worker thread, a pool of
    your own), as long as the Reader is running.
    """

    id: bytes
    body: bytes
    attempts: int
    timestamp: int
    address: str = ""
    _responder: Responder | None = attrs.field(default=None, repr=False, alias="responder")
    _responded: bool = attrs.field(default=False, repr=False, init=False)
    _auto_response: bool = attrs.field(default=True, repr=False, init=False)

    @property
    def has_responded(self) -> bool:
        return self._responded

    @property
    def auto_response(self) -> bool:
        return self._auto_response

    def disable_auto_response(self) -> None:
        self._auto_response = False

    def finish(self) -> None:
        """FIN: processed, nsqd forgets it."""
        self._claim()
        if self._responder is not None:
            self._responder.finish(self)

    def requeue(self, delay: float | None = None, *, backoff: bool = True) -> None:
        """REQ: deliver again after ``delay`` seconds (``None``: the Reader's
        default, ``default_requeue_delay`` x attempts, capped).  ``backoff``
        tells the Reader to slow down, as a failure does."""
        self._claim()
        if self._responder is not None:
            self._responder.requeue(self, delay, backoff)

    def touch(self) -> None:
        """TOUCH: reset nsqd's timeout for this message."""
        if self._responded:
            raise AlreadyResponded(self.id.decode(errors="replace"))
        if self._responder is not None:
            self._responder.touch(self)

    def _claim(self) -> None:
        if self._responded:
            raise AlreadyResponded(self.id.decode(errors="replace"))
        self._responded = True
