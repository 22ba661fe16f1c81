"""Exact analytic model of an INT8 GEMM on the WWW architectures (Timeloop's counting, no Timeloop).

Problem (Timeloop ``gemm_ABZ``): A[M,K] inputs, B[N,K] weights, Z[M,N] outputs (read-write).

A *mapping* is a list of storage levels, outer to inner; each level holds the dataspaces it keeps
and its loops, outer to inner: temporal loops first, then the spatial fan-out to the level below.
Access counts per level and dataspace follow Timeloop's (v0.4) rules, checked exactly against the
five committed runs in ``../shared/reference/www/level_stats.csv``:

* tile(L, d) = product of the loops of L and of every level inside it over d's dimensions.
* loads(L, d) = tile x the temporal loops above L, skipping the innermost run of loops irrelevant to
  d (the tile stays put across them); instances(L) = spatial loops above L.
* distinct(L, d) = tile x the relevant temporal loops above L (the elements one instance ever holds).
* read-only d: fills = loads (0 at DRAM); reads = the child keeper's fills x child instances per
  instance / multicast (spatial loops in between irrelevant to d), or, at the innermost keeper,
  MACs per instance / multicast.
* Z: updates = the child keeper's loads x fan-out / spatial reduction (MACs per instance /
  reduction at the innermost keeper); fills = loads - distinct (a first write reads nothing);
  reads = temporal reductions = updates - distinct.
* energy = instances x (reads x read + fills x write + updates x update) / block, plus storage
  leakage x instances x cycles; compute energy = MACs x E_mac (Timeloop charges no compute leakage).
* cycles (Timeloop's) = max(temporal iterations per compute instance, per level reads / read_bw and
  (fills + updates) / write_bw, rounded up). The CiM primitive latency is NOT in ``cycles``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

DIMS = ("M", "N", "K")
RELEVANT = {"A": {"M", "K"}, "B": {"N", "K"}, "Z": {"M", "N"}}
ARCHS = ("baseline", "rf", "smem")
CIM_TYPES = ("analog6T", "analog8T", "digital6T", "digital8T")
DEFAULT_CONSTANTS = Path(__file__).with_name("constants.yaml")


def load_constants(path: str | Path | None = None) -> dict[str, Any]:
    """The constants (``constants.yaml`` beside this module, or a user file of the same layout)."""
    path = Path(path) if path else DEFAULT_CONSTANTS
    if not path.is_file():
        raise FileNotFoundError(f"constants file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f)
    for key in ("levels", "baseline", "cim", "mapping", "global"):
        if key not in data:
            raise ValueError(f"constants file {path}: missing section {key!r}")
    return data


@dataclass(frozen=True)
class Loop:
    dim: str
    bound: int
    spatial: bool = False

    def __str__(self) -> str:
        return f"{'spatial ' if self.spatial else ''}for {self.dim} in [0:{self.bound})"


@dataclass
class Level:
    """A storage level: the dataspaces it keeps, its loops (outer to inner; spatial fan-out last)."""
    name: str
    keeps: tuple[str, ...]
    loops: list[Loop] = field(default_factory=list)


@dataclass
class Mapping:
    levels: list[Level]           # outer (DRAM) to inner
    compute: str                  # name of the compute level ("mac" or "CiMUnit")
    notes: str = ""

    def factors(self) -> dict[str, int]:
        out = {d: 1 for d in DIMS}
        for level in self.levels:
            for lp in level.loops:
                out[lp.dim] *= lp.bound
        return out

    def describe(self) -> dict[str, list[str]]:
        return {lv.name: [str(lp) for lp in lv.loops if lp.bound > 1] for lv in self.levels}


@dataclass
class Accesses:
    instances: int
    tile: int
    reads: int = 0
    fills: int = 0
    updates: int = 0
    temporal_reductions: int = 0


@dataclass
class PlacementResult:
    arch: str
    cim: str | None
    banks: int | None
    M: int
    N: int
    K: int
    macs: int
    energy_uj: float
    energy_per_mac_fj: float
    cycles: int                      # Timeloop's: one cycle per MAC per compute instance, CiM latency excluded
    cycles_with_cim_latency: int     # ours: compute cycles x primitive latency (applied once), vs bandwidth
    cycles_www_postprocess: int      # get_stats.py's formula (x Rh_used x Ch_used x latency; counts that loop twice)
    compute_cycles: int
    bandwidth_cycles: dict[str, int]
    utilization: float               # MACs / (compute instances x cycles), as Timeloop prints it
    utilization_www: float           # get_stats.py's CiM formula (baseline: = utilization)
    breakdown_uj: dict[str, float]   # per level, leakage included
    leakage_uj: dict[str, float]
    accesses: dict[str, dict[str, dict[str, int]]]   # level -> dataspace -> counts per instance
    mapping: dict[str, list[str]]
    tops_per_w_www: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def analyze(mapping: Mapping, M: int, N: int, K: int, level_energy: dict[str, dict[str, float]],
            compute_pj: float, compute_instances_total: int) -> tuple[dict, dict, int, dict, float]:
    """Access counts, energy (pJ, leakage excluded) per level, Timeloop cycles, bandwidth cycles.

    ``level_energy[name]`` has per-scalar ``read``, ``write`` (fill), ``update`` energies, ``leak``
    per instance per cycle, ``read_bw``/``write_bw`` (None = unlimited)."""
    got = mapping.factors()
    if (got["M"], got["N"], got["K"]) != (M, N, K):
        raise ValueError(f"mapping covers M={got['M']} N={got['N']} K={got['K']}, not M={M} N={N} K={K}")
    macs = M * N * K
    flat: list[Loop] = []
    start: dict[str, int] = {}
    for lv in mapping.levels:
        start[lv.name] = len(flat)
        flat.extend(lv.loops)

    def instances(name: str) -> int:
        return _prod(lp.bound for lp in flat[:start[name]] if lp.spatial)

    acc: dict[str, dict[str, Accesses]] = {lv.name: {} for lv in mapping.levels}
    for ds, rel in RELEVANT.items():
        keepers = [lv.name for lv in mapping.levels if ds in lv.keeps]
        info = {}
        for name in keepers:
            inner, outer = flat[start[name]:], flat[:start[name]]
            tile = _prod(lp.bound for lp in inner if lp.dim in rel)
            temporal = [lp for lp in outer if not lp.spatial]
            factor, seen_relevant = 1, False
            for lp in reversed(temporal):
                seen_relevant = seen_relevant or lp.dim in rel
                if seen_relevant:
                    factor *= lp.bound
            distinct = tile * _prod(lp.bound for lp in temporal if lp.dim in rel)
            info[name] = (tile, tile * factor, distinct, instances(name))
        for i, name in reversed(list(enumerate(keepers))):  # inner first: reads need the child fills
            tile, loads, distinct, inst = info[name]
            a = Accesses(instances=inst, tile=tile)
            child = keepers[i + 1] if i + 1 < len(keepers) else None
            between = flat[start[name]:start[child]] if child else flat[start[name]:]
            spatial_irrelevant = _prod(lp.bound for lp in between if lp.spatial and lp.dim not in rel)
            fanout = _prod(lp.bound for lp in between if lp.spatial)
            if ds == "Z":
                if child:
                    a.updates = info[child][1] * fanout // spatial_irrelevant
                else:
                    a.updates = macs // inst // spatial_irrelevant
                a.fills = 0 if i == 0 else loads - distinct
                a.reads = a.temporal_reductions = a.updates - distinct
            else:
                a.fills = 0 if i == 0 else loads
                if child:
                    a.reads = acc[child][ds].fills * fanout // spatial_irrelevant
                else:
                    a.reads = macs // inst // spatial_irrelevant
            acc[name][ds] = a

    compute_cycles = _prod(lp.bound for lp in flat if not lp.spatial)
    bw_cycles = {}
    energy_pj = {}
    for lv in mapping.levels:
        e = level_energy[lv.name]
        total = 0.0
        reads = writes = 0
        for a in acc[lv.name].values():
            total += a.instances * (a.reads * e["read"] + a.fills * e["write"] + a.updates * e["update"])
            reads += a.instances * a.reads
            writes += a.instances * (a.fills + a.updates)
        energy_pj[lv.name] = total
        cyc = 0
        if e.get("read_bw"):
            cyc = max(cyc, math.ceil(reads / e["read_bw"]))
        if e.get("write_bw"):
            cyc = max(cyc, math.ceil(writes / e["write_bw"]))
        if cyc:
            bw_cycles[lv.name] = cyc
    energy_pj[mapping.compute] = macs * compute_pj
    utilized = _prod(lp.bound for lp in flat if lp.spatial)
    if utilized > compute_instances_total:
        raise ValueError(f"mapping uses {utilized} compute instances, the architecture has {compute_instances_total}")
    return acc, energy_pj, compute_cycles, bw_cycles, float(utilized)


# ----------------------------------------------------------------------------------------------
# The repository's priority mapping (www-cim/constraints/main.py v2.1/v2.2), re-implemented.

def largest_divisor_at_most(n: int, cap: int) -> int:
    """Largest divisor of n that is <= cap (1 when cap < 1)."""
    cap = min(cap, n)
    while cap > 1 and n % cap:
        cap -= 1
    return max(cap, 1)


def smallest_factor(n: int) -> int | None:
    """Smallest factor >= 2 of n, None for n <= 1."""
    for i in range(2, n + 1):
        if n % i == 0:
            return i
    return None


def loop_order(factors: dict[str, int]) -> list[str]:
    """Dims outer to inner, largest factor innermost, with the repository's tie-breaking."""
    m, n, k = factors["M"], factors["N"], factors["K"]
    if m > n:
        inner_first = "MNK" if n > k else ("MKN" if m > k else "KMN")
    else:
        inner_first = "KNM" if n < k else ("NMK" if m > k else "NKM")
    return list(reversed(inner_first))


