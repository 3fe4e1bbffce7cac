"""A LoRA adapter (PEFT layout) as a fine-tune: its task vector, computed per row chunk in float32.

For a targeted weight, tau = scaling * B @ A (SPEC section 5), transposed for `fan_in_fan_out`
and for embeddings, exactly what peft's `merge_and_unload()` adds to the base
(peft/tuners/lora/layer.py, Linear.get_delta_weight and Embedding.get_delta_weight); scaling =
alpha / r, or alpha / sqrt(r) with `use_rslora`, with r and alpha per module from
`rank_pattern` / `alpha_pattern` (peft/utils/other.py get_pattern_key). A saved full tensor
(`modules_to_save`, trained biases, an embedding's saved `base_layer`) gives tau = saved - base.
Every other tensor has tau = 0. Nothing the size of the base tensor is ever held beyond one chunk.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import Checkpoint, CheckpointError, TensorInfo

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# config flags of LoRA variants whose merge is not B @ A: refused before any work
_VARIANTS = {
    "use_dora": "DoRA (use_dora: true)",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora: true)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
}


class AdapterError(CheckpointError):
    """An adapter that cannot be used as a fine-tune; names the adapter (and module)."""


@dataclass(frozen=True)
class _Piece:
    kind: str              # 'lora' (scaling * B @ A), 'bias' (scaling * B.bias), 'replace' (saved - base)
    a: str | None = None   # adapter tensor names
    b: str | None = None
    scaling: float = 1.0
    transposed: bool = False


def _more_rows(shape, base_shape) -> bool:
    """`shape` extends `base_shape` by rows (an extended vocabulary), same trailing dimensions."""
    return (len(shape) == len(base_shape) >= 2 and tuple(shape[1:]) == tuple(base_shape[1:])
            and shape[0] > base_shape[0])


def is_adapter_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def pattern_value(patterns: dict, module: str, default):
    """peft's get_pattern_key: the first pattern (in the config's order) matching the module name's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


