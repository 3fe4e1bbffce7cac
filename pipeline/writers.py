"""Outputs written in place by many processes: safetensors shards, Zarr masks, Parquet stats.

Shards are laid out up front from the headers alone (every tensor's byte range
is known before any job runs), so each job pwrites its own disjoint range of a
preallocated file and no process ever needs to assemble a shard.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import urllib.parse
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import xxhash
import pyarrow.parquet as pq
import torch

from .checkpoints import DTYPES

INDEX_SUFFIX = ".safetensors.index.json"


# ---------------------------------------------------------------- small file helpers

def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename/creation in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# File systems where syncfs(2) writes back every dirty page and commits every directory entry
# of the file system (a local disk file system; tmpfs has nothing to write back).  Elsewhere
# (NFS, FUSE, overlays...) outputs are made durable file by file with fsync.
_SYNCFS_TYPES = {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs"}
_SYNCFS_ENV = "TADROP_SYNCFS"      # 0: always fsync file by file
_LIBC = None


def _fs_type(path: Path) -> str | None:
    """The type of the file system holding `path`, from /proc/self/mountinfo (longest mount point)."""
    try:
        real, best, kind = os.path.realpath(path), "", None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                mnt = fields[4].encode().decode("unicode_escape") if len(fields) > 4 else ""
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, right.split()[0] if right else None
        return kind
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def syncfs_usable(path: str | os.PathLike) -> bool:
    """Whether one syncfs(2) on `path`'s file system makes everything written there durable, and
    reports write-back errors (Linux >= 5.8 on a local disk file system): then a job's outputs are
    made durable by one call instead of an fsync per file and per directory (an EMR job writes K
    mask chunk files per row chunk, each in its own directory)."""
    if os.environ.get(_SYNCFS_ENV, "1") == "0" or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        major, minor = (int(v) for v in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    if (major, minor) < (5, 8):
        return False
    return _fs_type(Path(path)) in _SYNCFS_TYPES


def syncfs(path: str | os.PathLike) -> None:
    """syncfs(2) on the file system holding `path` (see `syncfs_usable`); OSError on failure."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        _LIBC = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _LIBC.syncfs(fd) != 0:
            import ctypes
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)


def sync_mask_chunks(store: str | os.PathLike, array_key: str, chunk_keys: Iterable[str], *,
                     files: bool = True) -> None:
    """fsync mask chunk files of one array and the directories their names live in (every level
    below the array's own directory, and that one): what makes a written chunk durable."""
    top = Path(store) / array_key
    dirs = set()
    for key in chunk_keys:
        f = top / key
        if files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        d = f.parent
        while d != top.parent and d not in dirs:
            dirs.add(d)
            d = d.parent
    for d in sorted(dirs, reverse=True):
        fsync_dir(d)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes so readers see the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so readers see the old file or the new one, never a torn one."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


# ---------------------------------------------------------------- safetensors shards

@dataclass(frozen=True)
class ShardTensor:
    name: str
    dtype: str                       # safetensors dtype string
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]    # relative to the data start, as in the header
    offset: int                      # absolute byte offset in the file
    nbytes: int

    @property
    def row_numel(self) -> int:
        """Elements per row: first dim for >=2-d, one element for 0-d/1-d."""
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return DTYPES[self.dtype][1] * self.row_numel


@dataclass(frozen=True)
class ShardFile:
    filename: str
    tensors: dict[str, ShardTensor]
    header: bytes                    # the exact first bytes: u64 length + padded JSON
    file_size: int


@dataclass(frozen=True)
class ShardPlan:
    shards: list[ShardFile]
    weight_map: dict[str, str]       # tensor -> file name (sorted by tensor)
    total_size: int                  # sum of tensor bytes
    prefix: str = "model"
    _where: dict[str, tuple[int, ShardTensor]] = field(default_factory=dict, repr=False)

    def locate(self, name: str) -> tuple[ShardFile, ShardTensor]:
        i, t = self._where[name]
        return self.shards[i], t

    @property
    def files(self) -> list[str]:
        """Shard file names in order."""
        return [s.filename for s in self.shards]

    @property
    def index_name(self) -> str:
        return self.prefix + INDEX_SUFFIX


