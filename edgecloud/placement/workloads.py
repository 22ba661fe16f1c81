"""The GEMM shapes of the WWW study (M, N, K; A[M,K] x B[N,K]).

* BERT-Large and ResNet-50: the repository's workload files (tanvisharma/WWWtoCiM,
  ``src/my-inputs/workloads/bert.txt`` and ``resnet.txt``), every row (ResNet-50: 50 conv/FC GEMMs,
  M = OH*OW, N = Cout, K = KH*KW*Cin, batch 1).
* GPT-J-6B and DLRM: not in the stored workload files. GPT-J-6B from its published configuration
  (d_model 4096, FFN 16384, 2048-token context): QKV/out projections (2048, 4096, 4096), FFN up
  (2048, 16384, 4096), FFN down (2048, 4096, 16384). DLRM from the MLPerf reference configuration
  (bottom MLP 13-512-256-128, top MLP 479-1024-1024-512-256-1) at batch 2048. These two are our
  stand-ins for the paper's, not copied from it.
"""

from __future__ import annotations

BERT_LARGE = [(512, 1024, 1024), (512, 512, 1024), (512, 1024, 512), (512, 4096, 1024), (512, 1024, 4096)]

_R50 = [(12544, 64, 147)]
_R50 += [(3136, 64, 64)] + [(3136, 64, 576), (3136, 256, 64), (3136, 64, 256)] * 3
_R50 = _R50[:-1] + [(3136, 128, 256)]
_R50 += [(784, 128, 1152), (784, 512, 128), (784, 128, 512)] * 4
_R50 = _R50[:-1] + [(784, 256, 512)]
_R50 += [(196, 256, 2304), (196, 1024, 256), (196, 256, 1024)] * 6
_R50 = _R50[:-1] + [(196, 512, 1024)]
_R50 += [(49, 512, 4608), (49, 2048, 512), (49, 512, 2048)] * 3
_R50 = _R50[:-1] + [(1, 1000, 2048)]
RESNET50 = _R50

GPTJ = [(2048, 4096, 4096), (2048, 16384, 4096), (2048, 4096, 16384)]

DLRM = [(2048, 512, 13), (2048, 256, 512), (2048, 128, 256),
        (2048, 1024, 479), (2048, 1024, 1024), (2048, 512, 1024), (2048, 256, 512), (2048, 1, 256)]

WORKLOADS = {"BERT-Large": BERT_LARGE, "GPT-J-6B": GPTJ, "ResNet-50": RESNET50, "DLRM": DLRM}
