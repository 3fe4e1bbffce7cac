"""Integrity on real merges (real processes, the real CLI): two writers, damage to a complete run of each
method (detected, named, never served, repaired byte-exact), a lost partial shard on resume, float16
overflow, an input truncated mid-merge, export guards, the free-space check, Ctrl-C, --verify-inputs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make_family, run_cli, tree_digest, write_config, write_hf, llama_config, TINY

pytestmark = pytest.mark.slow

METHODS = {
    "task_arithmetic": dict(method="task_arithmetic", sparsify={"kind": "tadrop"}),
    "ties": dict(method="ties"),
    "emr": dict(method="emr", sparsify={"kind": "tadrop"}),
    "tall_masks": dict(method="tall_masks"),
    "consensus": dict(method="consensus"),
}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("integrity_family"), k=2, seed=11)


def _merge(cfg, *extra, **kw):
    return run_cli("merge", cfg, "--quiet", *extra, **kw)


def _pause_env(tmp_path: Path, point: str) -> tuple[dict, Path]:
    flag = tmp_path / "pause"
    flag.touch()
    return {"TADROP_PAUSE": point, "TADROP_PAUSE_FILE": str(flag)}, flag


def _popen_merge(cfg: Path, env_extra: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "merge", str(cfg), "--quiet"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env_extra}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_merges_of_one_run_one_is_refused(tmp_path, fam):
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", workers=1, **METHODS["emr"])
    ref = write_config(tmp_path / "ref.yaml", fam, tmp_path / "ref", workers=1, **METHODS["emr"])
    env, flag = _pause_env(tmp_path, "after_job:2")
    first = _popen_merge(cfg, env)
    try:
        _wait_for(Path(str(flag) + ".reached"), first)
        second = _merge(cfg)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"in use by merge (pid {first.pid}, host {socket.gethostname()}" in second.stderr
        st = run_cli("status", tmp_path / "run")
        assert st.returncode == 3 and f"running (pid {first.pid}, host {socket.gethostname()})" in st.stdout
        assert "re-run" not in st.stdout
    finally:
        flag.unlink()
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    _merge(ref, check=True)
    assert tree_digest(tmp_path / "run") == tree_digest(tmp_path / "ref")
    assert run_cli("verify", tmp_path / "run").returncode == 0


def _damage(run: Path, method: str) -> set[str]:
    """Delete or flip bytes in several outputs; returns the jobs a repair must redo."""
    rec = json.loads((run / "run.json").read_text())
    sums = rec["checksums"]
    out = "merged" if "merged" in sums and sums["merged"] else "unified"
    tensor = "model.layers.1.mlp.down_proj.weight"
    fname, offset, nbytes, _, job = sums[out][tensor]
    with open(run / out / fname, "r+b") as f:          # one flipped byte inside a tensor's range
        f.seek(offset + nbytes // 2)
        b = f.read(1)
        f.seek(offset + nbytes // 2)
        f.write(bytes([b[0] ^ 0x40]))
    jobs = {job}
    if sums["masks"]:
        entry = sums["masks"]["model.embed_tokens.weight"]
        key = sorted(entry["chunks"])[-1]
        (run / "masks.zarr" / entry["array"] / key).unlink()          # one lost mask chunk
        jobs.add(entry["job"])
    (run / "stats.parquet").write_bytes(b"PAR1 garbage")           # reduce-level damage: no job
    return jobs


@pytest.mark.parametrize("method", list(METHODS))
def test_damaged_complete_run_is_detected_never_served_and_repaired(tmp_path, fam, method):
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", workers=1, **METHODS[method])
    _merge(cfg, check=True)
    clean = tree_digest(tmp_path / "run")
    want_jobs = _damage(tmp_path / "run", method)

    st = run_cli("status", tmp_path / "run")
    assert st.returncode == 1 and "DAMAGED" in st.stdout and "stats.parquet" in st.stdout
    v = run_cli("verify", tmp_path / "run")
    assert v.returncode == 1 and "model.layers.1.mlp.down_proj.weight' damaged (checksum)" in v.stdout
    assert "stats.parquet: " in v.stdout
    if method in ("emr", "tall_masks", "consensus"):
        assert "model.embed_tokens.weight" in v.stdout and "missing" in v.stdout
    exp = run_cli("export", tmp_path / "run", "--task", "task0", "--output", tmp_path / "exp")
    assert exp.returncode == 1 and "damaged" in exp.stderr and "Traceback" not in exp.stderr
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp.partial-*"))

    rep = run_cli("merge", cfg)
    assert rep.returncode == 0, rep.stderr
    assert f"redoing {len(want_jobs)} job(s): {', '.join(sorted(want_jobs))}" in rep.stderr
    assert tree_digest(tmp_path / "run") == clean
    assert run_cli("verify", tmp_path / "run").returncode == 0
    again = run_cli("merge", cfg)
    assert again.returncode == 0 and "complete and intact; nothing to do" in again.stderr


def test_deleted_shard_of_a_complete_run(tmp_path, fam):
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", workers=1, shard_size="20kB",
                       **METHODS["ties"])
    _merge(cfg, check=True)
    clean = tree_digest(tmp_path / "run")
    shards = sorted((tmp_path / "run" / "merged").glob("*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    st = run_cli("status", tmp_path / "run")
    assert st.returncode == 1 and f"merged/{shards[1].name}: missing" in st.stdout
    exp = run_cli("export", tmp_path / "run", "--task", "task1", "--output", tmp_path / "exp")
    assert exp.returncode == 1 and not (tmp_path / "exp").exists()
    index = json.loads((tmp_path / "run" / "merged" / "model.safetensors.index.json").read_text())
    lost = {t for t, f in index["weight_map"].items() if f == shards[1].name}
    rep = run_cli("merge", cfg)
    assert rep.returncode == 0, rep.stderr
    assert f"redoing {len(lost)} job(s)" in rep.stderr
    assert tree_digest(tmp_path / "run") == clean


def test_resume_redoes_jobs_whose_partial_outputs_were_lost(tmp_path, fam):
    kw = METHODS["emr"]
    ref = write_config(tmp_path / "ref.yaml", fam, tmp_path / "ref", workers=1, **kw)
    _merge(ref, check=True)
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", workers=1, **kw)
    assert _merge(cfg, env_extra={"TADROP_FAULT": "after_job:12"}).returncode == -signal.SIGKILL
    state = tmp_path / "run" / ".tadrop"
    for shard in (state / "unified.partial").glob("*.safetensors"):
        shard.unlink()                                   # every finished job's unified bytes are gone
    done = [json.loads(line) for line in (state / "ledger.jsonl").read_text().splitlines()]
    masks = next(r["result"]["checksums"]["masks"] for r in done if r["result"]["checksums"].get("masks"))
    (state / "masks.zarr.partial" / masks["array"] / sorted(masks["chunks"])[0]).unlink()
    res = _merge(cfg)
    assert res.returncode == 0, res.stderr
    assert "12 finished job(s) lost their outputs" in res.stderr
    assert tree_digest(tmp_path / "run") == tree_digest(tmp_path / "ref")


def _big_family(root: Path) -> dict:
    """Base values near float16's limit and fine-tunes that push lm_head past it."""
    shapes = {"model.norm.weight": (8,), "lm_head.weight": (16, 8)}
    base = {n: torch.full(s, 6.0e4) for n, s in shapes.items()}
    fams = {"base": write_hf(root / "base", base, llama_config(**TINY))}
    for i in range(2):
        sd = {n: t + (1.0e4 * (i + 1) if n == "lm_head.weight" else 1.0) for n, t in base.items()}
        fams[f"t{i}"] = write_hf(root / f"t{i}", sd, llama_config(**TINY))
    return fams


