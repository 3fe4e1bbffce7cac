"""`tadrop merge | status | verify | export | report`: the command line.

Errors we understand (bad config, bad checkpoint, conflicting run, failed job) print one clear line
naming the file/tensor/key at fault and exit 1; `status` exits 0 complete, 3 incomplete, 2 not a run.
"""
from __future__ import annotations

import argparse
import logging
import os
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
    m.add_argument("--verify-inputs", action="store_true",
                   help="hash every input file: record the hashes, or refuse inputs changed since")

    s = sub.add_parser("status", help="progress of a run: exit 0 complete, 3 incomplete, 2 not a run")
    s.add_argument("run_dir", type=Path)

    e = sub.add_parser("export", help="write one task's model as a Hugging Face checkpoint")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--task", required=True)
    e.add_argument("--output", type=Path, required=True)

    v = sub.add_parser("verify", help="re-hash every output of a run against its checksums: "
                       "exit 0 intact, 1 damaged (named), 2 not a run, 3 incomplete")
    v.add_argument("run_dir", type=Path)
    v.add_argument("--verify-inputs", action="store_true",
                   help="also re-hash the inputs against the hashes `merge --verify-inputs` recorded")

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
    from .integrity import LockError, StateError
    from .ledger import LedgerError
    from .run import RunError
    from .writers import MaskStoreError
    return (ConfigError, CheckpointError, PlanError, RunError, JobError, WorkerLost, ExportError, OSError,
            LockError, StateError, LedgerError, MaskStoreError)


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
    merge(cfg, dry_run=args.dry_run, quiet=args.quiet, verify_inputs=args.verify_inputs)
    return 0


def _verify(args) -> int:
    """0 complete and intact, 1 damaged, 2 not a run, 3 incomplete (its finished jobs intact)."""
    from .integrity import RunLock, StateError, verify
    if not (args.run_dir / "run.json").is_file():
        print(f"{args.run_dir}: not a tadrop run (no run.json)")
        return 2
    with RunLock(args.run_dir, exclusive=False, command="verify"):
        try:
            report = verify(args.run_dir, inputs=True, hash_inputs=args.verify_inputs)
            complete = _complete(args.run_dir)
        except StateError as e:
            print(f"{args.run_dir}: damaged: {e}")
            return 1
    for p in report.problems:
        print(f"DAMAGED {p}")
    what = f"{report.checked} item(s), {report.hashed_bytes / 1e6:.1f} MB hashed"
    if not report.ok:
        print(f"{args.run_dir}: {len(report.problems)} problem(s) in {what}; "
              + (f"re-run `tadrop merge` to redo {len(report.jobs)} job(s) and repair it" if complete
                 else "re-run `tadrop merge` to redo them"))
        return 1
    print(f"{args.run_dir}: " + ("intact" if complete else "incomplete; its finished jobs are intact")
          + f" ({what})")
    return 0 if complete else 3


def _complete(run_dir: Path) -> bool:
    from .integrity import read_json
    return bool(read_json(run_dir / "run.json").get("complete"))


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
    handlers = {"merge": _merge, "export": _export, "report": _report, "verify": _verify,
                "status": _status}
    try:
        rc = handlers[args.command](args)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # `tadrop status RUN | head -1`: the reader left; say nothing more (stdout is gone)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("tadrop: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except RecursionError:
        print("tadrop: error: an input is nested too deeply to read", file=sys.stderr)
        return 1
    except _known_errors() as e:
        print(f"tadrop: error: {e}", file=sys.stderr)
        return 1


def _status(args) -> int:
    from .run import status
    return status(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
