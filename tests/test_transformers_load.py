"""The merged directory is a Hugging Face checkpoint: transformers loads it and gives the logits of the
in-memory merged state dict."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.plan import build_spec
from pipeline.run import merge
from tadrop.reference import merge_state_dicts

from conftest import write_config

transformers = pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("ties", {"sparsify": {"kind": "tadrop"}}),
                                          ("consensus", {})])
def test_merged_checkpoint_loads_with_same_logits(tmp_path, family, method, extra):
    path = write_config(tmp_path / "c.yaml", family, tmp_path / "run", method=method, **extra)
    cfg = load_config(path)
    merge(cfg, quiet=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    model.eval()

    base = load_file(str(Path(family["base"]) / "model.safetensors"))
    tasks = [load_file(str(Path(family[m.name]) / "model.safetensors")) for m in cfg.models]
    ref = merge_state_dicts(build_spec(cfg), base, tasks)
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
