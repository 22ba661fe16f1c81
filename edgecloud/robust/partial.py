"""Mid-attack checkpoints: the batches crafted so far and where every random stream stands.

A hardware-in-loop Square unit on one chip takes hours of a CPU core; a session that stops in
the middle would lose all of it. ``craft`` saves one of these after each batch, so a rerun
continues from the next batch and repeats the uninterrupted run bit for bit (the attack's
generator and the chip's read noise are restored, not reseeded). zstd-compressed: the crafted
images take a few distinct values per pixel, so the file is small enough to keep in git across
sessions.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zstandard


@dataclass
class Partial:
    batches: list[torch.Tensor]      # crafted batches, in order
    generator: torch.Tensor          # the attack's torch.Generator state after the last batch
    reads: list[Any]                 # HardwareModel.read_state() after the last batch
    fingerprint: str                 # what the batches were crafted from (a stale file is refused)


def save_partial(path: Path, partial: Partial) -> None:
    buf = io.BytesIO()
    torch.save({"batches": partial.batches, "generator": partial.generator, "reads": partial.reads,
                "fingerprint": partial.fingerprint}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(zstandard.ZstdCompressor(level=19).compress(buf.getvalue()))
    os.replace(tmp, path)  # never a half-written checkpoint


def load_partial(path: Path, fingerprint: str) -> Partial | None:
    """The checkpoint at ``path`` if it was made for ``fingerprint``, else None."""
    if not path.is_file():
        return None
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
    data = torch.load(io.BytesIO(raw), weights_only=False)
    if data.get("fingerprint") != fingerprint:
        return None
    return Partial(data["batches"], data["generator"], data["reads"], data["fingerprint"])
