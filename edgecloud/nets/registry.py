"""Name -> constructor registry for model families."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, Callable[..., Any]] = {}

# Modules that register families on import; importing the registry imports them all.
_FAMILY_MODULES = ("cdhn", "resnet", "resnet_quant", "resnet_elastic", "lenet", "meanet", "vgg")


def register_model(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        try:
            importlib.import_module(f"edgecloud.nets.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"edgecloud.nets.{module}":
                raise


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> Any:
    _load_families()
    try:
        fn = _REGISTRY[name]
    except KeyError as exc:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from exc
    return fn(**kwargs)


def model_arguments(name: str) -> set[str] | None:
    """The keyword arguments family ``name`` takes (None: it takes any, through ``**kwargs``), so a
    recipe's ``arch`` can be checked before a model is built; KeyError for an unknown family."""
    import inspect

    _load_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    params = inspect.signature(_REGISTRY[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)
