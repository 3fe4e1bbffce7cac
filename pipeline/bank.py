"""The task bank: every task of a run served from one model's memory (SPEC section 6).

EMR and TALL runs store K task models as the base, one shared vector and one bit per parameter per
task. The bank holds exactly that, the masks still bit-packed (K/8 bytes a parameter), read once,
and writes a task's weights into a live `transformers` model on demand: `switch` unpacks one block
of one task's bits at a time into a fixed scratch buffer, never K unpacked masks. The values come
from `pipeline.export.task_rows`, the function `tadrop export` writes with, so bank and export
agree to the bit. Single-model methods (task arithmetic, TIES, consensus) open too, with one task.

    bank = TaskBank.open("runs/emr", device="cuda")
    model = bank.model("math")          # a transformers model, no checkpoint written
    bank.switch(model, "code")          # same model object, code's weights, in place
"""
from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import torch

from . import sources
from .checkpoints import Checkpoint
from .export import (MERGED_TASK, ExportError, TaskRecipe, load_run, output_dtypes, reading, run_tasks,
                     task_recipes, task_rows)
from .job import TORCH_DTYPES
from .plan import MERGED_METHODS
from .writers import MaskStore

BLOCK = 1 << 18  # elements per switch step, a multiple of 8: the float32 temporaries stay in cache


class BankError(ExportError):
    """The run cannot be served (incomplete, unknown task, model that does not fit its tensors)."""


