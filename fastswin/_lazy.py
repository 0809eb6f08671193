"""PEP 562 lazy exports: ``import fastswin`` stays cheap (no Triton, no extension load) and a
public name is imported from its submodule on first use."""
import importlib


def lazy_exports(package: str, table: dict):
    """``table`` maps public name -> submodule (relative to ``package``). Returns the module
    ``__getattr__`` and ``__dir__`` functions."""

    def __getattr__(name):
        mod = table.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(mod, package), name)
        return value

    def __dir__():
        return sorted(table)

    return __getattr__, __dir__
