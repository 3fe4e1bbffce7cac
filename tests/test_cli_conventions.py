"""CLI conventions a mergekit user expects, through the real `tadrop` subprocess: --version,
`merge CONFIG [OUTPUT]`, --device / --shard-size, --dry-run without `output:`, helpful --help;
and the shard-size and device traps (item 2, 3 of the first-hour issue)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli, write_config

METHODS = ("task_arithmetic", "ties", "emr", "tall_masks", "consensus")
SPARSIFIERS = ("none", "tadrop", "topk", "dare")


def test_version():
    proc = run_cli("--version", check=True)
    assert re.fullmatch(r"tadrop \S+\n", proc.stdout)


@pytest.mark.parametrize("args", [("--help",), ("merge", "--help")])
def test_help_lists_methods_and_sparsifiers_and_points_to_readme(args):
    out = run_cli(*args, check=True).stdout
    for name in (*METHODS, *SPARSIFIERS):
        assert re.search(rf"^  {name}\s+\S.*$", out, re.M), name      # one line each
    assert "README.md" in out


def test_every_export_and_merge_argument_has_help():
    for cmd in ("export", "merge"):
        out = run_cli(cmd, "--help", check=True).stdout
        body = out.split("positional arguments:")[1]
        args = re.findall(r"^  (\S+)(?: \S+)?(?:\n {10,}|\s{2,})(.*)$", body, re.M)
        assert len(args) >= (4 if cmd == "export" else 10)
        assert all(text.strip() for _, text in args), args


def test_positional_output_and_dry_run_without_output(tmp_path, family):
    cfg = write_config(tmp_path / "c.yaml", family, tmp_path / "unused", method="ties")
    d = yaml.safe_load(cfg.read_text())
    del d["output"]
    cfg.write_text(yaml.safe_dump(d))
    dry = run_cli("merge", cfg, "--dry-run", check=True)
    assert "method: ties" in dry.stdout and not any(tmp_path.glob("unused*"))
    missing = run_cli("merge", cfg)
    assert missing.returncode == 1 and "output: required" in missing.stderr and f"{cfg} DIR" in missing.stderr
    run_cli("merge", cfg, tmp_path / "pos", "--quiet", "--shard-size", "20KB", check=True)
    assert (tmp_path / "pos" / "run.json").exists()
    assert len(list((tmp_path / "pos" / "merged").glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("flag,value", [("--shard-size", "5B"), (None, "5B"), (None, 100)])
def test_shard_size_in_parameters_or_tiny_is_refused(tmp_path, family, flag, value):
    kw = {} if flag else {"shard_size": value}
    cfg = write_config(tmp_path / "c.yaml", family, tmp_path / "run", **kw)
    proc = run_cli("merge", cfg, *((flag, value) if flag else ()))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "shard" in proc.stderr and "did you mean" in proc.stderr
    if value == "5B":
        assert "billion parameters" in proc.stderr and "10GB" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_shard_size_below_largest_tensor_warns_loudly(tmp_path, family):
    cfg = write_config(tmp_path / "c.yaml", family, tmp_path / "run", method="ties", shard_size="2KB")
    proc = run_cli("merge", cfg, "--dry-run", check=True)
    assert "WARNING" in proc.stderr and "below the largest tensor" in proc.stderr
    assert "model.embed_tokens.weight" in proc.stderr or "lm_head.weight" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_device_cuda_without_cuda_fails_before_any_worker(tmp_path, family):
    cfg = write_config(tmp_path / "c.yaml", family, tmp_path / "run")
    proc = run_cli("merge", cfg, "--device", "cuda")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "device: cuda" in proc.stderr and "device: cpu" in proc.stderr
    assert ("built without CUDA" in proc.stderr) == (torch.version.cuda is None)
    assert not (tmp_path / "run").exists()            # nothing written, no worker started