class TaskBank:
    """Base + unified vector + bit-packed masks in memory; task models on demand. Use `open`."""

    def __init__(self, run_dir: Path, record: dict, device: torch.device, dtype: torch.dtype | None,
                 tasks: list[str], recipes: dict[str, TaskRecipe], config_dir: Path):
        self.run_dir, self.record, self.device, self.dtype = run_dir, record, device, dtype
        self.tasks = tasks
        self._recipes = recipes
        self._config_dir = config_dir
        self._fixed: dict[str, torch.Tensor] = {}     # the same for every task (flat)
        self._base: dict[str, torch.Tensor] = {}      # theta_0 of the tensors that differ (flat)
        self._unified: dict[str, torch.Tensor] = {}   # tau_uni / tau_MTL (flat)
        self._packed: dict[str, torch.Tensor] = {}    # uint8 (K, ceil(numel / 8)), np.packbits order
        self._shapes: dict[str, tuple] = {}
        self._out: dict[str, torch.dtype] = {}        # export's dtype of each tensor
        self._shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)
        self._scratch = torch.empty(BLOCK, dtype=torch.uint8, device=device)
        self._f32 = torch.empty((3, BLOCK), dtype=torch.float32, device=device)   # reused: no fresh pages
        self._targets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._live: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, run_dir, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "TaskBank":
        """Read a complete run into memory once. `dtype` casts the weights handed out (None: the
        dtypes `tadrop export` writes, bit for bit)."""
        run_dir = Path(run_dir)
        try:
            record, cfg = load_run(run_dir)
        except ExportError as e:
            raise BankError(str(e)) from None
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BankError(f"device {device} asked for, but torch sees no CUDA device")
        try:
            with reading(run_dir, "bank"):   # shared lock, completeness check, missing chunks raise
                return cls._read(run_dir, record, cfg, device, dtype)
        except BankError:
            raise
        except ExportError as e:
            raise BankError(str(e)) from None

    @classmethod
    def _read(cls, run_dir: Path, record: dict, cfg, device: torch.device, dtype) -> "TaskBank":
        if cfg.method in MERGED_METHODS:
            merged = Checkpoint.open(run_dir / "merged", "merged")
            bank = cls(run_dir, record, device, dtype, [MERGED_TASK], {}, run_dir / "merged")
            for name, info in merged.tensors.items():
                bank._hold(bank._fixed, merged, name)
                bank._shapes[name], bank._out[name] = tuple(info.shape), info.torch_dtype
            return bank

        base = sources.open_base(cfg.base, download=cfg.download)
        unified = Checkpoint.open(run_dir / "unified", "unified")
        store = MaskStore.open(run_dir / "masks.zarr", mode="r")
        recipes = task_recipes(cfg, store.attrs)
        bank = cls(run_dir, record, device, dtype, run_tasks(cfg), {r.task: r for r in recipes}, base.root)
        codes = output_dtypes(cfg, base, unified.tensors)
        for name, info in base.tensors.items():
            bank._shapes[name], bank._out[name] = tuple(info.shape), TORCH_DTYPES[codes[name]]
            if name not in unified.tensors:
                bank._hold(bank._fixed, base, name)
                continue
            if tuple(unified.tensors[name].shape) != tuple(info.shape):
                raise BankError(f"{run_dir / 'unified'}: tensor {name!r} has shape "
                                f"{tuple(unified.tensors[name].shape)}, the base {tuple(info.shape)}")
            bank._hold(bank._base, base, name)
            bank._hold(bank._unified, unified, name)
            bank._packed[name] = _pack(store, name, len(recipes), info.numel).to(device)
        missing = sorted(set(unified.tensors) - set(base.tensors))
        if missing:
            raise BankError(f"{run_dir / 'unified'}: tensor {missing[0]!r} is not in the base")
        return bank

    def _hold(self, into: dict, ckpt: Checkpoint, name: str) -> None:
        """Copy one tensor out of its file into our memory (flat), then drop its mapped pages."""
        view = ckpt.view(name)
        held = torch.empty(view.numel(), dtype=view.dtype, device=self.device)
        held.copy_(view.reshape(-1))
        into[name] = held
        ckpt.release(name)

    # ------------------------------------------------------------------ serving
    def model(self, task: str):
        """A `transformers` model (the base's architecture and config) holding `task`'s weights."""
        self._check_task(task)
        import transformers
        from transformers.initialization import no_init_weights

        config = transformers.AutoConfig.from_pretrained(self._config_dir)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
        with no_init_weights(), torch.device(self.device):
            model = cls._from_config(config, dtype=self._model_dtype())
        model.eval()
        targets = self._model_targets(model)
        with torch.no_grad():
            for name, held in self._fixed.items():
                targets[name].copy_(held)   # the base's bytes (cast only if the model's dtype differs)
        self.switch(model, task)
        return model

    def switch(self, model, task: str) -> None:
        """Rewrite `model`'s weights in place for `task` (only the tensors that differ by task; a
        model already holding `task` is left as it is)."""
        self._check_task(task)
        targets = self._model_targets(model)
        if self._live.get(model) == task:
            return
        recipe = self._recipes.get(task)
        with torch.no_grad():
            for name in self._unified:
                self._fill(recipe, name, targets[name])
        self._live[model] = task

    def state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """`task`'s tensors as fresh tensors, named and shaped as in the exported checkpoint."""
        self._check_task(task)
        out = {}
        for name, held in self._fixed.items():
            out[name] = held.to(self.dtype or self._out[name], copy=True).reshape(self._shapes[name])
        recipe = self._recipes.get(task)
        for name in self._unified:
            t = torch.empty(self._base[name].numel(), dtype=self.dtype or self._out[name], device=self.device)
            self._fill(recipe, name, t)
            out[name] = t.reshape(self._shapes[name])
        return {n: out[n] for n in self._shapes}

    def task_of(self, model) -> str | None:
        """The task whose weights `model` holds (None for a model this bank did not fill)."""
        return self._live.get(model)

    # ------------------------------------------------------------------ accounting
    @property
    def storage(self) -> dict | None:
        """The run's storage accounting (run.json `storage`, written by the reduce)."""
        return self.record.get("storage")

    def storage_report(self) -> str:
        """The storage table `tadrop report` prints, for this run."""
        from .storage import format_storage, run_storage
        return format_storage(self.storage or run_storage(self.run_dir, self.record))

    def memory_bytes(self) -> dict[str, int]:
        """Bytes the bank itself holds, by part (a live model is extra)."""
        size = lambda d: sum(t.numel() * t.element_size() for t in d.values())  # noqa: E731
        return {"fixed": size(self._fixed), "base": size(self._base), "unified": size(self._unified),
                "masks": size(self._packed), "scratch": self._scratch.numel()}

    def __repr__(self) -> str:
        return (f"TaskBank({str(self.run_dir)!r}, {self.record['config']['method']}, "
                f"{len(self.tasks)} tasks, {self.device})")

    # ------------------------------------------------------------------ internals
    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise BankError(f"task {task!r} is not in run {self.run_dir}; tasks: {', '.join(self.tasks)}")

    def _model_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        dtypes = [self._out[n] for n in self._shapes if self._out[n].is_floating_point]
        return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32

    def _fill(self, recipe: TaskRecipe, name: str, dst: torch.Tensor) -> None:
        """Write `task`'s values of tensor `name` into the flat `dst`, block by block.

        Where `dst` has the dtype export writes (and it is not float16, whose overflow check needs
        the generic path), the float32 maths runs in two reused scratch rows, in place: the same
        operations in the same order as `export.task_rows` (base + tau * lambda, where(mask, ., base),
        one cast), so the same bits, without allocating fresh temporaries per block."""
        out_dtype = self._out[name]
        if out_dtype == torch.float16 or dst.dtype != out_dtype or self.dtype not in (None, out_dtype):
            for e0, e1, vals in self._blocks(recipe, name):
                dst[e0:e1].copy_(vals)
            return
        base, vec, packed = self._base[name], self._unified[name], self._packed[name][recipe.index]
        lam = recipe.lambda_for(name) if recipe.method == "emr" else None
        for e0 in range(0, base.numel(), BLOCK):
            e1 = min(base.numel(), e0 + BLOCK)
            mask = self._unpack(packed, e0, e1)
            theta0, theta = self._f32[0, : e1 - e0], self._f32[1, : e1 - e0]
            pick = self._f32[2, : e1 - e0].view(torch.int32)
            theta0.copy_(base[e0:e1])
            theta.copy_(vec[e0:e1])
            if lam is not None:          # EMR: theta_0 + lambda_k M_k tau_uni; TALL: theta_0 + m_k tau_MTL
                theta.mul_(lam)
            theta.add_(theta0)
            # where(mask, theta, theta0) as a bit blend: torch.where / masked_fill_ on a bool mask
            # measured 4x slower than these five integer passes on this CPU
            pick.copy_(mask).neg_()                                   # 0 or all ones
            t, t0 = theta.view(torch.int32), theta0.view(torch.int32)
            t.bitwise_xor_(t0).bitwise_and_(pick).bitwise_xor_(t0)    # t0 ^ ((t ^ t0) & pick)
            dst[e0:e1].copy_(theta)

    def _blocks(self, recipe: TaskRecipe, name: str):
        """(e0, e1, values) over the flat tensor, BLOCK elements at a time, one task's bits each."""
        base, vec, packed = self._base[name], self._unified[name], self._packed[name][recipe.index]
        out_dtype = self._out[name]
        n = base.numel()
        for e0 in range(0, n, BLOCK):
            e1 = min(n, e0 + BLOCK)
            mask = self._unpack(packed, e0, e1)
            vals = task_rows(recipe, name, base[e0:e1], vec[e0:e1], mask, out_dtype)
            yield e0, e1, vals if self.dtype is None else vals.to(self.dtype)

    def _unpack(self, packed: torch.Tensor, e0: int, e1: int) -> torch.Tensor:
        """Bits [e0, e1) (e0 a multiple of 8) as a bool view of the scratch buffer."""
        b0, b1 = e0 // 8, (e1 + 7) // 8
        bits = self._scratch[: 8 * (b1 - b0)].view(b1 - b0, 8)
        torch.bitwise_right_shift(packed[b0:b1].unsqueeze(1), self._shifts, out=bits)
        bits.bitwise_and_(1)
        return bits.view(-1)[: e1 - e0].view(torch.bool)

    def _model_targets(self, model) -> dict[str, torch.Tensor]:
        """Flat views of the model's tensors by checkpoint name; checked once per model."""
        cached = self._targets.get(model)
        if cached is not None:
            return cached
        found = dict(model.named_parameters(remove_duplicate=False))
        found.update(model.named_buffers(remove_duplicate=False))
        targets = {}
        for name, shape in self._shapes.items():
            t = found.get(name)
            if t is None:
                raise BankError(f"tensor {name!r} of run {self.run_dir} is not in the "
                                f"{type(model).__name__} built from its config")
            if tuple(t.shape) != shape:
                raise BankError(f"tensor {name!r}: the model has shape {tuple(t.shape)}, "
                                f"the run {shape}")
            if not t.is_contiguous():
                raise BankError(f"tensor {name!r} of the model is not contiguous; cannot write in place")
            targets[name] = t.data.view(-1)
        held = {t.data_ptr() for t in targets.values()}
        persistent = set(model.state_dict())
        unfilled = [n for n, t in model.named_parameters(remove_duplicate=False)
                    if n not in targets and t.data_ptr() not in held]
        unfilled += [n for n, t in model.named_buffers(remove_duplicate=False)
                     if n in persistent and n not in targets and t.data_ptr() not in held]
        if unfilled:
            raise BankError(f"the {type(model).__name__} has tensor {unfilled[0]!r} that run "
                            f"{self.run_dir} does not hold ({len(unfilled)} such)")
        self._targets[model] = targets
        return targets


def _pack(store: MaskStore, name: str, k: int, numel: int) -> torch.Tensor:
    """All K masks of one tensor, bit-packed per task (np.packbits: first element in the high bit);
    one task's unpacked mask in memory at a time."""
    packed = np.empty((k, (numel + 7) // 8), dtype=np.uint8)
    for i in range(k):
        mask = np.asarray(store.read(name, i), dtype=bool).reshape(-1)
        if mask.size != numel:
            raise BankError(f"{store.path}: mask of tensor {name!r} has {mask.size} entries, "
                            f"the tensor {numel}")
        packed[i] = np.packbits(mask)
    return torch.from_numpy(packed)
