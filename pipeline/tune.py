"""`tadrop tune`: TALL's lambda_k chosen per task by the user's validation score, inside the product.

TALL masks (Wang et al. 2024) pick lambda_k per task from a grid by validation accuracy (official
nik-dim/tall_masks src/utils/tallmask_utils.py:96 builds the masks of every lambda in
[0.2, 0.3, 0.4, 0.5, 0.6], :129 takes each task's best with `max`, the first in grid order on a tie).
Here, on a complete `tall_masks` run:
  1. masks  one pass over the inputs (the merge's own engine, same plan and chunking) computes every
            task's mask for every grid value into one Zarr store per value, `RUN/.tadrop/tune/grid/`;
  2. score  for each task and grid value, that task's model (exactly what `tadrop export` writes, from
            a view of the run whose masks are that grid value's) is loaded with `transformers` and
            handed to the user's function `f(task_name, model) -> float` (higher is better);
  3. pick   lambda_k = the best grid value per task; `masks.zarr` is rewritten (new store beside
            it, then swapped in), its `tall_lambdas` attribute updated, the mask densities of
            stats.parquet and of run.json's storage record recomputed, and the choices and every
            score recorded under "tune" in run.json.
Step 2 builds models through `export` rather than the TaskBank: `--model-class` loads any
transformers class with `from_pretrained`, which the bank (the base's architecture) does not offer.
Each tensor of step 1 and each score of step 2 is ledgered (`RUN/.tadrop/tune/ledger.jsonl`), so an
interrupted tune continues where it stopped; a tune with another grid or score function starts over.
Afterwards the run's masks equal those of a fresh merge with `tall.lambdas` set to the choices.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import sys
import types
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from tadrop import streamed

from . import integrity, sources
from .checkpoints import validate_inputs
from .config import MergeConfig, read_finished_run
from .export import ExportError, export_task
from .globalstats import MAJORITY_FILE, VALUES_FILE, load_majority, load_values
from .job import _Sink, _Source
from .ledger import Ledger
from .plan import make_plan, mask_chunk_rows
from .run import STATE_DIR, open_inputs
from .storage import mask_statistics
from .writers import MaskStore, atomic_write_json, fsync_dir, write_stats

log = logging.getLogger("tadrop")

DEFAULT_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
TUNE_DIR = "tune"


class TuneError(RuntimeError):
    """The run cannot be tuned as asked (not a complete TALL run, bad grid or score function)."""


# -- arguments ----------------------------------------------------------------------------------------
def parse_grid(text: str) -> tuple[float, ...]:
    """'0.2,0.3' -> (0.2, 0.3): finite, >= 0, distinct, in the given order."""
    try:
        grid = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise TuneError(f"--grid {text!r}: expected comma-separated numbers like 0.2,0.3,0.4") from None
    if not grid or any(not math.isfinite(g) or g < 0 for g in grid) or len(set(grid)) != len(grid):
        raise TuneError(f"--grid {text!r}: expected distinct finite numbers >= 0")
    return grid


def load_score_function(spec: str) -> Callable:
    """'package.module:function' -> the function (the current directory is importable, as with -m)."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise TuneError(f"--score {spec!r}: expected MODULE:FUNCTION")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:   # the user's module: any import failure is theirs to see in one line
        raise TuneError(f"--score {spec!r}: cannot import {mod_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise TuneError(f"--score {spec!r}: {mod_name!r} has no function {fn_name!r}")
    return fn


# -- the run -----------------------------------------------------------------------------------------
def _load(run_dir: Path) -> tuple[dict, MergeConfig]:
    record, cfg = read_finished_run(run_dir, TuneError, "finish it first (re-run `tadrop merge`)")
    if cfg.method != "tall_masks":
        raise TuneError(f"run {run_dir} merges with {cfg.method}; `tadrop tune` chooses TALL's lambda_k "
                        "and needs method tall_masks")
    return record, cfg


def tune_id(grid, score: str) -> str:
    blob = json.dumps({"grid": list(grid), "score": score}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tune(run_dir, grid=DEFAULT_GRID, score: str = "", *, model_class: str | None = None,
         score_fn: Callable | None = None, quiet: bool = False, out=sys.stdout) -> dict:
    """Tune a complete tall_masks run in place; returns run.json's "tune" record.

    `score` names the function ('module:function', recorded); `score_fn` may pass it directly."""
    run_dir = Path(run_dir)
    grid = tuple(float(g) for g in grid)
    mod, sep, fn = score.partition(":")
    if score_fn is None and not (mod and sep and fn):
        raise TuneError(f"--score {score!r}: expected MODULE:FUNCTION")
    _load(run_dir)                              # refuse a non-run before creating its lock file
    with integrity.RunLock(run_dir, exclusive=True, command="tune"):
        return _tune(run_dir, grid, score, model_class, score_fn, quiet, out)


def _tune(run_dir: Path, grid, score, model_class, score_fn, quiet, out) -> dict:
    record, cfg = _load(run_dir)
    tid = tune_id(grid, score)
    done_rec = record.get("tune")
    if done_rec and done_rec.get("id") == tid and done_rec.get("complete"):
        log.info("run %s is already tuned with this grid and score", run_dir)
        return done_rec
    fn = score_fn or load_score_function(score)
    state = run_dir / STATE_DIR / TUNE_DIR
    meta = state / "tune.json"
    if meta.exists() and json.loads(meta.read_text()).get("id") != tid:
        shutil.rmtree(state)                   # another grid / score: its masks and scores do not apply
    state.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta, {"id": tid, "grid": list(grid), "score": score})
    ledger = Ledger(state / "ledger.jsonl")
    try:
        done = ledger.done()
        if not (state / "swap.json").exists():
            _grid_masks(run_dir, cfg, grid, state, ledger, done, quiet)
            scores = _scores(run_dir, cfg, grid, state, ledger, done, fn, model_class, quiet)
            lambdas = {t: _best(grid, scores[t]) for t in cfg.task_names}
            sums = _write_chosen(run_dir, cfg, grid, state, lambdas)
            atomic_write_json(state / "swap.json", {"lambdas": lambdas, "scores": scores, "checksums": sums})
        swap = json.loads((state / "swap.json").read_text())
        _swap(run_dir, state)
    finally:
        ledger.close()
    rec = {"id": tid, "grid": list(grid), "score": score, "lambdas": swap["lambdas"],
           "scores": swap["scores"], "complete": True,
           "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    record = json.loads((run_dir / "run.json").read_text())
    record["tune"] = rec
    _update_checksums(record, swap["checksums"])
    _refresh_mask_stats(run_dir, cfg, record)
    atomic_write_json(run_dir / "run.json", record)
    shutil.rmtree(state)
    for t in cfg.task_names:
        print(f"{t}: lambda {swap['lambdas'][t]}  (scores: "
              + ", ".join(f"{g}: {swap['scores'][t][str(g)]:.6g}" for g in grid) + ")", file=out)
    return rec


def _best(grid, scores: dict) -> float:
    """The grid value with the highest score; the first in grid order on a tie (as Python's max)."""
    return max(grid, key=lambda g: scores[str(g)])


# -- 1. the masks of every grid value ------------------------------------------------------------------
def _grid_masks(run_dir: Path, cfg: MergeConfig, grid, state: Path, ledger: Ledger, done: dict,
                quiet: bool) -> None:
    base, models = open_inputs(cfg)
    vocab = sources.plan_vocab(cfg, base, models)      # as run.merge: an extended vocabulary's row counts
    table = validate_inputs(base, models, cfg.passthrough, frozenset(vocab.rows) if vocab else frozenset())
    plan = make_plan(cfg, base, models, table, vocab=vocab, tall_grid=tuple(grid))
    ext = plan.vocab if plan.vocab is not None and plan.vocab.extended else None
    spec = plan.spec
    K = len(models)
    arrays = {n: (K, plan.shapes[n], mask_chunk_rows(plan.shapes[n])) for n in plan.merge}
    attrs = MaskStore.open(run_dir / "masks.zarr", mode="r").attrs
    # create keeps arrays that already match: chunks of tensors done before a crash stay
    stores = [MaskStore.create(state / "grid" / f"{i}.zarr", arrays,
                               {**attrs, "tall_lambdas": {t: g for t in cfg.task_names}})
              for i, g in enumerate(grid)]
    gv = None
    if plan.model_scope:
        values = run_dir / STATE_DIR / "global" / VALUES_FILE
        if not values.exists():
            raise TuneError(f"{values} is missing: the run's model-scope statistics are needed to tune it")
        gv = load_values(values)
    majority = None
    if spec.official_ties:     # inner ties_official: the run's model-wide majority sign
        mfile = run_dir / STATE_DIR / "global" / MAJORITY_FILE
        if not mfile.exists():
            raise TuneError(f"{mfile} is missing: the run's majority sign is needed to tune it")
        majority = load_majority(mfile)
    todo = [n for n in sorted(plan.merge) if f"grid:{n}" not in done]
    if todo and not quiet:
        log.info("tune: masks of %d grid values for %d tensors", len(grid), len(todo))
    for name in todo:
        src = _Source(base, tuple(models), name, ext)
        sink = _GridSink([_Sink(types.SimpleNamespace(mask_store=s), name, src.rows, slot=i)
                          for i, s in enumerate(stores)])
        try:
            streamed.merge_tensor(spec, name, src, sink, plan.tensor_plans[name], global_values=gv,
                                  device=cfg.device, majority=majority)
        finally:
            src.release()
            for ckpt in (base, *models):
                ckpt.release(name)
        for s in stores:
            s.take_checksums(name)              # the grid stores are scratch: nothing to record
        ledger.record(f"grid:{name}", {"tensor": name})
        done[f"grid:{name}"] = {"tensor": name}


class _GridSink:
    """Takes the engine's per-grid-value TALL masks into one mask store each; the run's own outputs
    (unified/, its masks) are already written and left alone."""

    def __init__(self, sinks):
        self._sinks = sinks

    def merged(self, r0, r1, theta):
        pass

    def unified(self, r0, r1, vec):
        pass

    def masks(self, r0, r1, masks):
        pass

    def grid_masks(self, i, r0, r1, masks):
        self._sinks[i].masks(r0, r1, masks)


# -- 2. scores -----------------------------------------------------------------------------------------
def _view(run_dir: Path, state: Path, i: int) -> Path:
    """A run directory that is the tuned run with grid value i's masks (symbolic links), so `export`
    (and the task bank) build exactly the task models they would after choosing that value."""
    view = state / "view" / str(i)
    if not (view / "masks.zarr").exists():
        view.mkdir(parents=True, exist_ok=True)
        record = json.loads((run_dir / "run.json").read_text())
        record.pop("checksums", None)       # they describe the run's own masks, not this grid value's
        atomic_write_json(view / "run.json", record)
        if not (view / "unified").is_symlink():
            (view / "unified").symlink_to((run_dir / "unified").resolve())
        (view / "masks.zarr").symlink_to((state / "grid" / f"{i}.zarr").resolve())
    return view


def load_model(path: Path, model_class: str | None = None):
    """A transformers model of the checkpoint in `path`: `model_class` (a transformers class name),
    else the class config.json's `architectures` names, else AutoModel."""
    import transformers
    transformers.utils.logging.disable_progress_bar()   # K x grid loads: tune logs its own progress
    name = model_class
    if name is None:
        try:
            name = (json.loads((path / "config.json").read_text()).get("architectures") or [None])[0]
        except (OSError, ValueError):
            name = None
    cls = getattr(transformers, name, None) if name else transformers.AutoModel
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise TuneError(f"model class {name!r} is not a transformers model class (use --model-class)")
    return cls.from_pretrained(str(path))


def _scores(run_dir: Path, cfg: MergeConfig, grid, state: Path, ledger: Ledger, done: dict,
            fn: Callable, model_class: str | None, quiet: bool) -> dict[str, dict[str, float]]:
    scores: dict[str, dict[str, float]] = {t: {} for t in cfg.task_names}
    for i, g in enumerate(grid):
        view = None
        for task in cfg.task_names:
            key = f"score:{task}:{g!r}"
            if key not in done:
                view = view or _view(run_dir, state, i)
                tmp = state / "model"
                if tmp.exists():
                    shutil.rmtree(tmp)
                try:
                    export_task(view, task, tmp)
                except ExportError as e:
                    raise TuneError(f"tune: building task {task!r} at lambda {g}: {e}") from None
                model = load_model(tmp, model_class)
                try:
                    value = fn(task, model)
                except Exception as e:   # the user's function: report it in one line, resumable
                    raise TuneError(f"score function failed on task {task!r}, lambda {g}: "
                                    f"{type(e).__name__}: {e}") from None
                finally:
                    del model
                    shutil.rmtree(tmp, ignore_errors=True)
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    value = math.nan
                if not math.isfinite(value):
                    raise TuneError(f"score function returned {value!r} for task {task!r}, lambda {g}: "
                                    "expected a finite number (higher is better)")
                ledger.record(key, {"score": value})
                done[key] = {"score": value}
                if not quiet:
                    log.info("tune: %s at lambda %s scores %.6g", task, g, value)
            scores[task][str(g)] = float(done[key]["score"])
    return scores


# -- 3. the chosen masks -------------------------------------------------------------------------------
def _write_chosen(run_dir: Path, cfg: MergeConfig, grid, state: Path, lambdas: dict) -> dict:
    """masks.zarr with each task's chosen grid value, beside the run's (state/masks.zarr.new);
    returns the checksums of what it wrote (integrity: chunk files per tensor, metadata files)."""
    old = MaskStore.open(run_dir / "masks.zarr", mode="r")
    grids = [MaskStore.open(state / "grid" / f"{i}.zarr", mode="r") for i in range(len(grid))]
    pick = [grids[list(grid).index(lambdas[t])] for t in cfg.task_names]
    new_path = state / "masks.zarr.new"
    if new_path.exists():
        shutil.rmtree(new_path)
    names = old.names()
    arrays = {}
    for n in names:
        shape = tuple(grids[0]._array(n).shape)
        arrays[n] = (shape[0], shape[1:], old.chunk_rows(n))
    attrs = {**old.attrs, "tall_lambdas": {t: float(lambdas[t]) for t in cfg.task_names}}
    new = MaskStore.create(new_path, arrays, attrs)
    masks = {}
    for n in names:
        K, shape = arrays[n][0], arrays[n][1]
        if not shape:
            new.write(n, 0, np.stack([pick[k].read(n, k) for k in range(K)]))
        else:
            cr = arrays[n][2]
            for r0 in range(0, shape[0], cr):
                r1 = min(shape[0], r0 + cr)
                new.write(n, r0, np.stack([pick[k].read(n, k, r0, r1) for k in range(K)]))
        masks[n] = new.take_checksums(n)
    fsync_dir(new_path)
    files = {"masks.zarr/zarr.json": integrity.file_entry(new_path / "zarr.json")}
    for n in names:
        key = masks[n]["array"] if masks[n] else None
        if key:
            files[f"masks.zarr/{key}/zarr.json"] = integrity.file_entry(new_path / key / "zarr.json")
    return {"masks": masks, "files": files}


def _update_checksums(record: dict, sums: dict) -> None:
    """run.json's checksums of masks.zarr replaced by those of the chosen masks (the rest stays)."""
    rec = record.get("checksums")
    if not isinstance(rec, dict):
        return                                  # a run made before checksums
    for tensor, entry in sums["masks"].items():
        if entry:
            job = rec.get("masks", {}).get(tensor, {}).get("job", f"merge:{tensor}")
            rec.setdefault("masks", {})[tensor] = {**entry, "job": job}
    rec.setdefault("files", {}).update(sums["files"])


def _refresh_mask_stats(run_dir: Path, cfg: MergeConfig, record: dict) -> None:
    """stats.parquet's mask_density (and its checksum) and run.json's storage record recomputed from
    the chosen masks, as a fresh merge with those lambdas writes them; idempotent (reads the live masks)."""
    store = MaskStore.open(run_dir / "masks.zarr", mode="r")
    path = run_dir / "stats.parquet"
    if path.is_file():
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
        order = {t: k for k, t in enumerate(cfg.task_names)}
        kept: dict = {}
        for r in rows:
            if r.get("mask_density") is None or r["tensor"] not in store.names():
                continue
            n, k = int(r["numel"]), order[r["task"]]
            if (r["tensor"], k) not in kept:
                kept[(r["tensor"], k)] = _count_kept(store, r["tensor"], k)
            r["mask_density"] = kept[(r["tensor"], k)] / n if n else 0.0
        write_stats(rows, path, cfg.task_names)
        sums = record.get("checksums")
        if isinstance(sums, dict):
            sums.setdefault("files", {})["stats.parquet"] = integrity.file_entry(path)
    if isinstance(record.get("storage"), dict) and "mask_density" in record["storage"]:
        record["storage"].update(mask_statistics(store, cfg.task_names))


def _count_kept(store: MaskStore, name: str, k: int) -> int:
    """Entries task k's mask keeps in one tensor, read a chunk of rows at a time (bounded memory)."""
    shape = tuple(store._array(name).shape[1:])
    if not shape:
        return int(np.count_nonzero(store.read(name, k)))
    step = store.chunk_rows(name)
    return sum(int(np.count_nonzero(store.read(name, k, r0, min(shape[0], r0 + step))))
               for r0 in range(0, shape[0], step))


def _swap(run_dir: Path, state: Path) -> None:
    """Replace RUN/masks.zarr by the chosen masks; idempotent, so a crash anywhere is repaired by
    running tune again (the old store is parked in the tune directory until the new one is in)."""
    new, live, parked = state / "masks.zarr.new", run_dir / "masks.zarr", state / "masks.zarr.old"
    if new.exists():
        if live.exists() and not parked.exists():
            live.rename(parked)
        elif live.exists():
            shutil.rmtree(live)
        new.rename(live)
        fsync_dir(run_dir)
    if parked.exists():
        shutil.rmtree(parked)
