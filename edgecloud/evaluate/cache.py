"""Run the network once, then evaluate any exit thresholds from cached outputs (threshold sweeps).

What is cached per sample (one chip):

- for each edge exit ``e``, a ``route`` pass whose policy stops every sample at exit ``e``: its
  event log holds the events of exactly the blocks a sample exiting there runs, and its answer
  is what ``route`` answers for a sample exiting there (a family may answer with the most
  confident exit reached so far, not exit ``e`` alone);
- a pass where no exit answers: its offloaded tensors go through the cloud part (the same one
  as :func:`evaluate`) for the cloud logits, and :meth:`EdgeRunner.complete` adds the radio bits
  of the offloaded tensor and the cloud MACs x ``mac_fp32`` — the daemon's own accounting;
- each edge exit's own softmax, which the exit decisions are made on: exit 0's is the answer of
  the stop-at-0 pass (nothing else was reached); deeper exits' come from ``model(x)``, which
  returns every exit's logits (run only for multi-exit models).

Replaying a policy then picks, per sample, the exit the routing rule gives
(:func:`edgecloud.train.exitstats.route_outputs`: the first confident exit of the cascade, or the
family's own ``route_outputs``), and that destination's answer and energy. On the digital
backend this equals a direct :func:`evaluate` at the same thresholds exactly (tests check it).

Approximations (documented, not hidden): event counts are measured once per (sample, exit depth)
rather than under each threshold, so counts that depend on which OTHER samples share a batch are
taken from the full-batch passes; a deeper exit's outputs are computed on the whole batch here
but on the surviving subset in ``route``, and CPU kernels may round differently by batch size,
so a sample whose exit entropy lies within float rounding of a threshold may be routed
differently; and on backends that draw fresh noise on every read, the
cached exit outputs are one draw, so the replay matches a direct run in distribution, not sample
by sample. A family whose ``route`` does not stop at the exit its policy accepts (checked on
every batch) cannot be swept this way and raises.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from edgecloud.data.dataset import ImageDataset
from edgecloud.data.loader import Loader
from edgecloud.edge.runner import EdgeRunner, softmax_np
from edgecloud.evaluate.evaluator import (
    EvalConfig, baseline_joules, baselines, make_policy, make_runner, offload_round_trip,
)
from edgecloud.evaluate.results import SampleTable, summarize
from edgecloud.evaluate.source import CloudPart, ModelSource, make_cloud
from edgecloud.exits import ExitPolicy
from edgecloud.train.exitstats import route_outputs


class _StopAt(ExitPolicy):
    """Every sample exits at edge exit ``stop`` (``None``: no exit answers, all go to the cloud)."""

    def __init__(self, n_exits: int, stop: int | None) -> None:
        super().__init__("entropy", [None] * n_exits)
        self.stop = stop

    def confident(self, probs: torch.Tensor, exit_index: int) -> torch.Tensor:
        return torch.full((probs.shape[0],), exit_index == self.stop, dtype=torch.bool)


@contextlib.contextmanager
def _policy(runner: EdgeRunner, policy: ExitPolicy) -> Iterator[None]:
    saved = runner.policy
    runner.policy = policy
    try:
        yield
    finally:
        runner.policy = saved


@dataclass
class OutputCache:
    """Per-sample outputs and per-destination energies of one chip (see module docstring)."""

    source: ModelSource
    model: torch.nn.Module             # for a family's own ``route_outputs``
    exit_names: list[str]
    labels: np.ndarray                 # [N]
    exit_probs: list[torch.Tensor]     # per edge exit: [N, C] its own softmax (for decisions)
    answer_probs: list[np.ndarray]     # per edge exit: [N, C] route's answer when exiting there
    cloud_logits: np.ndarray           # [N, C]
    energy_at: list[dict[str, np.ndarray]]  # per destination (edge exits..., cloud): component -> [N] J
    baseline_j: float
    seed: int
    all_cloud_j: float | None = None   # the all-cloud baseline (evaluator.baselines), for the ratio

    @property
    def num_exits(self) -> int:
        return len(self.exit_names)

    def routed_exits(self, policy: ExitPolicy) -> np.ndarray:
        """Exit of every sample under ``policy`` (edge exits 0.., the cloud = #edge exits)."""
        probs = [*self.exit_probs, torch.from_numpy(softmax_np(self.cloud_logits))]
        idx = route_outputs(self.model, probs, policy).numpy()
        return np.where(idx < 0, self.num_exits, idx).astype(np.int32)

    def replay(self, policy: ExitPolicy) -> SampleTable:
        """The per-sample outcome of ``policy`` without running the network again."""
        exits = self.routed_exits(policy)
        preds = [p.argmax(axis=1) for p in self.answer_probs] + [self.cloud_logits.argmax(axis=1)]
        pred = np.choose(exits, preds) if len(preds) > 1 else preds[0]
        components = sorted({c for d in self.energy_at for c in d})
        n = len(self.labels)
        energy = {}
        for c in components:
            stacked = np.stack([d.get(c, np.zeros(n)) for d in self.energy_at])  # [dest, N]
            energy[c] = stacked[exits, np.arange(n)]
        return SampleTable(self.labels.copy(), pred.astype(np.int64), exits, energy)

    def metrics(self, policy: ExitPolicy) -> dict:
        return summarize(self.replay(policy), self.exit_names, self.baseline_j, all_cloud_j=self.all_cloud_j)

    def entropies(self, exit_index: int = 0) -> np.ndarray:
        from edgecloud.exits import softmax_entropy

        return softmax_entropy(self.exit_probs[exit_index]).numpy()


def _check_route(runner: EdgeRunner, got: np.ndarray, want: int) -> None:
    if not (got == want).all():
        raise ValueError(
            f"model {runner.name!r}: route() did not stop every sample where its policy said "
            f"(wanted exit {want}, got {sorted(set(got.tolist()))}); this family cannot be swept "
            "from cached outputs"
        )


def build_cache(source: ModelSource, data: ImageDataset, config: EvalConfig | None = None,
                cloud: CloudPart | None = None) -> OutputCache:
    """One chip (``config.seed``) over ``data``: cache every exit's outputs and energies."""
    if source.manifest.edge_only:
        raise ValueError(f"model {source.name!r} is edge-only: its one exit answers every sample, "
                         "there is no threshold to sweep (use edgecloud eval)")
    config = config or EvalConfig()
    meter = config.meter()
    runner = make_runner(source, config, config.seed, make_policy(source, None), meter)
    cloud = cloud or make_cloud(source, config.cloud)
    n_exits = len(runner.exit_names)
    labels: list[np.ndarray] = []
    probs: list[list[torch.Tensor]] = [[] for _ in range(n_exits)]
    answers: list[list[np.ndarray]] = [[] for _ in range(n_exits)]
    cloud_logits: list[np.ndarray] = []
    energy_parts: list[list[dict[str, np.ndarray]]] = [[] for _ in range(n_exits + 1)]
    loader = Loader(data, config.batch_size)
    for x, y in tqdm(loader, desc="cache", total=len(loader), disable=not config.progress,
                     leave=False, file=sys.stderr, unit="batch"):
        labels.append(y.numpy())
        pixels = x.numpy()
        for e in range(n_exits):
            with _policy(runner, _StopAt(n_exits, e)):
                edge = runner.run(pixels)
            _check_route(runner, edge.exit_index, e)
            answers[e].append(edge.probs)
            energy_parts[e].append(runner.complete(edge, None, transmitted=True).energy)
        probs[0].append(torch.from_numpy(answers[0][-1]))
        if n_exits > 1:
            with torch.inference_mode():  # outside any EventLog: no events recorded
                outs = runner.model(x)
            for e in range(1, n_exits):
                probs[e].append(torch.softmax(outs[e].float(), dim=1))
        with _policy(runner, _StopAt(n_exits, None)):
            edge = runner.run(pixels)
        _check_route(runner, edge.exit_index, -1)
        logits, sent = offload_round_trip(runner, cloud, edge)  # the encoded payload, its bytes
        order = np.argsort(edge.offload_index)  # rows back into batch order
        cloud_logits.append(logits[order])
        energy_parts[n_exits].append(
            runner.complete(edge, softmax_np(logits), transmitted=True, sent_bytes=sent).energy)

    def join(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        keys = sorted({k for p in parts for k in p})
        return {k: np.concatenate([p.get(k, np.zeros(len(next(iter(p.values()))))) for p in parts])
                for k in keys}

    return OutputCache(
        source=source,
        model=runner.model,
        exit_names=list(runner.exit_names),
        labels=np.concatenate(labels).astype(np.int64),
        exit_probs=[torch.cat(p) for p in probs],
        answer_probs=[np.concatenate(a) for a in answers],
        cloud_logits=np.concatenate(cloud_logits).astype(np.float32),
        energy_at=[join(p) for p in energy_parts],
        baseline_j=baseline_joules(source, meter),
        seed=config.seed,
        all_cloud_j=ends["all_cloud"]["total_j"] if (ends := baselines(source, meter)) else None,
    )
