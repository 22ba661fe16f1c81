"""A replicated cloud tier: offload throughput with 1, 2, 3 cloud replicas behind N edges,
then one edge and one cloud across a real link.

The replica part runs on loopback. It starts the largest number of cloud replicas asked for (separate
``edgecloud cloud serve`` processes, one ONNX Runtime thread each, no spinning) and, for each
replica count k, N edge daemons (``edgecloud edge serve``) whose ``--cloud`` lists the first k
replicas, so their offloads spread over k replicas round-robin. Every exit threshold is pinned
so that every sample is offloaded: the cloud tier is the part under test. A closed-loop client
per edge then drives all N edges of one k at a time; the measurements are interleaved (round
r runs k = 1, 2, 3 in a rotated order), so drift on a shared machine hits every k alike and
the ratios are measured side by side. Offload throughput is the samples the replicas computed
(each replica's own ``edgecloud_samples_total{exit="cloud"}``) per second; the per-replica
shares show the spread.

On a machine with fewer cores than replicas + edges the replicas compete for the same cores,
so the ratio says how much of the tier's capacity the edges can use, not how a fleet of
machines scales; the summary names the CPU and the usable cores for that reason. Starting the
3 + 3N processes (each imports torch) is most of a default run on a small machine: about 85 s
of its 2 minutes on our shared 2-core machine under load, where 1, 2 and 3 replicas gave the
same offload throughput (ratios 0.94 and 0.98: the two cores, not the replicas, are the limit).

The link part (on by default where it can run; ``--no-link`` skips it) puts one edge daemon
and one cloud server on two hosts of a namespace network (``edgecloud.netlab``, as
``tests/test_netns_link.py`` does): a WAN of ``--rtt-ms`` (a delay relay) and ``--rate-mbit``
(tbf, both directions). Why: loopback has neither, so the replica part says nothing about
offloading over a real link. It measures the offload round trip of one-sample requests (min,
p50) against the configured RTT, then offload goodput from ``--link-clients`` clients of
64-sample requests (about ``--link-seconds`` of bytes at the rate) against the configured
rate, and the bytes on the wire (relay payload, tbf counters) against the edge's
``edgecloud_offload_bytes_total``. It needs root, ``ip`` and ``tc``; elsewhere the summary
says ``"link": {"skipped": "<why>"}``. About 15 s of a default run (85 s in all, on our
shared 2-core machine at load average 4-6).

    python benchmarks/fleet.py [--edges 2] [--replicas 1,2,3] [--duration 3] [--rounds 2] [--json]
                               [--no-link] [--rtt-ms 40] [--rate-mbit 10]

The last line printed is a one-line JSON summary (``--json``: only that line).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import cpu_info  # noqa: E402  (the CPU, named as every benchmark names it)


def _samples_computed(url: str, model: str) -> float:
    """Samples a cloud replica computed, from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "edgecloud_samples_total" and s.labels.get("exit") == "cloud"
        and s.labels.get("model") == model
    )


def _all_cloud_pins(manifest) -> list[str]:
    """``--threshold`` flags under which no edge exit is ever confident."""
    if manifest.edge_only:
        raise SystemExit(f"{manifest.name} is edge-only: it offloads nothing")
    never = "0" if manifest.policy == "entropy" else "1"  # entropy < 0 / max p >= 1: never
    return [arg for i, e in enumerate(manifest.exits) if e.threshold is not None
            for arg in ("--threshold", f"{manifest.name}:{i}={never}")]


def _data(manifest) -> np.ndarray:
    if list(manifest.input.shape) == [1, 28, 28]:
        from edgecloud.data.samples import load_demo_sample

        return load_demo_sample()[0]
    return np.random.default_rng(0).random((512, *manifest.input.shape), dtype=np.float32)


