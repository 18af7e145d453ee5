"""DailyChannel (Tavus' Interactions Protocol through a Daily room) against a daily-python double.

No Daily room is reachable from the tests, so ``FakeCallClient`` stands in for
``daily.CallClient``: same method signatures, and, like daily-python, it invokes every
completion and event callback on its own worker thread, never on the event loop's thread, and
after the call that caused it has returned. Inbound events go through
``DailyChannel._from_thread`` exactly as the real ``_Handler`` translates them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import daily
import pytest

from avatarkit import AvatarKit, ConfigError, KitConfig, ProviderConnectionError
from avatarkit.providers._tavus_channel import PROVIDER, DailyChannel
from avatarkit.providers.tavus import TavusProvider

ROOM = "https://tavus.daily.co/c123456"
TOKEN = "meeting-token-abc"
NO_DEVICES = {"inputs": {"camera": False, "microphone": False}}

JoinCompletion = Callable[[Mapping[str, Any] | None, str | None], None]
Completion = Callable[[str | None], None]


class FakeCallClient:
    """A ``daily.CallClient`` double whose callbacks all run on one worker thread.

    ``calls`` logs what the channel called (from the loop thread) and when each completion was
    delivered (from the worker), in order. Any exception a callback raises on the worker, and
    any callback that runs on the loop's thread, lands in ``callback_errors``.
    """

    def __init__(
        self,
        channel: DailyChannel,
        *,
        join_error: str | None = None,
        join_hangs: bool = False,
        send_error: str | None = None,
        send_hangs: bool = False,
        leave_error: str | None = None,
        left_on_leave: bool = True,
    ) -> None:
        self.channel = channel
        self.loop_thread = threading.get_ident()  # the factory runs on the loop's thread
        self.join_error = join_error
        self.join_hangs = join_hangs
        self.send_error = send_error
        self.send_hangs = send_hangs
        self.leave_error = leave_error
        self.left_on_leave = left_on_leave
        self.calls: list[str] = []
        self.raw_calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.sent: list[str] = []  # what went on the wire, serialised as Daily would
        self.callback_threads: list[int] = []
        self.callback_errors: list[BaseException] = []
        self.held: list[Callable[[], None]] = []  # completions that "never" came (so far)
        self.released = False
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="fake-daily-worker", daemon=True)
        self._worker.start()

    # -- the worker thread --------------------------------------------------------------

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            me = threading.get_ident()
            self.callback_threads.append(me)
            if me == self.loop_thread:
                self.callback_errors.append(AssertionError("callback on the loop thread"))
            try:
                job()
            except BaseException as exc:  # a real Daily worker would die or log this
                self.callback_errors.append(exc)

    def _post(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def drain(self, timeout: float = 2.0) -> None:
        """Wait until the worker has run everything posted so far."""
        done = threading.Event()
        self._post(done.set)
        assert done.wait(timeout), "the fake Daily worker is stuck"

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._worker.join(2.0)
        assert not self._worker.is_alive()

    def deliver_held(self) -> None:
        held, self.held = self.held, []
        for job in held:
            self._post(job)

    def _check_usable(self) -> None:
        if self.released:
            raise RuntimeError("CallClient used after release()")

    # -- daily.CallClient ---------------------------------------------------------------

    def join(
        self,
        meeting_url: str,
        meeting_token: str | None = None,
        client_settings: Mapping[str, Any] | None = None,
        completion: JoinCompletion | None = None,
    ) -> None:
        self._check_usable()
        self.calls.append("join")
        self.raw_calls.append(("join", (meeting_url,), {
            "meeting_token": meeting_token, "client_settings": client_settings,
            "completion": completion}))

        def complete() -> None:
            self.calls.append("join:completed")
            if completion is not None:
                if self.join_error is not None:
                    completion(None, self.join_error)
                else:
                    completion({"participants": {"local": {"id": "local-1"}}}, None)

        (self.held.append if self.join_hangs else self._post)(complete)

    def send_app_message(
        self,
        message: Any,
        participant_id: str | None = None,
        serialize_none: bool = True,
        completion: Completion | None = None,
    ) -> None:
        self._check_usable()
        self.calls.append("send")
        self.raw_calls.append(("send_app_message", (message,), {"completion": completion}))
        assert isinstance(message, dict), f"Daily got a {type(message).__name__}"
        self.sent.append(json.dumps(message))  # Daily serialises it: must be JSON-able

        def complete() -> None:
            self.calls.append("send:completed")
            if completion is not None:
                completion(self.send_error)

        (self.held.append if self.send_hangs else self._post)(complete)

    def leave(self, completion: Completion | None = None) -> None:
        self._check_usable()
        self.calls.append("leave")
        self.raw_calls.append(("leave", (), {"completion": completion}))

        def complete() -> None:
            if self.left_on_leave:  # Daily reports the state change, then completes
                self.on_call_state_updated("left")
            self.calls.append("leave:completed")
            if completion is not None:
                completion(self.leave_error)

        self._post(complete)

    def release(self) -> None:
        self._check_usable()
        self.calls.append("release")
        self.raw_calls.append(("release", (), {}))
        self.released = True

    # -- daily.EventHandler, translated exactly as DailyChannel's _Handler does ----------

    def on_app_message(self, message: Any, sender: str) -> None:
        if message is not None:
            self.channel._from_thread(message)

    def on_call_state_updated(self, state: str) -> None:
        if state == "left":
            self.channel._from_thread(None)

    def on_error(self, message: str) -> None:
        self.channel._from_thread(ProviderConnectionError(f"Daily error: {message}",
                                                          provider=PROVIDER))

    # -- events "from the room", delivered on the worker ---------------------------------

    def emit_app_message(self, message: Any, sender: str = "tavus-replica") -> None:
        self._post(lambda: self.on_app_message(message, sender))

    def emit_call_state(self, state: str) -> None:
        self._post(lambda: self.on_call_state_updated(state))

    def emit_error(self, message: str) -> None:
        self._post(lambda: self.on_error(message))


@dataclass
class Rig:
    channel: DailyChannel
    clients: list[FakeCallClient] = field(default_factory=list)

    @property
    def client(self) -> FakeCallClient:
        assert len(self.clients) == 1, f"{len(self.clients)} call clients were made"
        return self.clients[0]


RigFactory = Callable[..., Rig]


@pytest.fixture
def make_rig() -> Iterator[RigFactory]:
    """``make_rig(join_timeout=..., **FakeCallClient options)``: a channel over a fake client.

    At teardown every fake's worker is stopped and must have seen no callback raise.
    """
    rigs: list[Rig] = []

    def make(*, join_timeout: float = 2.0, **behaviour: Any) -> Rig:
        clients: list[FakeCallClient] = []

        def fake(channel: DailyChannel) -> FakeCallClient:
            client = FakeCallClient(channel, **behaviour)
            clients.append(client)
            return client

        rig = Rig(DailyChannel(join_timeout=join_timeout, call_client_factory=fake), clients)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        for client in rig.clients:
            client.shutdown()
            assert client.callback_errors == []


async def collect(channel: DailyChannel, within: float = 1.0) -> list[dict[str, Any]]:
    async with asyncio.timeout(within):
        return [message async for message in channel.messages()]


# -- connect --------------------------------------------------------------------------------


async def test_join_passes_token_and_disables_camera_and_microphone(make_rig: RigFactory) -> None:
    rig = make_rig()
    await rig.channel.connect(ROOM, TOKEN)
    client = rig.client
    assert client.calls == ["join", "join:completed"]  # connect waited for the completion
    name, args, kwargs = client.raw_calls[0]
    assert (name, args) == ("join", (ROOM,))
    assert kwargs["meeting_token"] == TOKEN
    assert kwargs["client_settings"] == NO_DEVICES
    assert callable(kwargs["completion"])
    await rig.channel.aclose()


async def test_join_without_token_passes_none(make_rig: RigFactory) -> None:
    rig = make_rig()
    await rig.channel.connect(ROOM, None)
    assert rig.client.raw_calls[0][2]["meeting_token"] is None
    await rig.channel.aclose()


async def test_join_error_raises_and_leaves_and_releases(make_rig: RigFactory) -> None:
    rig = make_rig(join_error="not-allowed: room is private")
    with pytest.raises(ProviderConnectionError, match="not-allowed: room is private") as info:
        await rig.channel.connect(ROOM, TOKEN)
    assert info.value.provider == "tavus"
    assert rig.client.calls == ["join", "join:completed", "leave", "leave:completed", "release"]
    with pytest.raises(ProviderConnectionError, match="not connected"):
        await rig.channel.send({"message_type": "conversation"})


async def test_join_that_never_completes_times_out_and_cleans_up(make_rig: RigFactory) -> None:
    rig = make_rig(join_timeout=0.2, join_hangs=True)
    started = time.monotonic()
    with pytest.raises(ProviderConnectionError, match="timed out joining"):
        await rig.channel.connect(ROOM, TOKEN)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 1.5
    client = rig.client
    assert client.calls == ["join", "leave", "leave:completed", "release"]
    # The join completion turning up late, on a still-running loop, is harmless.
    client.deliver_held()
    client.drain()
    await asyncio.sleep(0.01)
    assert client.calls[-1] == "join:completed"


async def test_cancelled_connect_leaves_and_releases(make_rig: RigFactory) -> None:
    rig = make_rig(join_hangs=True)
    task = asyncio.create_task(rig.channel.connect(ROOM, TOKEN))
    await asyncio.sleep(0)  # connect runs up to awaiting the join completion
    assert rig.client.calls == ["join"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.client.calls == ["join", "leave", "leave:completed", "release"]


async def test_channel_calls_bind_to_real_daily_signatures(make_rig: RigFactory) -> None:
    """What the channel passes the fake would also be accepted by daily-python's CallClient."""
    rig = make_rig()
    await rig.channel.connect(ROOM, TOKEN)
    await rig.channel.send({"event_type": "conversation.interrupt"})
    await rig.channel.aclose()
    calls = rig.client.raw_calls
    assert [name for name, _, _ in calls] == ["join", "send_app_message", "leave", "release"]
    for name, args, kwargs in calls:
        real = inspect.signature(getattr(daily.CallClient, name))
        fake = inspect.signature(getattr(FakeCallClient, name))
        real.bind(object(), *args, **kwargs)
        fake.bind(object(), *args, **kwargs)
        # The fake accepts at least every parameter the real one has, with the same defaults.
        for param in real.parameters.values():
            if param.name != "self":
                assert fake.parameters[param.name].default == param.default, (name, param)


