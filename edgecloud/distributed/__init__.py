"""Fan-out of research jobs: a local process pool by default, a Ray cluster on request.

Commands that run many independent, seeded jobs (chips of ``edgecloud eval``, attack units of
``edgecloud robust``) hand them to :func:`run_tasks`. Each job carries its own seed, so where it
runs changes nothing: a Ray run equals a local run bit for bit.
"""

from edgecloud.distributed.executor import ray_address, run_tasks

__all__ = ["ray_address", "run_tasks"]
