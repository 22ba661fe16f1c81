"""Evaluation results written into a bundle's model card (``edgecloud eval --card``).

Every number in a card must come with the command that produced it: each evaluation gets its
own section, keyed by the settings that change the result (split, subset, backend and its
options, chips, thresholds), holding the exact command line and its report. Running the same
evaluation again replaces its section; other sections are kept.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

CARD = "README.md"


OUTPUT_FLAGS = ("--json", "--card")  # change how a result is shown, not the result


def section_key(shown: list[str]) -> str:
    """A short stable key of the result-changing arguments."""
    return hashlib.sha1(" ".join(shown).encode()).hexdigest()[:10]


def write_eval_section(bundle_dir: str | Path, command: list[str], title: str, report: str) -> Path:
    """Insert or replace this evaluation's section in ``bundle_dir/README.md``."""
    path = Path(bundle_dir) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --card needs a bundle folder with a model card")
    shown = [a for a in command if a not in OUTPUT_FLAGS]
    key = section_key(shown)
    start, end = f"<!-- eval:{key} -->", f"<!-- /eval:{key} -->"
    body = (f"{start}\n### {title}\n\n```bash\n{shlex.join(shown)}\n```\n\n```text\n{report.rstrip()}\n```\n{end}")
    text = path.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text)
    else:
        if "\n## Evaluations\n" not in text:
            text = text.rstrip("\n") + "\n\n## Evaluations\n\nEach section: the command, then its output.\n"
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)
    return path