def plan_shards(entries: Sequence[tuple[str, str, Sequence[int]]], shard_size: int,
                prefix: str = "model") -> ShardPlan:
    """Greedy packing in the given order: a new shard starts when the next tensor would
    push the current one past `shard_size` tensor bytes (a larger tensor gets its own).

    Inside a shard, data is laid out by decreasing item size (stable), so every tensor
    is aligned to its dtype (safetensors requires contiguous data with no holes).
    """
    groups: list[list[tuple[str, str, tuple[int, ...], int]]] = []
    used = 0
    seen = set()
    for name, dtype, shape in entries:
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if name in seen:
            raise ValueError(f"tensor {name!r} listed twice")
        seen.add(name)
        shape = tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        if not groups or (groups[-1] and used + nbytes > shard_size):
            groups.append([])
            used = 0
        groups[-1].append((name, dtype, shape, nbytes))
        used += nbytes
    n = len(groups)
    shards, weight_map, where = [], {}, {}
    for i, group in enumerate(groups):
        filename = f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        layout = sorted(group, key=lambda e: -DTYPES[e[1]][1])
        pos, header = 0, {"__metadata__": {"format": "pt"}}
        rel = {}
        for name, dtype, shape, nbytes in layout:
            rel[name] = (pos, pos + nbytes)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        js = json.dumps(header, separators=(",", ":")).encode()
        js += b" " * (-len(js) % 8)
        data_start = 8 + len(js)
        tensors = {}
        for name, dtype, shape, nbytes in group:
            t = ShardTensor(name, dtype, shape, rel[name], data_start + rel[name][0], nbytes)
            tensors[name] = t
            weight_map[name] = filename
            where[name] = (i, t)
        shards.append(ShardFile(filename, tensors, struct.pack("<Q", len(js)) + js,
                                data_start + pos))
    total = sum(t.nbytes for s in shards for t in s.tensors.values())
    return ShardPlan(shards, dict(sorted(weight_map.items())), total, prefix, where)


def create_shard_files(plan: ShardPlan, directory: str | os.PathLike) -> None:
    """Write each shard's header and size it to its final length (sparse).

    Idempotent: a file already holding the right header and size is kept, so a
    resumed run keeps the bytes its finished jobs wrote.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for shard in plan.shards:
        path = directory / shard.filename
        if _shard_ok(path, shard):
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, memoryview(shard.header), 0)
            os.ftruncate(fd, shard.file_size)
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(directory)


def _shard_ok(path: Path, shard: ShardFile) -> bool:
    try:
        with open(path, "rb") as f:
            return (os.fstat(f.fileno()).st_size == shard.file_size
                    and f.read(len(shard.header)) == shard.header)
    except FileNotFoundError:
        return False


def _read_all(fd: int) -> bytes:
    parts = []
    while True:
        block = os.read(fd, 16 << 20)
        if not block:
            return b"".join(parts)
        parts.append(block)


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU contiguous tensor (any dtype, bf16 included), zero-copy."""
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy())


