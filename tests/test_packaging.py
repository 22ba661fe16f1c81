"""An installed, non-editable package carries its compiled CiM kernels, and they run.

From a copy of the checkout (the files docker/Dockerfile copies into its build stage) this builds
the sdist, then the wheel from the unpacked sdist (as ``python -m build`` and pip building from
source do), both offline with this environment's setuptools; installs the wheel into a folder of
its own and, in a subprocess that cannot see the source tree, loads every kernel this CPU can run
and checks a crossbar backend (``kernel: auto``) against the digital reference.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from edgecloud.cim import kernel

# what the wheel is built from (docker/Dockerfile's build stage copies the same)
SOURCES = ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "edgecloud", "models")
ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
X86 = platform.machine().lower() in {"x86_64", "amd64"}
# the libraries setup.py compiles on this architecture, whatever this CPU can run
EXPECTED = list(kernel.COMPILED) if X86 else ["portable"]


@dataclass
class Built:
    sdist: Path
    wheel: Path
    build_log: str
    target: Path  # the wheel installed here (pip install --target)
    scratch: Path  # an empty folder to run from: no source tree on sys.path


def _builds_wheels() -> bool:
    """Whether this environment's setuptools makes wheels: itself from 70.1, before with `wheel`."""
    try:
        if tuple(int(part) for part in version("setuptools").split(".")[:2]) >= (70, 1):
            return True
        version("wheel")
        return True
    except (PackageNotFoundError, ValueError):
        return False


def _compiler() -> str | None:
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")[0]
    return shutil.which(cc)


def _installed_env(built: "Built") -> dict[str, str]:
    """The environment of a subprocess that imports the installed wheel, not the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", kernel.ENV}}
    env["PYTHONPATH"] = str(built.target)
    return env


def _docker_instructions() -> list[tuple[int, str, str]]:
    """(stage, instruction, arguments) of docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", "", DOCKERFILE.read_text())
    out, stage = [], -1
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, args = line.strip().partition(" ")
            stage += instruction.upper() == "FROM"
            out.append((stage, instruction.upper(), args.strip()))
    return out


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if not _builds_wheels():
        pytest.skip("this setuptools cannot build wheels without the `wheel` package: pip install -e '.[test]'")
    if _compiler() is None:
        pytest.skip("no C compiler: the wheel would hold no kernels")
    tmp = tmp_path_factory.mktemp("packaging")
    tree = tmp / "checkout"
    tree.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=skip)
        else:
            shutil.copy2(src, tree / name)

    dist = tmp / "dist"
    sdist = dist / _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                         "print(b.build_sdist(sys.argv[1]))", str(dist)], cwd=tree).stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()

    # the three libraries compile side by side (about 10 s each at -O3)
    cfg = tmp / "parallel.cfg"
    cfg.write_text(f"[build_ext]\nparallel = {min(3, os.cpu_count() or 1)}\n")
    env = {**os.environ, "DIST_EXTRA_CONFIG": str(cfg)}
    proc = _run([sys.executable, "-m", "pip", "wheel", str(unpacked), "--no-deps", "--no-build-isolation",
                 "--no-index", "--no-cache-dir", "-v", "-w", str(dist)], env=env, cwd=tmp)
    (wheel,) = dist.glob("edgecloud-*.whl")

    target = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", "--no-compile",
          "--target", str(target), str(wheel)], cwd=tmp)
    scratch = tmp / "scratch"
    scratch.mkdir()
    return Built(Path(sdist), wheel, proc.stdout + proc.stderr, target, scratch)


@pytest.mark.slow
def test_sdist_holds_what_the_wheel_is_built_from(built: Built) -> None:
    with tarfile.open(built.sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "edgecloud/cim/csrc/cim_common.h",
              *(f"edgecloud/cim/csrc/cim_{isa}.c" for isa in kernel.COMPILED)}
    assert needed <= names, sorted(needed - names)
    assert any(name.startswith("models/") for name in names)


