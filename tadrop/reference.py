"""Whole-state-dict merge in memory: the readable reference (SPEC sections 1-3).

Written to be read next to shared/SPEC.md, not to be fast: every tensor is
handled whole, order statistics come from numpy.quantile and torch.sort, and
the merge methods are spelled out in plain torch.  Only DARE's random stream
(whose definition lives in sparsify.DARE) is shared with the engine.  The
pipeline's end-to-end tests compare against this: masks bit for bit, values up
to float32 rounding (the float64 norm sums may round differently).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .methods import EMRPartials, emr_rescalers
from .quantile import NonFiniteError
from .sparsify import DARE, ChunkKey, Identity, TADrop, TopK
from .spec import MergeSpec

StateDict = Mapping[str, torch.Tensor]


@dataclass
class MergeResult:
    """merged: the merged model (all base tensors, output dtype) or None;
    unified: tau_uni (EMR) / tau_MTL (TALL) per merged tensor, or None;
    masks: name -> bool [K, ...]; scalars: 'emr_lambdas' / 'tall_lambdas';
    stats: one row per (tensor, task), the SPEC section 4 columns."""
    spec: MergeSpec
    merged: dict[str, torch.Tensor] | None
    unified: dict[str, torch.Tensor] | None
    masks: dict[str, torch.Tensor]
    scalars: dict[str, list[float]]
    stats: list[dict]
    warnings: list[str] = field(default_factory=list)
    merged_names: list[str] = field(default_factory=list)


# ---- Phi, whole tensor -------------------------------------------------------------

def _np_quantile(abs_values: torch.Tensor, p: float) -> float:
    return float(np.quantile(abs_values.numpy(), p))


def _tadrop_rate(abs_values: torch.Tensor, phi: TADrop):
    """d = Q_a / (Q_b + eps) clamped to [0, 1], in float64 from float32 quantiles."""
    qa, qb = _np_quantile(abs_values, phi.a), _np_quantile(abs_values, phi.b)
    return min(max(qa / (qb + phi.eps), 0.0), 1.0), qa, qb


def _keep_at_least(tau: torch.Tensor, t: float) -> torch.Tensor:
    return torch.where(tau.abs() >= t, tau, torch.zeros((), dtype=tau.dtype))


def _tadrop(tau, phi: TADrop, d_global):
    """(Phi(tau), stats row, keep mask, rescale factor)."""
    n = tau.numel()
    a = tau.abs().reshape(-1)
    if phi.scope == "global_threshold":         # (model-wide d, model-wide threshold t)
        d, t = min(max(float(d_global[0]), 0.0), 1.0), float(d_global[1])
        qa = qb = None
        keep = tau.abs() >= t
        kept = int(keep.sum())
        tau_hat = torch.where(keep, tau, torch.zeros((), dtype=tau.dtype))
        rate = (n - kept) / n if n else 0.0     # the tensor's realised fraction dropped
    else:
        if d_global is None:
            d, qa, qb = _tadrop_rate(a, phi) if n else (0.0, None, None)
        else:
            d, qa, qb = min(max(float(d_global), 0.0), 1.0), None, None
        rate = d
        k = math.floor(d * n)                       # float64: n may exceed 2^24
        if k <= 0:                                  # drop nothing
            tau_hat, kept = tau.clone(), n
            keep = torch.ones_like(tau, dtype=torch.bool)
        elif k >= n:                                # d = 1: drop everything
            tau_hat, kept = torch.zeros_like(tau), 0
            keep = torch.zeros_like(tau, dtype=torch.bool)
        else:                                       # t = (k+1)-th smallest |tau|, ties kept
            t = float(torch.sort(a).values[k])
            tau_hat = _keep_at_least(tau, t)
            keep = tau.abs() >= t
            kept = int(keep.sum())
    norm = math.sqrt(float((tau.double() ** 2).sum()))
    norm_hat = math.sqrt(float((tau_hat.double() ** 2).sum()))
    if phi.rescale == "norm":
        scale = norm / (norm_hat + phi.eps)
    elif phi.rescale == "inverse_keep" and d < 1.0:
        scale = 1.0 / (1.0 - d)
    else:
        scale = 1.0
    out = tau_hat * scale if scale != 1.0 else tau_hat
    return out, dict(q_a=qa, q_b=qb, drop_rate=rate, kept=kept, norm_before=norm,
                     norm_after=scale * norm_hat), keep, scale


def _topk(tau, phi: TopK, t_global):
    """(Phi(tau), stats row, keep mask, rescale factor 1)."""
    n = tau.numel()
    if n == 0:
        return tau.clone(), dict(drop_rate=0.0, kept=0), torch.ones_like(tau, dtype=torch.bool), 1.0
    if t_global is None:
        keep = max(1, math.floor(phi.density * n))          # the `keep` largest |tau|
        t = float(torch.sort(tau.abs().reshape(-1)).values[n - keep])
    else:
        t = float(t_global)
    out = _keep_at_least(tau, t) if t > 0 else tau.clone()
    keep = tau.abs() >= t
    kept = int(keep.sum())
    return out, dict(drop_rate=(n - kept) / n, kept=kept), keep, 1.0


def _phi(spec: MergeSpec, name: str, k: int, tau: torch.Tensor, global_value):
    """(Phi(tau), stats row)."""
    return _phi_parts(spec, name, k, tau, global_value)[:2]


def _phi_parts(spec: MergeSpec, name: str, k: int, tau: torch.Tensor, global_value):
    """(Phi(tau), stats row[, keep mask, rescale factor] for TADrop and top-k)."""
    phi = spec.phi(k)
    if isinstance(phi, TADrop):
        return _tadrop(tau, phi, global_value)
    if isinstance(phi, TopK):
        return _topk(tau, phi, global_value)
    if isinstance(phi, DARE):
        keep = phi.keep_mask(ChunkKey(spec.seed, name, spec.task_names[k], 0), tau.numel())
        return (tau.reshape(-1) * keep / (1.0 - phi.p)).reshape(tau.shape), dict(drop_rate=phi.p)
    if isinstance(phi, Identity):
        return tau.clone(), {}
    raise TypeError(f"unknown sparsifier {phi!r}")


def _model_scope_values(spec: MergeSpec, taus_by_name: dict) -> list[float]:
    """Per task, over all merged tensors together: TADrop's d or TopK's threshold."""
    values = []
    for k in range(spec.K):
        phi = spec.phi(k)
        a = torch.cat([taus[k].abs().reshape(-1) for taus in taus_by_name.values()])
        if isinstance(phi, TADrop) and phi.scope == "global_threshold":
            # one threshold per task over all its merged entries: (k+1)-th smallest, k = floor(d N)
            d, N = _tadrop_rate(a, phi)[0], a.numel()
            k_drop = math.floor(d * N)
            t = 0.0 if k_drop <= 0 else math.inf if k_drop >= N else float(torch.sort(a).values[k_drop])
            values.append((d, t))
        elif isinstance(phi, TADrop):
            values.append(_tadrop_rate(a, phi)[0])
        else:
            N = a.numel()
            values.append(float(torch.sort(a).values[N - max(1, math.floor(phi.density * N))]))
    return values


# ---- merge methods, whole tensor ---------------------------------------------------

def _sum64(taus):
    """sum_k tau'_k in float64, added in task order."""
    total = taus[0].double()
    for k in range(1, taus.shape[0]):
        total = total + taus[k].double()
    return total


