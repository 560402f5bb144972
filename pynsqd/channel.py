"""A channel: one consumer group's copy of a topic's messages.

Plain synchronous code (the daemon's trio edge only runs its timer): messages
wait in a bounded memory queue backed by a ``BackendQueue`` for the overflow;
subscribed clients that are ready (in-flight < RDY) get messages pushed to
them round-robin the moment both exist, without a task per client or per
message.  In-flight messages sit in dicts grouped by timeout, each in
deadline order (no heap work per message); deferred ones in a due-time heap.  ``process_timeouts(now)`` requeues what expired and
returns when it next needs to run.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .backend_queue import BackendQueue
from .client_v2 import ClientV2
from .log import get_logger
from .memory_queue import MemoryQueue
from .message import Message, Messages, any_deferred, encode_messages
from .protocol import is_ephemeral

if TYPE_CHECKING:
    from .e2e import LatencyStream

log = get_logger()

INF = float("inf")
# a popped copy of a message whose other copy is in flight waits this long (guarded channels)
DUPLICATE_RETRY = 1.0


class ChannelError(Exception):
    """FIN/REQ/TOUCH of an id this client cannot act on (non-fatal)."""


class ChannelExiting(Exception):
    """The channel is being deleted or the daemon is stopping."""


class TooManyConsumers(Exception):
    pass


class Channel:
    def __init__(
        self,
        topic_name: str,
        name: str,
        *,
        backend: BackendQueue,
        mem_queue_size: int,
        max_msg_timeout: float,
        max_channel_consumers: int = 0,
        clock: Callable[[], float] = time.monotonic,
        on_deadline: Callable[[float], None] | None = None,
        on_delete: Callable[[Channel], None] | None = None,
        e2e: LatencyStream | None = None,
    ) -> None:
        self.topic_name = topic_name
        self.name = name
        self.ephemeral = is_ephemeral(name)
        self.backend = backend
        self.mem_queue_size = mem_queue_size
        self.max_msg_timeout = max_msg_timeout
        self.max_channel_consumers = max_channel_consumers
        self._clock = clock
        # told the earliest time process_timeouts() must run (the trio timer task)
        self._on_deadline = on_deadline
        # ephemeral channels delete themselves when their last client leaves
        self._on_delete = on_delete
        self.e2e = e2e

        self.memory = MemoryQueue()
        self.in_flight: dict[bytes, Message] = {}
        # in-flight messages by the timeout they were given: deliveries and
        # TOUCHes append with deadline = now + that timeout, so each dict is
        # in deadline order and expiry only looks at its head
        self._flights: dict[float, dict[bytes, Message]] = {}
        # the rare deadline that breaks that order (a TOUCH capped by
        # --max-msg-timeout): (deadline, seq, message), checked lazily
        self._irregular: list[tuple[float, int, Message]] = []
        self.deferred: dict[bytes, Message] = {}
        self._deferred_heap: list[tuple[float, int, Message]] = []
        self._seq = itertools.count()
        self._next_deadline = INF

        self.clients: dict[int, ClientV2] = {}
        self._ready: deque[ClientV2] = deque()
        self._backend_turn = False
        self._pumping = False

        self.paused = False
        # held by a move into this channel (--sync-every=1): nothing is
        # delivered until the move is on disk in full
        self.holds = 0
        # paused or held: the one flag the delivery paths look at
        self.stopped = False
        self.exiting = False
        self.message_count = 0
        self.requeue_count = 0
        self.timeout_count = 0
        # server-side max attempts (0: off, as nsqd): a message delivered this
        # many times is handed to on_dead_letter instead of being delivered again
        self.max_attempts = 0
        self.dead_letter_topic = ""
        self.dead_letter_count = 0
        self.on_dead_letter: Callable[[Channel, list[Message]], None] | None = None
        # told of messages that leave for good (FIN) when the channel's topic
        # is a dead-letter topic (its log forgets what no channel still holds)
        self.on_finished: Callable[[Channel, Sequence[Message]], None] | None = None
        # nsqd.dat keys of settings made through the HTTP API (settings.py)
        self.settings: dict[str, object] = {}
        # a backend with tracked reads keeps every message on disk until FIN
        self.durable = bool(getattr(backend, "track_acks", False))
        # id -> due time (unix ns) of messages that were deferred when the
        # daemon last stopped; applied when they are read back
        self.pending_deferrals: dict[bytes, int] = {}
        # a replay of the topic's retained messages into this channel (replay.py)
        self.replay: Any = None

    def __repr__(self) -> str:
        return f"Channel({self.topic_name}:{self.name})"

    # ------------------------------------------------------------ depth

    def depth(self) -> int:
        return len(self.memory) + self.backend.depth()

    # ------------------------------------------------------------ putting

    def put_messages(self, msgs: Messages, mark: int | None = None) -> None:
        """Messages arriving from the topic, all or none: raises BackendError
        (nothing accepted) if what must go to disk cannot be stored.  ``mark``:
        the batch is the topic's backlog up to that position (durable mode)."""
        if self.exiting:
            raise ChannelExiting(self.name)
        if self.durable:
            self._put_durable(msgs, mark)
            return
        plain = msgs
        deferred = None
        if any_deferred(msgs):
            plain = [m for m in msgs if not m.deferred]
            deferred = [m for m in msgs if m.deferred]
        if plain:
            self._enqueue(plain)
        self.message_count += len(msgs)
        if deferred:
            now = self._clock()
            for m in deferred:
                self._defer(m, now + m.deferred)
                m.deferred = 0.0
        if plain:
            self._pump()

    def _put_durable(self, msgs: Messages, mark: int | None) -> None:
        """--sync-every=1: every message to disk, a deferred one with its due
        time in the queue's journal (read back into the deferred heap)."""
        notes = None
        if any_deferred(msgs):
            now = time.time_ns()
            notes = [now + int(m.deferred * 1e9) if m.deferred else 0 for m in msgs]
        self.backend.put_many(encode_messages(msgs), notes=notes, mark=mark)  # type: ignore[call-arg]
        self.message_count += len(msgs)
        self._pump()

    def _enqueue(self, msgs: Messages) -> None:
        """Into memory up to mem-queue-size, the rest to the backend (written
        first, so that a failure leaves nothing half-accepted)."""
        mem = self.memory
        room = self.mem_queue_size - len(mem)
        if room >= len(msgs):
            mem.put(msgs)
            return
        if room > 0:
            self.backend.put_many(encode_messages(msgs[room:]))
            mem.put(msgs[:room])
        else:
            self.backend.put_many(encode_messages(msgs))

    def take_stalled(self, msgs: Messages) -> None:
        """Shutdown: messages the topic still owed this channel (its disk was
        full) go to memory, whatever its bound, to be flushed with the rest."""
        self.message_count += len(msgs)
        now = self._clock()
        for m in msgs:
            if m.deferred:
                self._defer(m, now + m.deferred)
                m.deferred = 0.0
            else:
                self.memory.append(m)

    def _requeue(self, msg: Message) -> None:
        """A message back from a client (REQ 0, timeout, disconnect) or a due deferred one."""
        msg.client = None
        if self.max_attempts and msg.attempts >= self.max_attempts:
            self._dead_letter([msg])
            return
        if len(self.memory) < self.mem_queue_size:
            self.memory.append(msg)
            return
        try:
            if msg.token is not None:
                # stored again at the tail, the old record let go (durably
                # one or the other, whenever a crash comes)
                self.backend.put_again([msg.encode()], [msg.token])  # type: ignore[attr-defined]
                msg.token = None
            else:
                self.backend.put(msg.encode())
        except Exception:
            # keep it rather than lose it: memory may exceed its bound briefly
            log.warning("backend write failed on requeue, keeping message in memory", channel=self.name, topic=self.topic_name)
            self.memory.append(msg)

    # ------------------------------------------------------------ delivery

    def _pop(self) -> Message | None:
        """Next message, alternating memory and backend so neither starves."""
        mem = self.memory
        backend = self.backend
        while True:
            use_backend = backend.depth() > 0 and (not mem or self._backend_turn)
            if use_backend:
                self._backend_turn = False
                token = None
                note = 0
                if self.durable:
                    item = backend.get_tracked()  # type: ignore[attr-defined]
                    data, token, note = item if item is not None else (None, None, 0)
                else:
                    data = backend.get()
                if data is None:
                    if not mem:
                        return None
                    continue
                try:
                    msg = Message.decode(data)
                except ValueError:
                    log.error("failed to decode message from backend", channel=self.name, topic=self.topic_name)
                    if token is not None:
                        backend.ack(token)  # type: ignore[attr-defined]
                    continue
                msg.token = token
                if self.max_attempts and msg.attempts >= self.max_attempts:
                    # delivered as often as allowed before it was stored (a
                    # restart, the bound lowered): not delivered again
                    self._dead_letter([msg])
                    continue
                if note:
                    # a due time from the journal (DPUB, REQ with a delay)
                    remaining = (note - time.time_ns()) / 1e9
                    if remaining > 0:
                        self._defer(msg, self._clock() + remaining, noted=True)
                        continue
                if self.pending_deferrals:
                    due = self.pending_deferrals.pop(msg.id, None)
                    if due is not None:
                        remaining = (due - time.time_ns()) / 1e9
                        if remaining > 0:
                            self._defer(msg, self._clock() + remaining)
                            continue
                return msg
            if mem:
                self._backend_turn = True
                return mem.popleft()
            return None

    def _pop_many(self, limit: int) -> list[Message]:
        """Up to ``limit`` messages, as ``_pop`` would give them one by one."""
        if self.backend.depth() == 0:
            self._backend_turn = True
            return self.memory.pop_many(limit)
        out: list[Message] = []
        while len(out) < limit:
            msg = self._pop()
            if msg is None:
                break
            out.append(msg)
        return out

    # ------------------------------------------------------------ replays

    def put_replayed(self, msgs: list[Message]) -> None:
        """Messages a replay gives the channel again: as published ones,
        except that one whose id waits deferred here is left to that copy
        (delivered after the replay was asked for, as the replay promises).
        From now on the channel keeps two copies of an id out of flight at once."""
        self.guard_duplicates()
        deferred = self.deferred
        fresh = [m for m in msgs if m.id not in deferred] if deferred else msgs
        if fresh:
            Channel.put_messages(self, fresh)

    def skip_replayed(self) -> None:
        """While a replay runs, what the topic hands over (its held backlog)
        that the replay gives anyway is left out (``Replay.keep``): only this
        instance's ``put_messages`` is replaced."""
        if "put_messages" not in self.__dict__:
            self.put_messages = self._put_unreplayed  # type: ignore[method-assign]

    def _put_unreplayed(self, msgs: Messages, mark: int | None = None) -> None:
        replay = self.replay
        if replay is not None:
            msgs = replay.keep(msgs)
        Channel.put_messages(self, msgs, mark)

    def guard_duplicates(self) -> None:
        """A replayed copy can meet the channel's own copy of a message: from
        now on a message popped while a copy of it is in flight waits
        (deferred ``DUPLICATE_RETRY`` s) and one popped while a copy waits
        deferred is dropped (that copy will be delivered).  Only guarded
        channels pay for the check: their instance's ``_pop``/``_pop_many``
        are replaced."""
        if "_pop" not in self.__dict__:
            self._pop = self._pop_guarded  # type: ignore[method-assign]
            self._pop_many = self._pop_many_guarded  # type: ignore[method-assign]

    def _pop_guarded(self) -> Message | None:
        while True:
            msg = Channel._pop(self)
            if msg is None or self._admit(msg, None):
                return msg

    def _pop_many_guarded(self, limit: int) -> list[Message]:
        out: list[Message] = []
        taking: set[bytes] = set()
        while len(out) < limit:
            got = Channel._pop_many(self, limit - len(out))
            if not got:
                break
            for msg in got:
                if self._admit(msg, taking):
                    out.append(msg)
                    taking.add(msg.id)
        return out

    def _admit(self, msg: Message, taking: set[bytes] | None) -> bool:
        msg_id = msg.id
        if msg_id in self.deferred:
            if msg.token is not None:
                self.backend.ack(msg.token)  # type: ignore[attr-defined]
            return False
        if msg_id in self.in_flight or (taking is not None and msg_id in taking):
            self._defer(msg, self._clock() + DUPLICATE_RETRY)
            return False
        return True

    def _pump(self) -> None:
        """Push queued messages to ready clients until one side runs out."""
        if self._pumping or self.stopped:
            return
        ready = self._ready
        if not ready:
            return
        self._pumping = True
        try:
            mem = self.memory
            backend = self.backend
            # competing consumers take turns, each taking its share of what is waiting
            share = max(1, -(-(len(mem) + backend.depth()) // len(ready)))
            while ready and (mem or backend.depth() > 0):
                client = ready[0]
                if not client.can_receive():
                    ready.popleft()
                    client.in_ready_queue = False
                    client.flush_now = True
                    client.wakeup()
                    continue
                if client.sample_rate:
                    msg = self._pop()
                    if msg is None:
                        break
                    if not client.sampled_out():
                        self._start_in_flight((msg,), client)
                        client.deliver(msg)
                else:
                    msgs = self._pop_many(min(share, client.ready_count - client.in_flight_count))
                    if not msgs:
                        break
                    self._start_in_flight(msgs, client)
                    client.deliver_many(msgs)
                if len(ready) > 1:
                    ready.rotate(-1)
        finally:
            self._pumping = False

    def _start_in_flight(self, msgs: Sequence[Message], client: ClientV2) -> None:
        now = self._clock()
        timeout = client.msg_timeout
        deadline = now + timeout
        flight = self._flights.get(timeout)
        if flight is None:
            flight = self._flights[timeout] = {}
        in_flight = self.in_flight
        for msg in msgs:
            msg.attempts += 1
            msg.client = client
            msg.delivered_at = now
            msg.deadline = deadline
            in_flight[msg.id] = msg
            flight[msg.id] = msg
            msg.flight = flight
        if self.durable:
            for msg in msgs:
                if msg.token is not None:
                    # the record on disk counts the attempt too, for a redelivery after a crash
                    self.backend.set_attempts(msg.token, msg.attempts)  # type: ignore[attr-defined]
        if deadline < self._next_deadline:
            self._set_next_deadline(deadline)

    def _leave_flight(self, msg: Message) -> None:
        flight = msg.flight
        if flight is not None:
            del flight[msg.id]
            msg.flight = None
        # an irregular entry is recognised as stale when it comes up

    def _set_next_deadline(self, deadline: float) -> None:
        self._next_deadline = deadline
        if self._on_deadline is not None:
            self._on_deadline(deadline)

    def client_ready_changed(self, client: ClientV2) -> None:
        """RDY changed or a message left the client's window."""
        if client.can_receive() and not self.stopped:
            if not client.in_ready_queue:
                client.in_ready_queue = True
                self._ready.append(client)
            self._pump()
        else:
            # nsqd flushes a client the moment it stops being ready
            if client.out:
                client.flush_now = True
                client.wakeup()

    # ------------------------------------------------------------ clients

    def add_client(self, client: ClientV2) -> None:
        if self.exiting:
            raise ChannelExiting(self.name)
        if client.id in self.clients:
            return
        limit = self.max_channel_consumers
        if limit and len(self.clients) >= limit:
            raise TooManyConsumers(f"consumers for {self.topic_name}:{self.name} exceeds limit of {limit}")
        self.clients[client.id] = client
        client.channel = self
        self.client_ready_changed(client)

    def remove_client(self, client: ClientV2) -> None:
        if self.clients.pop(client.id, None) is None:
            return
        if client.in_ready_queue:
            try:
                self._ready.remove(client)
            except ValueError:
                pass
            client.in_ready_queue = False
        # nsqd leaves a gone client's messages to time out; handing them to
        # the remaining consumers at once loses nothing and is faster
        owned = [m for m in self.in_flight.values() if m.client is client]
        for msg in owned:
            del self.in_flight[msg.id]
            self._leave_flight(msg)
            self._requeue(msg)
        client.in_flight_count = 0
        if self.ephemeral and not self.clients and not self.exiting:
            if self._on_delete is not None:
                self._on_delete(self)
            return
        if owned:
            self._pump()

    # ------------------------------------------------------------ FIN / REQ / TOUCH

    def _owned(self, client: ClientV2, msg_id: bytes) -> Message:
        msg = self.in_flight.get(msg_id)
        if msg is None:
            raise ChannelError("ID not in flight")
        if msg.client is not client:
            raise ChannelError("client does not own message")
        return msg

    def _pop_in_flight(self, client: ClientV2, msg_id: bytes) -> Message:
        msg = self._owned(client, msg_id)
        del self.in_flight[msg_id]
        self._leave_flight(msg)
        return msg

    def finish(self, client: ClientV2, msg_id: bytes) -> None:
        msg = self._pop_in_flight(client, msg_id)
        self._finished(client, (msg,))

    def finish_many(self, client: ClientV2, ids: Sequence[bytes], start: int = 0) -> int:
        """FIN ``ids[start:]`` in order, up to the first one this client cannot
        finish; returns its index (``len(ids)``: all done; ``finish`` of that
        id raises the reason).  The consumer's hottest path: a buffer of FINs
        at a time, the freed slots refilled once at the end."""
        in_flight = self.in_flight
        done = []
        stop = len(ids)
        for i in range(start, stop):
            msg_id = ids[i]
            msg = in_flight.get(msg_id)
            if msg is None or msg.client is not client:
                stop = i
                break
            del in_flight[msg_id]
            flight = msg.flight
            if flight is not None:
                del flight[msg_id]
                msg.flight = None
            done.append(msg)
        if done:
            self._finished(client, done)
        return stop

    def _finished(self, client: ClientV2, msgs: Sequence[Message]) -> None:
        """``msgs`` left ``client``'s window by FIN: count them, let their
        records go (durable mode), hand the client what is waiting."""
        if self.durable:
            for msg in msgs:
                if msg.token is not None:
                    self.backend.ack(msg.token)  # type: ignore[attr-defined]
        n = len(msgs)
        client.in_flight_count = max(0, client.in_flight_count - n)
        client.finish_count += n
        if self.e2e is not None:
            now = time.time_ns()
            for msg in msgs:
                self.e2e.add(now - msg.timestamp)
        if self.on_finished is not None:
            self.on_finished(self, msgs)
        want = client.ready_count - client.in_flight_count
        if want > 0 and not self.stopped and not self._pumping and not client.sample_rate and (self.memory or self.backend.depth() > 0):
            # messages are waiting, so no other client is ready and idle (the
            # pump never leaves one): this client takes the next ones, as
            # many as FIN by FIN would have handed it
            nxt = self._pop_many(want)
            if nxt:
                self._start_in_flight(nxt, client)
                client.deliver_many(nxt)
                if client.in_flight_count >= client.ready_count:
                    return
        self.client_ready_changed(client)

    def requeue(self, client: ClientV2, msg_id: bytes, delay: float) -> None:
        msg = self._pop_in_flight(client, msg_id)
        client.message_done()
        client.requeue_count += 1
        self.requeue_count += 1
        if delay > 0 and not (self.max_attempts and msg.attempts >= self.max_attempts):
            self._defer(msg, self._clock() + delay)
        else:
            self._requeue(msg)
        self.client_ready_changed(client)
        if delay <= 0:
            # the message is back in the queue: another ready client may take it
            self._pump()

    def touch(self, client: ClientV2, msg_id: bytes) -> None:
        msg = self._owned(client, msg_id)
        now = self._clock()
        timeout = client.msg_timeout
        deadline = now + timeout
        cap = msg.delivered_at + self.max_msg_timeout
        self._leave_flight(msg)
        if deadline <= cap:
            msg.deadline = deadline
            flight = self._flights.get(timeout)
            if flight is None:
                flight = self._flights[timeout] = {}
            flight[msg.id] = msg  # re-appended: still in deadline order
            msg.flight = flight
        else:
            msg.deadline = cap
            heapq.heappush(self._irregular, (cap, next(self._seq), msg))
            if cap < self._next_deadline:
                self._set_next_deadline(cap)

    # ------------------------------------------------------------ deferred

    def _defer(self, msg: Message, due: float, noted: bool = False) -> None:
        if msg.token is not None and not noted:
            # durable mode: the record on disk learns its due time
            wall = time.time_ns() + int((due - self._clock()) * 1e9)
            self.backend.set_note(msg.token, wall)  # type: ignore[attr-defined]
        msg.client = None
        msg.due = due
        deferred = self.deferred
        other = deferred.get(msg.id)
        deferred[msg.id] = msg
        if other is not None and other is not msg and other.token is not None and other.token != msg.token:
            # a replayed copy waited deferred (its heap entry is now stale): one
            # copy waits, the other is dropped -- on disk too, or a restart serves it again
            self.backend.ack(other.token)  # type: ignore[attr-defined]
        heapq.heappush(self._deferred_heap, (due, next(self._seq), msg))
        if due < self._next_deadline:
            self._set_next_deadline(due)

    def put_deferred(self, msg: Message, delay: float) -> None:
        self.message_count += 1
        self._defer(msg, self._clock() + delay)

    # ------------------------------------------------------------ timers

    def process_timeouts(self, now: float) -> float:
        """Requeue expired in-flight messages and release due deferred ones.

        Returns the next time this must run (``inf`` if nothing is pending)."""
        # insertion-ordered (a set of clients would order by address): the
        # same timeouts must hand out messages in the same order every run
        touched: dict[ClientV2, None] = {}
        in_flight = self.in_flight
        expired: list[Message] = []
        for flight in self._flights.values():
            while flight:
                msg = next(iter(flight.values()))
                if msg.deadline > now:
                    break
                del flight[msg.id]
                msg.flight = None
                expired.append(msg)
        heap = self._irregular
        while heap and heap[0][0] <= now:
            deadline, _, msg = heapq.heappop(heap)
            if in_flight.get(msg.id) is msg and msg.flight is None and msg.deadline == deadline:
                expired.append(msg)
        requeued = False
        for msg in expired:
            del in_flight[msg.id]
            self.timeout_count += 1
            client = msg.client
            if client is not None:
                client.message_done()
                touched[client] = None
            self._requeue(msg)
            requeued = True
        dheap = self._deferred_heap
        deferred = self.deferred
        while dheap and dheap[0][0] <= now:
            due, _, msg = heapq.heappop(dheap)
            if deferred.get(msg.id) is not msg or msg.due != due:
                continue
            del deferred[msg.id]
            self._requeue(msg)
            requeued = True
        for client in touched:
            if client.channel is self:
                self.client_ready_changed(client)
        if requeued:
            self._pump()
        # stale entries at the top would make the timer fire for nothing
        while heap and (in_flight.get(heap[0][2].id) is not heap[0][2] or heap[0][2].flight is not None or heap[0][2].deadline != heap[0][0]):
            heapq.heappop(heap)
        while dheap and (deferred.get(dheap[0][2].id) is not dheap[0][2] or dheap[0][2].due != dheap[0][0]):
            heapq.heappop(dheap)
        nxt = min(heap[0][0] if heap else INF, dheap[0][0] if dheap else INF)
        for flight in self._flights.values():
            if flight:
                nxt = min(nxt, next(iter(flight.values())).deadline)
        self._next_deadline = nxt
        return nxt

    @property
    def next_deadline(self) -> float:
        return self._next_deadline

    # ------------------------------------------------------------ dead letters and moves

    def _dead_letter(self, msgs: list[Message]) -> None:
        """Messages delivered max_attempts times leave the channel (to the
        daemon's dead-letter mover, dead_letter.py)."""
        for msg in msgs:
            msg.client = None
        assert self.on_dead_letter is not None
        self.on_dead_letter(self, msgs)

    def dead_letter_failed(self, msgs: list[Message], retry: float) -> None:
        """The dead-letter topic could not take them (its disk is full): they
        wait here, deferred, and are moved again after ``retry`` seconds."""
        due = self._clock() + retry
        for msg in msgs:
            self._defer(msg, due)

    def sweep_max_attempts(self) -> None:
        """max_attempts was set or lowered: queued and deferred messages
        already delivered that often go now."""
        limit = self.max_attempts
        if not limit:
            return
        out = self.memory.extract(lambda m: m.attempts >= limit)
        spent = [m for m in self.deferred.values() if m.attempts >= limit]
        for msg in spent:
            del self.deferred[msg.id]  # its heap entry is skipped as stale
        if out or spent:
            self._dead_letter(out + spent)

    def hold(self) -> None:
        self.holds += 1
        self.stopped = True

    def release(self) -> None:
        self.holds -= 1
        self.stopped = self.paused or self.holds > 0
        if not self.stopped:
            for client in list(self.clients.values()):
                self.client_ready_changed(client)
            self._pump()

    def take_queued(self, limit: int) -> list[Message]:
        """Up to ``limit`` queued messages out of the channel, to be moved
        elsewhere (in durable mode their records stay until acknowledged)."""
        return self._pop_many(limit)

    def put_back(self, msgs: list[Message]) -> None:
        """Messages from ``take_queued`` that stay: queued again at the tail."""
        for msg in msgs:
            self._requeue(msg)
        self._pump()

    def take_back(self, msgs: list[Message]) -> None:
        """Shutdown: messages that were on their way out (to a dead-letter
        topic) join the memory queue, to be written to disk with the rest."""
        for msg in msgs:
            self.memory.append(msg)

    # ------------------------------------------------------------ admin

    def pause(self) -> None:
        self.paused = self.stopped = True
        for client in self.clients.values():
            if client.out:
                client.flush_now = True
                client.wakeup()

    def unpause(self) -> None:
        self.paused = False
        self.stopped = self.holds > 0
        for client in self.clients.values():
            self.client_ready_changed(client)
        self._pump()

    def empty(self) -> None:
        """Drop everything queued, in flight and deferred (nsqd's /channel/empty)."""
        self.memory.clear()
        self.backend.empty()
        self.in_flight.clear()
        self._flights.clear()
        self._irregular.clear()
        self.deferred.clear()
        self._deferred_heap.clear()
        for client in self.clients.values():
            client.in_flight_count = 0
            self.client_ready_changed(client)

    def close_clients(self) -> None:
        for client in list(self.clients.values()):
            client.close_connection()

    def delete(self) -> None:
        """Remove the channel: close its consumers, drop its data."""
        self.exiting = True
        self.close_clients()
        self.memory.clear()
        self.in_flight.clear()
        self.deferred.clear()
        self._flights.clear()
        self._irregular.clear()
        self._deferred_heap.clear()
        self.backend.delete()

    def flush_to_backend(self) -> dict[bytes, int]:
        """Shutdown: everything unfinished goes to the backend as ordinary
        messages (a Go nsqd reads them too) — in-flight ones (redelivered
        later, attempts kept), the memory queue, then deferred ones.

        Returns the deferrals to keep beside the queue: id -> due time (unix
        ns), for deferred messages and for those read back from a previous
        shutdown's list that have not come up yet."""
        now_wall = time.time_ns()
        now = self._clock()
        deferrals = dict(self.pending_deferrals)
        due = {m.id: now_wall + max(0, int((m.due - now) * 1e9)) for m in self.deferred.values()}
        msgs = list(self.in_flight.values()) + list(self.memory) + list(self.deferred.values())
        self.in_flight.clear()
        self._flights.clear()
        self._irregular.clear()
        self.memory.clear()
        self.deferred.clear()
        self._deferred_heap.clear()
        if not msgs:
            return deferrals
        if self.durable:
            # each stored again with its due time in the journal, its old record let go
            notes = [due.get(m.id, 0) for m in msgs]
            self.backend.put_again([m.encode() for m in msgs], [m.token for m in msgs], notes)  # type: ignore[attr-defined]
            return deferrals
        self.backend.put_many([m.encode() for m in msgs])
        deferrals.update(due)
        return deferrals

    def stats(self, include_clients: bool = True) -> dict[str, object]:
        clients = [c.stats() for c in self.clients.values()] if include_clients else []
        out = {
            "channel_name": self.name,
            "depth": self.depth(),
            "backend_depth": self.backend.depth(),
            "in_flight_count": len(self.in_flight),
            "deferred_count": len(self.deferred),
            "message_count": self.message_count,
            "requeue_count": self.requeue_count,
            "timeout_count": self.timeout_count,
            "client_count": len(self.clients),
            "clients": clients,
            "paused": self.paused,
            "e2e_processing_latency": self.e2e.result() if self.e2e is not None else {"count": 0, "percentiles": None},
        }
        if self.max_attempts:
            # only where the feature is on: otherwise exactly nsqd's fields
            out["max_attempts"] = self.max_attempts
            out["dead_letter_topic"] = self.dead_letter_topic
            out["dead_letter_count"] = self.dead_letter_count
        if self.replay is not None:
            out["replay"] = self.replay.stats()
        return out

