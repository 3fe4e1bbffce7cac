"""The merged directory is a Hugging Face checkpoint: transformers loads it and gives the logits of the
in-memory reference merge, whose spec is built from the YAML values (tests/yaml_spec.py), not by the
pipeline."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers   # a test dependency (pyproject `test` extra): an import failure is a failure
import yaml
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.run import merge
from tadrop.reference import merge_state_dicts

from conftest import write_config
from yaml_spec import spec_from_yaml


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("ties", {"sparsify": {"kind": "tadrop", "a": 0.4}, "lambda": 0.7}),
    ("consensus", {"consensus": {"k_min": 2, "alpha": 0.55, "inner": "ties"},
                   "tall": {"lambdas": {"task0": 0.25}, "default_lambda": 0.45}}),
])
def test_merged_checkpoint_loads_with_same_logits(tmp_path, family, method, extra):
    path = write_config(tmp_path / "c.yaml", family, tmp_path / "run", method=method, **extra)
    data = yaml.safe_load(path.read_text())
    data["models"][1]["weight"] = 0.7
    data["models"][2]["weight"] = 1.6
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    merge(load_config(path), quiet=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    model.eval()

    base = load_file(str(Path(family["base"]) / "model.safetensors"))
    tasks = [load_file(str(Path(m["path"]) / "model.safetensors")) for m in data["models"]]
    ref = merge_state_dicts(spec_from_yaml(data), base, tasks)
    expected = transformers.AutoModelForCausalLM.from_pretrained(family["base"])
    expected.load_state_dict({k: v.to(base[k].dtype) for k, v in ref.merged.items()})
    expected.eval()

    ids = torch.tensor([[1, 5, 9, 2, 33, 7, 11, 4]])
    with torch.no_grad():
        got = model(ids).logits
        want = expected(ids).logits
    assert torch.equal(got, want)
    # and the merge really changed the model
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(family["base"])(ids).logits
    assert not torch.allclose(got, plain)