# -- send -----------------------------------------------------------------------------------


async def test_send_serialises_a_dict_and_awaits_the_completion(make_rig: RigFactory) -> None:
    rig = make_rig(send_hangs=True)
    await rig.channel.connect(ROOM, None)
    client = rig.client
    message = MappingProxyType({"message_type": "conversation",
                                "event_type": "conversation.echo",
                                "properties": {"done": True, "audio": "AAAA"}})
    sending = asyncio.create_task(rig.channel.send(message))
    await asyncio.sleep(0.05)
    assert client.calls[-1] == "send"
    assert not sending.done(), "send returned before Daily completed it"
    client.deliver_held()
    await asyncio.wait_for(sending, 1.0)
    assert client.calls[-2:] == ["send", "send:completed"]
    assert [json.loads(raw) for raw in client.sent] == [dict(message)]
    await rig.channel.aclose()


async def test_send_error_raises(make_rig: RigFactory) -> None:
    rig = make_rig(send_error="app-message-too-large")
    await rig.channel.connect(ROOM, None)
    with pytest.raises(ProviderConnectionError, match="app-message-too-large") as info:
        await rig.channel.send({"event_type": "conversation.echo"})
    assert info.value.provider == "tavus"
    await rig.channel.aclose()


async def test_send_before_connect_raises(make_rig: RigFactory) -> None:
    rig = make_rig()
    with pytest.raises(ProviderConnectionError, match="not connected"):
        await rig.channel.send({"event_type": "conversation.echo"})
    assert rig.clients == []


