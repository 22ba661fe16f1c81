"""Online exit control: hold budgets (agreement with the cloud, energy, uplink, latency) by
moving an exit threshold at run time, with shadow sampling as the accuracy signal.

Uses the serving and simulator parts as libraries (never the reverse):

- :mod:`edgecloud.control.budgets` — what a user asks for (:class:`Budgets`), validated.
- :mod:`edgecloud.control.estimate` — agreement estimates and confidence bounds from shadow
  samples and offloaded samples (pure numerics).
- :mod:`edgecloud.control.controller` — :class:`ExitController`: observations in, a threshold and
  a shadow rate out, plus the state the metrics and the admin API show.
- :mod:`edgecloud.control.trace` — drifting streams and their deterministic replay.
"""
