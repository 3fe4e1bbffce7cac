"""tadrop-merge's public Python API (re-exports only; see README "Python API").

    from pipeline import merge
    result = merge("configs/demo.yaml", output="runs/demo")

Names load on first use, so `import pipeline` (and `tadrop --help`) stays fast and never imports
Ray or torch until a merge needs them.
"""
from importlib import import_module

_EXPORTS = {
    "merge": "pipeline.api", "load": "pipeline.api", "RunResult": "pipeline.api",
    "MergeConfig": "pipeline.config", "ConfigError": "pipeline.config",
    "TaskBank": "pipeline.bank",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__():
    return __all__