async def test_send_after_aclose_raises(make_rig: RigFactory) -> None:
    rig = make_rig()
    await rig.channel.connect(ROOM, None)
    await rig.channel.aclose()
    with pytest.raises(ProviderConnectionError, match="not connected"):
        await rig.channel.send({"event_type": "conversation.echo"})
    assert rig.client.calls.count("send") == 0


# -- inbound messages -----------------------------------------------------------------------


async def test_inbound_messages_in_order_and_non_objects_skipped(make_rig: RigFactory) -> None:
    rig = make_rig()
    await rig.channel.connect(ROOM, None)
    client = rig.client
    client.emit_call_state("joined")  # other states are not the end
    client.emit_app_message({"event_type": "conversation.replica.started_speaking", "n": 1})
    for junk in ([1, 2], 42, "not json", "[1, 2]", '"a string"', "null", None, True):
        client.emit_app_message(junk)
    client.emit_app_message('{"event_type": "conversation.utterance", "n": 2}')
    client.emit_app_message({"event_type": "conversation.replica.stopped_speaking", "n": 3})
    client.emit_call_state("left")
    messages = await collect(rig.channel)
    assert [m["n"] for m in messages] == [1, 2, 3]
    assert messages[1] == {"event_type": "conversation.utterance", "n": 2}
    await rig.channel.aclose()


