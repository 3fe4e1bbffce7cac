"""`tadrop export`: task models as Hugging Face checkpoints, streamed in row chunks.

EMR: theta_0 + lambda_k * M_k * tau_uni; TALL masks: theta_0 + m_k * tau_MTL. Single-model methods
copy `merged/`. `task_rows` is the one place a task's tensor values are computed: export and the
task bank (pipeline/bank.py) both call it, so their bytes cannot drift apart. Several tasks are
exported in one pass over the inputs (each base and unified row is read once for all of them).
Every checkpoint is written beside its destination and renamed into place when whole.
"""
from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tadrop import methods

from . import integrity
from . import sources
from .checkpoints import Checkpoint
from .config import MergeConfig
from .job import TORCH_DTYPES, JobError, check_float16
from .hfconfig import copy_non_weight_files
from .modelcard import attrs_scalars, stats_rows as _stats_rows, write_model_card
from .plan import MERGED_METHODS
from .writers import MaskStore, MaskStoreError, ShardWriter, create_shard_files, fsync_dir, plan_shards, write_index

log = logging.getLogger("tadrop")

CHUNK_BYTES = 64 << 20  # float32 bytes per streamed piece of one tensor
MERGED_TASK = "merged"  # the one "task" of a single-model method (task_arithmetic, ties, consensus)
_SAFETENSORS_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class ExportError(RuntimeError):
    pass