def _start_all(role: str, arg_lists: list[list[str]], workdir: Path, name: str) -> list:
    """Servers started side by side (imports dominate start-up); all stopped if one fails."""
    from edgecloud.procs import start_server

    dirs = [workdir / f"{name}{i}" for i in range(len(arg_lists))]
    for d in dirs:
        d.mkdir()
    with ThreadPoolExecutor(len(arg_lists)) as pool:
        futures = [pool.submit(start_server, role, args, d) for args, d in zip(arg_lists, dirs)]
    started = [f.result() for f in futures if f.exception() is None]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        for server in started:
            server.stop()
        raise failed[0]
    return started


def _drive(edges, manifest, data, *, batch: int, concurrency: int, duration: float):
    """All ``edges`` under closed-loop load at once; the LoadResults."""
    from edgecloud.serving.client import InferenceClient
    from edgecloud.serving.loadgen import run_load

    results = [None] * len(edges)

    def one(i: int) -> None:
        with InferenceClient(edges[i].address) as client:
            results[i] = run_load(client, manifest.name, manifest.input.name, data,
                                  batch_size=batch, concurrency=concurrency, duration_s=duration)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(edges))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---- the link part: one edge and one cloud host on a real (namespace) network ---------------
def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def _link(args: argparse.Namespace, manifest, repository: Path, data: np.ndarray,
          workdir: Path, say) -> dict:
    """Offload latency and goodput across a WAN of ``--rtt-ms`` and ``--rate-mbit`` (network
    namespaces, tbf and a delay relay: ``edgecloud.netlab``), against what is configured and
    against ``edgecloud_offload_bytes_total``; ``{"skipped": why}`` where no network can be made."""
    from edgecloud import netlab

    reason = netlab.skip_reason()
    if reason:
        return {"skipped": reason}
    import grpc

    from edgecloud.protocol import codec, pb, pb_grpc

    spec = netlab.LinkSpec(rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit)
    batch, workers = 64, args.link_clients
    # One cloud call carries up to 128 samples (the edge's offload batch, at most 4 B a value);
    # give it 4x its time on the wire, plus the RTT, plus a second for a loaded machine.
    call_bytes = 128 * int(np.prod(manifest.cloud.input_shape)) * 4
    link_timeout = round(1.0 + spec.rtt_s + 4 * call_bytes * 8 / spec.rate_bit_s, 2)
    netlab.sweep_stale_namespaces()
    (workdir / "link").mkdir()
    lab = netlab.Lab(workdir / "link", spec)
    channel = None
    try:
        try:
            lab.build_network()
        except netlab.NetnsUnavailable as exc:
            return {"skipped": str(exc)}
        t0 = time.monotonic()
        lab.start_servers(
            cloud={"repository": str(repository), "models": [manifest.name],
                   "intra_op_threads": 1, "allow_spinning": False,
                   "server": {"shutdown_grace_s": 0.5}, "batching": {"max_queue_delay_ms": 1.0}},
            edge={"repository": str(repository), "models": [manifest.name],
                  "server": {"shutdown_grace_s": 0.5}, "batching": {"max_queue_delay_ms": 1.0},
                  "cloud": {"timeout_s": link_timeout}},
            edge_args=_all_cloud_pins(manifest))
        ready_s = time.monotonic() - t0
        channel = grpc.insecure_channel(lab.edge_address, options=[("grpc.enable_http_proxy", 0)])
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def infer(n: int, seed: int) -> tuple[float, dict]:
            """(client latency s, response parameters) of one request of ``n`` samples."""
            x = data[(np.arange(n) + seed * n) % len(data)]
            request = codec.encode_request(manifest.name, {manifest.input.name: x})
            start = time.perf_counter()
            response = stub.ModelInfer(request, timeout=60)
            return time.perf_counter() - start, codec.read_parameters(response.parameters)

        deadline = time.monotonic() + 60
        while True:  # the first offload opens the edge->cloud connection
            try:
                if not infer(1, 0)[1]["degraded"]:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer from the cloud across the link in 60 s:\n"
                                   f"{lab.log_tail('edge')}")
            time.sleep(0.2)

        # Latency: one-sample requests, one at a time (nothing queues: the link is idle).
        m0 = lab.edge_metrics()
        pings = [infer(1, i) for i in range(args.link_pings)]
        m1 = lab.edge_metrics()
        cloud_ms = [float(p["cloud_latency_ms"]) for _, p in pings if not p["degraded"]]
        client_ms = [lat * 1000 for lat, p in pings if not p["degraded"]]
        if not cloud_ms:
            raise RuntimeError("every one-sample request was answered degraded")
        offload = "edgecloud_offload_bytes_total"
        per_sample = (netlab.metric(m1, offload, model=manifest.name)
                      - netlab.metric(m0, offload, model=manifest.name)) / len(cloud_ms)

        # Goodput: enough 64-sample requests for ~--link-seconds at the configured rate, from
        # several clients (some wait while another's offload is on the wire: the link stays busy).
        requests = max(4, int(np.ceil(spec.rate_bit_s / 8 * args.link_seconds / (batch * per_sample))))
        t_open = time.monotonic()  # the window brackets every snapshot, so it bounds what they count
        (up0, over0), (down0, _) = lab.tbf(lab.edge_ns), lab.tbf(lab.cloud_ns)
        m0, r0 = lab.edge_metrics(), lab.relay_stats()
        start = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            answers = list(pool.map(lambda i: infer(batch, 1000 + i)[1], range(requests)))
        elapsed = time.monotonic() - start
        m1, r1 = lab.edge_metrics(), lab.relay_stats()
        (up1, over1), (down1, _) = lab.tbf(lab.edge_ns), lab.tbf(lab.cloud_ns)
        window = time.monotonic() - t_open
    finally:
        if channel is not None:
            channel.close()
        lab.destroy()

    sent = netlab.metric(m1, offload, model=manifest.name) - netlab.metric(m0, offload, model=manifest.name)
    relay_up, relay_down = r1["up_bytes"] - r0["up_bytes"], r1["down_bytes"] - r0["down_bytes"]
    tbf_up, tbf_down = up1 - up0, down1 - down0
    degraded = sum(int(a["degraded"]) * batch for a in answers)
    result = {
        "rtt_ms_configured": spec.rtt_ms, "rate_mbit_configured": spec.rate_mbit,
        "tbf_burst_bytes": spec.burst_bytes, "servers_ready_s": round(ready_s, 1),
        "cloud_timeout_s": link_timeout,
        "latency": {
            "requests": len(pings), "samples_per_request": 1, "degraded": len(pings) - len(cloud_ms),
            "offload_round_trip_ms_min": round(min(cloud_ms), 1),
            "offload_round_trip_ms_p50": _percentile(cloud_ms, 50),
            "offload_round_trip_ms_max": round(max(cloud_ms), 1),
            "p50_over_rtt_ms": round(_percentile(cloud_ms, 50) - spec.rtt_ms, 1),
            "min_at_least_rtt": min(cloud_ms) >= spec.rtt_ms,
            "client_latency_ms_p50": _percentile(client_ms, 50),
        },
        "throughput": {
            "requests": requests, "samples_per_request": batch, "clients": workers,
            "elapsed_s": round(elapsed, 2), "degraded_samples": degraded,
            "offload_bytes_per_sample": round(per_sample, 1),
            "offload_bytes_metric": int(sent), "relay_up_bytes": relay_up, "tbf_up_bytes": tbf_up,
            "relay_down_bytes": relay_down, "tbf_down_bytes": tbf_down,
            # relay payload = tensors + gRPC/HTTP/2 framing; tbf = that + TCP/IP/Ethernet headers
            "framing_overhead_pct": round(100 * (relay_up - sent) / sent, 3) if sent else None,
            "wire_overhead_pct": round(100 * (tbf_up - sent) / sent, 3) if sent else None,
            "wire_ge_relay_ge_metric": tbf_up >= relay_up >= sent > 0,
            "offload_goodput_mbit_s": round(sent * 8 / elapsed / 1e6, 2),
            "wire_up_mbit_s": round(tbf_up * 8 / window / 1e6, 2),
            "goodput_of_rate": round(sent * 8 / elapsed / spec.rate_bit_s, 3),
            "within_tbf_bound": tbf_up <= spec.burst_bytes + spec.rate_bit_s / 8 * window,
            "tbf_up_overlimits": over1 - over0,  # > 0: the rate, not the servers, was the limit
        },
    }
    lat, thr = result["latency"], result["throughput"]
    say(f"link rtt {spec.rtt_ms:g} ms: offload round trip min {lat['offload_round_trip_ms_min']} ms, "
        f"p50 {lat['offload_round_trip_ms_p50']} ms (client p50 {lat['client_latency_ms_p50']} ms)")
    say(f"link rate {spec.rate_mbit:g} Mbit/s: goodput {thr['offload_goodput_mbit_s']} Mbit/s, "
        f"wire {thr['wire_up_mbit_s']} Mbit/s; bytes metric {int(sent)}, relay {relay_up}, "
        f"tbf {tbf_up} (overlimits {over1 - over0})")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fmnist-hybrid")
    parser.add_argument("--repository", default=None)
    parser.add_argument("--edges", type=int, default=2, help="edge daemons per replica count")
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to compare")
    parser.add_argument("--batch", type=int, default=16, help="samples per request")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per edge")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--no-link", action="store_true",
                        help="skip the link part (edge and cloud across a namespace network)")
    parser.add_argument("--rtt-ms", type=float, default=40.0, help="link part: round-trip time")
    parser.add_argument("--rate-mbit", type=float, default=10.0, help="link part: tbf rate, Mbit/s")
    parser.add_argument("--link-seconds", type=float, default=3.0,
                        help="link part: offload this many seconds' worth of bytes at the rate")
    parser.add_argument("--link-pings", type=int, default=20,
                        help="link part: one-sample requests for the latency")
    parser.add_argument("--link-clients", type=int, default=4,
                        help="link part: clients in parallel for the goodput")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds, args.link_seconds, args.link_pings = 1.0, 1, 1.0, 5
    try:
        counts = sorted({int(k) for k in args.replicas.split(",")})
    except ValueError:
        parser.error(f"--replicas {args.replicas!r}: expected a comma list of integers, e.g. 1,2,3")
    if not counts or counts[0] < 1 or args.edges < 1 or args.rounds < 1:
        parser.error("--replicas, --edges and --rounds must be >= 1")
    if (args.rtt_ms < 0 or args.rate_mbit <= 0 or args.link_seconds <= 0 or args.link_pings < 1
            or args.link_clients < 1):
        parser.error("--rtt-ms must be >= 0, --rate-mbit and --link-seconds > 0, "
                     "--link-pings and --link-clients >= 1")
    say = (lambda *a, **k: None) if args.json else (lambda *a: print(*a, file=sys.stderr))

    from edgecloud.bundle import ModelRepository

    cpu = cpu_info()
    bundle = ModelRepository(args.repository).get(args.model)
    manifest = bundle.manifest
    data = _data(manifest)
    repo = ["--repository", str(bundle.path.parent), "--model", manifest.name]
    say(f"model {manifest.name}, {args.edges} edges x replicas {counts}, batch {args.batch}, "
        f"concurrency {args.concurrency}/edge, {args.duration:g} s x {args.rounds} rounds")
    say(f"cpu: {cpu['model']}, {cpu['cores']} cores, {' '.join(cpu['simd']) or 'no SIMD flags'}")

    sps: dict[int, list[float]] = {k: [] for k in counts}
    shares: dict[int, list[float]] = {k: [] for k in counts}
    errors: dict[int, dict[str, int]] = {k: {} for k in counts}
    degraded: dict[int, int] = {k: 0 for k in counts}
    with tempfile.TemporaryDirectory(prefix="edgecloud-fleet-") as tmp:
        workdir = Path(tmp)
        t0 = time.monotonic()
        replicas = _start_all("cloud", [[*repo, "--intra-op-threads", "1", "--no-allow-spinning"]]
                              * counts[-1], workdir, "cloud")
        fleets: dict[int, list] = {}
        try:
            for k in counts:
                cloud = [a for r in replicas[:k] for a in ("--cloud", r.address)]
                fleets[k] = _start_all("edge", [[*repo, *cloud, *_all_cloud_pins(manifest)]]
                                       * args.edges, workdir, f"edge-k{k}-")
            say(f"started {len(replicas)} replicas and {args.edges * len(counts)} edges "
                f"in {time.monotonic() - t0:.1f} s")
            for k in counts:  # warm up every path once (connections, arenas, batchers)
                _drive(fleets[k], manifest, data, batch=args.batch,
                       concurrency=args.concurrency, duration=0.5)
            for r in range(args.rounds):
                order = counts[r % len(counts):] + counts[:r % len(counts)]
                for k in order:
                    urls = [rep.metrics_url for rep in replicas[:k]]
                    before = [_samples_computed(u, manifest.name) for u in urls]
                    start = time.perf_counter()
                    results = _drive(fleets[k], manifest, data, batch=args.batch,
                                     concurrency=args.concurrency, duration=args.duration)
                    wall = time.perf_counter() - start
                    done = [_samples_computed(u, manifest.name) - b for u, b in zip(urls, before)]
                    sps[k].append(sum(done) / wall)
                    shares[k].append(min(done) / max(sum(done), 1.0) * k)  # 1.0 = perfectly even
                    for res in results:
                        degraded[k] += res.degraded_samples
                        for code, n in res.errors.items():
                            errors[k][code] = errors[k].get(code, 0) + n
                    say(f"round {r + 1} replicas {k}: {sum(done) / wall:8.0f} offloaded samples/s, "
                        f"per replica {[int(d) for d in done]}")
        finally:
            codes = [s.stop() for fleet in fleets.values() for s in fleet]
            codes += [s.stop() for s in replicas]
        if args.no_link:
            link: dict = {"skipped": "--no-link"}
        else:
            t0 = time.monotonic()
            try:
                link = _link(args, manifest, bundle.path.parent, data, workdir, say)
            except Exception as exc:  # noqa: BLE001 - the replica numbers are still worth printing
                print(f"fleet: link part failed: {exc}", file=sys.stderr)
                link = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            if "skipped" in link:
                say(f"link part skipped: {link['skipped']}")
            else:
                say(f"link part took {time.monotonic() - t0:.1f} s")

    base = float(np.mean(sps[counts[0]]))
    rows = {}
    say(f"{'replicas':>8}{'offload samples/s':>20}{'ratio':>8}{'min share':>11}")
    for k in counts:
        mean = float(np.mean(sps[k]))
        rows[str(k)] = {
            "offload_samples_per_s": round(mean, 1),
            "offload_samples_per_s_runs": [round(v, 1) for v in sps[k]],
            "ratio_to_first": round(mean / base, 3) if base else None,
            "min_replica_share": round(float(np.min(shares[k])), 3),
            "degraded_samples": degraded[k],
            "errors": errors[k],
        }
        say(f"{k:>8}{mean:>20.0f}{rows[str(k)]['ratio_to_first']:>8.3f}"
            f"{rows[str(k)]['min_replica_share']:>11.3f}")
    summary = {
        "benchmark": "fleet", "model": manifest.name, "edges": args.edges,
        "replica_counts": counts, "batch": args.batch, "concurrency_per_edge": args.concurrency,
        "duration_s": args.duration, "rounds": args.rounds, "all_samples_offloaded": True,
        "by_replicas": rows, "server_exit_codes": codes, "link": link, "cpu": cpu,
    }
    print(json.dumps(summary))
    return 1 if "error" in link else 0


if __name__ == "__main__":
    sys.exit(main())