async def test_daily_error_surfaces_from_messages(make_rig: RigFactory) -> None:
    rig = make_rig()
    await rig.channel.connect(ROOM, None)
    client = rig.client
    client.emit_app_message({"n": 1})
    client.emit_error("connection to the SFU lost")
    received: list[dict[str, Any]] = []
    with pytest.raises(ProviderConnectionError, match="SFU lost") as info:
        async with asyncio.timeout(1.0):
            async for message in rig.channel.messages():
                received.append(message)
    assert received == [{"n": 1}]
    assert info.value.provider == "tavus"
    await rig.channel.aclose()


async def test_left_ends_messages_cleanly(make_rig: RigFactory) -> None:
    rig = make_rig()
    await rig.channel.connect(ROOM, None)
    rig.client.emit_app_message({"n": 1})
    rig.client.emit_call_state("left")  # e.g. the room was ended from Tavus' side
    assert await collect(rig.channel) == [{"n": 1}]
    await rig.channel.aclose()


# -- aclose ---------------------------------------------------------------------------------


async def test_aclose_leaves_then_releases_and_is_idempotent(make_rig: RigFactory) -> None:
    rig = make_rig()
    await rig.channel.connect(ROOM, None)
    await rig.channel.aclose()
    await rig.channel.aclose()
    # release() only after Daily completed the leave
    assert rig.client.calls == ["join", "join:completed", "leave", "leave:completed", "release"]


async def test_aclose_before_connect_is_a_no_op(make_rig: RigFactory) -> None:
    rig = make_rig()
    await rig.channel.aclose()
    assert rig.clients == []


async def test_aclose_releases_even_when_leave_fails(make_rig: RigFactory) -> None:
    rig = make_rig(leave_error="not-joined")
    await rig.channel.connect(ROOM, None)
    await rig.channel.aclose()
    assert rig.client.calls[-3:] == ["leave", "leave:completed", "release"]


async def test_aclose_ends_an_ongoing_messages_iteration(make_rig: RigFactory) -> None:
    # Daily reports no "left" here, so only aclose itself can end the iteration.
    rig = make_rig(left_on_leave=False)
    await rig.channel.connect(ROOM, None)
    received: list[dict[str, Any]] = []
    first = asyncio.Event()

    async def read() -> None:
        async for message in rig.channel.messages():
            received.append(message)
            first.set()

    reader = asyncio.create_task(read())
    rig.client.emit_app_message({"n": 1})
    await asyncio.wait_for(first.wait(), 1.0)
    await asyncio.sleep(0.01)
    assert not reader.done()
    await rig.channel.aclose()
    await asyncio.wait_for(reader, 1.0)
    assert received == [{"n": 1}]


# -- threads --------------------------------------------------------------------------------


async def test_callbacks_come_from_another_thread(make_rig: RigFactory) -> None:
    rig = make_rig()
    await rig.channel.connect(ROOM, None)
    await rig.channel.send({"n": 0})
    rig.client.emit_app_message({"n": 1})
    rig.client.emit_error("boom")
    with pytest.raises(ProviderConnectionError):
        await collect(rig.channel)
    await rig.channel.aclose()
    client = rig.client
    client.drain()
    loop_thread = threading.get_ident()
    assert client.loop_thread == loop_thread
    assert len(client.callback_threads) >= 6  # join, send, message, error, leave, drain
    assert loop_thread not in client.callback_threads
    assert client.callback_errors == []