class LoraAdapter:
    """One adapter directory; `bind(base)` maps its tensors onto the base's, `delta` gives tau rows."""

    is_adapter = True

    def __init__(self, name: str, root: Path, origin: dict | None = None):
        self.name, self.root = name, Path(root)
        self.origin = origin
        cfg_path = self.root / CONFIG_NAME
        try:
            self.config = json.loads(cfg_path.read_text())
            if not isinstance(self.config, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            raise AdapterError(f"{cfg_path}: no such file (adapter {name!r})") from None
        except (OSError, ValueError) as e:
            raise AdapterError(f"{cfg_path}: unreadable adapter config ({e}) (adapter {name!r})") from None
        self._check_type()
        weights = self.root / WEIGHTS_NAME
        if not weights.is_file():
            found = sorted(p.name for p in self.root.iterdir() if p.name.startswith("adapter_model"))
            raise AdapterError(f"{self.root}: no {WEIGHTS_NAME} (adapter {name!r}); found: "
                               f"{', '.join(found) or 'none'}"
                               + ("; convert the .bin adapter to safetensors" if found else ""))
        self.weights = Checkpoint.open(weights, name)
        self.files = self.weights.files
        self.pieces: dict[str, list[_Piece]] = {}
        self.ext_rows: dict[str, int] = {}   # tensor -> rows, where the adapter extends the vocabulary

    # -- what kind of adapter ------------------------------------------------------------------------
    def _check_type(self) -> None:
        c, where = self.config, f"adapter {self.name!r} ({self.root})"
        ptype = c.get("peft_type")
        if ptype != "LORA":
            raise AdapterError(f"{where}: PEFT type {ptype!r} is not supported; only LORA adapters "
                               "(tau = scaling * B @ A) can be merged")
        for key, what in _VARIANTS.items():
            if c.get(key):
                raise AdapterError(f"{where}: {what} is not supported: its merge is not scaling * B @ A")
        if c.get("use_rslora") and not isinstance(c.get("use_rslora"), bool):
            raise AdapterError(f"{where}: use_rslora must be true or false")
        for key in ("r", "lora_alpha"):
            v = c.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise AdapterError(f"{where}: {key} must be a positive number, got {v!r}")

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    def _scaling(self, module: str) -> tuple[int, float]:
        c = self.config
        r = pattern_value(c.get("rank_pattern") or {}, module, c["r"])
        alpha = pattern_value(c.get("alpha_pattern") or {}, module, c["lora_alpha"])
        return r, (alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r)

    # -- mapping onto the base --------------------------------------------------------------------------
    def bind(self, base: Checkpoint) -> list[str]:
        """Map every adapter tensor onto a base tensor; returns the problems (empty when usable)."""
        problems: list[str] = []
        where = f"adapter {self.name!r}"
        keys = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): k for k in self.weights.tensors}
        modules: dict[str, dict[str, str]] = {}
        pieces: dict[str, list[_Piece]] = {}
        for short in [k for k in keys if ".original_module." in k or ".modules_to_save." in k]:
            # peft's save_embedding_layers (a resized vocabulary) also writes the ModulesToSaveWrapper's
            # internals: `original_module` is the untouched base copy (merge_and_unload drops it) and
            # `modules_to_save.weight` repeats the saved `X.weight`; taken only when `X.weight` is absent
            plain = short.replace(".modules_to_save.", ".")
            if ".original_module." in short or plain in keys:
                del keys[short]
            else:
                keys[plain] = keys.pop(short)
        for short, key in sorted(keys.items()):
            for suffix, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "Bb"),
                                 (".lora_embedding_A", "eA"), (".lora_embedding_B", "eB")):
                if short.endswith(suffix):
                    modules.setdefault(short[:-len(suffix)], {})[role] = key
                    break
            else:
                if "lora_magnitude_vector" in short:
                    raise AdapterError(f"{where}: tensor {key!r} is a DoRA magnitude vector: DoRA is "
                                       "not supported")
                target = short.replace(".base_layer.", ".")
                if target in base.tensors:
                    pieces.setdefault(target, []).append(_Piece("replace", a=key))
                else:
                    problems.append(f"{where}: tensor {key!r} matches no tensor of the base "
                                    f"(looked for {target!r})")
        fan = bool(self.config.get("fan_in_fan_out"))
        for module, roles in sorted(modules.items()):
            r, scaling = self._scaling(module)
            emb = "eA" in roles or "eB" in roles
            a, b = (roles.get("eA"), roles.get("eB")) if emb else (roles.get("A"), roles.get("B"))
            wname = f"{module}.weight"
            if a is None or b is None:
                problems.append(f"{where}: module {module!r} has only one of lora_A / lora_B")
                continue
            if wname not in base.tensors:
                problems.append(f"{where}: module {module!r} targets {wname!r}, which the base does not have")
                continue
            ai, bi, wi = self.weights.tensors[a], self.weights.tensors[b], base.tensors[wname]
            # an update with more rows than the base (extended vocabulary) adds to the saved full tensor
            saved = {self.weights.tensors[p.a].shape[0] for p in pieces.get(wname, ()) if p.kind == "replace"}
            problem = self._shape_problem(module, ai, bi, wi, r, emb, fan, saved)
            if problem:
                problems.append(f"{where}: {problem}")
                continue
            pieces.setdefault(wname, []).append(_Piece("lora", a, b, float(scaling), emb or fan))
            if "Bb" in roles:
                bname = f"{module}.bias"
                bb = self.weights.tensors[roles["Bb"]]
                if bname not in base.tensors or base.tensors[bname].shape != bb.shape:
                    problems.append(f"{where}: module {module!r}: lora_B.bias {list(bb.shape)} does not fit "
                                    f"the base's {bname!r}"
                                    + (f" {list(base.tensors[bname].shape)}" if bname in base.tensors else
                                       " (absent)"))
                else:
                    pieces.setdefault(bname, []).append(_Piece("bias", b=roles["Bb"], scaling=float(scaling)))
        ext: dict[str, int] = {}
        for target, ps in pieces.items():
            for p in ps:
                if p.kind == "replace":
                    si, wi = self.weights.tensors[p.a], base.tensors[target]
                    if _more_rows(si.shape, wi.shape) and si.is_float and wi.is_float:
                        ext.setdefault(target, si.shape[0])   # an extended vocabulary (sources.vocab)
                    elif si.shape != wi.shape:
                        problems.append(f"{where}: saved tensor {p.a!r} has shape {list(si.shape)} but the "
                                        f"base's {target!r} has {list(wi.shape)}")
                    elif not si.is_float or not wi.is_float:
                        problems.append(f"{where}: saved tensor {p.a!r} is {si.dtype}, the base's "
                                        f"{target!r} {wi.dtype}: only floating tensors are merged")
        problems += self._check_extended(base, pieces, ext)
        self.pieces, self.ext_rows = pieces, ext
        return problems

    def _check_extended(self, base: Checkpoint, pieces: dict, ext: dict) -> list[str]:
        """An extended vocabulary: every base tensor shaped like an extended one (the input embeddings
        and the output head) must be extended too, else the fine-tune's rows there are not in the
        adapter (peft saves only the embedding layers it targets or finds resized)."""
        where, problems = f"adapter {self.name!r}", []
        for target, v in ext.items():
            shape = base.tensors[target].shape
            for other, info in base.tensors.items():
                if other != target and info.shape == shape and info.is_float and ext.get(other) != v:
                    problems.append(f"{where}: {target!r} is extended to {v} rows (an extended vocabulary) but "
                                    f"{other!r} is not: the adapter does not hold the fine-tune's rows of "
                                    f"{other!r} beyond the base's {shape[0]}")
        return problems


    @staticmethod
    def _shape_problem(module, ai: TensorInfo, bi: TensorInfo, wi: TensorInfo, r, emb, fan,
                       saved_rows=frozenset()) -> str | None:
        if len(ai.shape) != 2 or len(bi.shape) != 2:
            return (f"module {module!r}: lora_A {list(ai.shape)} / lora_B {list(bi.shape)} are not matrices "
                    "(LoRA on convolutions is not supported)")
        if ai.shape[0] != bi.shape[1] or ai.shape[0] != r:
            return (f"module {module!r}: lora_A {list(ai.shape)} and lora_B {list(bi.shape)} do not have "
                    f"the rank r={r} of the config (r / rank_pattern)")
        # tau = B @ A has shape [B rows, A cols]; transposed for embeddings and fan_in_fan_out
        want = (ai.shape[1], bi.shape[0]) if (emb or fan) else (bi.shape[0], ai.shape[1])
        if tuple(wi.shape) != want and not (_more_rows(want, wi.shape) and want[0] in saved_rows):
            return (f"module {module!r}: lora_A {list(ai.shape)} and lora_B {list(bi.shape)} give a "
                    f"{list(want)} update{' (transposed)' if emb or fan else ''} but the base's "
                    f"{wi.name!r} is {list(wi.shape)}")
        return None

    # -- reading -------------------------------------------------------------------------------------------
    def touched(self, name: str) -> bool:
        return name in self.pieces

    def input_bytes(self, name: str) -> int:
        """Adapter bytes read to produce this tensor's tau (all of A, B or the saved tensor)."""
        t = self.weights.tensors
        return sum((t[p.a].nbytes if p.a else 0) + (t[p.b].nbytes if p.b else 0)
                   for p in self.pieces.get(name, ()))

    def delta(self, name: str, shape: tuple, r0: int, r1: int, base: Checkpoint,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 rows [r0, r1) of tau for base tensor `name` (zeros where the adapter has none).

        `out`: a flat float32 CPU buffer of the rows' numel; the first piece is computed straight
        into it (one matmul, no temporary the size of the chunk), and `out` is returned. Only a
        64-byte aligned `out` is used, the alignment of a fresh tensor, so the matmul's bits are
        those of `B @ A` into a new tensor whatever buffer the engine hands over."""
        rows_shape = (r1 - r0, *shape[1:]) if shape else (1,)
        pieces = self.pieces.get(name, ())
        if not pieces:   # untouched: tau = 0, as a broadcast view (no allocation, the engine copies it)
            return torch.zeros((), dtype=torch.float32).expand(math.prod(rows_shape))
        if out is not None and not (out.device.type == "cpu" and out.dtype == torch.float32
                                    and out.is_contiguous() and out.numel() == math.prod(rows_shape)
                                    and out.data_ptr() % 64 == 0):
            out = None
        acc = None
        w = self.weights
        for p in pieces:
            dst = out.view(rows_shape) if acc is None and out is not None else None
            if p.kind == "replace":
                saved = w.view(p.a).reshape(1) if not shape else w.view(p.a, r0, r1)
                b0 = base.view(name).reshape(1) if not shape else base.view(name, r0, r1)
                if dst is not None and max(saved.element_size(), b0.element_size()) <= 4:
                    # float32(saved) - float32(b0): both conversions are exact, one rounding
                    d = dst.copy_(saved).sub_(b0)
                else:
                    d = saved.float() - b0.float()     # out of place: the views are read-only maps
            elif p.kind == "bias":
                d = w.view(p.b, r0, r1).float() * p.scaling
            elif p.transposed:    # (B @ A).T rows r0:r1 = A[:, r0:r1].T @ B.T
                a = w.view(p.a).float()[:, r0:r1]
                bt = w.view(p.b).float().t()
                d = (torch.matmul(a.t(), bt, out=dst) if dst is not None else a.t() @ bt).mul_(p.scaling)
            else:                 # rows r0:r1 of B @ A, times scaling (peft's order)
                b, a = w.view(p.b, r0, r1).float(), w.view(p.a).float()
                d = (torch.matmul(b, a, out=dst) if dst is not None else b @ a).mul_(p.scaling)
            acc = d if acc is None else acc.add_(d)
        return out if out is not None and acc.data_ptr() == out.data_ptr() else acc.reshape(rows_shape)

    def theta_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """float32 rows [r0, r1) of the fine-tune's own tensor where the adapter extends the vocabulary
        (rows the base lacks): the saved full tensor plus any LoRA update, as merge_and_unload gives."""
        if name not in self.ext_rows:
            raise AdapterError(f"adapter {self.name!r}: {name!r} has no rows beyond the base's")
        w, out = self.weights, None
        for p in sorted(self.pieces[name], key=lambda p: p.kind != "replace"):
            if p.kind == "replace":    # a copy: .float() of a float32 view is the read-only map itself
                d = w.view(p.a, r0, r1).to(torch.float32, copy=True)
            elif p.kind == "lora":
                d = self._lora_rows(p, r0, r1)
            else:
                continue
            out = d if out is None else out.add_(d)
        return out

    def _lora_rows(self, p: _Piece, r0: int, r1: int) -> torch.Tensor:
        w = self.weights
        if p.transposed:
            return (w.view(p.a).float()[:, r0:r1].t() @ w.view(p.b).float().t()).mul_(p.scaling)
        return (w.view(p.b, r0, r1).float() @ w.view(p.a).float()).mul_(p.scaling)

    # -- the Checkpoint-like surface the pipeline uses -----------------------------------------------------
    def _stored(self, name: str | None) -> list[str]:
        """The adapter tensors (A and B of each piece) that make up tensor `name`'s delta."""
        return [t for p in self.pieces.get(name, ()) for t in (p.a, p.b) if t]

    def release(self, name: str | None = None, r0=None, r1=None) -> None:
        for t in self._stored(name):
            self.weights.release(t)

    def evict(self, name: str | None = None) -> None:
        for t in self._stored(name):
            self.weights.evict(t)

    def fingerprint(self) -> dict:
        fp = self.weights.fingerprint()
        cfg = self.root / CONFIG_NAME
        fp[CONFIG_NAME] = {"size": cfg.stat().st_size, "mtime_ns": cfg.stat().st_mtime_ns,
                           "sha256": hashlib.sha256(cfg.read_bytes()).hexdigest()}
        return fp

    def non_weight_files(self) -> list[Path]:
        return []

    def close(self) -> None:
        self.weights.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({self.name!r}, {str(self.root)!r}, {len(self.pieces)} tensors touched)"