@pytest.mark.slow
def test_wheel_holds_the_compiled_kernels_and_not_their_sources(built: Built) -> None:
    names = zipfile.ZipFile(built.wheel).namelist()
    for path in EXPECTED:
        kernel_so = re.compile(rf"edgecloud/cim/_kernel_{path}\..*so")
        assert any(kernel_so.fullmatch(n) for n in names), (path, built.build_log[-3000:])
    assert not [n for n in names if "/csrc/" in n]
    assert any(n.startswith("edgecloud/models/") for n in names)  # the trained bundles
    assert "edgecloud/cim/energy_table.yaml" in names and "edgecloud/train/recipes/fmnist-hybrid.yaml" in names
    # data folders are not taken for undeclared packages (include-package-data = false)
    assert "absent from the `packages` configuration" not in built.build_log


CHECK = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import edgecloud
from edgecloud.cim import kernel
from edgecloud.cim.backend import create_backend
from edgecloud.nn.quant import QuantConv2d

torch.manual_seed(0)
conv = QuantConv2d(5, 7, 3, stride=2, padding=1, weight_bits=4, act_bits=4).eval()
x = torch.rand(2, 5, 9, 9)
runs = {}
with torch.no_grad():
    xi, (wi, _) = conv.quantize_input(x), conv.quantize_weight()
    ref = conv.integer_mvm(xi, wi)
    for request in ["auto", *kernel.available_paths()]:
        be = create_backend("crossbar", {"kernel": request, "rows": 16}, seed=0)
        out = be.mvm(conv, xi, wi)
        runs[request] = {"path": be.kernel.path if be.kernel is not None else "torch",
                         "library": be.kernel.lib._name if be.kernel is not None else None,
                         "exact": bool(torch.equal(out, ref))}
print(json.dumps({"package": edgecloud.__file__, "available": kernel.available_paths(),
                  "files": {p: str(kernel.library_file(p)) for p in kernel.COMPILED if kernel.library_file(p)},
                  "runs": runs}))
"""


@pytest.mark.slow
def test_installed_kernels_load_and_equal_the_digital_reference(built: Built) -> None:
    proc = _run([sys.executable, "-c", CHECK], env=_installed_env(built), cwd=built.scratch)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    target = str(built.target)

    assert got["package"].startswith(target + os.sep), got["package"]  # not the source tree
    assert sorted(got["files"]) == sorted(EXPECTED) and all(f.startswith(target) for f in got["files"].values())
    # every compiled path this CPU can run is available from the installed package, as from the checkout
    runnable = [p for p in EXPECTED if kernel.unavailable_reason(p, built=True) is None]
    assert got["available"] == [*runnable, "torch"]
    assert set(kernel.available_paths()) <= set(got["available"])
    # auto picks the best of them; every path, auto included, equals integer_mvm at ideal settings
    assert got["runs"]["auto"]["path"] == (runnable[0] if runnable else "torch")
    for request, run in got["runs"].items():
        assert run["exact"], (request, run)
        assert request == "auto" or run["path"] == request
        assert run["library"] is None or run["library"].startswith(target), run


def test_docker_build_stage_copies_the_wheel_sources() -> None:
    """The image is built from the files this module builds its wheel from, none of them ignored."""
    copied = set()
    for stage, instruction, args in _docker_instructions():
        if stage == 0 and instruction == "COPY":
            copied.update(args.split()[:-1])
    assert copied == set(SOURCES)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not ignored & set(SOURCES)


@pytest.mark.slow
def test_docker_kernel_check_passes_on_the_installed_wheel(built: Built) -> None:
    """The runtime stage's build-time check (docker/Dockerfile) runs as written on a real install."""
    (check,) = [args for stage, instruction, args in _docker_instructions()
                if stage == 1 and instruction == "RUN" and args.startswith("python -c") and "kernel" in args]
    env = {**_installed_env(built), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = _run(["sh", "-c", check], env=env, cwd=built.scratch)
    assert "CiM kernels built" in proc.stdout
