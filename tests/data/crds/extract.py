"""Regenerate the CRD schemas in this folder from the upstream CRD YAMLs.

Why: the tests validate KEDA and KServe objects offline, against the same OpenAPI schema the API
server would use, without a cluster or network. Only the ``openAPIV3Schema`` of the one version
the manifests use is kept, and schema ``description`` texts are dropped (they do not take part in
validation and make the InferenceService CRD ~2 MB). Nothing else is changed.

Usage (a git checkout of the upstream repository at the commit named in the header)::

    python tests/data/crds/extract.py GIT_DIR COMMIT PATH VERSION OWNER/NAME OUT.yaml

The files here were made from the repositories' newest snapshots with::

    python tests/data/crds/extract.py KEDA.git 8b4f083ca8c8c2baf8477e322bd4d16ac4dfa09a \\
        config/crd/bases/keda.sh_scaledobjects.yaml v1alpha1 kedacore/keda \\
        tests/data/crds/keda.sh_scaledobjects.v1alpha1.yaml
    python tests/data/crds/extract.py KSERVE.git aaac4e294dae2c7b1aa1886447793f3aa1c30912 \\
        config/crd/full/serving.kserve.io_clusterservingruntimes.yaml v1alpha1 kserve/kserve \\
        tests/data/crds/serving.kserve.io_clusterservingruntimes.v1alpha1.yaml
    python tests/data/crds/extract.py KSERVE.git aaac4e294dae2c7b1aa1886447793f3aa1c30912 \\
        config/crd/full/serving.kserve.io_inferenceservices.yaml v1beta1 kserve/kserve \\
        tests/data/crds/serving.kserve.io_inferenceservices.v1beta1.yaml
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

# Keys whose value is a map of name -> schema (the names are data, not keywords).
_SCHEMA_MAPS = ("properties", "patternProperties", "definitions", "$defs")
# Keys whose value is a schema or a list of schemas.
_SCHEMA_ONE = ("items", "additionalProperties", "not")
_SCHEMA_LIST = ("allOf", "anyOf", "oneOf")


def strip_descriptions(node: Any) -> Any:
    """A copy of the schema ``node`` without ``description`` keywords (property names kept)."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description" and isinstance(value, str):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
        elif key in _SCHEMA_ONE:
            out[key] = strip_descriptions(value)
        elif key in _SCHEMA_LIST and isinstance(value, list):
            out[key] = [strip_descriptions(sub) for sub in value]
        else:
            out[key] = value
    return out


def main(repo: str, commit: str, path: str, version: str, slug: str, out: str) -> None:
    text = subprocess.run(
        ["git", "--git-dir", repo, "show", f"{commit}:{path}"],
        check=True, capture_output=True, text=True,
    ).stdout
    crd = yaml.safe_load(text)
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strip_descriptions(found["schema"]["openAPIV3Schema"])
    spec = crd["spec"]
    header = (
        f"# openAPIV3Schema of {spec['names']['kind']} {spec['group']}/{version}\n"
        f"# Source: https://github.com/{slug} ({path}) at commit {commit}\n"
        "# License: Apache-2.0 (the source repository's LICENSE file)\n"
        "# Only this version's schema is kept; 'description' texts are removed, nothing else.\n"
        "# Regenerate with tests/data/crds/extract.py.\n"
    )
    doc = {"apiVersion": f"{spec['group']}/{version}", "kind": spec["names"]["kind"],
           "openAPIV3Schema": schema}
    # The body is JSON (also valid YAML, under the comment header): the tests read it with the
    # json module, ~50x faster than PyYAML on the ~0.7 MB InferenceService schema; one value per
    # line keeps regenerated files diffable.
    Path(out).write_text(header + json.dumps(doc, indent=0) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
