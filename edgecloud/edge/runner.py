"""The edge part of one bundle: model on a CiM backend, exit policy, per-sample energy.

:class:`EdgeRunner` is everything the daemon needs from the model side and nothing from the
network side: it turns a batch of input pixels into an :class:`EdgeResult` (the best local
answer for every sample plus the cloud input for the undecided ones), and then, once the cloud
has answered or failed, into final :class:`SampleResults` with the energy of every component.
Keeping the two steps apart lets the servicer micro-batch the first across requests and send
the second through the cloud client.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgecloud import offload
from edgecloud.bundle import Bundle, bundle_backend_options
from edgecloud.cim.backend import Backend, create_backend
from edgecloud.cim.energy import EnergyMeter
from edgecloud.cim.events import EventLog, recording
from edgecloud.exits import ExitPolicy
from edgecloud.nn.discretize import discretize

RADIO = "radio"
CLOUD = "cloud"
MAX_COMPONENTS = 16  # energy components (digital, crossbar, adc, ...) one edge model can report


def policy_from_manifest(bundle: Bundle, override: list[float | None] | None = None) -> ExitPolicy:
    """The manifest's exit policy, with thresholds optionally replaced (config or flags)."""
    manifest = bundle.manifest
    thresholds = [e.threshold for e in manifest.exits]
    if override is not None:
        if len(override) != len(thresholds):
            raise ValueError(
                f"model {bundle.name!r}: {len(override)} thresholds given but the bundle has "
                f"{len(thresholds)} exits ({', '.join(e.name for e in manifest.exits)})"
            )
        thresholds = list(override)
    try:
        return ExitPolicy(kind=manifest.policy, thresholds=thresholds)
    except ValueError as exc:
        raise ValueError(f"model {bundle.name!r}: {exc}") from exc


def softmax_np(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (the cloud returns logits)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass
class EdgeResult:
    """What the edge decided for N samples (numpy, ready to split per request).

    ``exit_index`` is -1 for samples that need the cloud; for those ``best_exit`` is the edge
    exit whose prediction ``probs`` holds (the degraded answer if the cloud cannot help).
    """

    probs: np.ndarray          # [N, C] float32
    exit_index: np.ndarray     # [N] int32
    best_exit: np.ndarray      # [N] int32
    offload_index: np.ndarray  # [K] int64 rows that need the cloud
    offload: np.ndarray        # [K, ...] float32 cloud input for those rows (before encoding)
    energy: dict[str, np.ndarray] = field(default_factory=dict)  # component -> [N] joules
    compute_s: float = 0.0     # wall time of the batch this result came from

    @property
    def size(self) -> int:
        return int(self.probs.shape[0])


@dataclass
class SampleResults:
    """Final per-sample answer of one request."""

    probabilities: np.ndarray  # [N, C] float32
    class_index: np.ndarray    # [N] int32
    exit_index: np.ndarray     # [N] int32; edge exits 0.., cloud = number of edge exits
    confidence: np.ndarray     # [N] float32, max probability
    energy_joules: np.ndarray  # [N] float64, all components
    energy: dict[str, np.ndarray]  # component -> [N] joules
    degraded: np.ndarray       # [N] bool: needed the cloud, answered by an edge exit
    cloud: np.ndarray          # [N] bool: answered by the cloud


class NeverExit(ExitPolicy):
    """No edge exit answers: route() sends every sample to the cloud (as
    ``edgecloud.evaluate.cache._StopAt(n, None)`` does)."""

    def __init__(self, kind: str, n_exits: int) -> None:
        super().__init__(kind, [None] * n_exits)

    def confident(self, probs: torch.Tensor, exit_index: int) -> torch.Tensor:
        return torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)


