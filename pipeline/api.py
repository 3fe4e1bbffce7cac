"""The Python API: `merge(config, **overrides) -> RunResult`, what `tadrop merge` does, callable from
scripts (with or without an `if __name__ == "__main__":` guard), notebooks and stdin.

    from pipeline import merge
    result = merge("configs/demo.yaml", output="runs/demo", workers=2)
    result.stats.to_pandas()            # one row per (tensor, task)
    result.scalars["emr_lambdas"]       # per-task scalars
    result.export("math", "runs/demo-math")

Errors are the CLI's: ConfigError, CheckpointError, RunError, JobError, WorkerLost (one line each).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, MergeConfig, config_from_data, read_config_data, read_finished_run


@dataclass(frozen=True)
class RunResult:
    """A finished run: where its outputs are, its per-task scalars, its stats table."""
    run_dir: Path
    config: MergeConfig
    merged: Path | None          # the merged checkpoint (task_arithmetic, ties, consensus)
    unified: Path | None         # EMR tau_uni / TALL tau_MTL shards (emr, tall_masks)
    masks: Path | None           # masks.zarr (emr, tall_masks, consensus)
    stats_path: Path
    run_json: Path
    scalars: dict = field(default_factory=dict)   # emr_lambdas / tall_lambdas ... per task
    timings: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return self.config.task_names

    @property
    def stats(self):
        """stats.parquet as a pyarrow Table (tensor, task, numel, q_a, q_b, drop_rate, kept, ...)."""
        import pyarrow.parquet as pq
        return pq.read_table(self.stats_path)

    def export(self, task: str, output: str | os.PathLike) -> Path:
        """Write one task's model as a Hugging Face checkpoint (`tadrop export`)."""
        from .export import export_task
        return export_task(self.run_dir, task, Path(output))

    @classmethod
    def open(cls, run_dir: str | os.PathLike) -> "RunResult":
        """The result of a complete run directory."""
        run_dir = Path(run_dir)
        record, cfg = read_finished_run(run_dir, ConfigError, "call merge() again to finish it")
        there = lambda p: p if p.exists() else None  # noqa: E731
        masks = there(run_dir / "masks.zarr")
        scalars: dict = {}
        if masks is not None:
            attrs = json.loads((masks / "zarr.json").read_text()).get("attributes", {})
            scalars = {k: v for k, v in attrs.items() if k not in ("tasks", "method", "sparsify")}
        return cls(run_dir=run_dir, config=cfg, merged=there(run_dir / "merged"),
                   unified=there(run_dir / "unified"), masks=masks, stats_path=run_dir / "stats.parquet",
                   run_json=run_dir / "run.json", scalars=scalars, timings=record.get("timings", {}))


def load(config: Any, **overrides) -> MergeConfig:
    """A validated MergeConfig from a dict, a YAML path (ours or mergekit's) or a MergeConfig,
    with `overrides` (any top-level config key, e.g. output=, workers=, device=) applied."""
    if isinstance(config, MergeConfig):
        data, source = config.to_json(), "MergeConfig"
    elif isinstance(config, dict):
        data, source = dict(config), "config dict"
    elif isinstance(config, (str, os.PathLike)):
        data, source = read_config_data(config), str(config)
    else:
        raise ConfigError(f"config: expected a dict, a YAML path or a MergeConfig, got {type(config).__name__}")
    from .mergekit_config import is_mergekit, translate
    if is_mergekit(data):
        data = translate(data, source).config
    data.update({k.replace("-", "_"): v for k, v in overrides.items()})
    return config_from_data(data, source)


def merge(config: Any, *, dry_run: bool = False, quiet: bool = True, **overrides) -> RunResult | None:
    """Run (or resume) a merge; returns its RunResult (None for a dry run).

    config: a dict, a YAML path (tadrop's or mergekit's) or a MergeConfig; overrides: top-level
    keys that win over it (output="runs/x", workers=4, device="cuda", model_card=False...).
    quiet=False shows the progress bar.
    """
    from .run import merge as run_merge
    cfg = load(config, **overrides)
    out = run_merge(cfg, dry_run=dry_run, quiet=quiet)
    return None if out is None else RunResult.open(out)