def _ties_vector64(taus):
    s = torch.where(_sum64(taus) >= 0, 1.0, -1.0).double()     # zero sum elects +1
    agree = (taus.double() * s > 0)                             # nonzero and sign s
    total = (taus.double() * agree).sum(0)
    count = agree.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros((), dtype=torch.float64))


def _tau_mtl(taus, inner, official=None):
    if inner == "ties_official":
        return _ties_official64(taus, *official).float()
    return (_ties_vector64(taus) if inner == "ties" else _sum64(taus)).float()


# ---- TIES inside TALL / consensus as the official TALL code builds it -------------------
# nik-dim/tall_masks src/eval/aggregation.py:109 and :129: ties_merging(tv, reset_thresh=20,
# merge_func="dis-sum"); src/utils/ties_utils.py:7-59 and src/utils/utils.py:251-282.

def _official_thresholds(taus_by_name: dict, K: int) -> list[float]:
    """Per task over its whole flattened vector: the k-th smallest |tau| (1-based), k = n - int(n * 0.2)
    (topk_values_mask with K=20: keep |tau| >= it)."""
    out = []
    for k in range(K):
        a = torch.cat([taus[k].abs().reshape(-1) for taus in taus_by_name.values()])
        n = a.numel()
        out.append(float(torch.sort(a).values[n - math.floor(n * 0.2) - 1]))
    return out


