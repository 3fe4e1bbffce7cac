"""`tadrop merge | status | export | report`: the command line.

Errors we understand (bad config, bad checkpoint, conflicting run, failed job) print one clear line
naming the file/tensor/key at fault and exit 1; `status` exits 0 complete, 3 incomplete, 2 not a run.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tadrop", description="Out-of-core, resumable merging of many "
                                "fine-tunes of one base model (TADrop, TA, TIES, EMR, TALL, consensus, DARE).")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="run or resume a merge described by a YAML config")
    m.add_argument("config", type=Path)
    m.add_argument("--output", type=Path, help="run directory (overrides `output:`)")
    m.add_argument("--executor", choices=["local", "ray"], help="overrides `executor:` (default local)")
    m.add_argument("--workers", type=int, help="worker processes / Ray actors (overrides `workers:`)")
    m.add_argument("--memory-budget", help="per-worker memory budget, e.g. 2GiB (overrides `memory_budget:`)")
    m.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else a private local instance)")
    m.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    m.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")

    s = sub.add_parser("status", help="progress of a run: exit 0 complete, 3 incomplete, 2 not a run")
    s.add_argument("run_dir", type=Path)

    e = sub.add_parser("export", help="write one task's model as a Hugging Face checkpoint")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--task", required=True)
    e.add_argument("--output", type=Path, required=True)

    r = sub.add_parser("report", help="drop-rate heatmap (PNG) and summary from stats.parquet")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--output", type=Path, help="PNG path (default RUN/report.png)")
    return p


def _known_errors() -> tuple[type[BaseException], ...]:
    from .checkpoints import CheckpointError
    from .config import ConfigError
    from .executor import WorkerLost
    from .export import ExportError
    from .job import JobError
    from .plan import PlanError
    from .run import RunError
    return (ConfigError, CheckpointError, PlanError, RunError, JobError, WorkerLost, ExportError, OSError)


def _merge(args) -> int:
    from .config import load_config
    from .run import merge
    overrides = {k: v for k, v in {
        "output": args.output, "executor": args.executor, "workers": args.workers,
        "memory_budget": args.memory_budget,
    }.items() if v is not None}
    cfg = load_config(args.config, overrides)
    if args.ray_address:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": args.ray_address})})
    merge(cfg, dry_run=args.dry_run, quiet=args.quiet)
    return 0


def _export(args) -> int:
    from .export import export_task
    out = export_task(args.run_dir, args.task, args.output)
    print(f"wrote task {args.task!r} to {out}")
    return 0


def _report(args) -> int:
    from .report import write_report
    print(write_report(args.run_dir, args.output))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if args.command == "status":
        from .run import status
        return status(args.run_dir)
    handlers = {"merge": _merge, "export": _export, "report": _report}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("tadrop: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except _known_errors() as e:
        print(f"tadrop: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
