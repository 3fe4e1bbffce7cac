"""The memory budget, measured: a merge whose one big tensor's inputs are many times the per-worker budget
keeps every worker's peak anonymous memory (sampled from /proc the way scripts/bench_merge.py does)
within memory_budget + 256 MiB (the worker's Python, torch and zarr runtime and allocator slack; README
"Memory"; pipeline.plan.RUNTIME_RESERVE, 320 MiB, also counts the shared libraries' RSS). At this small
budget the engine plans with 96 MiB of it (a quarter is reserved), so the runtime does not fit inside
the budget; mapped input pages are file-backed and not counted.

EMR is the method whose workers used to grow with the tensor size (small float64 block sums kept as
tensors pinned the C heap between chunks: 524 MiB here, 760 MiB with a tensor twice as large);
it now peaks at about 180-230 MiB, and a regression shows as a peak over the bound."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, write_config

sys.path.insert(0, str(REPO / "scripts"))
import bench_memory  # noqa: E402  (the /proc sampling and the K-task inputs of scripts/bench_memory.py)
from pipeline.plan import RUNTIME_RESERVE

SLACK = 256 * 2**20     # the runtime's private memory, under RUNTIME_RESERVE
assert SLACK <= RUNTIME_RESERVE

MiB = 2**20
BUDGET = 128 * MiB
ROWS, COLS = 4096, 8192          # 32 Mi float32 elements: 128 MiB per input, 512 MiB over base + 3 tasks


def _pattern(n: int, k: int) -> torch.Tensor:
    """Cheap deterministic values with a spread of magnitudes (no RNG: generating 1 GiB must be fast)."""
    x = (torch.arange(n, dtype=torch.float64) * (0.6180339887498949 * (k + 1))) % 1.0 - 0.5
    return (x * x * x).float()


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("big")
    n = ROWS * COLS
    base = torch.zeros(ROWS, COLS)
    paths = {}
    for k, name in enumerate(["base", "t0", "t1", "t2"]):
        w = base if name == "base" else base + 0.01 * _pattern(n, k).reshape(ROWS, COLS)
        small = torch.full((64,), 1.0 + 0.001 * k)
        (root / name).mkdir()
        save_file({"big.weight": w, "norm.weight": small}, str(root / name / "model.safetensors"))
        paths[name] = root / name
        del w
    return paths


@pytest.mark.slow
def test_workers_stay_within_the_memory_budget(tmp_path, big_inputs):
    fam = dict(big_inputs)
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run", method="emr", sparsify={"kind": "tadrop"},
                       memory_budget=f"{BUDGET // MiB}MiB", workers=2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "merge", str(cfg), "--quiet"], cwd=REPO,
                            env=env, stderr=subprocess.PIPE, text=True)
    peaks, samples, err = bench_memory.worker_peaks(proc)
    assert proc.returncode == 0, err
    plan = json.loads((tmp_path / "run" / ".tadrop" / "plan.json").read_text())["summary"]
    inputs = plan["input_bytes"]
    assert inputs >= 3 * BUDGET and plan["chunked_tensors"] >= 1, plan    # inputs much larger than it
    assert peaks and samples > 20, (peaks, samples)
    worst = max(peaks.values())
    print(f"\nbudget {BUDGET / MiB:.0f} MiB, inputs {inputs / MiB:.0f} MiB, worker peak anonymous "
          f"{[round(v / MiB) for v in peaks.values()]} MiB over {samples} samples")
    assert worst <= BUDGET + SLACK, (f"a worker reached {worst / MiB:.0f} MiB anonymous, over the "
                                     f"budget + {SLACK / MiB:.0f} MiB")


@pytest.mark.slow
@pytest.mark.parametrize("method,K,shape,budget,chunked", [("emr", 16, (1024, 2048), "1GiB", False),
                                                          ("tall_masks", 32, (2048, 2048), "512MiB", True)])
def test_plan_estimate_bounds_the_worker(tmp_path, method, K, shape, budget, chunked):
    """The plan's per-tensor estimate (what the row chunking is sized by: tadrop.streamed.plan_tensor, and
    the sink's mask staging in pipeline.plan) bounds what a worker really holds at K = 16 and 32: its
    peak anonymous memory minus the same merge's on an 8 x 8 tensor (the runtime). The chunked case's
    engine chunks are smaller than a Zarr mask chunk, so the mask rows gather in the sink's staging
    buffer (K bools per element of up to two mask chunks): an estimate without it fails here, as the
    plans before bench/memory.md did (measured 1.16x the estimate at K = 32)."""
    case = {"method": method, "sparsify": {"kind": "tadrop"}}
    runtime = bench_memory.run(bench_memory.make_family(tmp_path / "tiny", K, (8, 8)), case, budget,
                               tmp_path / "run-t")["peak_anon"]
    r = bench_memory.run(bench_memory.make_family(tmp_path / "big", K, shape), case, budget, tmp_path / "run-b")
    assert r["chunked"] == chunked, r
    print(f"\n{method} K={K} budget {budget}: worker {(r['peak_anon'] - runtime) / MiB:.0f} MiB over its "
          f"runtime ({runtime / MiB:.0f} MiB), plan estimate {r['est'] / MiB:.0f} MiB")
    assert r["peak_anon"] - runtime <= r["est"], (r, runtime)