def _official_majority(trimmed_by_name: dict) -> float:
    """sign of the sum over every entry of the model of sign(sum_k trimmed_k) (resolve_zero_signs)."""
    total = sum(int(torch.sign(_sum64(t)).sum()) for t in trimmed_by_name.values())
    return float((total > 0) - (total < 0))


def _ties_official64(taus, keep, majority):
    trimmed = (taus * keep).double()
    s = torch.sign(_sum64(taus * keep))
    s = torch.where(s == 0, torch.tensor(majority, dtype=torch.float64), s)   # zero -> majority
    sel = torch.where(s > 0, trimmed > 0, trimmed < 0)                         # disjoint, as official
    return _sum64((taus * keep) * sel)                                          # 'sum', not mean


def _tall_masks(taus, tau_mtl, lambdas):
    return torch.stack([taus[k].abs() > lambdas[k] * (tau_mtl - taus[k]).abs()
                        for k in range(taus.shape[0])])


def _emr(taus, keep=None):
    """keep: EMR + TADrop 'mask' (SPEC 2): taus raw, M_k = (tau_k flag > 0) AND keep_k."""
    flag = torch.where(_sum64(taus) > 0, 1.0, -1.0).float()    # zero sum -> -1 (official)
    masks = taus * flag > 0
    if keep is not None:
        masks = masks & keep
    tau_uni = flag * (taus * masks).abs().amax(0)
    return tau_uni, masks


# ---- the state dict ----------------------------------------------------------------

def _passthrough_fn(passthrough) -> Callable[[str], bool]:
    if callable(passthrough):
        return passthrough
    pats = list(passthrough)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in pats)


