"""Starting and stopping edgecloud servers as child processes (demo, benchmarks, tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass
class ServerProcess:
    role: str
    proc: subprocess.Popen
    log_path: Path
    info: dict[str, Any]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.info['grpc_port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.info['metrics_port']}/metrics"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain), then kill if it does not exit in time; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_server(role: str, args: list[str], workdir: Path, *, timeout: float = 90.0,
                 env: dict[str, str] | None = None) -> ServerProcess:
    """``python -m edgecloud <role> serve`` on free loopback ports; returns once it is serving."""
    ready = workdir / f"{role}.ready.json"
    log_path = workdir / f"{role}.log"
    cmd = [sys.executable, "-m", "edgecloud", role, "serve", "--host", "127.0.0.1", "--port", "0",
           "--metrics-port", "0", "--ready-file", str(ready), *args]
    log: IO[str] = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            try:
                return ServerProcess(role, proc, log_path, json.loads(ready.read_text()))
            except json.JSONDecodeError:
                pass  # still being written
        if proc.poll() is not None:
            raise RuntimeError(f"{role} server exited with code {proc.returncode}:\n"
                               f"{log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"{role} server not ready after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
