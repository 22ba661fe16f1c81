"""Hardware-software co-design: training and pruning methods that target the in-memory arrays.

:mod:`edgecloud.codesign.dub`: D.U.B. crossbar-attuned pruning (Ibrayev et al., arXiv 2403.13082),
which lowers the ADC resolution each crossbar needs, and its baselines (magnitude pruning,
crossbar-aware group lasso).

:mod:`edgecloud.codesign.nax`: NAX (Negi et al., DAC'22), per-layer kernel size and crossbar size
chosen together on a weight-sharing supernet (:mod:`edgecloud.nets.resnet_elastic`), scored by the
accuracy on the non-ideal crossbar backend and the EDAP of :mod:`edgecloud.cim.cost`
(``edgecloud search nax``).
"""
