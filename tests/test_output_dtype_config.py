"""config.json of every checkpoint we write names the dtype it holds (torch_dtype, and `dtype` where
the base has it), so transformers loads a float32 merge of a bf16 base as float32."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.export import export_task
from pipeline.run import merge

from conftest import make_family, write_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    fam = make_family(tmp_path_factory.mktemp("bf16dt"), k=2, dtype=torch.bfloat16, seed=5)
    for name, d in fam.items():            # a base config as transformers >= 4.56 writes it: both keys
        cfg = json.loads((Path(d) / "config.json").read_text())
        cfg.update(torch_dtype="bfloat16", dtype="bfloat16")
        (Path(d) / "config.json").write_text(json.dumps(cfg))
    return fam


def _dtypes(d: Path) -> tuple[str, str]:
    cfg = json.loads((d / "config.json").read_text())
    return cfg["torch_dtype"], cfg["dtype"]


@pytest.mark.parametrize("method,out_dtype", [("ties", "float32"), ("ties", None), ("emr", "float32")])
def test_config_json_names_the_written_dtype(tmp_path, bf16_family, method, out_dtype):
    kw = {"output_dtype": out_dtype} if out_dtype else {}
    cfg = load_config(write_config(tmp_path / "c.yaml", bf16_family, tmp_path / "run", method=method, **kw))
    run = merge(cfg, quiet=True)
    want = out_dtype or "bfloat16"
    if method == "emr":
        ckpt = export_task(run, "task1", tmp_path / "export")
    else:
        ckpt = run / "merged"
    assert _dtypes(ckpt) == (want, want)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {getattr(torch, want)}
    # the inputs' config.json is untouched
    assert json.loads((Path(bf16_family["base"]) / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_config_without_dtype_key_gets_torch_dtype_only(tmp_path, family):
    cfg = load_config(write_config(tmp_path / "c.yaml", family, tmp_path / "run", method="ties",
                                   output_dtype="bfloat16"))
    merged = merge(cfg, quiet=True) / "merged"
    got = json.loads((merged / "config.json").read_text())
    assert got["torch_dtype"] == "bfloat16" and "dtype" not in got
    base = json.loads((Path(family["base"]) / "config.json").read_text())
    assert {k: v for k, v in got.items() if k != "torch_dtype"} == \
        {k: v for k, v in base.items() if k != "torch_dtype"}
