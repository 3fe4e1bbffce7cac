"""Merge methods on one chunk with all K task vectors present (SPEC section 2).

`taus` is float32 [K, *chunk], already through Phi and multiplied by the
per-model weights; `base` is float32 [*chunk].  Results are float32 (the caller
casts once).  Sums over tasks are float64 (added in task order), so every
result depends on the element alone: chunking never changes a bit.  `out=`
arguments let the engine reuse buffers; temporaries come from the scratch pool.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from . import _bools as B
from . import native
from ._buffers import SUM_BLOCK, Sum64, Sum64Rows, f64_inplace, scratch, sum_tasks64


def _flat_tasks(taus: torch.Tensor) -> torch.Tensor:
    return taus.reshape(taus.shape[0], -1)


def _out(out, shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device) if out is None else out


def _sum64(t2: torch.Tensor) -> torch.Tensor:
    return sum_tasks64(t2, scratch("m.sum64", t2.shape[1], torch.float64, t2.device))


def _base_plus(base, delta64: torch.Tensor, lam: float, out) -> torch.Tensor:
    """theta_0 + lam * delta, computed in float64 (delta64 is consumed) and rounded once to float32."""
    f64_inplace(delta64.mul_(lam), base.reshape(-1), "add")
    out = _out(out, base.shape, torch.float32, base.device)
    out.reshape(-1).copy_(delta64)
    return out


def task_arithmetic(base, taus, lam, *, out=None) -> torch.Tensor:
    """theta_0 + lam * sum_k tau'_k: the sum and the scaled add in float64, rounded once."""
    return _base_plus(base, _sum64(_flat_tasks(taus)), lam, out)


def task_sum(taus, *, out=None) -> torch.Tensor:
    """sum_k tau'_k (float64 sum, float32 result): TALL's tau_MTL for an inner task arithmetic."""
    S = _sum64(_flat_tasks(taus))
    out = _out(out, taus.shape[1:], torch.float32, taus.device)
    out.reshape(-1).copy_(S)
    return out


def _sign32(S: torch.Tensor, name: str, strict: bool) -> torch.Tensor:
    """float32 +-1: +1 where S > 0 (strict) or S >= 0, else -1."""
    b = B.compare(S, "gt" if strict else "ge", 0, scratch("m.bool", S.numel(), torch.bool, S.device))
    return B.as_float(b, scratch(name, S.numel(), torch.float32, S.device)).mul_(2).sub_(1)


def _ties_mean64(t2: torch.Tensor) -> torch.Tensor:
    """TIES elect + disjoint mean, float64 [m] (scratch)."""
    K, m = t2.shape
    s = _sign32(_sum64(t2), "m.sign", strict=False)        # a zero sum elects +1
    agree = torch.mul(t2, s, out=scratch("m.prod", K * m, torch.float32, t2.device).view(K, m))
    agree.relu_()                                          # |tau'_k| where sign(tau'_k) = s, else 0
    num = sum_tasks64(agree, scratch("m.num64", m, torch.float64, t2.device))
    cnt = torch.sum(agree.sign_(), 0, out=scratch("m.cnt", m, torch.float32, t2.device))
    f64_inplace(num, cnt.clamp_(min=1), "div")              # zero where no task agrees
    return f64_inplace(num, s, "mul")


def ties_vector(taus, *, out=None) -> torch.Tensor:
    """TIES merged vector (no lambda, no base): sign s = sign(sum_k tau'_k) with 0 -> +1,
    then the mean over the tasks whose tau'_k is nonzero with sign s (0 where none)."""
    v = _ties_mean64(_flat_tasks(taus))
    out = _out(out, taus.shape[1:], torch.float32, taus.device)
    out.reshape(-1).copy_(v)
    return out


def ties(base, taus, lam, *, out=None) -> torch.Tensor:
    """theta_0 + lam * ties_vector (in float64, rounded once); one fused pass in the C kernel
    where it is built (the same bits)."""
    o = _out(out, base.shape, torch.float32, base.device)
    if native.ties_block(_flat_tasks(taus), base.reshape(-1), lam, o.view(-1)):
        return o
    return _base_plus(base, _ties_mean64(_flat_tasks(taus)), lam, o)


def _official_trimmed(taus, keep) -> torch.Tensor:
    """float32 [K, m] scratch: the trimmed task vectors tau'_k * keep_k."""
    K, m = taus.shape[0], taus[0].numel()
    t2 = scratch("m.trim", K * m, torch.float32, taus.device).view(K, m)
    return torch.mul(_flat_tasks(taus), keep.reshape(K, m), out=t2)


