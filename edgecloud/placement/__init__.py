"""Where to compute in memory: an exact analytic model of INT8 GEMMs on the WWW architectures.

A tensor-core-like baseline (A100-SM-like) and SRAM compute-in-memory at the register-file (``rf``)
or shared-memory (``smem``) level with four CiM primitives (Sharma et al., "WWW: What, When, Where to
Compute-in-Memory", arXiv 2312.15896). Counts accesses the way Timeloop does; validated exactly
against the committed Timeloop runs (tests/test_placement.py). Constants: ``constants.yaml``.
"""

from edgecloud.placement.model import (
    ARCHS, CIM_TYPES, Level, Loop, Mapping, PlacementResult, baseline_mapper_reference, baseline_mapping, evaluate,
    gemm, load_constants, priority_mapping, search_mapping,
)

__all__ = [
    "ARCHS", "CIM_TYPES", "Level", "Loop", "Mapping", "PlacementResult", "baseline_mapper_reference",
    "baseline_mapping", "evaluate", "gemm", "load_constants", "priority_mapping", "search_mapping",
]
