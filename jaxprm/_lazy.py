"""Lazy package faces: a package names its public attributes and the modules that define them,
and each is imported on first use (so ``import jaxprm`` does not import JAX).

    __getattr__, __dir__ = lazy_attributes(__name__, {"load_prm": "jaxprm.scoring", "Sampler": ".sampler"})

Relative module names are resolved against the package. A resolved attribute is cached in the
package's namespace, so ``__getattr__`` runs once per name.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_attributes(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package`` whose attribute ``name`` lives in module ``names[name]``."""
    names = dict(names)

    def __getattr__(name: str):
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__


__all__ = ["lazy_attributes"]
