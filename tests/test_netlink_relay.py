"""The delay relay on loopback (no root needed): delay, order, counters, link down/up, the CLI.

Only lower bounds on time are asserted (the delay is a floor by construction), never upper ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from edgecloud.netlink_relay import DelayRelay, ThreadedRelay, parse_address

REPO_ROOT = Path(__file__).resolve().parents[1]


@asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[str, int]]:
    """Echoes everything back; closes after the peer's EOF."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def relay_to(target: tuple[str, int], delay_s: float) -> AsyncIterator[DelayRelay]:
    relay = DelayRelay(("127.0.0.1", 0), target, delay_s, chunk_size=4096)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


def test_parse_address():
    assert parse_address("10.0.0.6:8100") == ("10.0.0.6", 8100)
    assert parse_address("[::1]:5") == ("::1", 5)
    with pytest.raises(ValueError):
        parse_address("nohost")


def test_round_trip_is_delayed_both_ways_order_kept_and_bytes_counted():
    delay = 0.03

    async def scenario() -> None:
        async with echo_server() as target, relay_to(target, delay) as relay:
            reader, writer = await asyncio.open_connection(*relay.address)
            start = time.monotonic()
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            rtt = time.monotonic() - start
            assert rtt >= 2 * delay  # one delay each way, a floor by construction
            # Many writes of varied content arrive complete and in order.
            payload = b"".join(i.to_bytes(4, "big") * 300 for i in range(400))  # 480 kB
            for i in range(0, len(payload), 1000):
                writer.write(payload[i:i + 1000])
            await writer.drain()
            writer.write_eof()  # half-close: the echo side still answers, then closes
            got = await asyncio.wait_for(reader.read(), timeout=30)
            assert got == payload
            writer.close()
            await asyncio.sleep(0.1)  # let the relay see both EOFs
            assert relay.stats.up_bytes == relay.stats.down_bytes == len(payload) + 4
            assert relay.stats.connections == 1 and relay.stats.active == 0

    asyncio.run(scenario())


def test_link_down_resets_and_refuses_then_up_serves_on_the_same_port():
    async def scenario() -> None:
        async with echo_server() as target, relay_to(target, 0.0) as relay:
            port = relay.address[1]
            reader, writer = await asyncio.open_connection(*relay.address)
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            await relay.set_down(True)
            assert relay.stats.down
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), timeout=10)  # reset, or EOF
            writer.close()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            await relay.set_down(False)
            assert relay.address[1] == port and not relay.stats.down
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"b")
            assert await reader.readexactly(1) == b"b"
            writer.close()

    asyncio.run(scenario())


def test_relay_to_a_closed_port_refuses_the_client():
    async def scenario() -> None:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[:2]
        async with relay_to(dead, 0.0) as relay:
            reader, writer = await asyncio.open_connection(*relay.address)
            assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # reset or EOF
            writer.close()
            assert relay.stats.refused == 1 and relay.stats.connections == 0

    asyncio.run(scenario())


def test_threaded_relay_for_synchronous_callers():
    with socket.socket() as echo:
        echo.bind(("127.0.0.1", 0))
        echo.listen()
        with ThreadedRelay(("127.0.0.1", 0), echo.getsockname()[:2], 0.02) as relay:
            host, port = parse_address(relay.address)
            with socket.create_connection((host, port), timeout=10) as c:
                server_side, _ = echo.accept()
                start = time.monotonic()
                c.sendall(b"hello")
                server_side.settimeout(10)
                assert server_side.recv(16) == b"hello"
                server_side.sendall(b"back")
                c.settimeout(10)
                assert c.recv(16) == b"back"
                assert time.monotonic() - start >= 0.04  # 20 ms up + 20 ms down
                server_side.close()
            assert relay.stats.up_bytes == 5 and relay.stats.down_bytes == 4
            relay.set_down(True)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, port), timeout=10)
            relay.set_down(False)
            socket.create_connection((host, port), timeout=10).close()


def _wait_seq(path: Path, seq: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            data = json.loads(path.read_text())
            if data["seq"] >= seq:
                return data
        time.sleep(0.02)
    raise AssertionError(f"relay stats file {path} did not reach seq {seq}")


def test_command_signals_stats_down_up_and_stop(tmp_path):
    with socket.socket() as echo:
        echo.bind(("127.0.0.1", 0))
        echo.listen()
        stats = tmp_path / "relay.json"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgecloud.netlink_relay", "--listen", "127.0.0.1:0",
             "--target", "127.0.0.1:%d" % echo.getsockname()[1], "--delay-ms", "5",
             "--stats-file", str(stats)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        try:
            line = proc.stdout.readline()
            assert line.startswith("edgecloud relay listening 127.0.0.1:"), line
            first = _wait_seq(stats, 0)
            host, port = parse_address(first["listen"])
            with socket.create_connection((host, port), timeout=10) as c:
                server_side, _ = echo.accept()
                c.sendall(b"x" * 1000)
                got = b""
                server_side.settimeout(10)
                while len(got) < 1000:
                    got += server_side.recv(4096)
                server_side.close()
            proc.send_signal(signal.SIGUSR1)
            assert _wait_seq(stats, 1)["up_bytes"] == 1000
            proc.send_signal(signal.SIGUSR2)
            assert "link down" in proc.stdout.readline()
            assert _wait_seq(stats, 2)["down"] is True
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, port), timeout=10)
            proc.send_signal(signal.SIGHUP)
            assert "link up" in proc.stdout.readline()
            assert _wait_seq(stats, 3)["down"] is False
            socket.create_connection((host, port), timeout=10).close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