class ShardWriter:
    """pwrites tensors (or row ranges) into shard files made by create_shard_files.

    Many processes may write disjoint ranges of one file at once: that is the design.
    """

    def __init__(self, plan: ShardPlan, directory: str | os.PathLike):
        self.plan, self.directory = plan, Path(directory)
        self._fds: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._hash: dict[str, tuple[Any, int]] = {}   # tensor -> (running xxh3, next byte expected)

    def _fd(self, filename: str) -> int:
        fd = self._fds.get(filename)
        if fd is None:
            fd = self._fds[filename] = os.open(self.directory / filename, os.O_WRONLY)
        return fd

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write `tensor` (in the planned dtype; whole rows, shaped or flat) at row_start."""
        shard, info = self.plan.locate(name)
        want = DTYPES[info.dtype][0]
        if tensor.dtype != want:
            raise TypeError(f"tensor {name!r}: got {tensor.dtype}, planned {info.dtype} "
                            f"({want}); cast before writing")
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"tensor {name!r}: need a CPU contiguous tensor")
        flat_rows = tensor.dim() == 1 and tensor.numel() % max(1, info.row_numel) == 0
        if len(info.shape) >= 2 and tuple(tensor.shape[1:]) != info.shape[1:] and not flat_rows:
            raise ValueError(f"tensor {name!r}: rows of shape {tuple(tensor.shape[1:])}, "
                             f"planned {info.shape[1:]}")
        buf = tensor_bytes(tensor)
        start = row_start * info.row_bytes
        if row_start < 0 or start + len(buf) > info.nbytes:
            raise ValueError(f"tensor {name!r}: writing {len(buf)} bytes at row {row_start} "
                             f"overruns its {info.nbytes} bytes")
        _pwrite_all(self._fd(shard.filename), buf, info.offset + start)
        self._dirty.add(shard.filename)
        h, pos = self._hash.get(name) or (xxhash.xxh3_64(), 0)
        if pos == start:  # rows in order (the usual case): hash the bytes while they are in cache
            h.update(buf)
            self._hash[name] = (h, start + len(buf))
        else:
            self._hash[name] = (None, -1)

    def checksum(self, name: str) -> list:
        """[file, offset, nbytes, xxh3_64] of a tensor's byte range, from the bytes written (read back
        from the file only when its rows were not written in order)."""
        shard, info = self.plan.locate(name)
        h, pos = self._hash.pop(name, (None, -1))
        if h is None or pos != info.nbytes:
            h = xxhash.xxh3_64()
            fd = os.open(self.directory / shard.filename, os.O_RDONLY)
            try:
                done = 0
                while done < info.nbytes:
                    block = os.pread(fd, min(16 << 20, info.nbytes - done), info.offset + done)
                    if not block:
                        break
                    h.update(block)
                    done += len(block)
            finally:
                os.close(fd)
        return [shard.filename, info.offset, info.nbytes, h.hexdigest()]

    def sync(self) -> None:
        """fsync every file written since the last sync (before the ledger records a job)."""
        for filename in sorted(self._dirty):
            os.fsync(self._fds[filename])
        self._dirty.clear()

    def forget_dirty(self) -> None:
        """The files written since the last sync are made durable by someone else (the driver)."""
        self._dirty.clear()

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        self._dirty.clear()
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"plan": self.plan, "directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["plan"], state["directory"])


def write_index(plan: ShardPlan, directory: str | os.PathLike) -> Path:
    """`<prefix>.safetensors.index.json` as transformers reads it, written atomically."""
    path = Path(directory) / plan.index_name
    atomic_write_json(path, {"metadata": {"total_size": plan.total_size},
                             "weight_map": plan.weight_map})
    return path


# ---------------------------------------------------------------- Zarr masks

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def encode_array_name(name: str) -> str:
    """Zarr node name for a tensor name: kept as is when plain ([A-Za-z0-9_.-], not
    starting with '.'); otherwise percent-encoded (reversible by decode_array_name)."""
    if _SAFE_NAME.match(name) and name != "zarr.json":  # the group's own metadata file
        return name
    if name == "zarr.json":
        return "zarr%2Ejson"
    enc = urllib.parse.quote(name, safe="_-.")
    return "%2E" + enc[1:] if enc.startswith(".") else enc


def decode_array_name(key: str) -> str:
    return urllib.parse.unquote(key)


_ZARR_NOISE = (".*[Nn]umcodecs.*", ".*not in the Zarr version 3 specification.*")
for _msg in _ZARR_NOISE:  # process-wide: zarr emits these from its event-loop thread
    warnings.filterwarnings("ignore", message=_msg)


@contextlib.contextmanager
def _quiet_zarr():
    """numcodecs codecs in zarr v3 warn that they are unstable/not in the spec: expected."""
    with warnings.catch_warnings():  # again here: test runners reset the global filters
        for msg in _ZARR_NOISE:
            warnings.filterwarnings("ignore", message=msg)
        yield


_ZARR_TEMP = re.compile(r".+\.[0-9a-f]{32}\.partial")   # zarr LocalStore's write-then-rename temp


class MaskStoreError(ValueError, KeyError):
    """A mask array or chunk is missing or unreadable; names the store, tensor and chunk.
    A missing chunk is never read as the fill value: every chunk is written, even an all-False one."""

    def __str__(self) -> str:   # a plain message, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class MaskStore:
    """Per-task boolean masks: one bit-packed Zarr array (K, *shape) per tensor.

    Chunks are (1, chunk_rows, *rest) so every job writes only whole chunks of its own
    rows; no sharding codec, since two processes writing one shard lose data. Every chunk is
    stored (write_empty_chunks), so a missing chunk file always means damage.
    """

    def __init__(self, path: str | os.PathLike, group):
        self.path, self._group = Path(path), group
        self.defer_sync = False    # True: the driver fsyncs what a job wrote (sync_mask_chunks)
        self._arrays: dict[str, Any] = {}
        self._sums: dict[str, dict[str, list]] = {}   # tensor -> chunk key -> [size, xxh3_64]

    @classmethod
    def create(cls, path: str | os.PathLike, arrays: dict[str, tuple[int, Sequence[int], int]],
               attrs: dict) -> "MaskStore":
        """Create (or keep, if already identical) one array per tensor: name -> (K, shape,
        chunk_rows). Called by the driver before any job runs."""
        import zarr
        from zarr.codecs import ZstdCodec
        from zarr.codecs.numcodecs import PackBits

        with _quiet_zarr():
            group = zarr.open_group(str(path), mode="a")
            existing = {decode_array_name(k): group[k] for k in group.array_keys()}
            for name, (k, shape, chunk_rows) in arrays.items():
                shape = tuple(int(d) for d in shape)
                full = (int(k), *shape)
                chunks = (1, max(1, min(int(chunk_rows), shape[0] or 1)), *shape[1:]) \
                    if shape else (1,)
                arr = existing.get(name)
                if (arr is not None and arr.shape == full and arr.chunks == chunks
                        and arr.dtype == np.bool_):
                    continue
                group.create_array(encode_array_name(name), shape=full, chunks=chunks,
                                   dtype="bool", fill_value=False, filters=[PackBits()],
                                   compressors=[ZstdCodec(level=1)], overwrite=True)
            group.attrs.update(attrs)
        store = cls(path, group)
        store._sync_metadata()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r+") -> "MaskStore":
        import zarr
        if not (Path(path) / "zarr.json").is_file():
            raise FileNotFoundError(f"{path}: not a mask store (no zarr.json)")
        try:
            with _quiet_zarr():
                return cls(path, zarr.open_group(str(path), mode=mode))
        except Exception as e:
            raise MaskStoreError(f"{path}/zarr.json: unreadable mask store metadata "
                                 f"({type(e).__name__}: {e})") from None

    @staticmethod
    def sweep_temps(path: str | os.PathLike) -> list[Path]:
        """Delete zarr's own temporary files (`<chunk>.<uuid hex>.partial`): a worker killed while
        writing a chunk leaves one, and the job is redone on resume, so it is never data."""
        gone = []
        for p in Path(path).rglob("*.partial"):
            if _ZARR_TEMP.fullmatch(p.name) and p.is_file():
                p.unlink()
                gone.append(p)
        return gone

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        other = MaskStore.open(state["path"])
        self.__dict__.update(other.__dict__)

    def _array(self, name: str):
        arr = self._arrays.get(name)
        if arr is None:
            key = encode_array_name(name)
            try:
                with _quiet_zarr():
                    arr = self._group[key].with_config({"write_empty_chunks": True})
            except KeyError:
                raise MaskStoreError(f"{self.path}: no mask array for tensor {name!r} "
                                     f"({key}/zarr.json missing)") from None
            except Exception as e:  # corrupt array metadata
                raise MaskStoreError(f"{self.path}/{key}/zarr.json: unreadable mask array metadata "
                                     f"for tensor {name!r} ({type(e).__name__}: {e})") from None
            self._arrays[name] = arr
        return arr

    def array_key(self, name: str) -> str:
        return encode_array_name(name)

    def take_checksums(self, name: str) -> dict | None:
        """{"array": key, "chunks": {chunk key: [size, xxh3_64]}} of the chunks written for a tensor
        since the last call (for the job's ledger result)."""
        chunks = self._sums.pop(name, None)
        return {"array": encode_array_name(name), "chunks": chunks} if chunks else None

    def names(self) -> list[str]:
        with _quiet_zarr():
            return sorted(decode_array_name(k) for k in self._group.array_keys())

    def chunk_rows(self, name: str) -> int:
        arr = self._array(name)
        return arr.chunks[1] if len(arr.chunks) > 1 else 1

    def write(self, name: str, r0: int, masks: np.ndarray | torch.Tensor) -> None:
        """Write rows [r0, r0 + rows) of all K tasks; r0 is aligned to chunk_rows and the
        range ends on a chunk boundary or at the last row (so only whole chunks are written)."""
        arr = self._array(name)
        if isinstance(masks, torch.Tensor):
            masks = masks.detach().cpu().numpy()
        masks = np.asarray(masks, dtype=bool)
        if masks.shape[0] != arr.shape[0] or masks.shape[2:] != arr.shape[2:]:
            raise ValueError(f"mask {name!r}: got shape {masks.shape} for array {arr.shape}")
        if len(arr.shape) == 1:   # 0-d tensor: one element per task
            with _quiet_zarr():
                arr[:] = masks.reshape(arr.shape)
            self._sync_chunks(name, arr, [(k,) for k in range(arr.shape[0])])
            return
        rows, cr = masks.shape[1], arr.chunks[1]
        r1 = r0 + rows
        if r0 % cr or not (r1 % cr == 0 or r1 == arr.shape[1]) or r1 > arr.shape[1]:
            raise ValueError(f"mask {name!r}: rows [{r0}, {r1}) are not whole chunks of "
                             f"{cr} rows within {arr.shape[1]}")
        rest = (0,) * (len(arr.shape) - 2)
        encode = self._encoder(arr)
        if encode is not None:
            self._write_chunks(name, arr, encode, masks, r0, rest)
            return
        with _quiet_zarr():
            arr[:, r0:r1] = masks
        self._sync_chunks(name, arr, [(k, c, *rest) for k in range(arr.shape[0])
                                      for c in range(r0 // cr, -(-r1 // cr))])

    @staticmethod
    def _encoder(arr):
        """The chunk encoding of the arrays `create` makes (packbits, raw bytes, zstd without a
        checksum) done directly, byte for byte what zarr writes (test_writers checks), without
        zarr's event loop round trips; None for any other codec chain (zarr writes those)."""
        codecs = list(getattr(arr.metadata, "codecs", ()))
        if [type(c).__name__ for c in codecs] != ["PackBits", "BytesCodec", "ZstdCodec"] \
                or codecs[2].checksum:
            return None
        from numcodecs import PackBits as _PackBits, Zstd as _Zstd
        pack, zstd = _PackBits(), _Zstd(level=codecs[2].level)
        return lambda chunk: zstd.encode(pack.encode(chunk))

    def _write_chunks(self, name: str, arr, encode, masks: np.ndarray, r0: int, rest: tuple) -> None:
        """Encode and write whole chunks of rows [r0, r0 + rows) for every task, each file written
        beside its final name and renamed into place (as zarr does: a crash leaves the old chunk or a
        `.partial` temp that `sweep_temps` removes); hashed from the bytes in memory."""
        top = self.path / arr.path
        sums = self._sums.setdefault(name, {})
        K, rows, cr = masks.shape[0], masks.shape[1], arr.chunks[1]
        keys, made = [], set()
        for c in range(r0 // cr, -(-(r0 + rows) // cr)):
            a, b = c * cr - r0, min(rows, (c + 1) * cr - r0)
            for k in range(K):
                piece = masks[k, a:b]
                if b - a < cr:                   # the last chunk: padded with the fill value (False)
                    full = np.zeros((cr, *piece.shape[1:]), dtype=bool)
                    full[: b - a] = piece
                    piece = full
                data = bytes(encode(np.ascontiguousarray(piece)))
                key = arr.metadata.encode_chunk_key((k, c, *rest))
                path = top / key
                if path.parent not in made:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    made.add(path.parent)
                tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    if not self.defer_sync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
                sums[key] = [len(data), xxhash.xxh3_64_hexdigest(data)]
                keys.append(key)
        if not self.defer_sync:
            sync_mask_chunks(self.path, arr.path, keys, files=False)

    def _sync_chunks(self, name: str, arr, coords: list[tuple[int, ...]]) -> None:
        """Hash the chunk files just written (for the ledger) and, unless the driver makes them
        durable itself (`defer_sync`), fsync them (zarr renames them into place but never fsyncs),
        so a job is durable before the ledger records it."""
        top = self.path / arr.path
        sums = self._sums.setdefault(name, {})
        keys = []
        for c in coords:
            key = arr.metadata.encode_chunk_key(c)
            keys.append(key)
            fd = os.open(top / key, os.O_RDONLY)
            try:
                data = _read_all(fd)
                sums[key] = [len(data), xxhash.xxh3_64_hexdigest(data)]
                if not self.defer_sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        if not self.defer_sync:
            sync_mask_chunks(self.path, arr.path, keys, files=False)

    def read(self, name: str, task_index: int, r0: int | None = None,
             r1: int | None = None) -> np.ndarray:
        """Rows [r0, r1) of one task's mask; MaskStoreError names a missing or garbage chunk."""
        arr = self._array(name)
        if len(arr.shape) == 1:
            keys = [(task_index,)]
        else:
            cr, rows = arr.chunks[1], arr.shape[1]
            a, b, _ = slice(r0, r1).indices(rows)
            rest = (0,) * (len(arr.shape) - 2)
            keys = [(task_index, c, *rest) for c in range(a // cr, -(-b // cr))] if b > a else []
        top = self.path / arr.path
        for c in keys:
            key = arr.metadata.encode_chunk_key(c)
            if not (top / key).is_file():
                raise MaskStoreError(f"{top / key}: mask chunk missing (tensor {name!r}, "
                                     f"task {task_index}); run `tadrop verify`, re-run `tadrop merge` to repair")
        try:
            with _quiet_zarr():
                if len(arr.shape) == 1:
                    return np.asarray(arr[task_index])
                return np.asarray(arr[task_index, slice(r0, r1)])
        except Exception as e:  # a chunk that does not decode
            raise MaskStoreError(f"{top}: mask of tensor {name!r} (task {task_index}, rows {r0}:{r1}) "
                                 f"unreadable: {type(e).__name__}: {e}") from None

    @property
    def attrs(self) -> dict:
        with _quiet_zarr():
            return dict(self._group.attrs)

    def set_attrs(self, attrs: dict) -> None:
        """Merge `attrs` into the group attributes (task names, per-task scalars)."""
        with _quiet_zarr():
            self._group.attrs.update(attrs)
        self._sync_metadata()

    def _sync_metadata(self) -> None:
        """fsync every zarr.json and the directories holding them."""
        for meta in [self.path / "zarr.json", *self.path.glob("*/zarr.json")]:
            fd = os.open(meta, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(meta.parent)
        fsync_dir(self.path.parent)


# ---------------------------------------------------------------- Parquet stats

STATS_SCHEMA = pa.schema([
    pa.field("tensor", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("numel", pa.int64(), nullable=False),
    pa.field("q_a", pa.float64()),
    pa.field("q_b", pa.float64()),
    pa.field("drop_rate", pa.float64()),
    pa.field("kept", pa.int64()),
    pa.field("norm_before", pa.float64()),
    pa.field("norm_after", pa.float64()),
    pa.field("mask_density", pa.float64()),
])


def write_stats(rows: Iterable[dict], path: str | os.PathLike,
                task_order: Sequence[str] | None = None) -> None:
    """stats.parquet, one row per (tensor, task), sorted by tensor then by task order
    (`task_order`, else the order the rows came in); written atomically."""
    rows = list(rows)
    cols = STATS_SCHEMA.names
    for r in rows:
        extra = set(r) - set(cols)
        missing = [c for c in ("tensor", "task", "numel") if r.get(c) is None]
        if missing:
            raise ValueError(f"stats row {r!r}: {', '.join(missing)} required")
        if extra:
            raise ValueError(f"stats row for {r.get('tensor')!r}: unknown column(s) "
                             f"{sorted(extra)}; allowed: {cols}")
    order = {t: i for i, t in enumerate(task_order or ())}
    rows = sorted(rows, key=lambda r: (r["tensor"], order.get(r["task"], len(order))))
    table = pa.Table.from_pydict({c: [r.get(c) for r in rows] for c in cols},
                                 schema=STATS_SCHEMA)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
