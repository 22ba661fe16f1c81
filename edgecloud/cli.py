"""The ``edgecloud`` command: one entry point, one module per sub-command.

Each module in :mod:`edgecloud.commands` exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a callable taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from edgecloud import __version__

# Order here is the order in ``edgecloud --help``.
COMMAND_MODULES = (
    "demo", "edge", "cloud", "health", "infer", "bench", "train", "export", "prune", "eval", "sweep", "analyze", "kernels", "robust",
    "search", "placement", "offload", "control",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecloud",
        description="Distributed edge-cloud inference with simulated compute-in-memory edges.",
    )
    parser.add_argument("--version", action="version", version=f"edgecloud {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"edgecloud.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"edgecloud.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that record their own command line
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # Configuration and input errors: one clear line, no traceback.
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"edgecloud {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