def _official_sign(S: torch.Tensor, majority: float) -> torch.Tensor:
    """float32 sign(S) with zeros set to `majority` (official `resolve_zero_signs`, 'majority')."""
    s = scratch("m.sign", S.numel(), torch.float32, S.device).copy_(torch.sign(S))
    if majority != 0:
        s.masked_fill_(s == 0, float(majority))
    return s


def ties_official_sign_sum(taus, keep) -> int:
    """sum over the chunk's entries of sign(sum_k tau'_k keep_k): this chunk's share of the
    model-wide majority sign that `ties_official_vector` gives entries whose sum is zero."""
    S = _sum64(_official_trimmed(taus, keep))
    b = scratch("m.bool", S.numel(), torch.bool, S.device)
    return B.count(B.compare(S, "gt", 0, b)) - B.count(B.compare(S, "lt", 0, b))


def ties_official_vector(taus, keep, majority: float, *, out=None) -> torch.Tensor:
    """TIES inside TALL masks / consensus as the official TALL code builds it: `ties_merging(
    tv_flat_checks, reset_thresh=20, merge_func="dis-sum")` (nik-dim/tall_masks
    src/eval/aggregation.py:109 and :129, src/utils/ties_utils.py:49-59):
      trim     keep_k = the task's model-wide top-k mask (utils.py:251-282, computed by the caller);
      elect    s = sign(sum_k tau'_k keep_k); s = 0 takes the model-wide majority sign(sum of s)
               (ties_utils.py:7-20; `majority` is that sign, from a statistics pass);
      disjoint SUM (not mean): sum_k of tau'_k keep_k where it is > 0 if s > 0, else < 0
               (ties_utils.py:28-39; s = 0 with a zero majority selects the negative entries).
    Sums are float64 (the official sums in float32), the result float32."""
    t2 = _official_trimmed(taus, keep)
    K, m = t2.shape
    s = _official_sign(_sum64(t2), majority)
    sel = B.compare(t2, "lt", 0, scratch("m.bool2", K * m, torch.bool, t2.device).view(K, m))
    pos = B.compare(t2, "gt", 0, scratch("m.bool3", K * m, torch.bool, t2.device).view(K, m))
    up = B.compare(s, "gt", 0, scratch("m.bool", m, torch.bool, t2.device))
    B.select(up, pos, sel)                                  # sel = pos where s > 0, else t2 < 0
    t2.mul_(B.as_float(sel, scratch("m.prod", K * m, torch.float32, t2.device).view(K, m)))
    total = sum_tasks64(t2, scratch("m.num64", m, torch.float64, t2.device))
    out = _out(out, taus.shape[1:], torch.float32, taus.device)
    out.reshape(-1).copy_(total)
    return out


@dataclass
class EMRChunk:
    tau_uni: torch.Tensor                  # float32 [*chunk]
    masks: torch.Tensor                    # bool [K, *chunk]
    abs_tau_sum: torch.Tensor | None       # float64 [K]: sum |tau'_k| over the chunk
    abs_uni_sum: torch.Tensor | None       # float64 [K]: sum |M_k tau_uni| over the chunk
    counts: tuple[list[int], list[int]] | None = None   # with counts=True: _bools.mask_counts(masks)


@dataclass(frozen=True)
class EMRPartials:
    """One tensor's contribution to the EMR rescalers (per task sums, float64)."""
    abs_tau_sum: tuple[float, ...]
    abs_uni_sum: tuple[float, ...]
    numel: int

    def to_dict(self) -> dict:
        return {"abs_tau_sum": list(self.abs_tau_sum), "abs_uni_sum": list(self.abs_uni_sum),
                "numel": int(self.numel)}

    @classmethod
    def from_dict(cls, d: dict) -> "EMRPartials":
        return cls(tuple(map(float, d["abs_tau_sum"])), tuple(map(float, d["abs_uni_sum"])),
                   int(d["numel"]))


class EMRSums:
    """Running rescaler sums of one tensor, fed chunk by chunk in flat order (Sum64Rows, one
    stream per task: the totals do not depend on the chunking)."""

    def __init__(self, K: int, device):
        self.K = K
        self.abs_tau = Sum64Rows(K, device, "abs")
        self.abs_uni = Sum64Rows(K, device, "sum")   # fed M_k |tau_uni|, exact in float32

    def partials(self, numel: int) -> EMRPartials:
        return EMRPartials(tuple(self.abs_tau.value(k) for k in range(self.K)),
                           tuple(self.abs_uni.value(k) for k in range(self.K)), numel)


