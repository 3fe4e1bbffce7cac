"""`tadrop merge | status | verify | export | report | tune`: the command line.

Errors we understand (bad config, bad checkpoint, conflicting run, failed job) print one clear line
naming the file/tensor/key at fault and exit 1; `status` exits 0 complete, 3 incomplete, 2 not a run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path


METHODS_HELP = """\
methods (`method:`):
  task_arithmetic  theta_0 + lambda * sum_k w_k Phi(tau_k)            (default; lambda 0.3)
  ties             trim, elect the sign, disjoint mean (TIES-Merging) (lambda 1.0, topk 0.2)
  emr              one unified vector + per-task masks and rescalers (EMR-Merging)
  tall_masks       per-task masks over the summed vector (TALL masks)
  consensus        keep entries at least k_min tasks' masks agree on (Consensus merging)
sparsifiers (`sparsify: {kind: ...}`), the Phi applied to every task vector first:
  none             Phi(tau) = tau
  tadrop           per tensor drop the d = Q_a/Q_b fraction of smallest |tau|, rescale the norm
  topk             keep the `density` fraction of largest |tau| (per model: models[].sparsify)
  dare             drop each entry with probability p, divide survivors by 1-p (per model too)
every key, its default and meaning: the "A config" table in README.md
(mergekit YAML configs are accepted too: README "From mergekit")."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("tadrop-merge")
    except PackageNotFoundError:
        return "dev"


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="tadrop", formatter_class=raw, epilog=METHODS_HELP,
                                description="Out-of-core, resumable merging of many fine-tunes of one base "
                                "model (TADrop, TA, TIES, EMR, TALL, consensus, DARE).")
    p.add_argument("--version", action="version", version=f"tadrop {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("merge", help="run or resume a merge described by a YAML config (ours or mergekit's)",
                       formatter_class=raw, epilog=METHODS_HELP,
                       description="Run or resume a merge. CONFIG is a tadrop YAML config or a mergekit one "
                       "(translated, printed, then run). Re-running the same command resumes.")
    m.add_argument("config", type=Path, metavar="CONFIG", help="YAML config: tadrop's, or mergekit's (merge_method:)")
    m.add_argument("output_pos", type=Path, nargs="?", metavar="OUTPUT",
                   help="run directory (as mergekit-yaml CONFIG OUTPUT; overrides `output:`)")
    m.add_argument("--output", type=Path, help="run directory (overrides `output:`)")
    m.add_argument("--device", choices=["cpu", "cuda"], help="where the maths runs (overrides `device:`)")
    m.add_argument("--shard-size", help="bytes per output shard, e.g. 5GB (overrides `shard_size:`; "
                   "mergekit's --out-shard-size 5B counts parameters: 5B bf16 parameters = 10GB)")
    m.add_argument("--executor", choices=["local", "ray"], help="overrides `executor:` (default local)")
    m.add_argument("--workers", type=int, help="worker processes / Ray actors (overrides `workers:`)")
    m.add_argument("--memory-budget", help="per-worker memory budget, e.g. 2GiB (overrides `memory_budget:`)")
    m.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else a private local instance)")
    m.add_argument("--dry-run", action="store_true", help="print the plan and exit; writes nothing "
                   "(no `output:` needed)")
    m.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    m.add_argument("--verify-inputs", action="store_true",
                   help="hash every input file: record the hashes, or refuse inputs changed since")

    s = sub.add_parser("status", help="progress of a run: exit 0 complete, 3 incomplete, 2 not a run")
    s.add_argument("run_dir", type=Path)

    e = sub.add_parser("export", help="write task models as Hugging Face checkpoints",
                       description="Write task models of a complete run as Hugging Face checkpoints "
                       "(EMR: theta_0 + lambda_k M_k tau_uni; TALL: theta_0 + m_k tau_MTL; task_arithmetic, "
                       "ties, consensus: a copy of merged/), with a model card unless the run's config "
                       "says model_card: false.")
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a complete run directory (`output:` of the merge)")
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="the task to export (a `models[].name`; OUTPUT is its model), "
                       "or a,b,c (OUTPUT/<task>/ each, one pass over the inputs)")
    which.add_argument("--all", action="store_true", help="every task as OUTPUT/<task>/, one pass over the inputs")
    e.add_argument("--output", type=Path, required=True,
                   help="directory to create (must not exist or be empty); written beside it, renamed when whole")
    e.add_argument("--shard-size", help="bytes per output shard, e.g. 5GB (default: the run's shard_size)")

    v = sub.add_parser("verify", help="re-hash every output of a run against its checksums: "
                       "exit 0 intact, 1 damaged (named), 2 not a run, 3 incomplete")
    v.add_argument("run_dir", type=Path)
    v.add_argument("--verify-inputs", action="store_true",
                   help="also re-hash the inputs against the hashes `merge --verify-inputs` recorded")

    t = sub.add_parser("tune", help="choose TALL's lambda per task with your validation score; "
                       "rewrites the run's masks")
    t.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a complete TALL run directory")
    t.add_argument("--grid", default="0.2,0.3,0.4,0.5,0.6", help="lambda values to try (default: TALL's)")
    t.add_argument("--score", required=True, metavar="MODULE:FUNCTION",
                   help="f(task_name, model) -> float, higher is better (the current directory is importable)")
    t.add_argument("--model-class", help="transformers class to load each task model with "
                   "(default: config.json's architectures, else AutoModel)")
    t.add_argument("--quiet", action="store_true", help="no progress messages")

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
    from .report import ReportError
    from .run import RunError
    from .tune import TuneError
    from .writers import MaskStoreError
    return (ConfigError, CheckpointError, PlanError, RunError, JobError, WorkerLost, ExportError, OSError,
            LockError, StateError, LedgerError, MaskStoreError, ReportError, TuneError)


