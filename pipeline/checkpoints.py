"""Safetensors checkpoints read by header + mmap: no tensor is loaded until a job asks.

We parse headers ourselves (instead of safetensors.safe_open) to validate every
offset up front with errors that name the file and tensor, and to hand out
zero-copy row views of any range of a tensor.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import mmap
import os
import struct
import threading
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype string -> (torch dtype, itemsize). Sub-byte types (F4, F6_*) are refused.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1), "U8": (torch.uint8, 1), "I8": (torch.int8, 1),
    "I16": (torch.int16, 2), "U16": (torch.uint16, 2), "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4), "I64": (torch.int64, 8), "U64": (torch.uint64, 8),
    "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2), "F32": (torch.float32, 4),
    "F64": (torch.float64, 8), "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
TORCH_TO_ST = {t: s for s, (t, _) in DTYPES.items()}
MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
NON_WEIGHT_PATTERNS = ("config.json", "generation_config.json", "tokenizer*",
                       "special_tokens_map.json", "added_tokens.json", "vocab*", "merges*",
                       "*.model", "chat_template*", "preprocessor_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


log = logging.getLogger("tadrop")

# torch warns (once per process) that a view of a read-only map is not writable: by design.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class CheckpointError(ValueError):
    """An unusable input checkpoint; the message names the file (and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # safetensors dtype string, e.g. 'BF16'
    shape: tuple[int, ...]
    file: Path
    offset: int         # absolute byte offset in `file`
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def rows(self) -> int:
        """Length of the row axis: the first dim; elements for 0-d/1-d tensors."""
        return self.shape[0] if len(self.shape) >= 1 else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) >= 1 else 1


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict, int]:
    """Parse and validate one safetensors file -> (tensors, __metadata__, header bytes)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, "
                                      "shorter than the 8-byte header length)")
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen > MAX_HEADER or hlen < 2:
                raise CheckpointError(f"{path}: not a safetensors file (header length {hlen} "
                                      f"is absurd; limit {MAX_HEADER})")
            if 8 + hlen > size:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header "
                                      f"length {hlen} exceeds the file size {size})")
            raw = f.read(hlen)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
    except PermissionError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt header (not JSON: {e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt header (JSON nested too deeply)") from None
    except KeyError as e:
        raise CheckpointError(f"{path}: corrupt header (tensor {e.args[0]!r} listed "
                              "twice)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header (JSON {type(header).__name__}, "
                              "expected an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt header (__metadata__ is not an object)")
    data_start, data_size = 8 + hlen, size - 8 - hlen
    tensors = {}
    for name in sorted(header):
        tensors[name] = _tensor_info(path, name, header[name], data_start, data_size)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: corrupt header: tensors {n0!r} and {n1!r} "
                                  "overlap")
    return tensors, meta, hlen


def _tensor_info(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{where}: corrupt header entry {entry!r} (expected dtype, "
                              "shape, data_offsets)")
    dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: unknown or unsupported dtype {dtype!r}; supported: "
                              f"{', '.join(DTYPES)}")
    if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
        raise CheckpointError(f"{where}: corrupt shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)
            and offs[0] <= offs[1]):
        raise CheckpointError(f"{where}: corrupt data_offsets {offs!r}")
    nbytes = math.prod(shape) * DTYPES[dtype][1]
    if offs[1] - offs[0] != nbytes:
        raise CheckpointError(f"{where}: data_offsets {offs} span {offs[1] - offs[0]} bytes "
                              f"but {dtype}{shape} needs {nbytes}")
    if offs[1] > data_size:
        raise CheckpointError(f"{where}: truncated file: data ends at byte "
                              f"{data_start + offs[1]} but the file has {data_start + data_size}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + offs[0], nbytes)


def _unique_keys(pairs: list) -> dict:
    """json object hook: a duplicated key would silently hide a tensor."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise KeyError(k)
        out[k] = v
    return out


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class Checkpoint:
    """One model's tensors across its safetensors files, read lazily by mmap.

    Picklable: worker processes receive it and reopen the maps on first use.
    """

    def __init__(self, name: str, root: Path, files: list[Path],
                 tensors: dict[str, TensorInfo], index_file: Path | None = None):
        self.name, self.root, self.files = name, root, files
        self.tensors, self.index_file = tensors, index_file
        self._sizes = {f: f.stat().st_size for f in files}
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike, name: str) -> "Checkpoint":
        """A Hugging Face model dir (single or sharded) or a single .safetensors file."""
        path = Path(os.path.abspath(path))
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory (model {name!r})")
        if path.is_file():
            tensors, _, _ = read_header(path)
            return cls(name, path.parent, [path], tensors)
        index = path / INDEX_NAME
        if index.is_file():
            return cls._open_sharded(path, name, index)
        if (path / SINGLE_NAME).is_file():
            single = path / SINGLE_NAME
            return cls(name, path, [single], read_header(single)[0])
        found = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} (model {name!r}); "
                              f"weight files found: {', '.join(found) or 'none'}"
                              + ("; convert .bin weights to safetensors" if any(
                                  f.endswith(".bin") for f in found) else ""))

    @classmethod
    def _open_sharded(cls, root: Path, name: str, index: Path) -> "Checkpoint":
        try:
            data = json.loads(index.read_text())
            wmap = data["weight_map"]
            if not isinstance(wmap, dict):
                raise TypeError("weight_map is not an object")
        except RecursionError:
            raise CheckpointError(f"{index}: corrupt index (JSON nested too deeply)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
        for t, s in wmap.items():
            if not isinstance(s, str) or Path(s).name != s or s in ("", ".", ".."):
                raise CheckpointError(f"{index}: tensor {t!r}: shard name {str(s)[:80]!r} must be "
                                      "a plain file name")
        shard_names = list(dict.fromkeys(wmap.values()))
        tensors: dict[str, TensorInfo] = {}
        problems = []
        for s in shard_names:
            for tname, info in read_header(root / s)[0].items():
                if tname in tensors:
                    problems.append(f"tensor {tname!r} is in both {tensors[tname].file.name} "
                                    f"and {s}")
                elif wmap.get(tname) != s:
                    problems.append(f"tensor {tname!r} is in {s} but the index maps it to "
                                    f"{wmap.get(tname)!r}")
                tensors.setdefault(tname, info)
        problems += [f"tensor {t!r} is mapped to {s} but not in that file"
                     for t, s in wmap.items() if t not in tensors]
        if problems:
            raise CheckpointError(_summarize(f"{index}: index does not match its shards",
                                             problems))
        files = [root / s for s in sorted(shard_names)]
        return cls(name, root, files, {k: tensors[k] for k in sorted(tensors)}, index)

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {str(self.root)!r}, {len(self.tensors)} tensors)"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with self._lock:
                mm = self._maps.get(file)
                if mm is None:
                    mm = self._maps[file] = self._mmap(file)
        return mm

    def _mmap(self, file: Path) -> mmap.mmap:
        try:
            with open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != self._sizes[file]:
                    raise CheckpointError(f"{file}: size changed from {self._sizes[file]} to "
                                          f"{size} since it was opened (model {self.name!r})")
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(f"{file}: cannot map: {e.strerror or e}") from None

    def view(self, name: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """Read-only zero-copy view of rows [r0, r1) in the stored dtype (never write to it)."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: no tensor {name!r} in model "
                                  f"{self.name!r}") from None
        rows, ranged = info.rows, r0 is not None or r1 is not None
        r0 = 0 if r0 is None else r0
        r1 = rows if r1 is None else r1
        if not 0 <= r0 <= r1 <= rows:
            raise CheckpointError(f"{info.file}: tensor {name!r}: rows [{r0}, {r1}) out of "
                                  f"range [0, {rows})")
        # a 0-d tensor asked for a row range comes back 1-d, like every other row view
        shape = (r1 - r0, *info.shape[1:]) if ranged else info.shape
        count = (r1 - r0) * info.row_numel
        if count == 0:
            return torch.empty(shape, dtype=info.torch_dtype)
        offset = info.offset + r0 * info.row_numel * info.itemsize
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            t = torch.frombuffer(self._map(info.file), dtype=info.torch_dtype,
                                 count=count, offset=offset)
        return t.view(shape)

    def prefetch(self, name: str, limit: int | None = None) -> None:
        """Ask the kernel to start reading a tensor's bytes (its first `limit` bytes) into the page
        cache now (MADV_WILLNEED): the K+1 inputs' reads then queue at once, in large requests,
        instead of one small synchronous read per page fault as the engine touches each view."""
        info = self.tensors.get(name)
        if info is None or not info.nbytes:
            return
        mm = self._map(info.file)
        if not hasattr(mm, "madvise"):
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        end = info.offset + (info.nbytes if limit is None else min(info.nbytes, limit))
        try:
            mm.madvise(mmap.MADV_WILLNEED, start, end - start)
        except OSError:   # advice only
            pass

    def release(self, name: str, r0: int | None = None, r1: int | None = None) -> None:
        """Drop a tensor's pages (or those of rows [r0, r1)) from this process's mapping so a
        worker's RSS stays bounded: mapped input pages count in RSS until dropped.

        Safe with live views: pages fault back in from the page cache when touched.
        """
        info = self.tensors.get(name)
        mm = self._maps.get(info.file) if info else None
        if mm is None or not info.nbytes or not hasattr(mm, "madvise"):
            return
        row_bytes = info.row_numel * info.itemsize
        begin = info.offset + (r0 or 0) * row_bytes
        end = info.offset + (info.nbytes if r1 is None else r1 * row_bytes)
        start = begin - begin % mmap.PAGESIZE
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def evict(self, name: str) -> None:
        """Drop a tensor's bytes from the page cache once its job is done with them (after `release`:
        pages still mapped are not dropped).  For out-of-core runs (`pipeline.job.evict_inputs`): the
        next job's reads then land in the memory these pages just gave back instead of in memory the
        page cache has not touched yet, which on a VM whose freed memory goes back to the host
        (virtio-balloon free page reporting) costs ~6x as much to touch (README "Memory")."""
        info = self.tensors.get(name)
        if info is None or not info.nbytes or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(info.file, os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)
        except OSError:   # advice only
            pass
        finally:
            os.close(fd)

    def non_weight_files(self) -> list[Path]:
        """Files a Hugging Face output needs besides the weights (config, tokenizer...).

        A symlink is followed only into the model directory or, for a snapshot of the Hugging Face
        cache (`.../snapshots/<rev>/`), into that repo's `blobs/`: a link pointing anywhere else is
        skipped with a warning, so a merge never copies an unrelated file into its output."""
        out = []
        root = self.root.resolve()
        allowed = [root]
        if root.parent.name == "snapshots":
            allowed.append(root.parent.parent / "blobs")
        for p in sorted(self.root.iterdir()):
            if not p.is_file() or p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(
                    ".index.json"):
                continue
            if any(fnmatch.fnmatchcase(p.name, pat) for pat in NON_WEIGHT_PATTERNS):
                if p.is_symlink():
                    target = p.resolve()
                    if not any(target.is_relative_to(a) for a in allowed):
                        log.warning("%s: not copied: a symlink to %s, outside the model directory",
                                    p, target)
                        continue
                out.append(p)
        return out

    def fingerprint(self) -> dict:
        """Cheap identity of the inputs: size, mtime and header hash per file (+ the index)."""
        fp = {}
        for f in self.files + ([self.index_file] if self.index_file else []):
            st = f.stat()
            with open(f, "rb") as fh:
                if f == self.index_file:
                    head = fh.read()
                else:
                    (hlen,) = struct.unpack("<Q", fh.read(8))
                    head = fh.read(min(hlen, MAX_HEADER))
            fp[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                          "header_sha256": hashlib.sha256(head).hexdigest()}
        return fp

    def close(self) -> None:
        """Drop our maps; views still alive keep theirs (unmapping under them would crash)."""
        self._maps = {}


@dataclass(frozen=True)
class InputTable:
    merge: list[str]   # floating tensors merged across all models
    copy: list[str]    # integer/bool and passthrough tensors copied from the base


def validate_inputs(base: Checkpoint, models: list[Checkpoint],
                    passthrough: list[str], extended: frozenset = frozenset()) -> InputTable:
    """Which tensors are merged and which copied; every mismatch reported at once.

    Adapters (pipeline.sources.LoraAdapter) cover every base tensor (tau = 0 where they have
    none) and are checked against the base by their own `bind`, so only full checkpoints are
    compared here. `extended`: vocabulary tensors (pipeline.sources.vocab) whose row counts may differ."""
    models = [m for m in models if not getattr(m, "is_adapter", False)]

    def passed(n: str) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for p in passthrough)

    merge, copy, problems = [], [], []
    for name, b in base.tensors.items():
        if passed(name):
            copy.append(name)
            continue
        missing = [m.name for m in models if name not in m.tensors]
        shapes = [f"{m.name} {list(m.tensors[name].shape)}" for m in models
                  if name in m.tensors and m.tensors[name].shape != b.shape
                  and not (name in extended and m.tensors[name].shape[1:] == b.shape[1:])]
        kinds = [f"{m.name} {m.tensors[name].dtype}" for m in models
                 if name in m.tensors and m.tensors[name].is_float != b.is_float]
        if missing:
            problems.append(f"tensor {name!r}: missing in model(s) {', '.join(missing)}")
        if shapes:
            problems.append(f"tensor {name!r}: shape {list(b.shape)} in the base "
                            f"({base.name}) but {'; '.join(shapes)}")
        if kinds:
            problems.append(f"tensor {name!r}: {b.dtype} in the base ({base.name}) but "
                            f"{'; '.join(kinds)} (floating vs integer/bool)")
        if not (missing or shapes or kinds):
            (merge if b.is_float else copy).append(name)
    extra: dict[str, list[str]] = {}
    for m in models:
        for name in m.tensors:
            if name not in base.tensors and not passed(name):
                extra.setdefault(name, []).append(m.name)
    problems += [f"tensor {n!r}: in model(s) {', '.join(ms)} but not in the base "
                 f"({base.name}); list it under passthrough to ignore it"
                 for n, ms in sorted(extra.items())]
    if problems:
        where = "; ".join(f"{c.name}={c.root}" for c in [base, *models])
        raise CheckpointError(_summarize(f"inputs do not match ({where})", problems))
    return InputTable(merge, copy)


def _summarize(head: str, problems: list[str], limit: int = 10) -> str:
    lines = problems[:limit]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return f"{head}: {len(problems)} problem(s):\n  " + "\n  ".join(lines)