def emr(taus, *, out_uni=None, out_masks=None, sums: EMRSums | None = None,
        keep: torch.Tensor | None = None, pre=None, counts: bool = False) -> EMRChunk:
    """EMR-Merging elect/mask/unify (official harveyhuang18/EMR_Merging `emr_merge`):
    flag = +1 where sum_k tau'_k > 0 else -1; M_k = tau'_k * flag > 0 (strict);
    tau_uni = flag * max_k |M_k tau'_k|.  The rescaler sums go into `sums` when
    given (streaming), else they are returned for this chunk.

    keep (bool [K, *chunk], EMR + TADrop 'mask' integration, SPEC 2): taus are the
    raw weighted tau_k, and M_k = (tau_k * flag > 0) AND keep_k enters tau_uni and
    the rescaler sums; flag still comes from the raw sum.

    pre (float32 [3, K]: lam, scale, weight per task, from `Sparsifier.elementwise`): taus are first
    replaced in place by ((|tau| <= lam ? +0 : tau) * scale) * weight, Phi's apply and the task
    weight, in the same pass as the combine.  counts: also _bools.mask_counts of the masks."""
    K = taus.shape[0]
    t2 = _flat_tasks(taus)
    m = t2.shape[1]
    masks = _out(out_masks, taus.shape, torch.bool, taus.device)
    tau_uni = _out(out_uni, taus.shape[1:], torch.float32, taus.device)
    acc = sums if sums is not None else EMRSums(K, t2.device)
    mu = scratch("m.masked", K * m, torch.float32, t2.device).view(K, m)
    head = acc.abs_tau.head(m)              # both streams are fed in lockstep: the same head
    nb = (m - head) // SUM_BLOCK
    fused = native.emr_block(t2, None if keep is None else keep.reshape(K, m), masks.view(K, m),
                             tau_uni.view(-1), mu, head, nb, pre=pre, counts=counts)
    got = None
    if fused is not None:      # the nb whole blocks' sums came with it (mu holds the rest only)
        tail = head + nb * SUM_BLOCK if "sums" in fused else head
        acc.abs_tau.add(t2[:, :head])
        acc.abs_uni.add(mu[:, :head])
        if "sums" in fused:
            acc.abs_tau.extend(fused["sums"][0])
            acc.abs_uni.extend(fused["sums"][1])
        acc.abs_tau.add(t2[:, tail:])
        acc.abs_uni.add(mu[:, tail:])
        if counts:
            got = ([int(v) for v in fused["kept"]], [int(v) for v in fused["hist"]])
    else:
        if pre is not None:
            apply_elementwise(t2, pre)
        _emr_torch(t2, keep, masks, tau_uni, acc)
        if counts:
            got = B.mask_counts(masks.view(K, m))
    if sums is not None:
        return EMRChunk(tau_uni, masks, None, None, got)
    p = acc.partials(m)
    return EMRChunk(tau_uni, masks, torch.tensor(p.abs_tau_sum, dtype=torch.float64),
                    torch.tensor(p.abs_uni_sum, dtype=torch.float64), got)


def apply_elementwise(t2: torch.Tensor, pre) -> torch.Tensor:
    """t2[k] = ((|t2[k]| <= lam_k ? +0 : t2[k]) * scale_k) * weight_k in place, float32 ops in
    that order (the torch twin of the C kernel's `pre`; pre float32 [3, K])."""
    for k in range(t2.shape[0]):
        lam, sc, w = (float(v) for v in (pre[0][k], pre[1][k], pre[2][k]))
        row = t2[k]
        if lam >= 0:
            torch.ops.aten.hardshrink.out(row, lam, out=row) if lam < math.inf else row.zero_()
        if sc != 1.0:
            row.mul_(sc)
        if w != 1.0:
            row.mul_(w)
    return t2