def test_float16_overflow_is_an_error_or_a_clamp(tmp_path):
    fams = _big_family(tmp_path / "fam")
    cfg = write_config(tmp_path / "c.yaml", fams, tmp_path / "run", workers=1, method="task_arithmetic",
                       output_dtype="float16", **{"lambda": 1.0})
    proc = _merge(cfg)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "tensor 'lm_head.weight': float16 overflow: largest magnitude 90000" in proc.stderr
    cfg = write_config(tmp_path / "c2.yaml", fams, tmp_path / "run2", workers=1, method="task_arithmetic",
                       output_dtype="float16", clamp_overflow=True, **{"lambda": 1.0})
    proc = _merge(cfg)
    assert proc.returncode == 0 and "clamped to +-65504" in proc.stderr and "lm_head.weight" in proc.stderr
    out = load_file(str(tmp_path / "run2" / "merged" / "model-00001-of-00001.safetensors"))
    assert torch.isfinite(out["lm_head.weight"]).all() and out["lm_head.weight"].max() == 65504


def test_input_truncated_during_the_merge_is_named(tmp_path):
    fam = make_family(tmp_path / "fam", k=2, seed=4)
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", workers=1, **METHODS["ties"])
    env, flag = _pause_env(tmp_path, "after_job:1")
    proc = _popen_merge(cfg, env)
    target = Path(fam["task1"]) / "model.safetensors"
    try:
        _wait_for(Path(str(flag) + ".reached"), proc)
        (hlen,) = struct.unpack("<Q", target.read_bytes()[:8])
        os.truncate(target, 8 + hlen + 64)
    finally:
        flag.unlink()
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert str(target) in err and "changed" in err and "out of memory" not in err


