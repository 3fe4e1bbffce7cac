"""The YAML merge config: a strict pydantic model.

Strict because a typo in a merge config silently changes the merged weights:
every unknown key or bad value is refused with its key path and what is allowed.
"""
from __future__ import annotations

import os
import re
import typing
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

METHODS = ("task_arithmetic", "ties", "emr", "tall_masks", "consensus")
DEFAULT_METHOD = "task_arithmetic"
# lambda scales the merged vector of these methods only; the others ignore it.
DEFAULT_LAMBDA = {"task_arithmetic": 0.3, "ties": 1.0}
OVERRIDE_KEYS = ("output", "workers", "memory_budget", "executor", "device", "shard_size")
# Keys that do not change the output bytes (left out of identity()).
NON_IDENTITY_KEYS = ("output", "workers", "executor", "ray", "device", "memory_budget", "download", "model_card")

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and key path."""


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB' (SI and IEC units)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 5GB or 2GiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a size like 5GB or 2GiB, got {value!r}")
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(
            f"cannot parse size {value!r}: expected a number with an optional unit, "
            "one of B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024)")
    try:
        return int(Decimal(m.group(1)) * _SIZE_UNITS[unit])
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"cannot parse size {value!r}") from e


def _not_bool(v: Any) -> Any:
    """YAML turns yes/no/true into booleans; pydantic would read them as 1/0."""
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {str(v).lower()}")
    return v


Float = Annotated[float, BeforeValidator(_not_bool)]
Int = Annotated[int, BeforeValidator(_not_bool)]
Size = Annotated[int, Field(gt=0)]
RESERVED_TASK_NAMES = ("base",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              allow_inf_nan=False)


class ModelEntry(_Strict):
    """A fine-tune: `path` (a directory, a .safetensors file, or a repo id org/name[@revision]) holding
    a full checkpoint or a PEFT adapter, or `adapter` (the same, always read as a LoRA adapter)."""
    name: str
    path: Path | str | None = None      # Path: a local path; str: a repo id
    weight: Float = 1.0
    # this task's own sparsifier parameter (topk: density, dare: p), like mergekit's per-model density
    sparsify: dict[str, Float] | None = None
    adapter: Path | str | None = None
    check_base: bool = True     # refuse an adapter whose base_model_name_or_path names another model

    @model_validator(mode="after")
    def _one_source(self) -> "ModelEntry":
        if (self.path is None) == (self.adapter is None):
            raise ValueError(f"model {self.name!r}: give exactly one of path (a checkpoint) or adapter "
                             "(a LoRA adapter)")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TASK_NAME_RE.match(v):
            raise ValueError(f"task name {v!r} must match {_TASK_NAME_RE.pattern} "
                             "(letters, digits, '_', '.', '-'; used in file names)")
        if v in RESERVED_TASK_NAMES:
            raise ValueError(f"task name {v!r} is reserved for the base model")
        return v


class SparsifyNone(_Strict):
    kind: Literal["none"]


class SparsifyTADrop(_Strict):
    kind: Literal["tadrop"]
    a: Float = Field(0.5, ge=0.0, le=1.0)
    b: Float = Field(0.95, ge=0.0, le=1.0)
    eps: Float = Field(1e-12, ge=0.0)
    rescale: Literal["norm", "none", "inverse_keep"] = "norm"
    scope: Literal["tensor", "model", "global_threshold"] = "tensor"


class SparsifyTopK(_Strict):
    kind: Literal["topk"]
    density: Float = Field(0.2, gt=0.0, le=1.0)
    scope: Literal["tensor", "model"] = "tensor"


class SparsifyDARE(_Strict):
    kind: Literal["dare"]
    p: Float = Field(ge=0.0, lt=1.0)


Sparsify = Annotated[Union[SparsifyNone, SparsifyTADrop, SparsifyTopK, SparsifyDARE],
                     Field(discriminator="kind")]
SPARSIFY_KINDS = {"none": SparsifyNone, "tadrop": SparsifyTADrop,
                  "topk": SparsifyTopK, "dare": SparsifyDARE}


class EMRConfig(_Strict):
    rescaler: Literal["official", "global"] = "official"
    # how a TADrop/top-k sparsifier enters EMR (SPEC 2): Phi before EMR, or its keep mask ANDed into M_k
    tadrop: Literal["rescaled", "mask"] = "rescaled"


class TallConfig(_Strict):
    lambdas: dict[str, Annotated[Float, Field(ge=0.0)]] = Field(default_factory=dict)
    default_lambda: Float = Field(0.4, ge=0.0)
    inner: Literal["task_arithmetic", "ties", "ties_official"] = "task_arithmetic"


class ConsensusConfig(_Strict):
    k_min: Int = Field(2, ge=1)
    alpha: Float = 0.3
    inner: Literal["task_arithmetic", "ties", "ties_official"] = "task_arithmetic"


class RayConfig(_Strict):
    address: str | None = None
    actors: Int | None = Field(None, ge=1)
    num_cpus_per_actor: Float = Field(1, gt=0)
    num_gpus_per_actor: Float = Field(0, ge=0)


class MergeConfig(_Strict):
    """A validated merge config; paths are absolute, `lam` has the method default
    (task_arithmetic 0.3, ties 1.0; emr/tall_masks/consensus ignore it)."""

    base: Path | str    # Path: a directory, a .safetensors file or a repo id org/name[@revision]
    models: list[ModelEntry]
    method: Literal["task_arithmetic", "ties", "emr", "tall_masks", "consensus"] = DEFAULT_METHOD
    sparsify: Sparsify
    lam: Float = Field(alias="lambda")  # filled with the method default by _defaults
    emr: EMRConfig = Field(default_factory=EMRConfig)
    tall: TallConfig = Field(default_factory=TallConfig)
    consensus: ConsensusConfig = Field(default_factory=ConsensusConfig)
    passthrough: list[str] = Field(default_factory=list)
    output: Path
    output_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    unified_dtype: Literal["float32", "float16", "bfloat16"] | None = None   # None: as output_dtype
    shard_size: Size = 5 * 10**9
    seed: Int = Field(0, ge=0)
    memory_budget: Size = 2 * 2**30
    workers: Int = Field(2, ge=1)
    executor: Literal["local", "ray"] = "local"
    device: Literal["cpu", "cuda"] = "cpu"
    ray: RayConfig = Field(default_factory=RayConfig)
    clamp_overflow: bool = False   # float16 output: clamp out-of-range values (warning) instead of failing
    download: bool = False   # fetch repo ids missing from the HF cache (safetensors/config/tokenizer only)
    tokenizer_source: str = "base"   # the output vocabulary: base | union | a model's name (SPEC 5)
    model_card: bool = True     # README.md model card in merged/ and in exports

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Method-dependent defaults: the sparsifier (TIES trims) and lambda."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        method = data.setdefault("method", DEFAULT_METHOD)
        if data.get("sparsify") is None and isinstance(method, str):
            data["sparsify"] = ({"kind": "topk", "density": 0.2, "scope": "tensor"}
                                if method == "ties" else {"kind": "none"})
        key = "lambda" if "lambda" in data else "lam"
        if data.get(key) is None and isinstance(method, str):
            data[key] = DEFAULT_LAMBDA.get(method, DEFAULT_LAMBDA[DEFAULT_METHOD])
        return data

    @field_validator("shard_size", "memory_budget", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("shard_size", mode="before")
    @classmethod
    def _shard_size_sane(cls, v: Any) -> Any:
        return check_shard_size(v)

    @field_validator("output", mode="after")
    @classmethod
    def _abs(cls, v: Path) -> Path:
        return _absolute(v)

    @field_validator("base", mode="after")
    @classmethod
    def _base_ref(cls, v: Path | str) -> Path | str:
        return _input_ref(v)

    @field_validator("models", mode="after")
    @classmethod
    def _models(cls, v: list[ModelEntry]) -> list[ModelEntry]:
        if not v:
            raise ValueError("at least one fine-tuned model is required (K=0)")
        return [m.model_copy(update={k: _input_ref(getattr(m, k)) for k in ("path", "adapter")
                                     if getattr(m, k) is not None}) for m in v]

    @model_validator(mode="after")
    def _cross(self) -> "MergeConfig":
        names = self.task_names
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"models.{i}.name: duplicate task name {n!r} "
                                 f"(also models.{names.index(n)}.name)")
        if self.tokenizer_source not in ("base", "union", *names):
            raise ValueError(f"tokenizer_source: {self.tokenizer_source!r} is not base, union or a model name "
                             f"({', '.join(names)})")
        sp = self.sparsify
        if isinstance(sp, SparsifyTADrop) and not sp.a < sp.b:
            raise ValueError(f"sparsify.a: must be < sparsify.b (0 <= a < b <= 1), "
                             f"got a={sp.a}, b={sp.b}")
        for i, m in enumerate(self.models):
            if m.sparsify is not None:
                task_sparsify(sp, m.sparsify, f"models.{i}.sparsify")
        if self.method == "emr" and self.emr.tadrop == "mask" and sp.kind not in ("tadrop", "topk"):
            raise ValueError(f"emr.tadrop: 'mask' combines TADrop's (or top-k's) keep mask with EMR's "
                             f"sign mask and needs sparsify.kind tadrop or topk (got {sp.kind!r})")
        inner_key = {"tall_masks": "tall", "consensus": "consensus"}.get(self.method)
        if inner_key and getattr(self, inner_key).inner == "ties_official" and sp.kind != "none":
            raise ValueError(f"{inner_key}.inner: 'ties_official' trims inside its TIES step as the official "
                             f"TALL code does and needs sparsify.kind none (got {sp.kind!r})")
        unknown = [k for k in self.tall.lambdas if k not in names]
        if unknown:
            raise ValueError(f"tall.lambdas: unknown task(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(map(repr, names))}")
        if self.method == "consensus" and self.consensus.k_min > len(names):
            raise ValueError(f"consensus.k_min: {self.consensus.k_min} exceeds the number of "
                             f"tasks ({len(names)}): the mask would be empty")
        return self

    @property
    def task_names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.models]

    def tall_lambdas(self) -> list[float]:
        """Per-task TALL lambda in task order (tall.lambdas, else tall.default_lambda)."""
        return [self.tall.lambdas.get(n, self.tall.default_lambda) for n in self.task_names]

    def to_json(self) -> dict:
        """The whole config as a JSON-able dict (for run.json); `from_json` reads it back."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_json(cls, data: dict) -> "MergeConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_format_errors(e, "run.json config")) from None

    def identity(self) -> dict:
        """The normalized settings that determine the output bytes, in canonical form.

        Method-specific sections are kept only for the methods that read them, so an
        unused section never changes a run's identity.
        """
        d = self.to_json()
        for k in NON_IDENTITY_KEYS:
            d.pop(k)
        if d.get("tokenizer_source") == "base":   # the default: absent, as before the key existed
            d.pop("tokenizer_source")
        for m in d["models"]:
            if m.get("sparsify") is None:   # runs from before per-model sparsify keep their identity
                m.pop("sparsify", None)
            for key, default in (("path", None), ("adapter", None), ("check_base", True)):
                if m.get(key, default) == default:   # input keys at their defaults: absent, as before
                    m.pop(key, None)
        if self.method not in DEFAULT_LAMBDA:
            d["lambda"] = None
        if self.method != "emr":
            d.pop("emr")
        elif d["emr"].get("tadrop") == "rescaled":
            del d["emr"]["tadrop"]      # the default before the key existed: old runs keep their id
        if self.method not in ("tall_masks", "consensus"):
            d.pop("tall")
        else:
            d["tall"]["lambdas"] = dict(zip(self.task_names, self.tall_lambdas()))
        if self.method != "consensus":
            d.pop("consensus")
        if not self.clamp_overflow:  # the default leaves the identity of earlier runs unchanged
            d.pop("clamp_overflow")
        return _canonical(d)


