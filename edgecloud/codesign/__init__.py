"""Hardware-software co-design: training and pruning methods that target the in-memory arrays.

:mod:`edgecloud.codesign.dub`: D.U.B. crossbar-attuned pruning (Ibrayev et al., arXiv 2403.13082),
which lowers the ADC resolution each crossbar needs, and its baselines (magnitude pruning,
crossbar-aware group lasso).
"""
