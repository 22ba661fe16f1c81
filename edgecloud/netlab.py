"""A two-host network on one Linux machine (network namespaces), with edgecloud served in it.

Why: loopback has no latency, no bandwidth limit and never fails; the edge's cloud link
(deadlines, retries, breaker, degraded answers, offload byte counts) only meets those on a
network. :class:`Lab` builds one per run, for the link test (``tests/test_netns_link.py``)
and the link part of ``benchmarks/fleet.py``:

    root ns: the caller (client)       EDGE ns                         CLOUD ns
      lan 10.A.B.1/30 ---veth--- lan0 10.A.B.2/30
                                 edge daemon :8001, /metrics :9001
                                 wan0 10.A.B.5/30 ---veth--- wan0 10.A.B.6/30
                                 tbf RATE (uplink)            tbf RATE (downlink)
                                                              relay :8100, RTT/2 each way
                                                              -> cloud server 127.0.0.1:8101

The kernel has no ``tc netem``: the RTT comes from ``edgecloud.netlink_relay`` (a userspace
TCP relay in the cloud host), the rate limit from ``tbf`` on both ends of the WAN link
(:class:`LinkSpec`). Building it needs root, ``ip`` and ``tc``: :func:`skip_reason` says
beforehand why not, :meth:`Lab.build_network` raises :class:`NetnsUnavailable` when the
kernel or container refuses a step. :meth:`Lab.destroy` removes everything it made; the
servers die with their creator (``setpriv --pdeathsig``) and :func:`sweep_stale_namespaces`
removes namespaces a killed run left behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]  # put on the servers' path: this checkout

# Ports inside the namespaces (fresh namespaces: nothing else can hold them).
EDGE_PORT, EDGE_METRICS_PORT = 8001, 9001
RELAY_PORT, CLOUD_PORT, CLOUD_METRICS_PORT = 8100, 8101, 9101

NS_PREFIX = "ecnl"
STALE_AFTER_S = 5 * 60    # a namespace of ours older than this, whose creator is gone, is litter

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass(frozen=True)
class LinkSpec:
    """The WAN link as configured: what physics then guarantees (a round trip takes at least
    ``rtt_ms``; tbf never passes more than ``burst_bytes + rate * time``)."""

    rtt_ms: float = 40.0          # relay delay, both directions together
    rate_mbit: float = 10.0       # tbf rate, each direction (tc's "mbit" = 10^6 bit/s)
    burst_bytes: int = 32 * 1024  # tbf burst ("32kb" = 32 KiB): the most it sends above rate
    tbf_latency_ms: float = 100.0  # longest a packet may queue in tbf before it is dropped

    @property
    def one_way_delay_ms(self) -> float:
        return self.rtt_ms / 2.0

    @property
    def rtt_s(self) -> float:
        return self.rtt_ms / 1000.0

    @property
    def rate_bit_s(self) -> float:
        return self.rate_mbit * 1e6

    def tbf_args(self) -> list[str]:
        """The ``tc qdisc add ... tbf`` parameters (e.g. rate 10mbit burst 32kb latency 100ms)."""
        if self.burst_bytes % 1024:
            raise ValueError(f"burst_bytes must be whole KiB, got {self.burst_bytes}")
        return ["rate", f"{self.rate_mbit:g}mbit", "burst", f"{self.burst_bytes // 1024}kb",
                "latency", f"{self.tbf_latency_ms:g}ms"]


# ---- shell ----------------------------------------------------------------------------------
class NetnsUnavailable(Exception):
    """This machine cannot build the network; the message says why (callers skip)."""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (ip, tc) and return it; raise with its stderr when ``check`` and it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def skip_reason() -> str | None:
    """Why this machine cannot build the network, before anything is made; None when it may."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces, veth and tc need root (CI runs as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command (iproute2) is not installed"
    return None