PER_TASK_SPARSIFY = {"topk": ("density",), "dare": ("p",)}


def task_sparsify(sp: Any, override: dict, where: str = "models.N.sparsify") -> Any:
    """The sparsify section `sp` with one model's parameter overrides applied."""
    allowed = PER_TASK_SPARSIFY.get(sp.kind, ())
    bad = [k for k in override if k not in allowed]
    if bad:
        raise ValueError(f"{where}.{bad[0]}: not a per-model parameter of sparsify kind {sp.kind!r}; "
                         f"allowed: {', '.join(allowed) if allowed else 'none (use kind topk or dare)'}")
    try:
        return type(sp).model_validate({**sp.model_dump(), **override})
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise ValueError(f"{where}.{err['loc'][-1]}: {err['msg']} (got {err.get('input')!r})") from None


def check_shard_size(v: Any) -> Any:
    """Refuse a shard size below 1 KB: mergekit's `--out-shard-size 5B` means 5 billion
    *parameters*, ours are bytes, and '5B' would put every tensor in a shard of its own."""
    n = parse_size(v)
    if n >= 1000:
        return v
    m = _SIZE_RE.match(v) if isinstance(v, str) else None
    if m and m.group(2).lower() == "b":
        raise ValueError(f"{v!r} is {n} bytes (our sizes are bytes; mergekit's --out-shard-size "
                         f"{v} means {m.group(1)} billion parameters): did you mean {m.group(1)}GB "
                         f"(or {2 * Decimal(m.group(1))}GB for {m.group(1)}B bf16 parameters)?")
    raise ValueError(f"{v!r} is {n} bytes, below 1 KB: every tensor would get a shard of its own; "
                     f"did you mean {n}GB?")