def load_run(run_dir: Path) -> tuple[dict, MergeConfig]:
    """run.json and the config of a complete run; an incomplete one is refused in `tadrop status`'s
    words."""
    run_dir = Path(run_dir)
    try:
        record = integrity.read_json(run_dir / "run.json")
    except integrity.StateError as e:
        raise ExportError(f"{run_dir} is not a readable tadrop run ({e})") from None
    cfg = record.get("config") if isinstance(record.get("config"), dict) else {}
    if not record.get("complete"):
        raise ExportError(f"run {record.get('run_id')} in {run_dir} ({cfg.get('method')}, "
                          f"{len(cfg.get('models', []))} tasks): incomplete; "
                          "re-run the same `tadrop merge` command to continue")
    try:
        cfg = MergeConfig.from_json(record["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{run_dir / 'run.json'}: corrupt config ({e})") from None
    tuned = (record.get("tune") or {}).get("lambdas") if isinstance(record.get("tune"), dict) else None
    if cfg.method == "tall_masks" and isinstance(tuned, dict):
        # a tuned run is the fresh merge with tall.lambdas set to tune's choices: its model cards say so
        cfg = cfg.model_copy(update={"tall": cfg.tall.model_copy(update={"lambdas": dict(tuned)})})
    return record, cfg


@contextmanager
def reading(run_dir: Path, command: str):
    """Hold the run's shared lock (no merge writes meanwhile) and refuse a run whose outputs are
    missing or resized (integrity.check_complete); a missing mask chunk read later is an error too."""
    with integrity.read_lock(run_dir, command):
        report = integrity.check_complete(run_dir)
        if not report.ok:
            raise ExportError(f"run {run_dir} is damaged ({len(report.problems)} problem(s); first: "
                              f"{report.problems[0]}): re-run `tadrop merge` to repair it")
        try:
            yield
        except MaskStoreError as e:
            raise ExportError(str(e)) from None


def run_tasks(cfg: MergeConfig) -> list[str]:
    """The tasks a run serves: one per model for EMR / TALL, the single merged model otherwise."""
    if cfg.method in MERGED_METHODS:
        return [MERGED_TASK]
    return [m.name for m in cfg.models]


# ---------------------------------------------------------------- the maths shared with the bank

@dataclass(frozen=True)
class TaskRecipe:
    """What turns (theta_0 rows, unified rows, this task's mask rows) into this task's rows."""
    method: str                 # emr | tall_masks
    task: str
    index: int                  # position on the masks' task axis
    lam: float = 1.0            # EMR lambda_k
    tensor_scales: dict = field(default_factory=dict)   # EMR `emr.tadrop: mask`: name -> factor
    clamp_overflow: bool = False  # float16 outputs: clamp (with a warning) instead of an error

    def lambda_for(self, name: str) -> float:
        """EMR's lambda on one tensor: lambda_k times the tensor's TADrop rescale factor (absent:
        1.0), multiplied as Python floats (float64) so export and bank agree to the bit."""
        return float(self.lam) * float(self.tensor_scales.get(name, 1.0))


def task_recipes(cfg: MergeConfig, attrs: dict) -> list[TaskRecipe]:
    """One recipe per task of an EMR or TALL run, from the mask store's group attributes."""
    names = [m.name for m in cfg.models]
    stored = attrs.get("tasks", names)
    if list(stored) != names:
        raise ExportError(f"masks.zarr: tasks {stored} do not match the run's models {names}")
    clamp = bool(cfg.clamp_overflow)
    if cfg.method != "emr":
        return [TaskRecipe(cfg.method, n, k, clamp_overflow=clamp) for k, n in enumerate(names)]
    lambdas = attrs.get("emr_lambdas")
    if not isinstance(lambdas, dict) or set(lambdas) != set(names):
        raise ExportError(f"masks.zarr: attribute emr_lambdas {lambdas!r} does not name every task")
    scales = attrs.get("emr_tensor_scales") or {}
    for tname, per_task in scales.items():
        if not isinstance(per_task, list) or len(per_task) != len(names):
            raise ExportError(f"masks.zarr: emr_tensor_scales[{tname!r}] is not a list of "
                              f"{len(names)} numbers")
    return [TaskRecipe("emr", n, k, float(lambdas[n]), {t: float(v[k]) for t, v in scales.items()},
                       clamp) for k, n in enumerate(names)]


def task_rows(recipe: TaskRecipe, name: str, theta0: torch.Tensor, vec: torch.Tensor,
              mask: torch.Tensor, out_dtype: torch.dtype, warnings: list[str] | None = None) -> torch.Tensor:
    """This task's values of tensor `name` on some rows (or any elementwise piece): float32 maths,
    one cast to `out_dtype` at the end. Elementwise, so the pieces never change the bits. A float16
    output beyond float16's range is an error (ExportError), or clamped with a warning appended to
    `warnings` when the run's config says clamp_overflow."""
    theta0, vec = theta0.float(), vec.float()
    mask = mask.reshape(vec.shape)
    if recipe.method == "emr":
        theta = methods.emr_task_model(theta0, vec, mask, recipe.lambda_for(name))
    else:  # tall_masks: theta_0 + m_k * tau_MTL
        theta = methods.tall_task_model(theta0, vec, mask)
    if out_dtype == torch.float16:
        try:
            theta = check_float16(theta, name, recipe.clamp_overflow, warnings if warnings is not None else [])
        except JobError as e:
            raise ExportError(str(e)) from None
    return theta.to(out_dtype)


def output_dtypes(cfg: MergeConfig, base: Checkpoint, unified_names) -> dict[str, str]:
    """Safetensors dtype code of every tensor of a task model: the output dtype for merged tensors,
    the base's dtype for those copied from the base."""
    out = {}
    for name, info in base.tensors.items():
        out[name] = info.dtype
        if name in unified_names and cfg.output_dtype:
            out[name] = _SAFETENSORS_CODES[cfg.output_dtype]
    return out


# ---------------------------------------------------------------- export

def export_task(run_dir: Path, task: str, output: Path, shard_size: int | None = None) -> Path:
    """One task's model in `output` (for a single-model method, any model name or `merged`); holds
    the run's shared lock while reading."""
    run_dir, output = Path(run_dir), Path(output)
    _, cfg = load_run(run_dir)
    names = [m.name for m in cfg.models]
    valid = names + ([MERGED_TASK] if cfg.method in MERGED_METHODS else [])
    if task not in valid:
        raise ExportError(f"task {task!r} is not in run {run_dir}; tasks: {', '.join(valid)}")
    _check_output(output, run_dir, cfg)
    with reading(run_dir, "export"), _partial(output) as tmp:
        if cfg.method in MERGED_METHODS:
            shutil.copytree(run_dir / "merged", tmp)
        else:
            _write_task_models(run_dir, cfg, {names.index(task): tmp}, shard_size or int(cfg.shard_size))
        _publish(tmp, output)
    return output


def export_tasks(run_dir: Path, output: Path, tasks: list[str] | None = None,
                 shard_size: int | None = None) -> dict[str, Path]:
    """Every task (or those in `tasks`) as `output/<task>/`, in one pass over the inputs."""
    run_dir, output = Path(run_dir), Path(output)
    _, cfg = load_run(run_dir)
    all_tasks = run_tasks(cfg)
    if tasks is not None and not tasks:
        raise ExportError(f"no task named to export from run {run_dir}; tasks: {', '.join(all_tasks)}")
    tasks = all_tasks if tasks is None else list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in all_tasks]
    if unknown:
        raise ExportError(f"task(s) {', '.join(map(repr, unknown))} not in run {run_dir}; "
                          f"tasks: {', '.join(all_tasks)}")
    _check_output(output, run_dir, cfg)
    with reading(run_dir, "export"), _partial(output) as tmp:
        tmp.mkdir()
        if cfg.method in MERGED_METHODS:
            shutil.copytree(run_dir / "merged", tmp / MERGED_TASK)
        else:
            names = [m.name for m in cfg.models]
            _write_task_models(run_dir, cfg, {names.index(t): tmp / t for t in tasks},
                               shard_size or int(cfg.shard_size))
        fsync_dir(tmp)
        _publish(tmp, output)
    return {t: output / t for t in tasks}