def _emr_torch(t2, keep, masks, tau_uni, acc: EMRSums) -> None:
    """methods.emr in torch operations (the C kernel's twin, bit for bit; off the CPU, or
    without the kernel)."""
    K, m = t2.shape
    flag = _sign32(_sum64(t2), "m.sign", strict=True)      # a zero sum gives -1, as official
    prod = torch.mul(t2, flag, out=scratch("m.prod", K * m, torch.float32, t2.device).view(K, m))
    m2 = B.compare(prod, "gt", 0, masks.view(K, m))        # prod = |tau'_k| where M_k, < 0 elsewhere
    if keep is not None:
        B.and_(m2, keep.reshape(K, m))
    # the masks as 0.0/1.0 (a float times bool product takes a slow mixed-dtype path)
    masked = B.as_float(m2, scratch("m.masked", K * m, torch.float32, t2.device).view(K, m))
    if keep is not None:
        prod.mul_(masked)                                  # |tau_k| where M_k, <= 0 elsewhere
    abs_uni = scratch("m.absuni", m, torch.float32, t2.device)
    if K:
        abs_uni.copy_(prod[0])
    else:
        abs_uni.zero_()
    for k in range(1, K):
        torch.maximum(abs_uni, prod[k], out=abs_uni)
    # max_k |M_k tau'_k| = max(0, max_k prod_k); the + 0.0 turns -0.0 into +0.0: maximum's
    # choice between zeros differs between its vector and scalar paths (chunking would show)
    abs_uni.clamp_(min=0).add_(0.0)
    torch.mul(abs_uni, flag, out=tau_uni.view(-1))
    acc.abs_tau.add(t2)                                    # sum |tau'_k|
    # sum M_k |tau_uni|: the product by 0/1 is exact in float32, so this equals the float64 product
    # summed before, bit for bit, one float64 pass cheaper
    acc.abs_uni.add(masked.mul_(abs_uni))


def emr_rescalers(parts: Iterable[EMRPartials], mode: str = "official",
                  task_names: Sequence[str] | None = None) -> tuple[list[float], list[str]]:
    """lambda_k per task over the whole model.

    official: sum_tensors mean|tau'_k| / sum_tensors mean|M_k tau_uni| (as the
    official code: a sum of per-tensor means); global: sum|.| / sum|.| over the
    flattened model.  Sums are exactly rounded (math.fsum), so the order of the
    parts does not matter.  A zero denominator gives 0 and a warning.
    """
    if mode not in ("official", "global"):
        raise ValueError(f"EMR rescaler {mode!r}: expected official|global")
    parts = list(parts)
    K = len(parts[0].abs_tau_sum) if parts else len(task_names or ())
    names = list(task_names) if task_names is not None else [str(k) for k in range(K)]
    lambdas, warnings = [], []
    for k in range(K):
        if mode == "official":
            num = math.fsum(p.abs_tau_sum[k] / p.numel for p in parts if p.numel)
            den = math.fsum(p.abs_uni_sum[k] / p.numel for p in parts if p.numel)
        else:
            num = math.fsum(p.abs_tau_sum[k] for p in parts)
            den = math.fsum(p.abs_uni_sum[k] for p in parts)
        if den == 0.0:
            lambdas.append(0.0)
            warnings.append(f"EMR task {names[k]!r}: the unified vector is zero on its mask "
                            "(rescaler denominator 0); lambda set to 0")
        else:
            lambdas.append(num / den)
    return lambdas, warnings


def emr_task_model(base, tau_uni, mask_k, lambda_k) -> torch.Tensor:
    """theta_0 + lambda_k * M_k * tau_uni (base kept bit-exact where the mask is off)."""
    return torch.where(mask_k, base + tau_uni * lambda_k, base)


def tall_masks(taus, tau_mtl, lambdas: Sequence[float], *, out=None) -> torch.Tensor:
    """TALL masks (Wang et al. 2024, official nik-dim/tall_masks):
    m_k = |tau'_k| > lambda_k * |tau_MTL - tau'_k| (strict), bool [K, *chunk]."""
    K = taus.shape[0]
    t2, mtl = _flat_tasks(taus), tau_mtl.reshape(-1)
    m = mtl.numel()
    out = _out(out, taus.shape, torch.bool, taus.device)
    o2 = out.view(K, m)
    diff = scratch("m.diff", m, torch.float32, mtl.device)
    mag = scratch("m.mag", m, torch.float32, mtl.device)
    for k in range(K):
        torch.sub(mtl, t2[k], out=diff).abs_().mul_(float(lambdas[k]))
        B.compare(torch.abs(t2[k], out=mag), "gt", diff, o2[k])
    return out


def tall_task_model(base, tau_mtl, mask_k) -> torch.Tensor:
    """theta_0 + m_k * tau_MTL."""
    return torch.where(mask_k, base + tau_mtl, base)


def consensus_mask(masks, k_min: int) -> torch.Tensor:
    """Entries at least k_min tasks' TALL masks keep."""
    return masks.sum(0) >= k_min


def consensus(base, tau_mtl, masks, k_min: int, alpha: float) -> torch.Tensor:
    """theta_0 + alpha * [sum_k m_k >= k_min] * tau_MTL (TALL paper's consensus merging)."""
    return torch.where(consensus_mask(masks, k_min), base + tau_mtl * alpha, base)
