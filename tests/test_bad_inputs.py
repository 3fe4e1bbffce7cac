"""Hostile and broken inputs: a clear error naming the file/tensor/key, exit 1, no output marked complete,
and the inputs untouched."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import TINY, llama_shapes, make_family, run_cli, tree_digest, write_config


@pytest.fixture()
def fam(tmp_path):
    return make_family(tmp_path / "fam", k=2, seed=3)


def _fail(cfg: Path, *extra) -> str:
    proc = run_cli("merge", cfg, "--quiet", *extra)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("tadrop: error:"), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def _words(err: str, tmp_path: Path) -> str:
    """The message with the test's directory taken out (pytest names it after the test: "duplicate",
    "truncated" ...), lower-cased: what is left must carry the meaning."""
    return err.replace(str(tmp_path), "<dir>").lower()


def _not_complete(run: Path):
    rec = run / "run.json"
    assert not rec.exists() or json.loads(rec.read_text())["complete"] is False


def _edit(fam, task, fn):
    path = Path(fam[task]) / "model.safetensors"
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def test_missing_path(tmp_path, fam):
    fam = {**fam, "task1": tmp_path / "nowhere"}
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run"))
    assert "nowhere" in err


def test_not_a_safetensors_file(tmp_path, fam):
    (Path(fam["task0"]) / "model.safetensors").write_text("this is not a checkpoint at all\n" * 10)
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run"))
    assert "task0" in err and "model.safetensors" in err


def test_truncated_file(tmp_path, fam):
    f = Path(fam["task1"]) / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run"))
    assert str(f) in err
    assert "truncated" in _words(err, tmp_path)


def test_corrupt_header(tmp_path, fam):
    f = Path(fam["task0"]) / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"{{{{garbage!"
    f.write_bytes(bytes(data))
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run"))
    assert "model.safetensors" in err and "header" in err.lower()


def test_tensor_missing_in_one_model(tmp_path, fam):
    _edit(fam, "task1", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run"))
    assert "model.layers.1.mlp.up_proj.weight" in err and "task1" in err


def test_missing_tensor_allowed_by_passthrough(tmp_path, fam):
    _edit(fam, "task1", lambda sd: sd.pop("lm_head.weight"))
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", method="task_arithmetic",
                       passthrough=["lm_head.*"])
    run_cli("merge", cfg, "--quiet", check=True)
    got = load_file(str(tmp_path / "run" / "merged" / "model-00001-of-00001.safetensors"))
    base = load_file(str(Path(fam["base"]) / "model.safetensors"))
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])   # copied from the base, bit for bit
    assert not torch.equal(got["model.norm.weight"], base["model.norm.weight"])   # the rest is merged


def test_shape_mismatch(tmp_path, fam):
    _edit(fam, "task0", lambda sd: sd.update({"model.norm.weight": torch.zeros(7)}))
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run"))
    assert "model.norm.weight" in err and "task0" in err and "shape" in err.lower()


def test_integer_tensor_where_float_is_merged(tmp_path, fam):
    _edit(fam, "task1", lambda sd: sd.update({"model.norm.weight": torch.ones(32, dtype=torch.int64)}))
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run"))
    assert "model.norm.weight" in err and "task1" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_in_a_fine_tune(tmp_path, fam, bad):
    def poison(sd):
        sd["model.layers.0.self_attn.v_proj.weight"][3, 5] = bad
    _edit(fam, "task0", poison)
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run", method="emr",
                             sparsify={"kind": "tadrop"}))
    assert "model.layers.0.self_attn.v_proj.weight" in err and "task0" in err
    _not_complete(tmp_path / "run")


def test_no_models(tmp_path, fam):
    cfg = write_config(tmp_path / "c.yaml", {"base": fam["base"]}, tmp_path / "run")
    err = _fail(cfg)
    assert "models" in err


def test_duplicate_task_names(tmp_path, fam):
    cfg = tmp_path / "c.yaml"
    write_config(cfg, fam, tmp_path / "run")
    data = yaml.safe_load(cfg.read_text())
    data["models"][1]["name"] = data["models"][0]["name"]
    cfg.write_text(yaml.safe_dump(data))
    err = _fail(cfg)
    assert "duplicate task name 'task0'" in _words(err, tmp_path)


def test_unknown_key(tmp_path, fam):
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run", lamda=0.3))
    assert "lamda" in err


def test_bad_value_lists_allowed(tmp_path, fam):
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run", method="average"))
    assert "method" in err and "task_arithmetic" in err and "ties" in err


def test_bad_sparsify_value(tmp_path, fam):
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run",
                             sparsify={"kind": "tadrop", "rescale": "l1"}))
    assert "rescale" in err and "inverse_keep" in err


def test_output_equal_to_an_input(tmp_path, fam):
    before = tree_digest(Path(fam["task0"]))
    err = _fail(write_config(tmp_path / "c.yaml", fam, Path(fam["task0"])))
    assert "overlaps" in err
    assert tree_digest(Path(fam["task0"])) == before


def test_output_dir_with_foreign_files(tmp_path, fam):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("mine")
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run"))
    assert "not empty" in err
    assert (tmp_path / "run" / "precious.txt").read_text() == "mine"


def test_memory_budget_too_small_for_one_row(tmp_path, fam):
    err = _fail(write_config(tmp_path / "c.yaml", fam, tmp_path / "run", method="emr",
                             memory_budget="1KiB"))
    words = _words(err, tmp_path)
    shapes = llama_shapes(**TINY)
    assert any(f"'{n}'" in err or f"tensor {n}" in err for n in shapes), err   # names a tensor
    assert "budget" in words
    assert not (tmp_path / "run").exists()


def test_inputs_are_never_modified(tmp_path, fam):
    before = {n: tree_digest(Path(p)) for n, p in fam.items()}
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", method="emr", sparsify={"kind": "tadrop"})
    run_cli("merge", cfg, "--quiet", check=True)
    run_cli("export", tmp_path / "run", "--task", "task0", "--output", tmp_path / "x", check=True)
    assert {n: tree_digest(Path(p)) for n, p in fam.items()} == before


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_no_space_left_then_resume(tmp_path, fam):
    """A full disk fails the run with a clear error; with space back, the same command finishes it."""
    ref = write_config(tmp_path / "ref.yaml", fam, tmp_path / "ref", method="emr", sparsify={"kind": "tadrop"})
    run_cli("merge", ref, "--quiet", check=True)
    want = tree_digest(tmp_path / "ref")
    mnt = tmp_path / "small"
    mounted = _mount_tmpfs(mnt, "120k")  # a real full disk where we may mount one (root) ...
    env = {} if mounted else {"TADROP_FAULT": "enospc:5"}  # ... else writes fail as on a full disk
    try:
        cfg = write_config(tmp_path / "c.yaml", fam, mnt / "run", method="emr", sparsify={"kind": "tadrop"})
        proc = run_cli("merge", cfg, "--quiet", env_extra=env)
        assert proc.returncode == 1 and proc.stderr.startswith("tadrop: error:"), proc.stderr
        assert "Traceback" not in proc.stderr
        if mounted:   # the free-space check refuses before any job writes (issue 8)
            words = proc.stderr.replace(str(mnt / "run"), "RUN")
            assert "not enough free space" in words and "available" in words, proc.stderr
        else:         # writes fail mid-run as on a full disk
            assert "No space left on device" in proc.stderr, proc.stderr
        _not_complete(mnt / "run")
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=50m", str(mnt)], check=True)
        run_cli("merge", cfg, "--quiet", check=True)  # space is back: the same command finishes
        assert tree_digest(mnt / "run") == want
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)])
        shutil.rmtree(mnt, ignore_errors=True)


def test_injected_full_disk_then_resume(tmp_path, fam):
    """The same contract through the write-fault hook, which needs no privileges."""
    ref = write_config(tmp_path / "ref.yaml", fam, tmp_path / "ref", method="ties")
    run_cli("merge", ref, "--quiet", check=True)
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", method="ties")
    proc = run_cli("merge", cfg, "--quiet", env_extra={"TADROP_FAULT": "enospc:3"})
    assert proc.returncode == 1 and "No space left on device" in proc.stderr, proc.stderr
    assert "tensor '" in proc.stderr  # names the tensor whose write failed
    _not_complete(tmp_path / "run")
    run_cli("merge", cfg, "--quiet", check=True)
    assert tree_digest(tmp_path / "run") == tree_digest(tmp_path / "ref")