def test_callbacks_after_the_loop_closed_do_not_raise(make_rig: RigFactory) -> None:
    rig = make_rig(send_hangs=True)

    async def scenario() -> None:
        await rig.channel.connect(ROOM, None)
        # The send's completion has not come when the application gives up and its loop ends.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rig.channel.send({"n": 1}), 0.05)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    client = rig.client
    client.deliver_held()  # the send completion, late
    client.emit_app_message({"n": 2})
    client.emit_app_message('{"n": 3}')
    client.emit_error("late failure")
    client.emit_call_state("left")
    client.drain()
    assert client.calls[-1] == "send:completed"
    assert client.callback_errors == []


# -- the real daily-python bindings ---------------------------------------------------------


def test_daily_is_installed_and_event_handler_is_subclassable() -> None:
    assert DailyChannel.available()
    seen: list[tuple[Any, str]] = []

    class Handler(daily.EventHandler):
        def on_app_message(self, message: Any, sender: str) -> None:
            seen.append((message, sender))

    handler = Handler()
    assert isinstance(handler, daily.EventHandler)
    handler.on_app_message({"n": 1}, "peer")
    assert seen == [({"n": 1}, "peer")]


async def test_real_handler_translates_daily_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_make_client`` without a factory, with daily's CallClient (and init) swapped out, so
    that the channel's own ``_Handler`` is what receives the events."""
    handlers: list[Any] = []

    class CapturingCallClient:
        def __init__(self, event_handler: Any = None) -> None:
            handlers.append(event_handler)

    inits: list[bool] = []
    monkeypatch.setattr(daily, "CallClient", CapturingCallClient)
    monkeypatch.setattr(daily.Daily, "init", staticmethod(lambda *a, **k: inits.append(True)))
    monkeypatch.setattr(DailyChannel, "_initialised", False)
    channel = DailyChannel()
    channel._loop = asyncio.get_running_loop()  # what connect() sets before making the client
    assert isinstance(channel._make_client(), CapturingCallClient)
    assert isinstance(channel._make_client(), CapturingCallClient)
    assert inits == [True]  # Daily.init() once per process
    handler = handlers[0]
    assert isinstance(handler, daily.EventHandler)

    def from_daily() -> None:  # as Daily's worker would call it
        handler.on_call_state_updated("joining")
        handler.on_call_state_updated("joined")
        handler.on_app_message({"n": 1}, "replica")
        handler.on_app_message(None, "someone")  # a null payload is not "left"
        handler.on_app_message("[1]", "someone")
        handler.on_app_message('{"n": 2}', "replica")
        handler.on_error("meeting ended")

    worker = threading.Thread(target=from_daily)
    worker.start()
    worker.join()
    received: list[dict[str, Any]] = []
    with pytest.raises(ProviderConnectionError, match="Daily error: meeting ended"):
        async with asyncio.timeout(1.0):
            async for message in channel.messages():
                received.append(message)
    assert received == [{"n": 1}, {"n": 2}]

    worker = threading.Thread(target=handler.on_call_state_updated, args=("left",))
    worker.start()
    worker.join()
    assert await collect(channel) == []


# -- configuration --------------------------------------------------------------------------


async def test_kit_with_daily_channel_constructs() -> None:
    kit = AvatarKit(KitConfig(providers={"tavus": {"api_key": "k", "channel": "daily"}}))
    try:
        provider = kit.providers["tavus"]
        assert isinstance(provider, TavusProvider)
        assert isinstance(provider._new_channel(), DailyChannel)
    finally:
        await kit.aclose()


async def test_daily_channel_without_daily_python_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(DailyChannel, "available", classmethod(lambda cls: False))
    config = KitConfig(providers={"tavus": {"api_key": "k", "channel": "daily"}})
    with pytest.raises(ConfigError, match="daily-python") as info:
        AvatarKit(config)
    assert info.value.field == "providers.tavus.channel"
