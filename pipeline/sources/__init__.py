"""Where tensors come from: local safetensors checkpoints (by mmap), Hugging Face repo ids resolved
to a cached snapshot, and LoRA / PEFT adapters (tau = scaling * B @ A per row chunk).

`open_inputs` turns a config into the base and the K fine-tunes the plan and the jobs use; every
fine-tune is either a `Checkpoint` (theta_k) or a `LoraAdapter` (tau_k), both behind `RowSource`.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..checkpoints import Checkpoint, CheckpointError
from .hub import HubError, Snapshot, parse_repo_id, resolve
from .lora import AdapterError, LoraAdapter, is_adapter_dir
from .rows import RowSource, is_adapter
from .vocab import Vocab, VocabError, plan_vocab

__all__ = ["AdapterError", "HubError", "LoraAdapter", "RowSource", "Snapshot", "is_adapter", "open_inputs",
           "open_base", "local_path", "fingerprint", "check_adapters", "input_bytes", "mapped_itemsize",
           "Vocab", "VocabError", "plan_vocab"]


def local_path(ref: str, what: str, *, download: bool = False) -> tuple[Path, Snapshot | None]:
    """A directory or file on disk for a path or a repo id (with the snapshot it resolved to)."""
    if parse_repo_id(str(ref)) is not None:
        snap = resolve(str(ref), what, download=download)
        return snap.path, snap
    return Path(os.path.abspath(os.path.expanduser(str(ref)))), None


def open_base(ref: str, *, download: bool = False) -> Checkpoint:
    path, snap = local_path(ref, "base", download=download)
    ckpt = Checkpoint.open(path, "base")
    ckpt.origin = snap.identity() if snap else None
    return ckpt


def open_model(entry, *, download: bool = False):
    """A config `models[]` entry as a Checkpoint (full fine-tune) or a LoraAdapter."""
    ref = entry.adapter if entry.adapter is not None else entry.path
    path, snap = local_path(ref, f"model {entry.name!r}", download=download)
    origin = snap.identity() if snap else None
    if entry.adapter is not None or is_adapter_dir(path):
        if path.is_file():
            raise AdapterError(f"{path}: an adapter is a directory holding adapter_config.json and "
                               f"adapter_model.safetensors (model {entry.name!r})")
        return LoraAdapter(entry.name, path, origin)
    ckpt = Checkpoint.open(path, entry.name)
    ckpt.origin = origin
    return ckpt


def open_recorded(ref, name: str):
    """An input as a run's config recorded it (a path or repo id; a checkpoint or an adapter), reopened
    offline for verification."""
    path, snap = local_path(ref, "base" if name == "base" else f"model {name!r}")
    ck = LoraAdapter(name, path) if is_adapter_dir(path) else Checkpoint.open(path, name)
    ck.origin = snap.identity() if snap else None
    return ck


def open_inputs(cfg) -> tuple[Checkpoint, list]:
    download = bool(getattr(cfg, "download", False))
    base = open_base(cfg.base, download=download)
    models = [open_model(m, download=download) for m in cfg.models]
    return base, models


def _name_tail(s: str) -> str:
    return str(s).rstrip("/").split("@")[0].rsplit("/", 1)[-1].lower()


def check_adapters(cfg, base: Checkpoint, models: list) -> list[str]:
    """Bind every adapter to the base; problems name the adapter, the module and the shapes.
    An adapter trained on another base model (`base_model_name_or_path`) is refused unless its entry
    says `check_base: false`: the names match when equal or when their last path components agree."""
    problems = []
    entries = {m.name: m for m in cfg.models}
    base_ref = (getattr(base, "origin", None) or {}).get("repo_id") or str(cfg.base)
    for m in models:
        if not is_adapter(m):
            continue
        want = m.base_model_name
        if want and entries[m.name].check_base and _name_tail(want) != _name_tail(base_ref):
            problems.append(f"adapter {m.name!r}: trained on base model {want!r} (base_model_name_or_path) "
                            f"but the base is {base_ref!r}; set check_base: false on this model to merge anyway")
            continue
        problems += m.bind(base)
    return problems


def fingerprint(ckpt) -> dict:
    """The input's identity for run.json: files (size, mtime, header hash) plus, for a repo id, the
    resolved snapshot commit, so a cache update between a crash and the resume is detected."""
    fp = ckpt.fingerprint()
    origin = getattr(ckpt, "origin", None)
    if origin:
        fp["@snapshot"] = dict(origin)
    if is_adapter(ckpt):
        fp["@adapter"] = True
    return fp


def input_bytes(model, name: str) -> int:
    """Bytes of `model` read for tensor `name`."""
    return model.input_bytes(name) if is_adapter(model) else model.tensors[name].nbytes


def mapped_itemsize(model, name: str) -> int:
    """What the source holds per element of a chunk: mapped input pages, or an adapter's float32 delta
    (a temporary of the chunk's size where it cannot write into the engine's buffer, a saved tensor's
    mapped pages and the base rows it subtracts); nothing for an adapter that does not touch it."""
    if is_adapter(model):
        return 8 if model.touched(name) else 0
    return model.tensors[name].itemsize
