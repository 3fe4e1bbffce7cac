"""`tadrop export`: one task's model as a Hugging Face checkpoint, streamed in row chunks.

EMR: theta_0 + lambda_k * M_k * tau_uni; TALL masks: theta_0 + m_k * tau_MTL. Single-model methods
copy `merged/`. The checkpoint is written beside its destination and renamed into place when whole.
"""
from __future__ import annotations

import logging
import os
import shutil
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


class ExportError(RuntimeError):
    pass


def _load_run(run_dir: Path) -> tuple[dict, MergeConfig]:
    try:
        record = integrity.read_json(run_dir / "run.json")
    except integrity.StateError as e:
        raise ExportError(f"{run_dir} is not a readable tadrop run ({e})") from None
    if not record.get("complete"):
        raise ExportError(f"run {run_dir} is not complete: finish it first (re-run `tadrop merge`)")
    try:
        return record, MergeConfig.from_json(record["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{run_dir / 'run.json'}: corrupt config ({e})") from None


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


def export_task(run_dir: Path, task: str, output: Path, shard_size: int | None = None) -> Path:
    """Write one task's model; holds the run's shared lock while reading (no merge can write meanwhile)
    and refuses a run whose outputs are missing or resized (integrity.check_complete)."""
    run_dir, output = Path(run_dir), Path(output)
    record, cfg = _load_run(run_dir)
    names = [m.name for m in cfg.models]
    if task not in names:
        raise ExportError(f"task {task!r} is not in run {run_dir}; tasks: {', '.join(names)}")
    _check_output(output, run_dir, cfg)
    with integrity.read_lock(run_dir, "export"):
        report = integrity.check_complete(run_dir)
        if not report.ok:
            raise ExportError(f"run {run_dir} is damaged ({len(report.problems)} problem(s); first: "
                              f"{report.problems[0]}): re-run `tadrop merge` to repair it")
        tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            if cfg.method in MERGED_METHODS:
                shutil.copytree(run_dir / "merged", tmp)
            else:
                _write_task_model(run_dir, cfg, names.index(task), tmp, shard_size or int(cfg.shard_size))
            if output.exists():
                output.rmdir()
            tmp.rename(output)
        except MaskStoreError as e:
            raise ExportError(str(e)) from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(output.parent)
    return output


def _write_task_model(run_dir: Path, cfg: MergeConfig, k: int, tmp: Path, shard_size: int) -> None:
    base = sources.open_base(cfg.base, download=cfg.download)
    unified = Checkpoint.open(run_dir / "unified", "unified")
    vocab = _vocab(cfg, base, unified)
    store = MaskStore.open(run_dir / "masks.zarr")
    attrs = store.attrs
    if cfg.method == "emr":
        lam_k = float(attrs["emr_lambdas"][cfg.models[k].name])
        scales = attrs.get("emr_tensor_scales", {})   # EMR 'mask' integration; absent = 1.0

        def task_model_of(name):
            lam = lam_k * float(scales[name][k]) if name in scales else lam_k   # float64 product
            return lambda base_, vec, mask: methods.emr_task_model(base_, vec, mask, lam)
    else:  # tall_masks: theta_0 + m_k * tau_MTL
        task_model_of = lambda name: methods.tall_task_model  # noqa: E731

    entries = []
    for name, info in base.tensors.items():
        dtype = info.dtype
        if name in unified.tensors and cfg.output_dtype:
            dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[cfg.output_dtype]
        entries.append((name, dtype, tuple(unified.tensors[name].shape) if name in unified.tensors
                        else tuple(info.shape)))
    plan = plan_shards(entries, shard_size)
    create_shard_files(plan, tmp)
    writer = ShardWriter(plan, tmp)
    warnings: list[str] = []
    try:
        for name, dtype, shape in entries:
            if name not in unified.tensors:  # copied from the base unchanged
                writer.write(name, base.view(name).contiguous())
                continue
            rows = shape[0] if shape else 1
            row_numel = max(1, int(torch.Size(shape[1:]).numel())) if len(shape) > 1 else 1
            step = max(1, CHUNK_BYTES // (4 * row_numel))
            out_dtype = TORCH_DTYPES[dtype]
            task_model = task_model_of(name)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                theta0 = (sources.RowSource(base, vocab[1], name, vocab[0]).base(r0, r1)
                          if vocab and name in vocab[0].rows else _rows(base, name, shape, r0, r1)).float()
                vec = _rows(unified, name, shape, r0, r1).float()
                mask = torch.from_numpy(store.read(name, k, r0, r1)).reshape(vec.shape)
                theta = task_model(theta0, vec, mask)
                if out_dtype == torch.float16:
                    try:
                        theta = check_float16(theta, name, cfg.clamp_overflow, warnings)
                    except JobError as e:
                        raise ExportError(str(e)) from None
                writer.write(name, theta.to(out_dtype).reshape((r1 - r0, *shape[1:]) if shape else ())
                             .contiguous(), row_start=r0)
            base.release(name)
            unified.release(name)
        writer.sync()
    finally:
        writer.close()
    for w in dict.fromkeys(warnings):
        log.warning(w)
    write_index(plan, tmp)
    copy_non_weight_files(base, tmp, plan)
    if vocab:
        vocab[0].write_files(tmp)
    write_model_card(tmp, cfg, _stats_rows(run_dir), attrs_scalars(attrs), cfg.models[k].name, run_dir)
    fsync_dir(tmp)


def _vocab(cfg: MergeConfig, base: Checkpoint, unified: Checkpoint):
    """(Vocab, models) when the run's unified tensors have more rows than the base (an extended
    vocabulary, SPEC 5: the base rows there are the mean of the models' rows), else None."""
    if not any(n in base.tensors and unified.tensors[n].shape != base.tensors[n].shape for n in unified.tensors):
        return None
    _, models = sources.open_inputs(cfg)
    return sources.plan_vocab(cfg, base, models), tuple(models)


def _rows(ckpt: Checkpoint, name: str, shape: tuple, r0: int, r1: int) -> torch.Tensor:
    if not shape:
        return ckpt.view(name).reshape(1)
    return ckpt.view(name, r0, r1)