def _check_output(output: Path, run_dir: Path, cfg: MergeConfig) -> None:
    """Refuse up front an output that is a symlink, or lies inside an input or the run directory."""
    if output.is_symlink():
        raise ExportError(f"export output {output} is a symlink: give a real path")
    out_abs = output.resolve()
    run_abs = run_dir.resolve()
    if out_abs == run_abs or any(out_abs.is_relative_to(run_abs / d) for d in
                                 (".tadrop", "merged", "unified", "masks.zarr")):
        raise ExportError(f"export output {output} is the run directory or inside its outputs")
    for what, p in [("the input " + m.name, m.path or m.adapter) for m in cfg.models] + [("the base", cfg.base)]:
        if sources.parse_repo_id(str(p)) is not None:
            continue                # a repo id: its files live in the Hugging Face cache
        root = Path(p).resolve()   # a model dir (a single .safetensors input has no dir of its own)
        if out_abs == root or (root.is_dir() and out_abs.is_relative_to(root)):
            raise ExportError(f"export output {output} is inside {what} ({root}): choose another path")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ExportError(f"export output {output} exists and is not empty")


@contextmanager
def _partial(output: Path):
    """A scratch path beside `output`, removed unless it was published."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, output: Path) -> None:
    if output.exists():
        output.rmdir()
    tmp.rename(output)
    fsync_dir(output.parent)


def _write_task_models(run_dir: Path, cfg: MergeConfig, targets: dict[int, Path],
                       shard_size: int) -> None:
    """Write the task models `targets` (task index -> directory) reading base and unified once."""
    base = sources.open_base(cfg.base, download=cfg.download)
    unified = Checkpoint.open(run_dir / "unified", "unified")
    vocab = _vocab(cfg, base, unified)
    store = MaskStore.open(run_dir / "masks.zarr", mode="r")
    attrs = store.attrs
    recipes = task_recipes(cfg, attrs)
    dtypes = output_dtypes(cfg, base, unified.tensors)
    entries = [(name, dtypes[name], tuple(unified.tensors[name].shape) if name in unified.tensors
                else tuple(info.shape)) for name, info in base.tensors.items()]
    plan = plan_shards(entries, shard_size)
    writers = {}
    warnings: list[str] = []
    try:
        for k, d in targets.items():
            create_shard_files(plan, d)
            writers[k] = ShardWriter(plan, d)
        for name, dtype, shape in entries:
            if name not in unified.tensors:  # copied from the base unchanged
                t = base.view(name).contiguous()
                for w in writers.values():
                    w.write(name, t)
                base.release(name)
                continue
            rows = shape[0] if shape else 1
            row_numel = max(1, int(torch.Size(shape[1:]).numel())) if len(shape) > 1 else 1
            step = max(1, CHUNK_BYTES // (4 * row_numel))
            out_dtype = TORCH_DTYPES[dtype]
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                theta0 = (sources.RowSource(base, vocab[1], name, vocab[0]).base(r0, r1)
                          if vocab and name in vocab[0].rows else _rows(base, name, shape, r0, r1))
                vec = _rows(unified, name, shape, r0, r1)
                for k, w in writers.items():
                    mask = torch.from_numpy(store.read(name, k, r0, r1))
                    theta = task_rows(recipes[k], name, theta0, vec, mask, out_dtype, warnings)
                    w.write(name, theta.reshape((r1 - r0, *shape[1:]) if shape else ()).contiguous(),
                            row_start=r0)
            base.release(name)
            unified.release(name)
        for w in writers.values():
            w.sync()
    finally:
        for w in writers.values():
            w.close()
    for w in dict.fromkeys(warnings):
        log.warning(w)
    stats = _stats_rows(run_dir)
    for k, d in targets.items():
        write_index(plan, d)
        copy_non_weight_files(base, d, plan)
        if vocab:
            vocab[0].write_files(d)
        write_model_card(d, cfg, stats, attrs_scalars(attrs), cfg.models[k].name, run_dir)
        fsync_dir(d)


def _vocab(cfg: MergeConfig, base: Checkpoint, unified: Checkpoint):
    """(Vocab, models) when the run's unified tensors have more rows than the base (an extended
    vocabulary, SPEC 5: the base rows there are the mean of the models' rows), else None."""
    if not any(n in base.tensors and unified.tensors[n].shape != base.tensors[n].shape for n in unified.tensors):
        return None
    _, models = sources.open_inputs(cfg)
    problems = sources.check_adapters(cfg, base, models)    # adapters' rows beyond V0 need their binding
    if problems:
        raise sources.AdapterError(problems[0])
    return sources.plan_vocab(cfg, base, models), tuple(models)


def _rows(ckpt: Checkpoint, name: str, shape: tuple, r0: int, r1: int) -> torch.Tensor:
    if not shape:
        return ckpt.view(name).reshape(1)
    return ckpt.view(name, r0, r1)
