"""Modules that are also the API call they are named after.

``deploykit.bench``, ``deploykit.gate``, ``deploykit.quantize`` and
``deploykit.detect`` are modules (packages) of the pipeline and, as the README's
Python API promises, calls: ``deploykit.bench("model.onnx")``. Python binds a
submodule to its parent's attribute of the same name on import, so a function
there would be replaced by the module; instead the module itself is made callable.
"""

from __future__ import annotations

import importlib
import sys
import types


def callable_module(module_name: str, target: str) -> None:
    """Calling module ``module_name`` calls ``target`` ("pkg.module:function", imported on first call)."""
    module_path, func = target.split(":")

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(module_path), func)(*args, **kwargs)

    _CallableModule.__call__.__doc__ = f"Calls {module_path}.{func}."
    sys.modules[module_name].__class__ = _CallableModule
