"""The order jobs are handed out (pipeline.plan.job_order): the long poles first, then the base's file
order, the last tenth of the bytes largest first.  File order is what makes the kernel's read-ahead past
one tensor land in the next job's bytes (README "Resume"); only the order changes, never the bytes."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from conftest import write_config
from pipeline import sources
from pipeline.checkpoints import validate_inputs
from pipeline.config import load_config
from pipeline.job import Job
from pipeline.plan import job_order, make_plan


def _layered() -> tuple[list[Job], dict]:
    """An embedding and an LM head of 200 bytes around 6 layers of (q 10, mlp 30, norm 1)."""
    names = ["embed"] + [f"L{i}.{t}" for i in range(6) for t in ("q", "mlp", "norm")] + ["head"]
    size = {"embed": 200, "head": 200, "q": 10, "mlp": 30, "norm": 1}
    jobs = [Job("merge", n, size[n.split(".")[-1]]) for n in names]
    position, off = {}, 0
    for j in jobs:
        position[j.tensor] = (0, off)
        off += j.nbytes
    return jobs, position


def test_long_poles_then_file_order_then_a_largest_first_tail():
    jobs, position = _layered()
    shuffled = [jobs[i] for i in np.random.default_rng(0).permutation(len(jobs))]
    got = [j.tensor for j in job_order(shuffled, position)]
    # 646 bytes over 20 jobs: over 4x the mean (129.2) are the embedding and the head (a tie: file
    # order); the tail is the longest suffix of the rest within 64.6 bytes: L4.norm and layer 5 (42)
    assert got == (["embed", "head"]
                   + [f"L{i}.{t}" for i in range(4) for t in ("q", "mlp", "norm")] + ["L4.q", "L4.mlp"]
                   + ["L5.mlp", "L5.q", "L4.norm", "L5.norm"])


def test_every_job_once_and_size_ties_do_not_reorder_files():
    jobs, position = _layered()
    order = job_order(list(reversed(jobs)), position)
    assert sorted(j.id for j in order) == sorted(j.id for j in jobs)
    assert job_order([], position) == []
    # a tensor the base's files do not place goes after the placed ones (here into the tail, behind
    # the placed tensor of its size)
    got = [j.tensor for j in job_order([Job("merge", "zz", 10)] + jobs, position)]
    assert got[-5:] == ["L5.mlp", "L5.q", "zz", "L4.norm", "L5.norm"]


def _write_in_order(path: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
    """A safetensors file with its tensors in the given order (safetensors' own writer sorts by name)."""
    header, off = {}, 0
    for name, a in tensors:
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, a in tensors:
            f.write(np.ascontiguousarray(a, dtype=np.float32).tobytes())


def test_plan_follows_the_base_files_not_names_or_sizes(tmp_path):
    """Tensors stored in model order (attention before the MLP, as Hugging Face writes them), whose
    names sort otherwise and whose sizes differ: the plan hands them out in the files' order."""
    rng = np.random.default_rng(1)
    layout = []
    for i in range(4):
        layout += [(f"layers.{i}.self_attn.q_proj.weight", (16, 16)), (f"layers.{i}.mlp.up_proj.weight", (48, 16)),
                   (f"layers.{i}.input_layernorm.weight", (16,))]
    family = {}
    for m in ("base", "a", "b"):
        (tmp_path / m).mkdir()
        _write_in_order(tmp_path / m / "model.safetensors",
                        [(n, rng.standard_normal(s).astype(np.float32)) for n, s in layout])
        family[m] = tmp_path / m
    cfg = load_config(write_config(tmp_path / "c.yaml", family, tmp_path / "out", method="ties"))
    base, models = sources.open_inputs(cfg)
    table = validate_inputs(base, models, cfg.passthrough, frozenset())
    order = [j.tensor for j in make_plan(cfg, base, models, table).jobs["merge"]]
    names = [n for n, _ in layout]
    table_bytes = lambda n: base.tensors[n].nbytes  # noqa: E731
    last = [n for n in names if n.startswith("layers.3.")]   # the tail (10% of the bytes) is in here
    head = [n for n in order if n not in last]
    assert head == [n for n in names if n not in last]       # file order, not sorted(names) nor by size
    assert head != sorted(head) and head != sorted(head, key=lambda n: -table_bytes(n))
    assert sorted(order[-len(last):]) == sorted(last)