def check_device(cfg: "MergeConfig") -> None:
    """`device: cuda` needs a CUDA build of torch and a visible GPU here (the local executor, or
    Ray's private local instance): say so before any worker starts, not as a tensor error later."""
    if cfg.device != "cuda":
        return
    if cfg.executor == "ray" and (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        return          # the cluster's actors, not this machine, hold the GPUs
    import torch
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is built without CUDA; install a CUDA build of torch"
    elif not torch.cuda.is_available():
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
               + (f" (CUDA_VISIBLE_DEVICES={vis!r})" if vis is not None else " (no driver or no device)"))
    else:
        return
    raise ConfigError(f"device: cuda, but {why}; or set device: cpu (--device cpu)")


def _absolute(p: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p))))


def _input_ref(ref: Path | str) -> Path | str:
    """An input as written: a repo id (org/name[@rev], not an existing path) stays a str; a path
    becomes an absolute Path."""
    from .sources.hub import parse_repo_id
    return ref if isinstance(ref, str) and parse_repo_id(ref) is not None else _absolute(Path(ref))


def _canonical(obj: Any) -> Any:
    """Dicts with sorted keys (pydantic has already made every number its field's type)."""
    if isinstance(obj, dict):
        return {k: _canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    return obj


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last silently)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_config_data(path: str | os.PathLike) -> dict:
    """The YAML mapping of a config file (not validated yet)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8: byte {e.start} is "
                          f"{e.object[e.start:e.start + 1]!r})") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a YAML text file (it contains NUL bytes)")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, "
                          f"got {type(data).__name__}")
    return data


def config_from_data(data: dict, source: str) -> MergeConfig:
    """Validate a config mapping; errors name `source` and the key path."""
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> MergeConfig:
    """Read and validate a YAML config; `overrides` (from the CLI) win over the file."""
    path = Path(path)
    data = read_config_data(path)
    for k, v in (overrides or {}).items():
        if k not in OVERRIDE_KEYS:
            raise ConfigError(f"{path}: override {k!r} not allowed; allowed: "
                              f"{', '.join(OVERRIDE_KEYS)}")
        if v is not None:
            data[k] = v
    return config_from_data(data, str(path))


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        if len(loc) >= 2 and loc[0] == "sparsify" and loc[1] in SPARSIFY_KINDS:
            del loc[1]  # the union tag pydantic inserts; the user wrote sparsify.<key>
        key = ".".join(str(p) for p in loc)
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(e["loc"][:-1])
            msg = f"unknown key; allowed: {', '.join(allowed)}" if allowed else "unknown key"
            if loc and loc[0] == "sparsify" and len(e["loc"]) > 1:
                msg += f" (for sparsify kind {e['loc'][1]!r})"
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            key += ".kind"
            msg = f"must be one of {', '.join(SPARSIFY_KINDS)}"
            if e["type"] == "union_tag_invalid":
                msg += f" (got {e['ctx']['tag']!r})"
        elif e["type"] == "missing":
            msg = "required key missing"
        elif "input" in e and e["type"] not in ("model_type", "dict_type", "value_error"):
            msg += f" (got {e['input']!r})"
        lines.append(f"{key}: {msg}" if key else msg)
    head = f"{source}: invalid config"
    return head + (": " + lines[0] if len(lines) == 1 else ":\n  " + "\n  ".join(lines))


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys a model at `loc` (a pydantic error location) accepts, by their YAML names."""
    model: Any = MergeConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if part in SPARSIFY_KINDS and model is None:
            model = SPARSIFY_KINDS[part]
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        model = _model_in(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [f.alias or n for n, f in model.model_fields.items()]
    return []


def _model_in(annotation: Any) -> Any:
    """The single BaseModel type inside an annotation (list[...] etc.); None for unions."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [a for a in (_model_in(x) for x in typing.get_args(annotation)) if a is not None]
    return found[0] if len(found) == 1 else None


def read_finished_run(run_dir, error: type[Exception], unfinished: str) -> tuple[dict, "MergeConfig"]:
    """run.json and the config of a complete run; `error(...)` names the directory when it is not a
    run, and says `unfinished` when the run is not complete."""
    import json
    from pathlib import Path
    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError) as e:
        raise error(f"{run_dir} is not a tadrop run (run.json: {e})") from None
    if not record.get("complete"):
        raise error(f"run {run_dir} is not complete: {unfinished}")
    return record, MergeConfig.from_json(record["config"])