def merge_state_dicts(spec: MergeSpec, base_sd: StateDict, task_sds: Sequence[StateDict], *,
                      passthrough: Iterable[str] | Callable[[str], bool] = (),
                      out_dtype: torch.dtype | None = None) -> MergeResult:
    """Merges K fine-tuned state dicts into the base one (SPEC sections 1-3).

    passthrough: glob patterns (or a predicate) of tensors copied from the base.
    out_dtype: the output dtype; None keeps each base tensor's dtype.
    """
    K = spec.K
    if len(task_sds) != K:
        raise ValueError(f"{len(task_sds)} task state dicts for {K} task names")
    is_pass = _passthrough_fn(passthrough)
    cast = lambda t, like: t.to(out_dtype or like.dtype)  # noqa: E731

    # SPEC 3: merge floating tensors present in every model with the same shape.
    taus_by_name: dict[str, torch.Tensor] = {}
    for name, t0 in base_sd.items():
        if is_pass(name) or not t0.is_floating_point():
            continue
        missing = [spec.task_names[k] for k in range(K) if name not in task_sds[k]]
        if missing:
            raise ValueError(f"tensor {name!r} is missing from models {missing}")
        bad = [spec.task_names[k] for k in range(K) if task_sds[k][name].shape != t0.shape]
        if bad:
            raise ValueError(f"tensor {name!r} has a different shape in models {bad} "
                             f"(base {tuple(t0.shape)})")
        taus = torch.stack([task_sds[k][name].float() - t0.float() for k in range(K)])
        for k in range(K):
            if not bool(torch.isfinite(taus[k]).all()):
                raise NonFiniteError(f"tensor {name!r}, task {spec.task_names[k]!r}: "
                                     "non-finite values in the task vector")
        taus_by_name[name] = taus

    phi = spec.sparsifier
    global_vals = [None] * K
    if phi.needs_fit and phi.scope != "tensor" and taus_by_name:
        global_vals = _model_scope_values(spec, taus_by_name)
    official = {}
    if spec.official_ties and taus_by_name:   # trim keep masks from the raw tau_k, then the weights
        thr = _official_thresholds(taus_by_name, K)
        keeps = {n: torch.stack([t[k].abs() >= thr[k] for k in range(K)]) for n, t in taus_by_name.items()}
        weighted = {n: torch.stack([t[k] * spec.weights[k] for k in range(K)]) for n, t in taus_by_name.items()}
        majority = _official_majority({n: weighted[n] * keeps[n] for n in taus_by_name})
        official = {n: (keeps[n], majority) for n in taus_by_name}

    merged = {} if "merged" in spec.outputs else None
    unified = {} if "unified" in spec.outputs else None
    masks, stats, partials, tensor_scales = {}, [], [], {}
    for name, t0 in base_sd.items():
        if name not in taus_by_name:
            if merged is not None:
                merged[name] = t0.clone()
            continue
        base = t0.float()
        taus, rows, keeps, scales = taus_by_name[name], [], [], []
        for k in range(K):
            if spec.emr_mask_mode:      # SPEC 2, EMR + TADrop 'mask': tau_k stays raw
                _, row, keep, scale = _phi_parts(spec, name, k, taus[k], global_vals[k])
                keeps.append(keep)
                scales.append(float(scale))
            else:
                taus[k], row = _phi(spec, name, k, taus[k], global_vals[k])
            taus[k] *= spec.weights[k]
            rows.append(row)
        n = base.numel()
        m = None
        if spec.method == "task_arithmetic":
            merged[name] = cast((base.double() + spec.lam * _sum64(taus)).float(), t0)
        elif spec.method == "ties":
            merged[name] = cast((base.double() + spec.lam * _ties_vector64(taus)).float(), t0)
        elif spec.method == "emr":
            tau_uni, m = _emr(taus, torch.stack(keeps) if spec.emr_mask_mode else None)
            if spec.emr_mask_mode:
                tensor_scales[name] = scales
            unified[name] = cast(tau_uni, t0)
            partials.append(EMRPartials(
                tuple(float(taus[k].double().abs().sum()) for k in range(K)),
                tuple(float((tau_uni.double().abs() * m[k]).sum()) for k in range(K)), n))
        else:
            tau_mtl = _tau_mtl(taus, spec.inner, official.get(name))
            m = _tall_masks(taus, tau_mtl, spec.tall_lambdas)
            if spec.method == "tall_masks":
                unified[name] = cast(tau_mtl, t0)
            else:
                keep = m.sum(0) >= spec.consensus_k_min
                merged[name] = cast(torch.where(keep, base + spec.consensus_alpha * tau_mtl, base), t0)
        if m is not None:
            masks[name] = m
        for k in range(K):
            stats.append({"tensor": name, "task": spec.task_names[k], "numel": n,
                          "q_a": None, "q_b": None, "drop_rate": None, "kept": None,
                          "norm_before": None, "norm_after": None,
                          "mask_density": (float(m[k].sum()) / n if n else 0.0) if m is not None
                          else None} | rows[k])

    scalars, warnings = {}, []
    if spec.method == "emr":
        lambdas, warnings = emr_rescalers(partials, spec.emr_rescaler, spec.task_names)
        scalars["emr_lambdas"] = lambdas
        if spec.emr_mask_mode:
            scalars["emr_tensor_scales"] = tensor_scales
    elif spec.method in ("tall_masks", "consensus"):
        scalars["tall_lambdas"] = list(spec.tall_lambdas)
    return MergeResult(spec, merged, unified, masks, scalars, stats, warnings, list(taus_by_name))


def task_model(result: MergeResult, base_sd: StateDict, k: int) -> dict[str, torch.Tensor]:
    """Task k's model (what `tadrop export --task` writes): EMR theta_0 + lambda_k M_k
    tau_uni, TALL theta_0 + m_k tau_MTL (from the stored, cast unified vector);
    single-model methods return the merged model."""
    spec = result.spec
    if result.merged is not None and spec.method != "tall_masks":
        return dict(result.merged)
    out = {}
    for name, t0 in base_sd.items():
        if name not in result.masks:
            out[name] = t0.clone()
            continue
        base, uni, m = t0.float(), result.unified[name].float(), result.masks[name][k]
        if spec.method == "emr":
            # EMR 'mask': Phi's per-tensor rescale factor multiplies lambda_k (float64 product)
            scale = result.scalars.get("emr_tensor_scales", {}).get(name, [1.0] * spec.K)[k]
            lam = float(result.scalars["emr_lambdas"][k]) * float(scale)
            out[name] = torch.where(m, base + uni * lam, base).to(t0.dtype)
        else:
            out[name] = torch.where(m, base + uni, base).to(t0.dtype)
    return out
