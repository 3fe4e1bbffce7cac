"""The optional native kernels (tadrop/_native.c), loaded through ctypes.

Why a native kernel at all: EMR's elect/mask/unify is ~15 elementwise torch operations per block,
each a pass through memory; the C kernel reads a block once.  It is built at install time
(setup.py) and optional: without it (no compiler, another platform, or TADROP_NATIVE=0) the
torch path in methods.py runs and gives the same bits, which the tests check on both paths.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

import numpy as np
import torch

ENV = "TADROP_NATIVE"
_lib = None
_tried = False


SUM_BLOCK = 4096   # the block of every float64 sum (_buffers.SUM_BLOCK)
ABI = 4          # tadrop_native_abi() of a library this code can call; bump with any change


def _candidates():
    """Where a built library may lie: beside this file, then in the installed distribution (a Ray
    job runs this code from its uploaded working_dir copy, which has sources but no build output)."""
    here = Path(__file__).resolve().parent
    yield here
    try:
        import importlib.metadata as md
        import json
        from urllib.parse import unquote, urlparse
        dist = md.distribution("tadrop-merge")
        url = json.loads(dist.read_text("direct_url.json") or "{}")
        if url.get("dir_info", {}).get("editable") and url.get("url", "").startswith("file://"):
            yield Path(unquote(urlparse(url["url"]).path)) / "tadrop"
        for f in dist.files or ():
            if f.name.startswith("_native") and f.parent.name == "tadrop":
                yield Path(dist.locate_file(f)).resolve().parent
    except Exception:  # noqa: BLE001 (no distribution metadata: only the copy beside this file)
        return


def _load():
    seen = set()
    for d in _candidates():
        if d in seen:
            continue
        seen.add(d)
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = d / f"_native{suffix}"
            if not path.exists():
                continue
            lib = ctypes.CDLL(str(path))
            try:
                if lib.tadrop_native_abi() != ABI:
                    continue
            except AttributeError:
                continue
            i64, p = ctypes.c_int64, ctypes.c_void_p
            lib.tadrop_emr_block.argtypes = [i64, i64, p, i64, p, i64, p, i64, p, p, i64, i64, i64, p, p,
                                             p, p, p]
            lib.tadrop_emr_block.restype = ctypes.c_int
            lib.tadrop_ties_block.argtypes = [i64, i64, p, i64, p, ctypes.c_double, p]
            lib.tadrop_ties_block.restype = None
            lib.tadrop_mask_counts.argtypes = [i64, i64, p, i64, p, p]
            lib.tadrop_mask_counts.restype = None
            lib.tadrop_shrink_scale.argtypes = [i64, p, ctypes.c_float, ctypes.c_int, ctypes.c_float,
                                                ctypes.c_int]
            lib.tadrop_shrink_scale.restype = None
            lib.tadrop_block_sums.argtypes = [i64, i64, p, i64, ctypes.c_int, ctypes.c_double, p, p]
            lib.tadrop_block_sums.restype = None
            lib.tadrop_abs_hist_hi.argtypes = [p, i64, p]
            lib.tadrop_abs_hist_hi.restype = ctypes.c_int
            lib.tadrop_abs_hist_lo.argtypes = [p, i64, p, i64, p]
            lib.tadrop_abs_hist_lo.restype = ctypes.c_int
            return lib
    return None


def lib():
    """The loaded library, or None when it is not built or TADROP_NATIVE=0 turns it off."""
    global _lib, _tried
    if os.environ.get(ENV, "1").strip() in ("0", "off", "false", "no"):
        return None
    if not _tried:
        try:
            _lib = _load()
        except OSError:
            _lib = None
        _tried = True
    return _lib


def available() -> bool:
    return lib() is not None


def where() -> str | None:
    """Path of the loaded library (run.json records it), None when the torch path runs."""
    L = lib()
    return None if L is None else L._name


def _rows_ok(x: torch.Tensor, dtype) -> bool:
    return (x.device.type == "cpu" and x.dtype == dtype and x.dim() == 2
            and (x.shape[1] <= 1 or x.stride(1) == 1))


def emr_block(t2: torch.Tensor, keep: torch.Tensor | None, masks: torch.Tensor,
              uni: torch.Tensor, mu: torch.Tensor, head: int = 0, nb: int = 0,
              pre: np.ndarray | None = None, counts: bool = False):
    """EMR elect/mask/unify of one block by the C kernel (see _native.c); None when the kernel
    is not there or the tensors are not CPU rows it can take (the caller runs the torch path).
    t2 float32 [K, m], keep bool [K, m] or None, masks bool [K, m], uni float32 [m] contiguous,
    mu float32 [K, m] (M_k * |tau_uni|).  Returns a dict:
      - with nb > 0, "sums": (sums of |t2|, sums of mu), numpy float64 [K, nb] each, over the nb
        SUM_BLOCK-element blocks from element `head` on (mu is then written only outside them);
      - with `counts`, "kept" (int64 [K]) and "hist" (int64 [K + 1]): native.mask_counts of masks.
    pre: float32 [3, K] (lam, scale, weight per task) applies t2 = ((|t2| <= lam ? +0 : t2) * scale)
    * weight in place first (a sparsifier's elementwise apply and the task weight)."""
    L = lib()
    if L is None or not (_rows_ok(t2, torch.float32) and _rows_ok(masks, torch.bool)
                         and _rows_ok(mu, torch.float32) and uni.is_contiguous()
                         and uni.dtype == torch.float32 and uni.device.type == "cpu"
                         and (keep is None or _rows_ok(keep, torch.bool))):
        return None
    K, m = t2.shape
    if nb < 0 or head < 0 or head + nb * SUM_BLOCK > m:
        raise ValueError(f"emr_block: {nb} blocks from {head} do not fit in {m} elements")
    if pre is not None:
        pre = np.ascontiguousarray(pre, dtype=np.float32)
        if pre.shape != (3, K):
            raise ValueError(f"emr_block: pre of shape {pre.shape}, expected (3, {K})")
    nb = nb if K else 0
    abs_s, uni_s = np.empty((K, nb), dtype=np.float64), np.empty((K, nb), dtype=np.float64)
    kept, hist = (np.zeros(K, dtype=np.int64), np.zeros(K + 1, dtype=np.int64)) if counts else (None, None)
    err = L.tadrop_emr_block(K, m, t2.data_ptr(), t2.stride(0),
                             None if keep is None else keep.data_ptr(),
                             0 if keep is None else keep.stride(0), masks.data_ptr(), masks.stride(0),
                             uni.data_ptr(), mu.data_ptr(), mu.stride(0), head, nb,
                             abs_s.ctypes.data, uni_s.ctypes.data,
                             None if pre is None else pre.ctypes.data,
                             None if kept is None else kept.ctypes.data,
                             None if hist is None else hist.ctypes.data)
    if err == 2:
        raise MemoryError("tadrop_emr_block: out of memory")
    out = {}
    if nb:
        out["sums"] = (abs_s, uni_s)
    if counts:
        out["kept"], out["hist"] = kept, hist
    return out


def ties_block(t2: torch.Tensor, base: torch.Tensor, lam: float, out: torch.Tensor) -> bool:
    """TIES merged tensor of one block, theta_0 + lam * (elect + disjoint mean), by the C kernel
    (see _native.c); False when it cannot take these tensors (the caller runs the torch path).
    t2 float32 [K, m] rows, base and out float32 [m] contiguous."""
    L = lib()
    if L is None or not (_rows_ok(t2, torch.float32) and t2.shape[0] > 0
                         and all(v.dtype == torch.float32 and v.device.type == "cpu"
                                 and v.is_contiguous() and v.numel() == t2.shape[1]
                                 for v in (base, out))):
        return False
    L.tadrop_ties_block(t2.shape[0], t2.shape[1], t2.data_ptr(), t2.stride(0), base.data_ptr(),
                        float(lam), out.data_ptr())
    return True


def shrink_scale(x: torch.Tensor, lambd: float | None, scale: float | None) -> bool:
    """In place on a contiguous float32 CPU tensor: zero |x| <= lambd (hardshrink's +0.0; None:
    no shrink), then multiply by float32(scale) (None: no rescale), in one C pass; False when the
    kernel cannot take x (the caller runs the torch ops)."""
    L = lib()
    if L is None or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        return False
    L.tadrop_shrink_scale(x.numel(), x.data_ptr(), 0.0 if lambd is None else float(lambd),
                          lambd is not None, 1.0 if scale is None else float(scale), scale is not None)
    return True


HI_BINS = 1 << 15       # buckets of |x|: the top 16 bits of its float32 pattern, sign cleared


def abs_hist_hi(x: torch.Tensor) -> tuple[np.ndarray, bool] | None:
    """(int64 [HI_BINS] histogram of the top 16 bits of |x|, whether x held NaN/Inf) for a
    contiguous float32 CPU tensor, by the C kernel; None when it cannot run."""
    L = lib()
    if L is None or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        return None
    h = np.zeros(HI_BINS, dtype=np.int64)
    err = L.tadrop_abs_hist_hi(x.data_ptr(), x.numel(), h.ctypes.data)
    if err == 2:
        raise MemoryError("tadrop_abs_hist_hi: out of memory")
    return h, bool(err)


def abs_hist_lo(x: torch.Tensor, buckets: list[int]) -> np.ndarray | None:
    """int64 [len(buckets), 65536]: per bucket, the histogram of the low 16 bits of the |x| in it
    (one pass over x per 16 buckets), by the C kernel; None when it cannot run."""
    L = lib()
    if L is None or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        return None
    out = np.zeros((len(buckets), 1 << 16), dtype=np.int64)
    for i in range(0, len(buckets), 16):
        part = buckets[i:i + 16]
        slot = np.full(HI_BINS, 0xFF, dtype=np.uint8)
        slot[part] = np.arange(len(part), dtype=np.uint8)
        L.tadrop_abs_hist_lo(x.data_ptr(), x.numel(), slot.ctypes.data, len(part),
                             out[i:i + len(part)].ctypes.data)
    return out


def mask_counts(masks: np.ndarray):
    """(kept per row, hist) of a contiguous [K, n] bool/uint8 array of 0/1 by the C kernel: kept[k]
    the true entries of row k, hist[c] the entries true in exactly c rows; None without the
    kernel."""
    L = lib()
    if L is None or masks.ndim != 2 or not masks.flags.c_contiguous or masks.itemsize != 1:
        return None
    K, n = masks.shape
    kept, hist = np.zeros(K, dtype=np.int64), np.zeros(K + 1, dtype=np.int64)
    L.tadrop_mask_counts(K, n, masks.ctypes.data, n, kept.ctypes.data, hist.ctypes.data)
    return kept, hist


_OPS = {"sum": 0, "abs": 1, "square": 2}


def block_sums(x: torch.Tensor, nb: int, block: int, op: str, lam: float | None = None):
    """Float64 sums of f(x) over the first nb `block`-element blocks of each row of x (float32
    [K, >= nb * block], CPU, unit inner stride), by the C kernel in the order of
    `_buffers._block_sums` (pairwise halving): numpy float64 [K, nb], or None when the kernel
    cannot take it.  op 'sum', 'abs', 'square'; with op 'square' and `lam`, a second [K, nb] array
    of the sums of the squares v > lam is returned too (a pair)."""
    L = lib()
    if L is None or op not in _OPS or block != SUM_BLOCK or not _rows_ok(x, torch.float32):
        return None
    K = x.shape[0]
    out = np.empty((K, nb), dtype=np.float64)
    pair = op == "square" and lam is not None
    out2 = np.empty((K, nb), dtype=np.float64) if pair else None
    L.tadrop_block_sums(K, nb, x.data_ptr(), x.stride(0) if K > 1 else 0, 3 if pair else _OPS[op],
                        float(lam) if pair else 0.0, out.ctypes.data,
                        out2.ctypes.data if pair else None)
    return (out, out2) if pair else out