def sweep_stale_namespaces() -> None:
    """Remove namespaces (and end their processes) left by runs that were killed before they
    cleaned up: named ``ecnl-PID-EPOCH-...``, creator gone, older than 5 min."""
    listing = sh("ip", "netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = re.fullmatch(rf"{NS_PREFIX}-(\d+)-(\d+)-[0-9a-f]+-(edge|cloud)", name)
        if not match:
            continue
        pid, born = int(match.group(1)), int(match.group(2))
        if Path(f"/proc/{pid}").exists() or time.time() - born < STALE_AFTER_S:
            continue
        for stray in sh("ip", "netns", "pids", name, check=False).stdout.split():
            try:
                os.kill(int(stray), signal.SIGKILL)  # servers a killed run started
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", name, check=False)


def pick_subnet() -> ipaddress.IPv4Network:
    """A /29 in 10/8 that overlaps no route or address of this host (only its first /30 is
    routed in the root namespace, for the client's link to the edge host)."""
    taken: list[ipaddress.IPv4Network] = []
    for args in (("-4", "route", "show", "table", "all"), ("-4", "-o", "addr", "show")):
        for word in sh("ip", *args, check=False).stdout.split():
            try:
                net = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue
            if net.version == 4 and net.prefixlen > 0:  # the default route takes nothing
                taken.append(net)
    rng = random.SystemRandom()
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{rng.randrange(16, 255)}.{rng.randrange(256)}.{rng.randrange(32) * 8}/29")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise NetnsUnavailable("no free /29 in 10.0.0.0/8 for the network")


def scrape(url: str) -> Samples:
    """A /metrics page as {(name, labels): value}, fetched without any proxy (the address is
    inside our namespaces: a proxy from the environment could not reach it)."""
    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(url, timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def metric(values: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and want <= ls)


# ---- the lab: two hosts, their links, the servers -------------------------------------------
@dataclass
class Lab:
    """The network and the processes in it (everything removed by :meth:`destroy`).

    ``tmp`` holds the servers' configs, logs and the relay's counters."""

    tmp: Path
    link: LinkSpec = field(default_factory=LinkSpec)
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: ipaddress.IPv4Network | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)   # namespaces created so far
    relay_seq: int = 0                                # last stats write of the relay seen

    def __post_init__(self) -> None:
        stem = f"{NS_PREFIX}-{os.getpid()}-{int(time.time())}-{self.token}"
        self.edge_ns, self.cloud_ns = f"{stem}-edge", f"{stem}-cloud"
        self.root_if = f"{NS_PREFIX}{self.token}"  # the client's end, in the root namespace (<16 chars)

    # addresses
    def host(self, index: int) -> str:
        if self.subnet is None:
            raise RuntimeError("build_network() first")
        return str(self.subnet.network_address + index)

    @property
    def client_ip(self) -> str:
        return self.host(1)

    @property
    def edge_ip(self) -> str:
        return self.host(2)

    @property
    def edge_wan_ip(self) -> str:
        return self.host(5)

    @property
    def cloud_ip(self) -> str:
        return self.host(6)

    @property
    def edge_address(self) -> str:
        """The edge daemon's gRPC address, reachable from the root namespace."""
        return f"{self.edge_ip}:{EDGE_PORT}"

    @property
    def edge_metrics_url(self) -> str:
        return f"http://{self.edge_ip}:{EDGE_METRICS_PORT}/metrics"

    def edge_metrics(self) -> Samples:
        """The edge daemon's /metrics, across the client's link."""
        return scrape(self.edge_metrics_url)

    # ---- network ---------------------------------------------------------------------------
    def build_network(self) -> None:
        """Namespaces, veth links, addresses, tbf; raises NetnsUnavailable when the kernel or
        the container forbids a step (callers then skip)."""
        self.subnet = pick_subnet()
        e, c = self.edge_ns, self.cloud_ns
        steps: list[tuple[str, list[str]]] = [
            ("network namespaces", ["ip", "netns", "add", e]),
            ("network namespaces", ["ip", "netns", "add", c]),
            ("veth links", ["ip", "link", "add", "wan0", "netns", e, "type", "veth",
                            "peer", "name", "wan0", "netns", c]),
            ("veth links", ["ip", "link", "add", self.root_if, "type", "veth",
                            "peer", "name", "lan0", "netns", e]),
        ]
        for what, cmd in steps:
            done = sh(*cmd, check=False)
            if done.returncode != 0:
                raise NetnsUnavailable(f"cannot make {what} here: {' '.join(cmd)}: {done.stderr.strip()}")
            if cmd[1] == "netns":
                self.made.append(cmd[3])
        for cmd in (
            ["ip", "-n", e, "link", "set", "lo", "up"],
            ["ip", "-n", c, "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{self.client_ip}/30", "dev", self.root_if],
            ["ip", "link", "set", self.root_if, "up"],
            ["ip", "-n", e, "addr", "add", f"{self.edge_ip}/30", "dev", "lan0"],
            ["ip", "-n", e, "link", "set", "lan0", "up"],
            ["ip", "-n", e, "addr", "add", f"{self.edge_wan_ip}/30", "dev", "wan0"],
            ["ip", "-n", c, "addr", "add", f"{self.cloud_ip}/30", "dev", "wan0"],
            ["ip", "-n", e, "link", "set", "wan0", "up"],
            ["ip", "-n", c, "link", "set", "wan0", "up"],
        ):
            sh(*cmd)
        for ns in (e, c):  # uplink = the edge's egress, downlink = the cloud's egress
            done = sh("tc", "-n", ns, "qdisc", "add", "dev", "wan0", "root", "tbf",
                      *self.link.tbf_args(), check=False)
            if done.returncode != 0:
                raise NetnsUnavailable(f"tc tbf is not available here: {done.stderr.strip()}")

    def set_wan(self, up: bool) -> None:
        """The edge host's WAN interface up or down (down: a black hole, nothing is refused)."""
        sh("ip", "-n", self.edge_ns, "link", "set", "wan0", "up" if up else "down")

    def tbf(self, ns: str) -> tuple[int, int]:
        """(bytes sent, overlimits) of the tbf on ``ns``'s wan0: frames as charged to the bucket
        (retransmits too), and how often a packet had to wait for tokens."""
        out = sh("tc", "-s", "-n", ns, "qdisc", "show", "dev", "wan0").stdout
        match = re.search(r"qdisc tbf .*?Sent (\d+) bytes .*?overlimits (\d+)", out, re.S)
        if not match:
            raise RuntimeError(f"no tbf on {ns}/wan0: {out}")
        return int(match.group(1)), int(match.group(2))

    # ---- processes -------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The servers' environment: this checkout on the path, no proxies (gRPC and urllib
        would send namespace-local traffic to a proxy that is unreachable from there)."""
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["OMP_NUM_THREADS"] = "1"
        return env

    def spawn(self, name: str, ns: str, *args: str) -> None:
        """Start ``python -m ARGS`` inside namespace ``ns`` (``ip netns exec`` execs it: the
        Popen pid is the server's), output to ``tmp/NAME.log``."""
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        # setpriv --pdeathsig: should our caller be killed before it cleans up, its servers
        # get SIGTERM instead of living on (only the namespaces are left to sweep).
        guard = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
        self.procs[name] = subprocess.Popen(
            [*guard, "ip", "netns", "exec", ns, sys.executable, "-m", *args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.tmp,
        )
        log.close()

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.tmp / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start_servers(self, cloud: dict[str, Any], edge: dict[str, Any], *,
                      edge_args: Sequence[str] = (), timeout_s: float = 120.0) -> None:
        """Cloud server, relay (cloud host) and edge daemon (edge host), started together;
        returns once all three serve.

        ``cloud`` and ``edge`` are the ``cloud:`` and ``edge:`` config sections; the lab sets
        their listening addresses (``server.host/port/metrics_port``) and the edge's
        ``cloud.address`` (the relay). ``edge_args``: extra ``edgecloud edge serve`` flags."""
        cloud = {**cloud, "server": {**cloud.get("server", {}), "host": "127.0.0.1",
                                     "port": CLOUD_PORT, "metrics_port": CLOUD_METRICS_PORT}}
        edge = {**edge,
                "server": {**edge.get("server", {}), "host": self.edge_ip, "port": EDGE_PORT,
                           "metrics_port": EDGE_METRICS_PORT},
                "cloud": {**edge.get("cloud", {}), "address": f"{self.cloud_ip}:{RELAY_PORT}"}}
        cloud_cfg, edge_cfg = self.tmp / "cloud.yaml", self.tmp / "edge.yaml"
        cloud_cfg.write_text(yaml.safe_dump({"cloud": cloud}))
        edge_cfg.write_text(yaml.safe_dump({"edge": edge}))
        self.spawn("cloud", self.cloud_ns, "edgecloud", "cloud", "serve", "--config", str(cloud_cfg),
                   "--ready-file", str(self.tmp / "cloud.ready"))
        self.spawn("relay", self.cloud_ns, "edgecloud.netlink_relay",
                   "--listen", f"{self.cloud_ip}:{RELAY_PORT}", "--target", f"127.0.0.1:{CLOUD_PORT}",
                   "--delay-ms", str(self.link.one_way_delay_ms),
                   "--stats-file", str(self.tmp / "relay.json"))
        self.spawn("edge", self.edge_ns, "edgecloud", "edge", "serve", "--config", str(edge_cfg),
                   "--ready-file", str(self.tmp / "edge.ready"), *edge_args)
        deadline = time.monotonic() + timeout_s
        for name, ready in (("relay", "relay.json"), ("cloud", "cloud.ready"), ("edge", "edge.ready")):
            while not (self.tmp / ready).exists():
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.log_tail(name)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready after {timeout_s:.0f} s:\n{self.log_tail(name)}")
                time.sleep(0.05)

    def relay_stats(self) -> dict[str, Any]:
        """The relay's counters now (SIGUSR1, then wait for the file's next ``seq``)."""
        self.relay_seq += 1
        self.procs["relay"].send_signal(signal.SIGUSR1)
        return self._relay_file(lambda data: data["seq"] >= self.relay_seq)

    def set_relay(self, up: bool) -> None:
        """Relay link down (every connection reset, connects refused) or up again."""
        self.relay_seq += 1
        self.procs["relay"].send_signal(signal.SIGHUP if up else signal.SIGUSR2)
        self._relay_file(lambda data: data["seq"] >= self.relay_seq and data["down"] is not up)

    def _relay_file(self, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        path = self.tmp / "relay.json"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            data = json.loads(path.read_text())
            if ok(data):
                self.relay_seq = max(self.relay_seq, data["seq"])
                return data
            time.sleep(0.01)
        raise RuntimeError(f"relay did not answer:\n{self.log_tail('relay')}")

    # ---- the end ---------------------------------------------------------------------------
    def destroy(self) -> None:
        """Stop our processes (by pid), delete our links and namespaces. Never raises."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        # The root end of the client link at once (the kernel would drop it later, with the netns).
        for cmd in (["ip", "link", "del", self.root_if], *(["ip", "netns", "del", ns] for ns in self.made)):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                sh(*cmd, check=False)
