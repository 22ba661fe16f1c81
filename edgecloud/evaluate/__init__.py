"""Accuracy / exit-share / energy evaluation of bundles on CiM backends, and threshold sweeps.

- :func:`evaluate`: the daemon's path (``route`` -> cloud -> energy) over a data set, Monte-Carlo
  over chip instances.
- :func:`build_cache` + :func:`sweep`: one pass, then any thresholds from cached outputs.
"""

from edgecloud.evaluate.cache import OutputCache, build_cache
from edgecloud.evaluate.evaluator import EvalConfig, EvalReport, evaluate
from edgecloud.evaluate.results import SampleTable, aggregate, summarize
from edgecloud.evaluate.source import InMemoryBundle, load_eval_data, resolve_bundle
from edgecloud.evaluate.sweep import default_grid, sweep, write_csv, write_plot

__all__ = [
    "EvalConfig", "EvalReport", "InMemoryBundle", "OutputCache", "SampleTable", "aggregate",
    "build_cache", "default_grid", "evaluate", "load_eval_data", "resolve_bundle", "summarize",
    "sweep", "write_csv", "write_plot",
]