def _grow(capacity: int, fixed: int, growing: int, rem: int) -> int:
    """The repository's improvise_K / improvise_N, committed behaviour kept: at step j the growing
    tile is multiplied by (new prime factor x the factor accumulated so far), so it grows faster
    than the tile really does, and the search stops early (BERT 512x1024x1024 analog6T: SMEM K = 2
    where 4 would fit exactly)."""
    factor, last = 1, None
    if fixed + growing > capacity:
        return 1
    while fixed + growing <= capacity:
        last = smallest_factor(rem // factor)
        if last is None:
            break
        growing = last * factor * growing
        factor *= last
    if last is not None:
        factor //= last
    return factor


def _bank_factors(banks: int, n_rem: int, k_rem: int, n_ext: int, k_ext: int, threshold: float) -> tuple[int, int]:
    """(K, N) spread over the Y banks (get_bank_factors)."""
    if banks <= 1:
        return 1, 1
    if k_ext > n_ext:
        k_first = k_ext / n_ext < threshold
    else:
        k_first = not (n_ext / k_ext < threshold)
    first = smallest_factor(banks)
    if k_first and largest_divisor_at_most(k_rem, first) == 1:
        k_first = False
        if largest_divisor_at_most(n_rem, first) == 1:
            return 1, 1
    elif not k_first and largest_divisor_at_most(n_rem, first) == 1:
        k_first = True
        if largest_divisor_at_most(k_rem, first) == 1:
            return 1, 1
    kb = nb = 1
    left = banks
    while left > 1:
        f = smallest_factor(left)
        if k_first:
            step = largest_divisor_at_most(k_rem // kb, f)
            if step == 1 or k_ext * kb >= threshold * n_ext * nb:
                break
            kb *= step
        else:
            step = largest_divisor_at_most(n_rem // nb, f)
            if step == 1 or n_ext * nb >= threshold * k_ext * kb:
                break
            nb *= step
        left //= f
    return kb, nb


def priority_mapping(M: int, N: int, K: int, prim: dict[str, Any], banks: int, arch: str,
                     threshold: float, smem_words: int | None) -> Mapping:
    """CiM mapping by the repository's priority algorithm (architecture.md section 5)."""
    Rp, Cp, Rh, Ch = prim["Rp"], prim["Cp"], prim["Rh"], prim["Ch"]
    nc, kc = largest_divisor_at_most(N, Cp), largest_divisor_at_most(K, Rp)
    n_rem, k_rem = N // nc, K // kc
    kb, nb = _bank_factors(banks, n_rem, k_rem, Ch * Cp, Rh * Rp, threshold)
    n_rem, k_rem = n_rem // nb, k_rem // kb
    nh, kh = largest_divisor_at_most(n_rem, Ch), largest_divisor_at_most(k_rem, Rh)
    n_rem, k_rem = n_rem // nh, k_rem // kh
    m_rem = M
    levels = [Level("DRAM", ("A", "B", "Z"))]
    if arch == "rf":
        n_used, k_used = N // n_rem, K // k_rem
        m1 = largest_divisor_at_most(M, smem_words // (k_used + n_used))
        k1 = _grow(smem_words, m1 * n_used, m1 * k_used, k_rem)
        n1 = _grow(smem_words, m1 * k_used * k1, m1 * n_used, n_rem)
        m_rem, n_rem, k_rem = m_rem // m1, n_rem // n1, k_rem // k1
        smem = {"M": m1, "N": n1, "K": k1}
        levels.append(Level("SMEM", ("A", "Z"), [Loop(d, smem[d]) for d in loop_order(smem)]))
    dram = {"M": m_rem, "N": n_rem, "K": k_rem}
    levels[0].loops = [Loop(d, dram[d]) for d in loop_order(dram)]
    # the bank (X = 1, Y = banks) and array fan-outs belong to the level above the CiM buffers
    levels[-1].loops += [Loop("N", nb, True), Loop("K", kb, True), Loop("N", nc, True), Loop("K", kc, True)]
    levels += [Level("CiMInpBuffer", ("A",)), Level("CiMOutBuffer", ("Z",)),
               Level("CiMStorage", ("B",), [Loop("N", nh), Loop("K", kh)])]
    return Mapping(levels, "CiMUnit", notes=f"priority v2.1, threshold {threshold:g}")


def baseline_mapping(M: int, N: int, K: int, c: dict[str, Any], order: str = "NM", lrf_n: int | None = None,
                     smem_m: int | None = None) -> Mapping:
    """A tensor-core-like mapping under the committed constraints (PE N=16, K=16; RF temporal only K;
    LRF temporal only N <= 128), K reduced fully inside the RF when the SMEM holds it."""
    b = c["baseline"]
    pe_n, pe_k = largest_divisor_at_most(N, b["pe_cols"]), largest_divisor_at_most(K, b["pe_rows"])
    sub_m = largest_divisor_at_most(M, b["subpartitions"])
    n_rem, k_rem, m_rem = N // pe_n, K // pe_k, M // sub_m
    lrf_n = lrf_n or largest_divisor_at_most(n_rem, 8)
    n_rem //= lrf_n
    smem_m = smem_m or 1
    m_rem //= smem_m
    dram = {"M": m_rem, "N": n_rem}
    dram_loops = [Loop(d, dram[d]) for d in order]
    return Mapping([
        Level("DRAM", ("A", "B", "Z"), dram_loops),
        Level("SMEM", ("A", "B"), [Loop("M", smem_m), Loop("M", sub_m, True)]),
        Level("RF", ("Z",), [Loop("K", k_rem), Loop("N", pe_n, True), Loop("K", pe_k, True)]),
        Level("LRF", ("A",), [Loop("N", lrf_n)]),
    ], "mac", notes=f"baseline heuristic: DRAM order {order}, LRF N {lrf_n}, SMEM M {smem_m}")


def baseline_mapper_reference() -> Mapping:
    """The mapper-found baseline mapping of the committed run tc_mapper_512x1024x1024 (level_stats.csv)."""
    return Mapping([
        Level("DRAM", ("A", "B", "Z"), [Loop("N", 8), Loop("M", 4)]),
        Level("SMEM", ("A", "B"), [Loop("M", 32), Loop("K", 16), Loop("M", 4, True)]),
        Level("RF", ("Z",), [Loop("K", 4), Loop("N", 16, True), Loop("K", 16, True)]),
        Level("LRF", ("A",), [Loop("N", 8)]),
    ], "mac", notes="Timeloop mapper result of the committed baseline run")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------------------------

def _level_energy(c: dict[str, Any], names: list[str], prim: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    out = {}
    for name in names:
        if name in c["levels"]:
            lv = c["levels"][name]
            blk = lv["block"]
            out[name] = {"read": lv["read"] / blk, "write": lv["write"] / blk, "update": lv["update"] / blk,
                         "leak": lv["leak_pj_per_cycle"], "read_bw": lv["read_bw"], "write_bw": lv["write_bw"]}
        elif name == "CiMStorage":   # read free; a write costs write_pj per Ch-word vector
            w = prim["write_pj"] / prim["Ch"]
            out[name] = {"read": 0.0, "write": w, "update": w, "leak": 0.0, "read_bw": None, "write_bw": None}
        else:                        # CiMInpBuffer / CiMOutBuffer: custom_storage type "zero"
            out[name] = {"read": 0.0, "write": 0.0, "update": 0.0, "leak": 0.0, "read_bw": None, "write_bw": None}
    return out


def evaluate(mapping: Mapping, M: int, N: int, K: int, arch: str, cim: str | None = None, banks: int | None = None,
             constants: dict[str, Any] | None = None) -> PlacementResult:
    """Energy, cycles and accesses of ``mapping`` (any mapping; see :func:`gemm` for the default ones)."""
    c = constants or load_constants()
    prim = c["cim"][cim] if cim else None
    names = [lv.name for lv in mapping.levels]
    energy_of = _level_energy(c, names, prim)
    if arch == "baseline":
        b = c["baseline"]
        compute_pj, total_instances = b["mac_pj"], b["subpartitions"] * b["pe_rows"] * b["pe_cols"]
    else:
        compute_pj, total_instances = prim["mac_pj"], banks * prim["Rp"] * prim["Cp"]
    acc, energy_pj, compute_cycles, bw_cycles, utilized = analyze(
        mapping, M, N, K, energy_of, compute_pj, total_instances)
    macs = M * N * K
    cycles = max([compute_cycles, *bw_cycles.values()])
    leak = {}
    for name in names:
        inst = next(iter(acc[name].values())).instances if acc[name] else 1
        leak[name] = energy_of[name]["leak"] * inst * cycles
        energy_pj[name] += leak[name]
    energy_uj = sum(energy_pj.values()) * 1e-6
    utilization = macs / (total_instances * cycles)
    if arch == "baseline":
        cyc_lat = cyc_www = cycles
        util_www = utilization
    else:
        storage = {lp.dim: lp.bound for lp in mapping.levels[-1].loops}
        rh_used, ch_used = storage.get("K", 1), storage.get("N", 1)
        cyc_lat = max([compute_cycles * prim["latency_cycles"], *bw_cycles.values()])
        # get_stats.py: BW 42 (SMEM), 32 (DRAM), 1 for the others; reads and updates separately
        bw = {"SMEM": 42, "DRAM": 32}
        per_level = [math.ceil(a.reads / bw.get(n, 1)) for n in names for a in acc[n].values()]
        per_level += [math.ceil(a.updates / bw.get(n, 1)) for n in names for a in acc[n].values()]
        cyc_www = max([compute_cycles * rh_used * ch_used * prim["latency_cycles"], *per_level])
        util_www = (rh_used * ch_used) / (prim["Rh"] * prim["Ch"]) * utilized / total_instances
    reductions = sum(a.temporal_reductions for lv in acc.values() for a in lv.values())
    total_ops = M * N * K + M * N * (K - 1)
    tops_w = total_ops / (energy_uj + reductions * c["mapping"]["temporal_reduction_pj"] * 1e-6) * 1e-6
    order = [mapping.compute] + list(reversed(names))
    return PlacementResult(
        arch=arch, cim=cim, banks=banks, M=M, N=N, K=K, macs=macs, energy_uj=energy_uj,
        energy_per_mac_fj=energy_uj * 1e9 / macs, cycles=cycles, cycles_with_cim_latency=cyc_lat,
        cycles_www_postprocess=cyc_www, compute_cycles=compute_cycles, bandwidth_cycles=bw_cycles,
        utilization=utilization, utilization_www=util_www,
        breakdown_uj={n: energy_pj[n] * 1e-6 for n in order}, leakage_uj={n: v * 1e-6 for n, v in leak.items()},
        accesses={n: {d: asdict(a) for d, a in acc[n].items()} for n in reversed(names)},
        mapping=mapping.describe(), tops_per_w_www=tops_w)


def _check_positive(**kwargs: int) -> None:
    for flag, value in kwargs.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{flag} must be a positive integer, got {value!r}")


def gemm(M: int, N: int, K: int, arch: str = "rf", cim: str | None = "analog6T", banks: int | None = None,
         constants: dict[str, Any] | None = None, threshold: float | None = None,
         search: bool = False, objective: str = "edp") -> PlacementResult:
    """One GEMM on ``arch`` (baseline | rf | smem) with the default mapping: the repository's
    priority mapping for CiM (``search=True``: :func:`search_mapping`); for the baseline the
    lowest-EDP mapping of a small search over :func:`baseline_mapping` (LRF N tile, SMEM M tile, DRAM
    loop order) that fits the SMEM."""
    c = constants or load_constants()
    _check_positive(m=M, n=N, k=K)
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if arch == "baseline":
        return _best_baseline(M, N, K, c)
    if cim not in c["cim"]:
        raise ValueError(f"--cim {cim!r}: choose one of {', '.join(c['cim'])}")
    banks = banks if banks is not None else c["mapping"]["default_banks"]
    _check_positive(banks=banks)
    if search:
        return evaluate(search_mapping(M, N, K, arch, cim, banks, c, objective), M, N, K, arch, cim, banks, c)
    thr = threshold if threshold is not None else c["mapping"]["threshold"][arch]
    smem = c["levels"]["SMEM"]["capacity_words"] if arch == "rf" else None
    mapping = priority_mapping(M, N, K, c["cim"][cim], banks, arch, thr, smem)
    return evaluate(mapping, M, N, K, arch, cim, banks, c)


def _best_baseline(M: int, N: int, K: int, c: dict[str, Any]) -> PlacementResult:
    b = c["baseline"]
    cap = c["levels"]["SMEM"]["capacity_words"]
    pe_n, pe_k = largest_divisor_at_most(N, b["pe_cols"]), largest_divisor_at_most(K, b["pe_rows"])
    sub_m = largest_divisor_at_most(M, b["subpartitions"])
    best, fallback = None, None
    for lrf_n in [d for d in _divisors(N // pe_n) if d <= b["lrf_max_n"]
                  and pe_n * d <= c["levels"]["RF"]["capacity_words"]]:
        for smem_m in _divisors(M // sub_m):
            fits = sub_m * smem_m * K + K * pe_n * lrf_n <= cap
            for order in ("NM", "MN"):
                r = evaluate(baseline_mapping(M, N, K, c, order, lrf_n, smem_m), M, N, K, "baseline", constants=c)
                key = (r.energy_uj * r.cycles,)
                if fits and (best is None or key < best[0]):
                    best = (key, r)
                if fallback is None or sub_m * smem_m + pe_n * lrf_n < fallback[0]:
                    fallback = (sub_m * smem_m + pe_n * lrf_n, r)
    return best[1] if best else fallback[1]


# ----------------------------------------------------------------------------------------------
# Mapping search (the "option to search mappings"): exhaustive over a small, exact space.

OBJECTIVES = ("edp", "energy")


def _score(mapping: Mapping, M: int, N: int, K: int, c: dict[str, Any], prim: dict[str, Any], banks: int,
           objective: str) -> float:
    names = [lv.name for lv in mapping.levels]
    energy_of = _level_energy(c, names, prim)
    acc, energy_pj, compute_cycles, bw_cycles, _ = analyze(
        mapping, M, N, K, energy_of, prim["mac_pj"], banks * prim["Rp"] * prim["Cp"])
    cycles = max([compute_cycles, *bw_cycles.values()])
    energy = sum(energy_pj.values()) + sum(
        energy_of[n]["leak"] * next(iter(acc[n].values())).instances * cycles for n in names if acc[n])
    if objective == "energy":
        return energy
    return energy * max([compute_cycles * prim["latency_cycles"], *bw_cycles.values()])


def _maximal(options: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Options no other option dominates (every factor a multiple, one strictly larger)."""
    out = []
    for o in options:
        if not any(p != o and all(b % a == 0 for a, b in zip(o, p)) for p in options):
            out.append(o)
    return out


def _orders(factors: dict[str, int]) -> list[tuple[str, ...]]:
    """Distinct loop orders (outer to inner) of the dims with a factor > 1."""
    from itertools import permutations

    return sorted({tuple(d for d in p if factors[d] > 1) for p in permutations("MNK")})


def search_mapping(M: int, N: int, K: int, arch: str, cim: str, banks: int, c: dict[str, Any],
                   objective: str = "edp") -> Mapping:
    """The best CiM mapping over: every split of the primitives between N and K (X = 1), the largest
    holds, every maximal SMEM tile (M, N, K factors that fit; RF level only) in every loop order,
    and every DRAM loop order. Objective: ``edp`` = energy x cycles with the CiM latency (the WWW
    mapper minimised Timeloop's EDP, latency excluded), or ``energy``. The array is filled first, as
    in the priority mapping (largest divisors of N <= Cp and K <= Rp). Best within this space, not
    over all mappings."""
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    prim = c["cim"][cim]
    nc, kc = largest_divisor_at_most(N, prim["Cp"]), largest_divisor_at_most(K, prim["Rp"])
    cap = c["levels"]["SMEM"]["capacity_words"]
    best = None
    for nb in _divisors(N // nc):
        for kb in _divisors(K // kc):
            if nb * kb > banks:
                continue
            n2, k2 = N // nc // nb, K // kc // kb
            nh, kh = largest_divisor_at_most(n2, prim["Ch"]), largest_divisor_at_most(k2, prim["Rh"])
            n3, k3 = n2 // nh, k2 // kh
            if arch == "rf":
                nu, ku = N // n3, K // k3
                smem_opts = [(m1, n1, k1) for m1 in _divisors(M) for n1 in _divisors(n3) for k1 in _divisors(k3)
                             if m1 * (ku * k1 + nu * n1) <= cap] or [(1, 1, 1)]
                smem_opts = _maximal(smem_opts)
            else:
                smem_opts = [None]
            for so, smem_order in [(o, p) for o in smem_opts for p in _orders(dict(zip("MNK", o or (1, 1, 1))))]:
                rem = {"M": M, "N": n3, "K": k3}
                levels = [Level("DRAM", ("A", "B", "Z"))]
                if so:
                    smem = dict(zip("MNK", so))
                    rem = {d: rem[d] // smem[d] for d in DIMS}
                    levels.append(Level("SMEM", ("A", "Z"), [Loop(d, smem[d]) for d in smem_order]))
                fanout = [Loop("N", nb, True), Loop("K", kb, True), Loop("N", nc, True), Loop("K", kc, True)]
                if so:
                    levels[-1].loops += fanout
                levels += [Level("CiMInpBuffer", ("A",)), Level("CiMOutBuffer", ("Z",)),
                           Level("CiMStorage", ("B",), [Loop("N", nh), Loop("K", kh)])]
                for order in _orders(rem):
                    levels[0].loops = [Loop(d, rem[d]) for d in order] + ([] if so else fanout)
                    m = Mapping([Level(lv.name, lv.keeps, list(lv.loops)) for lv in levels], "CiMUnit",
                                notes=f"searched ({objective})")
                    s = _score(m, M, N, K, c, prim, banks, objective)
                    if best is None or s < best[0]:
                        best = (s, m)
    return best[1]
