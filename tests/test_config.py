"""The YAML config: defaults, normalisation, identity, and errors that name the key and the file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, MergeConfig, load_config, parse_size

FULL = """\
base: path/to/base
models:
  - {name: math, path: path/to/math, weight: 1.0}
  - {name: code, path: path/to/code}
method: emr
sparsify: {kind: tadrop, a: 0.5, b: 0.95, eps: 1e-12, rescale: norm, scope: tensor}
lambda: 0.3
emr: {rescaler: official}
tall: {lambdas: {math: 0.4}, default_lambda: 0.4, inner: task_arithmetic}
consensus: {k_min: 2, alpha: 0.3, inner: task_arithmetic}
passthrough: ["lm_head.weight"]
output: runs/my-merge
output_dtype: bfloat16
unified_dtype: float32
shard_size: 5GB
seed: 0
memory_budget: 2GiB
workers: 2
executor: local
device: cpu
ray: {address: null, actors: null, num_cpus_per_actor: 1, num_gpus_per_actor: 0}
"""

MINIMAL = {"base": "b", "models": [{"name": "math", "path": "m"}, {"name": "code", "path": "c"}],
           "output": "out"}


def write(tmp_path: Path, data, name="c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def error(tmp_path: Path, data, overrides=None) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert str(path) in msg, msg
    return msg


def test_full_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.base == tmp_path / "path/to/base" and cfg.base.is_absolute()
    assert [m.path for m in cfg.models] == [tmp_path / "path/to/math", tmp_path / "path/to/code"]
    assert cfg.output == tmp_path / "runs/my-merge"
    assert cfg.task_names == ["math", "code"] and cfg.weights == [1.0, 1.0]
    assert cfg.sparsify.kind == "tadrop" and cfg.sparsify.eps == 1e-12 and cfg.sparsify.b == 0.95
    assert cfg.shard_size == 5 * 10**9 and cfg.memory_budget == 2 * 2**30
    assert cfg.output_dtype == "bfloat16" and cfg.workers == 2
    assert cfg.tall_lambdas() == [0.4, 0.4]


def test_paths_relative_to_cwd_not_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path / "conf", MINIMAL))
    assert cfg.base == tmp_path / "b" and cfg.output == tmp_path / "out"


def test_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.method == "task_arithmetic" and cfg.lam == 0.3
    assert cfg.sparsify.kind == "none"
    assert cfg.output_dtype is None and cfg.unified_dtype is None
    assert cfg.shard_size == 5 * 10**9 and cfg.memory_budget == 2 * 2**30
    assert cfg.workers == 2 and cfg.executor == "local" and cfg.device == "cpu" and cfg.seed == 0
    assert cfg.passthrough == [] and cfg.models[1].weight == 1.0


@pytest.mark.parametrize("method,lam,kind", [("task_arithmetic", 0.3, "none"), ("ties", 1.0, "topk"),
                                             ("emr", 0.3, "none"), ("tall_masks", 0.3, "none"),
                                             ("consensus", 0.3, "none")])
def test_method_defaults(tmp_path, method, lam, kind):
    cfg = load_config(write(tmp_path, {**MINIMAL, "method": method}))
    assert cfg.lam == lam and cfg.sparsify.kind == kind
    if method == "ties":
        assert (cfg.sparsify.density, cfg.sparsify.scope) == (0.2, "tensor")


def test_sparsify_kind_defaults(tmp_path):
    cfg = load_config(write(tmp_path, {**MINIMAL, "method": "ties", "sparsify": {"kind": "tadrop"}}))
    s = cfg.sparsify
    assert (s.a, s.b, s.eps, s.rescale, s.scope) == (0.5, 0.95, 1e-12, "norm", "tensor")
    cfg = load_config(write(tmp_path, {**MINIMAL, "sparsify": {"kind": "dare", "p": 0.5}}))
    assert cfg.sparsify.p == 0.5


def test_overrides_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, MINIMAL), {"output": "elsewhere", "workers": 7,
                                                 "memory_budget": "1GB", "executor": "ray"})
    assert cfg.output == tmp_path / "elsewhere" and cfg.workers == 7
    assert cfg.memory_budget == 10**9 and cfg.executor == "ray"
    assert load_config(write(tmp_path, MINIMAL), {"workers": None}).workers == 2


def test_identity_ignores_execution_settings(tmp_path):
    a = load_config(write(tmp_path, FULL))
    b = load_config(write(tmp_path, FULL.replace("workers: 2", "workers: 9")
                          .replace("runs/my-merge", "runs/other").replace("executor: local", "executor: ray")
                          .replace("address: null", "address: auto")))
    assert a.identity() == b.identity()
    assert json.dumps(a.identity(), sort_keys=True)  # JSON-able
    for key in ("output", "workers", "executor", "ray", "device", "memory_budget"):
        assert key not in a.identity()
    c = load_config(write(tmp_path, FULL.replace("a: 0.5", "a: 0.4")))
    assert c.identity() != a.identity() and c.identity()["sparsify"]["a"] == 0.4


def test_identity_drops_sections_a_method_does_not_read(tmp_path):
    a = load_config(write(tmp_path, {**MINIMAL, "method": "emr"}))
    b = load_config(write(tmp_path, {**MINIMAL, "method": "emr", "lambda": 0.9,
                                     "tall": {"default_lambda": 0.2}, "consensus": {"alpha": 0.9}}))
    assert a.identity() == b.identity() and a.identity()["lambda"] is None
    # the resolved per-task TALL lambdas, not how they were spelled, identify a TALL run
    t1 = load_config(write(tmp_path, {**MINIMAL, "method": "tall_masks", "tall": {"lambdas": {"math": 0.4}}}))
    t2 = load_config(write(tmp_path, {**MINIMAL, "method": "tall_masks"}))
    assert t1.identity() == t2.identity()


def test_json_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    d = cfg.to_json()
    assert d["lambda"] == 0.3 and "lam" not in d
    assert MergeConfig.from_json(json.loads(json.dumps(d))) == cfg


# -- errors -------------------------------------------------------------------------------------------

def test_unknown_top_level_key(tmp_path):
    msg = error(tmp_path, {**MINIMAL, "lamda": 0.3})
    assert "lamda" in msg and "unknown key" in msg and "lambda" in msg and "sparsify" in msg


def test_unknown_nested_key(tmp_path):
    msg = error(tmp_path, {**MINIMAL, "models": [{"name": "a", "path": "p", "wieght": 2}]})
    assert "models.0.wieght" in msg and "name, path, weight" in msg
    msg = error(tmp_path, {**MINIMAL, "ray": {"num_cpus": 2}})
    assert "ray.num_cpus" in msg and "num_cpus_per_actor" in msg


def test_bad_value_lists_allowed(tmp_path):
    msg = error(tmp_path, {**MINIMAL, "method": "average"})
    assert "method" in msg and "'task_arithmetic'" in msg and "'consensus'" in msg and "average" in msg
    msg = error(tmp_path, {**MINIMAL, "sparsify": {"kind": "tadrop", "rescale": "l1"}})
    assert "sparsify.rescale" in msg and "inverse_keep" in msg and "l1" in msg
    msg = error(tmp_path, {**MINIMAL, "output_dtype": "fp8"})
    assert "output_dtype" in msg and "bfloat16" in msg


def test_sparsify_key_of_another_kind(tmp_path):
    msg = error(tmp_path, {**MINIMAL, "sparsify": {"kind": "tadrop", "density": 0.3}})
    assert "sparsify.density" in msg and "tadrop" in msg and "rescale" in msg
    msg = error(tmp_path, {**MINIMAL, "sparsify": {"kind": "dare", "p": 0.3, "scope": "model"}})
    assert "sparsify.scope" in msg and "allowed: kind, p" in msg


@pytest.mark.parametrize("sparsify,key", [
    ({"kind": "magic"}, "sparsify.kind"), ({"a": 0.2}, "sparsify.kind"),
    ({"kind": "topk", "density": 0}, "sparsify.density"), ({"kind": "topk", "density": 1.5}, "sparsify.density"),
    ({"kind": "dare", "p": 1.0}, "sparsify.p"), ({"kind": "dare"}, "sparsify.p"),
    ({"kind": "tadrop", "a": 0.9, "b": 0.5}, "sparsify.a"), ({"kind": "tadrop", "b": 1.5}, "sparsify.b"),
    ({"kind": "tadrop", "scope": "layer"}, "sparsify.scope"),
])
def test_bad_sparsify(tmp_path, sparsify, key):
    assert key in error(tmp_path, {**MINIMAL, "sparsify": sparsify})


def test_no_models(tmp_path):
    msg = error(tmp_path, {**MINIMAL, "models": []})
    assert "models" in msg and "K=0" in msg


def test_duplicate_task_names(tmp_path):
    msg = error(tmp_path, {**MINIMAL, "models": [{"name": "math", "path": "a"}, {"name": "code", "path": "b"},
                                                 {"name": "math", "path": "c"}]})
    assert "duplicate task name 'math'" in msg and "models.2.name" in msg


def test_cross_field_checks(tmp_path):
    msg = error(tmp_path, {**MINIMAL, "method": "tall_masks", "tall": {"lambdas": {"physics": 0.3}}})
    assert "tall.lambdas" in msg and "physics" in msg and "'math'" in msg
    assert "consensus.k_min" in error(tmp_path, {**MINIMAL, "consensus": {"k_min": 0}})
    assert "consensus.k_min" in error(tmp_path, {**MINIMAL, "method": "consensus", "consensus": {"k_min": 3}})
    assert "workers" in error(tmp_path, {**MINIMAL, "workers": 0})
    assert "models.0.name" in error(tmp_path, {**MINIMAL, "models": [{"name": "a/b", "path": "p"}]})


def test_missing_required_key(tmp_path):
    msg = error(tmp_path, {k: v for k, v in MINIMAL.items() if k != "base"})
    assert "base: required key missing" in msg


def test_several_errors_reported_together(tmp_path):
    msg = error(tmp_path, {**MINIMAL, "workers": 0, "seedd": 1, "device": "tpu"})
    assert "workers" in msg and "seedd" in msg and "device" in msg and "cuda" in msg


@pytest.mark.parametrize("text,value", [
    (5, 5), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000),
    ("10 KiB", 10240), ("7", 7), ("3kb", 3000), ("1TiB", 2**40), ("64B", 64)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["5G", "GB", "-1GB", "1e9", "five", True, -3, None, "1.2.3MB"])
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_bad_sizes_in_config(tmp_path):
    msg = error(tmp_path, {**MINIMAL, "shard_size": "5G"})
    assert "shard_size" in msg and "GiB" in msg and "GB" in msg
    assert "memory_budget" in error(tmp_path, {**MINIMAL, "memory_budget": 0})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml.*cannot read"):
        load_config(tmp_path / "nope.yaml")
    assert "invalid YAML" in error(tmp_path, "base: [unclosed\n")
    assert "mapping" in error(tmp_path, "- just\n- a list\n")
    msg = error(tmp_path, "base: a\nbase: b\nmodels: []\noutput: o\n")
    assert "duplicate key 'base'" in msg


def test_bad_override(tmp_path):
    msg = error(tmp_path, MINIMAL, overrides={"method": "ties"})
    assert "override 'method'" in msg and "memory_budget" in msg
    assert "workers" in error(tmp_path, MINIMAL, overrides={"workers": 0})


def test_booleans_and_non_finite_numbers_refused(tmp_path):
    assert "expected a number, got true" in error(tmp_path, {**MINIMAL, "workers": True})
    msg = error(tmp_path, {**MINIMAL, "models": [{"name": "a", "path": "p", "weight": True}]})
    assert "models.0.weight" in msg
    assert "lambda" in error(tmp_path, {**MINIMAL, "lambda": float("nan")})
    assert "consensus.alpha" in error(tmp_path, {**MINIMAL, "consensus": {"alpha": float("inf")}})
    assert "tall.lambdas.a" in error(tmp_path, {**MINIMAL, "tall": {"lambdas": {"a": False}}})


def test_task_named_base_is_reserved(tmp_path):
    assert "reserved" in error(tmp_path, {**MINIMAL, "models": [{"name": "base", "path": "p"}]})


# -- the config reaches the maths ------------------------------------------------------------------------
SPEC_CASES = [
    {"method": "task_arithmetic", "lambda": 0.55,
     "sparsify": {"kind": "tadrop", "a": 0.35, "b": 0.9, "eps": 1e-5, "rescale": "inverse_keep",
                  "scope": "model"}},
    {"method": "ties", "lambda": 0.8, "sparsify": {"kind": "topk", "density": 0.45, "scope": "model"}},
    {"method": "ties"},
    {"method": "emr", "emr": {"rescaler": "global"}, "sparsify": {"kind": "tadrop", "rescale": "none"}},
    {"method": "tall_masks", "tall": {"lambdas": {"code": 0.25}, "default_lambda": 0.55, "inner": "ties"}},
    {"method": "consensus", "consensus": {"k_min": 1, "alpha": 0.65, "inner": "ties"},
     "tall": {"lambdas": {"math": 0.2}, "default_lambda": 0.35}},
    {"method": "task_arithmetic", "sparsify": {"kind": "dare", "p": 0.35}, "seed": 17},
]


@pytest.mark.parametrize("extra", SPEC_CASES, ids=lambda e: e["method"] + "-" + e.get("sparsify", {}).get("kind", "-"))
def test_build_spec_carries_every_value(tmp_path, extra):
    """pipeline.plan.build_spec gives the spec the YAML asks for (tests/yaml_spec.py reads the YAML
    independently): weights, lambda, per-task TALL lambdas, consensus and sparsifier parameters."""
    from pipeline.plan import build_spec
    from yaml_spec import spec_from_yaml
    data = {**MINIMAL, "models": [{"name": "math", "path": "m", "weight": 0.7},
                                  {"name": "code", "path": "c", "weight": 1.9}], **extra}
    assert build_spec(load_config(write(tmp_path, data))) == spec_from_yaml(data)