class EdgeRunner:
    """One bundle's edge model, prepared on a backend, with a live exit policy."""

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend | str = "digital",
        policy: ExitPolicy | None = None,
        energy_meter: EnergyMeter | None = None,
        *,
        backend_options: dict[str, Any] | None = None,
        seed: int = 0,
        input_bits: int | None = None,
        bundle_hardware: bool = True,
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.name = bundle.name
        self.exit_names = [e.name for e in self.manifest.exits]
        self.cloud_exit = len(self.exit_names)
        self.sample_shape = tuple(int(d) for d in self.manifest.input.shape)
        # Input discretisation: this runner's override, else the bundle's input.bits (None: off).
        self.input_bits = input_bits if input_bits is not None else self.manifest.input.bits
        if self.input_bits is not None and not 1 <= self.input_bits <= 16:
            raise ValueError(f"input bits must lie in 1..16, got {self.input_bits}")
        self.num_classes = len(self.manifest.classes)
        self.policy = policy or policy_from_manifest(bundle)
        if len(self.policy.thresholds) != len(self.exit_names):
            raise ValueError(
                f"model {self.name!r}: policy has {len(self.policy.thresholds)} thresholds, "
                f"bundle has {len(self.exit_names)} exits"
            )
        self.meter = energy_meter or EnergyMeter()
        self.radio_joules_per_bit = self.meter.table.per_event("radio_bit")
        self.cloud_joules_per_sample = self.manifest.cloud.macs * self.meter.table.per_event("mac_fp32")
        # The options the backend runs with: the bundle's manifest ``hardware`` defaults for this
        # backend under the given ones (``bundle_hardware=False``: the given ones alone). A backend
        # passed as an instance is used as it is.
        self.backend_options: dict[str, Any] = dict(backend_options or {})
        if isinstance(backend, str):  # the backend owns its randomness (seeded), no global seed
            self.backend_options = bundle_backend_options(self.manifest, backend, backend_options,
                                                          use_bundle=bundle_hardware)
            try:
                backend = create_backend(backend, self.backend_options, seed)
            except ValueError as exc:
                own = self.manifest.hardware.get(backend) if bundle_hardware else None
                if not own:
                    raise
                raise ValueError(f"{exc} (the options include model {self.name!r}'s manifest "
                                 f"hardware.{backend}: {own})") from exc
        self.backend = backend
        self.model = backend.prepare(bundle.build_model())
        self.model.eval()
        # A backend may hold state (noise generators, programmed tiles): one batch at a time.
        self._lock = threading.Lock()
        self.offload_shape = tuple(int(d) for d in self.manifest.cloud.input_shape)
        # What the radio carries per offloaded sample: the ENCODED tensor (cloud.encoding).
        self.offload_bytes_per_sample = offload.bytes_per_sample(self.manifest.cloud)
        self._components: list[str] = []
        self._slots_lock = threading.Lock()

    # ---- inputs --------------------------------------------------------------------------
    def to_tensor(self, x: np.ndarray) -> torch.Tensor:
        """FP32 pixels in [0, 1] or UINT8 0..255 -> float32 tensor in [0, 1], discretised to
        ``input_bits`` when set (the defence runs on every request, before the model)."""
        if x.dtype == np.uint8:
            tensor = torch.from_numpy(x.astype(np.float32) / 255.0)
        else:
            tensor = torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy
        if self.input_bits is not None:
            tensor = discretize(tensor, self.input_bits)
        return tensor

    # ---- step 1: the edge ----------------------------------------------------------------
    def run(
        self, x: np.ndarray, exit0_threshold: float | None = None, *, policy: ExitPolicy | None = None
    ) -> EdgeResult:
        """Run the edge part on a batch; ``exit0_threshold`` overrides exit 0 for this call only,
        ``policy`` replaces the live policy for this call only (a per-request threshold)."""
        policy = policy if policy is not None else self.policy
        if exit0_threshold is not None:
            policy = ExitPolicy(kind=policy.kind, thresholds=list(policy.thresholds))
            policy.set_threshold(0, exit0_threshold)
        n = int(x.shape[0])
        tensor = self.to_tensor(x)
        log = EventLog(n)
        with self._lock:
            start = time.perf_counter()
            with torch.inference_mode(), recording(log):
                decision = self.model.route(tensor, policy)
            compute_s = time.perf_counter() - start
        probs = decision.probs.detach().float().cpu().numpy()
        exit_index = decision.exit_index.detach().cpu().numpy().astype(np.int32)
        best = getattr(decision, "best_exit", None)
        if best is not None:
            best_exit = np.asarray(best.detach().cpu().numpy() if isinstance(best, torch.Tensor) else best,
                                   dtype=np.int32)
        else:  # the contract does not say which exit the fallback came from: the deepest one
            best_exit = np.full(n, len(self.exit_names) - 1, dtype=np.int32)
        best_exit = np.where(exit_index >= 0, exit_index, best_exit).astype(np.int32)
        offload_index = decision.offload_index.detach().cpu().numpy().astype(np.int64)
        offload = decision.offload.detach().float().cpu().numpy()
        if offload.shape[0] != offload_index.shape[0]:
            raise RuntimeError(
                f"model {self.name!r}: route() returned {offload.shape[0]} offload rows for "
                f"{offload_index.shape[0]} offloaded samples"
            )
        if offload.dtype != np.float32:
            offload = offload.astype(np.float32)
        energy = {k: np.asarray(v, dtype=np.float64) for k, v in self.meter.per_component(log).items()}
        return EdgeResult(probs, exit_index, best_exit, offload_index, offload, energy, compute_s)

    # ---- the cloud input of samples an exit answered (shadow samples) ---------------------
    def offload_for(self, x: np.ndarray) -> np.ndarray:
        """The cloud input of these samples, in their order, as if no edge exit had answered
        them: an exited sample got no offload tensor from route(), so route() runs again with a
        policy whose exits never answer (:class:`NeverExit`). Used for shadow samples; the
        energy this second pass records is not returned (the data plane documents why)."""
        result = self.run(x, policy=NeverExit(self.policy.kind, len(self.exit_names)))
        self._check_offload(result)
        if result.offload_index.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"model {self.name!r}: route() with no exit answering offloaded "
                f"{result.offload_index.shape[0]} of {x.shape[0]} samples"
            )
        return result.offload[np.argsort(result.offload_index, kind="stable")]

    # ---- fixed-shape rows for the micro-batcher -------------------------------------------
    def run_checked(self, x: np.ndarray) -> EdgeResult:
        """:meth:`run` plus the check :meth:`run_rows` makes: offloaded samples have the
        manifest's ``cloud.input_shape``. The micro-batcher uses it for a batch that is one
        request alone (no rows to concatenate or split)."""
        result = self.run(x)
        self._check_offload(result)
        return result

    def _check_offload(self, result: EdgeResult) -> None:
        if result.offload_index.size and tuple(result.offload.shape[1:]) != self.offload_shape:
            raise RuntimeError(
                f"model {self.name!r}: route() offloads samples of shape "
                f"{list(result.offload.shape[1:])} but the manifest's cloud.input_shape is "
                f"{list(self.offload_shape)}"
            )

    def run_rows(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`run` as per-sample rows (every array has N rows), so a dynamic batcher can
        concatenate several requests' inputs and hand each request its own rows back."""
        result = self.run(x)
        self._check_offload(result)
        n = result.size
        need = np.zeros(n, dtype=bool)
        need[result.offload_index] = True
        offload = np.zeros((n, *self.offload_shape), dtype=np.float32)
        if result.offload_index.size:
            offload[result.offload_index] = result.offload
        energy = np.zeros((n, MAX_COMPONENTS), dtype=np.float64)
        for component, joules in result.energy.items():
            energy[:, self._slot(component)] = joules
        return {
            "probs": result.probs, "exit_index": result.exit_index, "best_exit": result.best_exit,
            "need": need, "offload": offload, "energy": energy,
            "compute_s": np.full(n, result.compute_s, dtype=np.float64),
        }

    def from_rows(self, rows: dict[str, np.ndarray]) -> EdgeResult:
        """The :class:`EdgeResult` of one request's rows (inverse of :meth:`run_rows`)."""
        offload_index = np.flatnonzero(rows["need"]).astype(np.int64)
        with self._slots_lock:
            components = list(self._components)
        return EdgeResult(
            probs=rows["probs"],
            exit_index=rows["exit_index"],
            best_exit=rows["best_exit"],
            offload_index=offload_index,
            offload=rows["offload"][offload_index],
            energy={c: rows["energy"][:, i] for i, c in enumerate(components)},
            compute_s=float(rows["compute_s"].max()) if rows["compute_s"].size else 0.0,
        )

    def _slot(self, component: str) -> int:
        with self._slots_lock:
            if component not in self._components:
                if len(self._components) >= MAX_COMPONENTS:
                    raise RuntimeError(f"more than {MAX_COMPONENTS} energy components")
                self._components.append(component)
            return self._components.index(component)

    # ---- the wire ------------------------------------------------------------------------
    def encode_offload(self, features: np.ndarray) -> np.ndarray:
        """Float cloud input -> the tensor sent to the cloud, per the manifest's
        ``cloud.encoding`` (FP32 as is, FP16, UINT8 with its scale and zero point, or for the
        packed / entropy-coded encodings an object array [K] of per-sample ``bytes`` payloads,
        sent as an OIP BYTES tensor; see :mod:`edgecloud.offload`)."""
        return offload.encode(features, self.manifest.cloud)

    def wire_bytes(self, wire: np.ndarray) -> np.ndarray:
        """Bytes the radio sends for every row of an encoded payload (``encode_offload``'s
        output): [K] int64, what :meth:`complete` takes as ``sent_bytes``."""
        return offload.wire_bytes(wire, self.manifest.cloud)

    # ---- step 2: combine with the cloud --------------------------------------------------
    def complete(
        self,
        edge: EdgeResult,
        cloud_probs: np.ndarray | None,
        transmitted: bool,
        *,
        sent_bytes: np.ndarray | None = None,
    ) -> SampleResults:
        """Final answers: cloud probabilities for offloaded rows if the cloud answered, else the
        best edge exit (degraded). Radio energy counts if the features were sent at all: the
        bytes actually sent x 8 x ``radio_bit``, per offloaded row ``sent_bytes`` (in
        ``edge.offload_index`` order, :meth:`wire_bytes` of the payload; a scalar is the total
        of all rows, spread evenly over them) or, when None, the
        encoding's fixed bytes per sample (a variable-length encoding, ``+zstd``, needs
        ``sent_bytes``); cloud compute only for samples the cloud answered."""
        n = edge.size
        probs = edge.probs.copy()
        exit_index = edge.exit_index.copy()
        rows = edge.offload_index
        cloud = np.zeros(n, dtype=bool)
        degraded = np.zeros(n, dtype=bool)
        energy = {k: v.copy() for k, v in edge.energy.items()}
        radio = np.zeros(n, dtype=np.float64)
        cloud_j = np.zeros(n, dtype=np.float64)
        if rows.size:
            if transmitted:
                if sent_bytes is not None:
                    sent = np.asarray(sent_bytes, dtype=np.float64)
                    if sent.ndim == 0:  # one total for the whole payload: spread over its rows
                        sent = np.full(rows.shape[0], float(sent) / rows.shape[0])
                    sent = sent.reshape(-1)
                    if sent.shape[0] != rows.shape[0]:
                        raise ValueError(f"model {self.name!r}: sent_bytes has {sent.shape[0]} rows for "
                                         f"{rows.shape[0]} offloaded samples")
                    radio[rows] = sent * 8.0 * self.radio_joules_per_bit
                elif not offload.fixed_length(self.manifest.cloud):
                    raise ValueError(
                        f"model {self.name!r}: cloud.encoding {self.manifest.cloud.encoding!r} sends "
                        "variable-length payloads; pass complete(..., sent_bytes=runner.wire_bytes(wire))")
                else:
                    per_sample_bits = float(self.offload_bytes_per_sample) * 8.0
                    radio[rows] = per_sample_bits * self.radio_joules_per_bit
            if cloud_probs is not None:
                probs[rows] = cloud_probs
                exit_index[rows] = self.cloud_exit
                cloud[rows] = True
                cloud_j[rows] = self.cloud_joules_per_sample
            else:
                exit_index[rows] = edge.best_exit[rows]
                degraded[rows] = True
        energy[RADIO] = radio
        energy[CLOUD] = cloud_j
        total = np.zeros(n, dtype=np.float64)
        for v in energy.values():
            total += v
        return SampleResults(
            probabilities=probs.astype(np.float32, copy=False),
            class_index=probs.argmax(axis=1).astype(np.int32),
            exit_index=exit_index.astype(np.int32),
            confidence=probs.max(axis=1).astype(np.float32) if n else np.zeros(0, np.float32),
            energy_joules=total,
            energy=energy,
            degraded=degraded,
            cloud=cloud,
        )

    # ---- thresholds ----------------------------------------------------------------------
    def thresholds(self) -> list[float | None]:
        return [self.policy.threshold(i) for i in range(len(self.exit_names))]

    def set_threshold(self, exit_index: int, value: float | None) -> None:
        self.policy.set_threshold(exit_index, value)

    def set_thresholds(self, values: list[float | None]) -> None:
        """Replace all thresholds at once (SIGHUP reload); validated before any is changed."""
        fresh = ExitPolicy(kind=self.policy.kind, thresholds=list(values))
        if len(fresh.thresholds) != len(self.exit_names):
            raise ValueError(
                f"model {self.name!r}: {len(values)} thresholds given, {len(self.exit_names)} exits"
            )
        for index, value in enumerate(fresh.thresholds):
            self.policy.set_threshold(index, value)

    def exit_label(self, exit_index: int) -> str:
        """Metric label of an exit: its manifest name, or ``cloud``."""
        if 0 <= exit_index < len(self.exit_names):
            return self.exit_names[exit_index]
        return "cloud"


__all__ = ["EdgeRunner", "EdgeResult", "NeverExit", "SampleResults", "policy_from_manifest", "softmax_np"]