def _merge(args) -> int:
    from .config import ConfigError, check_shard_size, config_from_data, read_config_data
    from .mergekit_config import is_mergekit, translate
    data = read_config_data(args.config)
    if is_mergekit(data):
        tr = translate(data, str(args.config))
        print(tr.yaml(str(args.config)), flush=True)    # the equivalent tadrop config, before running
        data = tr.config
    if args.output is not None and args.output_pos is not None and args.output != args.output_pos:
        raise ConfigError(f"{args.config}: OUTPUT {args.output_pos} and --output {args.output} disagree")
    if args.shard_size is not None:
        try:
            check_shard_size(args.shard_size)
        except ValueError as e:
            raise ConfigError(f"--shard-size: {e}") from None
    overrides = {"output": args.output or args.output_pos, "executor": args.executor, "workers": args.workers,
                 "memory_budget": args.memory_budget, "device": args.device, "shard_size": args.shard_size}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if data.get("output") is None:
        if not args.dry_run:
            raise ConfigError(f"{args.config}: output: required: put `output: DIR` in the config or run "
                              f"`tadrop merge {args.config} DIR`")
        data["output"] = str(Path(tempfile.gettempdir()) / "tadrop-dry-run")   # a dry run writes nothing
    cfg = config_from_data(data, str(args.config))
    if args.ray_address:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": args.ray_address})})
    from . import warm
    if not args.dry_run:       # workers import torch while this process does (below) and plans
        warm.maybe_prestart(cfg)
    try:
        from .run import merge
        merge(cfg, dry_run=args.dry_run, quiet=args.quiet, verify_inputs=args.verify_inputs)
    finally:
        warm.discard()         # workers the run did not take (nothing to do, or an error first)
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
    from .config import parse_size
    from .export import export_task, export_tasks
    shard = parse_size(args.shard_size) if args.shard_size else None
    if args.task and "," not in args.task:
        out = export_task(args.run_dir, args.task, args.output, shard_size=shard)
        print(f"wrote task {args.task!r} to {out}")
        return 0
    tasks = [t.strip() for t in args.task.split(",") if t.strip()] if args.task else None
    for task, out in export_tasks(args.run_dir, args.output, tasks, shard_size=shard).items():
        print(f"wrote task {task!r} to {out}")
    return 0


def _tune(args) -> int:
    from .tune import parse_grid, tune
    tune(args.run_dir, parse_grid(args.grid), args.score, model_class=args.model_class, quiet=args.quiet)
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
    # huggingface_hub's HTTP client (httpx, or httpx2 in huggingface_hub 2) logs every request at INFO
    for chatty in ("httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    handlers = {"merge": _merge, "export": _export, "report": _report, "verify": _verify,
                "status": _status, "tune": _tune}
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
