"""A userspace TCP relay that delays every chunk by a fixed time, both ways, in order.

Why: kernels of our kind have no ``tc netem``, so a link's latency cannot come from the
kernel; ``tbf`` limits the rate but adds no fixed delay. This relay sits on the path of one
TCP service (e.g. in front of the cloud server, inside the cloud host's network namespace)
and holds each chunk it reads for ``delay`` before writing it on, in each direction, so a
request/answer exchange through it takes at least ``2 * delay`` (the RTT). It also counts
the payload bytes it carries each way (what crossed the link, before TCP/IP headers), and
can take the link down (every connection reset, new ones refused) and bring it back.
:class:`ThreadedRelay` runs one in a background thread for synchronous code.

In a namespace::

    ip netns exec CLOUD python -m edgecloud.netlink_relay --listen 10.0.0.6:8100 \\
        --target 127.0.0.1:8101 --delay-ms 20 --stats-file relay.json

Signals of the command: SIGUSR1 writes the counters to ``--stats-file`` (``seq`` increases
by one per write; it is also written once listening and at exit), SIGUSR2 takes the link
down, SIGHUP brings it back up, SIGTERM/SIGINT stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

@dataclass
class RelayStats:
    """Counters of one relay (payload bytes: what the applications exchanged)."""

    up_bytes: int = 0      # read from accepted (client) connections, sent to the target
    down_bytes: int = 0    # read from the target, sent back to clients
    connections: int = 0   # client connections relayed to the target
    active: int = 0        # of those, still open
    refused: int = 0       # client connections reset: link down or target unreachable
    down: bool = False     # the link is down now


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _no_delay(writer: asyncio.StreamWriter) -> None:
    """Nagle would hold small HTTP/2 frames back on top of the configured delay."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DelayRelay:
    """Relays TCP connections from ``listen`` to ``target``, each chunk ``delay_s`` late.

    Order is preserved per direction (one FIFO per direction); a bounded queue gives back
    pressure (the relay stops reading when ``max_queued_chunks`` are waiting). Run it on an
    asyncio loop: ``await relay.start()``, ``await relay.set_down(True)``, ``await relay.close()``.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        delay_s: float,
        *,
        chunk_size: int = 64 * 1024,
        max_queued_chunks: int = 256,
    ) -> None:
        if delay_s < 0:
            raise ValueError("delay must be >= 0")
        self.listen = listen
        self.target = target
        self.delay_s = float(delay_s)
        self.chunk_size = int(chunk_size)
        self.max_queued_chunks = int(max_queued_chunks)
        self.stats = RelayStats()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is known after :meth:`start` when 0 was asked."""
        return self.listen

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound address."""
        self._server = await asyncio.start_server(
            self._accept, self.listen[0], self.listen[1], reuse_address=True
        )
        bound = self._server.sockets[0].getsockname()
        self.listen = (self.listen[0], int(bound[1]))  # a later set_down(False) rebinds it
        self.stats.down = False
        return self.listen

    async def set_down(self, down: bool) -> None:
        """Down: stop listening (connects are refused) and reset every open connection.
        Up: listen again on the same address."""
        if down == self.stats.down:
            return
        if down:
            self.stats.down = True
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            for writer in list(self._writers):
                writer.transport.abort()  # RST to both ends: the peers see the link fail
        else:
            await self.start()

    async def close(self) -> None:
        """Stop listening and end every connection."""
        await self.set_down(True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- one connection ------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            # close() ended it. Returning (not raising) matters: asyncio's streams call
            # task.exception() on this task, which logs a cancelled one as an error.
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stats.down:  # accepted just before the listener closed
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.stats.refused += 1
            writer.transport.abort()
            return
        for w in (writer, t_writer):
            _no_delay(w)
            self._writers.add(w)
        self.stats.connections += 1
        self.stats.active += 1
        pipes = [
            asyncio.ensure_future(self._pipe(reader, t_writer, "up_bytes")),
            asyncio.ensure_future(self._pipe(t_reader, writer, "down_bytes")),
        ]
        try:
            # Both halves end with EOF normally; an error on one side resets the whole connection.
            done, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            if any(t.exception() is not None for t in done):
                for t in pending:
                    t.cancel()
                for w in (writer, t_writer):
                    w.transport.abort()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for t in pipes:
                t.cancel()
            for w in (writer, t_writer):
                self._writers.discard(w)
                w.close()
            self.stats.active -= 1

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        """Copy one direction: a reader task stamps chunks into a FIFO, this task writes each
        no earlier than its stamp + delay (so order holds and every chunk is late by delay)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes | BaseException]] = asyncio.Queue(self.max_queued_chunks)

        async def read_side() -> None:
            try:
                while True:
                    data = await reader.read(self.chunk_size)
                    if data:
                        setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
                    await queue.put((loop.time() + self.delay_s, data))
                    if not data:
                        return
            except (OSError, asyncio.IncompleteReadError) as exc:  # reset: pass it on, in order
                await queue.put((0.0, exc))

        reading = asyncio.ensure_future(read_side())
        try:
            while True:
                due, data = await queue.get()
                if isinstance(data, BaseException):
                    raise data
                while (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()  # half-close: the other direction may go on
                    return
                writer.write(data)
                await writer.drain()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading


class ThreadedRelay:
    """A :class:`DelayRelay` on its own event-loop thread, for synchronous code (tests that
    want a slow or failing link on loopback, without namespaces). A context manager."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float, **kw: int) -> None:
        self.relay = DelayRelay(listen, target, delay_s, **kw)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-relay", daemon=True)
        self._thread.start()
        self._run(self.relay.start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    @property
    def address(self) -> str:
        """``host:port`` to dial instead of the target."""
        host, port = self.relay.address
        return f"{host}:{port}"

    @property
    def stats(self) -> RelayStats:
        """A copy of the counters now."""
        return self._run(self._copy_stats())

    async def _copy_stats(self) -> RelayStats:
        return RelayStats(**asdict(self.relay.stats))

    def set_down(self, down: bool) -> None:
        self._run(self.relay.set_down(down))

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self.relay.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()

    def __enter__(self) -> "ThreadedRelay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the command ---------------------------------------------------------------------------
def _write_stats(path: Path | None, relay: DelayRelay, seq: int) -> None:
    if path is None:
        return
    data = {"seq": seq, "listen": f"{relay.listen[0]}:{relay.listen[1]}", "pid": os.getpid(),
            **asdict(relay.stats)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # readers never see half a file


async def _main(args: argparse.Namespace) -> int:
    relay = DelayRelay(parse_address(args.listen), parse_address(args.target), args.delay_ms / 1000.0,
                       chunk_size=args.chunk_size)
    stats_file = Path(args.stats_file) if args.stats_file else None
    await relay.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    seq = 0

    def dump() -> None:
        nonlocal seq
        seq += 1
        _write_stats(stats_file, relay, seq)

    def link(down: bool) -> None:
        async def go() -> None:
            await relay.set_down(down)
            print(f"edgecloud relay link {'down' if down else 'up'}", flush=True)
            dump()
        loop.create_task(go())

    loop.add_signal_handler(signal.SIGUSR1, dump)
    loop.add_signal_handler(signal.SIGUSR2, link, True)
    loop.add_signal_handler(signal.SIGHUP, link, False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _write_stats(stats_file, relay, seq)
    host, port = relay.listen
    print(f"edgecloud relay listening {host}:{port} -> {args.target} "
          f"delay={args.delay_ms:g}ms each way", flush=True)
    await stop.wait()
    await relay.close()
    dump()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgecloud.netlink_relay",
        description="TCP relay adding a fixed delay to each chunk, each way (a link's latency "
                    "without tc netem). SIGUSR1: write stats; SIGUSR2: link down; SIGHUP: link up.",
    )
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0: any free)")
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay, each direction")
    parser.add_argument("--stats-file", help="JSON counters, written on SIGUSR1, at start and at exit")
    parser.add_argument("--chunk-size", type=int, default=64 * 1024, help="largest read (bytes)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    try:
        return asyncio.run(_main(args))
    except OSError as exc:
        print(f"edgecloud relay: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
