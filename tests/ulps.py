"""Distances in units in the last place of the stored dtype, for comparing weights whose task deltas
are 1e-4 to 1e-2 of the weights: an absolute tolerance of 1e-6 hides a lambda off by 2e-5 relative,
one float32 ulp does not."""
from __future__ import annotations

import torch

_INT = {torch.float32: (torch.int32, 31), torch.bfloat16: (torch.int16, 15), torch.float16: (torch.int16, 15)}


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """The float's position on the number line as an int64 (adjacent floats differ by 1, +0 == -0)."""
    itype, bits = _INT[x.dtype]
    b = x.contiguous().view(itype).to(torch.int64)
    mag = b & ((1 << bits) - 1)
    return torch.where(b < 0, -mag, mag)


def ulp_distance(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per element, how many representable values of got's dtype lie between got and want (cast)."""
    want = want.to(got.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    return (_ordered(got) - _ordered(want)).abs()


def assert_ulps(got: torch.Tensor, want: torch.Tensor, name: str, max_ulps: int = 1) -> None:
    """got equals want rounded to got's dtype, up to `max_ulps` (streamed and whole-tensor float64 sums
    may round the last bit differently before the single final cast)."""
    d = ulp_distance(got, want)
    worst = int(d.max()) if d.numel() else 0
    if worst > max_ulps:
        i = int(d.reshape(-1).argmax())
        raise AssertionError(f"{name}: {int((d > max_ulps).sum())} of {d.numel()} elements differ by more than "
                             f"{max_ulps} ulp ({got.dtype}); worst {worst} ulp at flat index {i}: "
                             f"got {got.reshape(-1)[i].item()!r}, want {want.to(got.dtype).reshape(-1)[i].item()!r}")


def delta_rel_error(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> float:
    """|| (got - base) - (want - base) || / || want - base ||, in float64: the error on the delta's scale."""
    g, w, b = got.double(), want.to(got.dtype).double(), base.double()
    scale = float((w - b).norm())
    return float((g - w).norm()) / scale if scale else float((g - w).norm())