def test_export_guards(tmp_path, fam):
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", workers=1, **METHODS["emr"])
    _merge(cfg, check=True)
    before = tree_digest(Path(fam["task0"]))
    for out in (Path(fam["task0"]) / "exported", Path(fam["base"])):
        proc = run_cli("export", tmp_path / "run", "--task", "task0", "--output", out)
        assert proc.returncode == 1 and "inside" in proc.stderr
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    proc = run_cli("export", tmp_path / "run", "--task", "task0", "--output", tmp_path / "link")
    assert proc.returncode == 1 and "symlink" in proc.stderr
    assert tree_digest(Path(fam["task0"])) == before and not list((tmp_path / "real").iterdir())

    masks = tmp_path / "run" / "masks.zarr"
    chunk = next(p for p in sorted(masks.rglob("*")) if p.is_file() and "/c/" in str(p))
    saved = chunk.read_bytes()
    chunk.write_bytes(b"\xff" * len(saved))                  # garbage of the right size
    proc = run_cli("export", tmp_path / "run", "--task", "task0", "--output", tmp_path / "exp")
    assert proc.returncode == 1 and "unreadable" in proc.stderr and "Traceback" not in proc.stderr
    chunk.write_bytes(saved)
    meta = masks / "lm_head.weight" / "zarr.json"
    meta_saved = meta.read_bytes()
    meta.write_text("{")
    proc = run_cli("export", tmp_path / "run", "--task", "task0", "--output", tmp_path / "exp")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp.partial-*"))
    meta.write_bytes(meta_saved)
    run_cli("export", tmp_path / "run", "--task", "task0", "--output", tmp_path / "exp", check=True)


def test_free_space_is_checked_up_front(tmp_path):
    """Sparse inputs whose merged output cannot fit on this disk: refused before anything is written."""
    free = shutil.disk_usage(tmp_path).free
    cols = 1024
    rows = (free + 8 * 2**30) // (cols * 4) + 1
    header = json.dumps({"w": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}})
    header = header.encode() + b" " * (-len(header) % 8)
    fams = {}
    for name in ("base", "t0"):
        d = tmp_path / name
        d.mkdir()
        with open(d / "model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + rows * cols * 4)
        fams[name] = d
    cfg = write_config(tmp_path / "c.yaml", fams, tmp_path / "run", workers=1)
    proc = _merge(cfg)
    assert proc.returncode == 1 and "not enough free space" in proc.stderr, proc.stderr
    assert "GB available" in proc.stderr
    assert not (tmp_path / "run" / ".tadrop" / "merged.partial").exists()


def test_ctrl_c_while_workers_start(tmp_path, fam):
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", workers=2, **METHODS["ties"])
    proc = _popen_merge(cfg, {})
    _wait_for(tmp_path / "run" / ".tadrop" / "plan.json", proc)
    time.sleep(0.3)                                  # workers are being spawned and import torch
    os.killpg(proc.pid, signal.SIGINT)               # what Ctrl-C does: the whole foreground group
    out, err = proc.communicate(timeout=300)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode in (0, 130)
    if proc.returncode == 130:
        assert "interrupted" in err
    _merge(cfg, check=True)


def test_verify_inputs_detects_bytes_changed_under_a_restored_mtime(tmp_path):
    fam = make_family(tmp_path / "fam", k=2, seed=6)
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", workers=1, **METHODS["ties"])
    _merge(cfg, "--verify-inputs", check=True)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["input_hashes"]
    target = Path(fam["task0"]) / "model.safetensors"
    st = target.stat()
    with open(target, "r+b") as f:                   # same size, same header, other bytes
        f.seek(st.st_size - 4)
        f.write(b"\x01\x02\x03\x04")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_cli("verify", tmp_path / "run").returncode == 0            # undetectable without hashes
    v = run_cli("verify", tmp_path / "run", "--verify-inputs")
    assert v.returncode == 1 and "input task0/model.safetensors: content changed" in v.stdout
    m = _merge(cfg, "--verify-inputs")
    assert m.returncode == 1 and "task0/model.safetensors changed" in m.stderr
