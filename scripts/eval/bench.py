"""The merging benchmark end to end: data -> fine-tunes -> `tadrop merge` /
`tadrop export` for every method -> accuracy tables (bench/eval.md, .json).

Hyperparameters (TA / TIES / DARE lambda, DARE p, consensus alpha, TALL
per-task lambda) are chosen on the validation split carved from the training
data; the test split is scored once per chosen configuration. Everything is
cached under WORK (fine-tunes, runs, scores), so an interrupted benchmark
resumes where it stopped.

    nice -n 10 python3 scripts/eval/bench.py [--work eval_data] [--until STEP]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import build_data
import encoder
import finetune
import merges
import results
from evaluate import Scores, score_model
from tasks import TASKS
from tune_score import VAL_PER_CLASS, val_subset

TADROP = {"kind": "tadrop", "a": 0.5, "b": 0.95, "rescale": "norm", "scope": "tensor"}
NONE = {"kind": "none"}
GRID_TA = [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]        # TA, TA+TADrop, DARE, consensus alpha
GRID_TIES = [0.4, 0.7, 1.0, 1.3, 1.6, 2.0]       # TIES, TIES+TADrop
GRID_DARE_P = [0.5, 0.9]
GRID_TALL = [0.2, 0.3, 0.4, 0.5, 0.6]                 # TALL masks, per task (`tadrop tune`)
STEPS = ["data", "finetune", "individual", "select", "test", "write"]


class Bench:
    def __init__(self, work: Path, workers: int):
        self.work = work.resolve()
        self.workers = workers
        self.names = [t.name for t in TASKS]
        self.scores = Scores(self.work / "scores.json")
        self.chosen: dict = {}

    # -- data and models -----------------------------------------------------
    def load_tasks(self) -> None:
        self.tasks = {n: encoder.load_task(self.work, n) for n in self.names}
        for t in self.tasks.values():    # the selection subset, fixed and class-balanced
            t["splits"]["valsel"] = val_subset(t["splits"]["val"], VAL_PER_CLASS)
        self.base = encoder.base_path()
        self.models = {n: self.work / "models" / n for n in self.names}

    def finetune(self) -> None:
        for n in self.names:
            if not self.models[n].exists():
                info = finetune.finetune(self.tasks[n], self.models[n])
                print(json.dumps(info), flush=True)

    # -- scoring helpers -------------------------------------------------------
    def score_merged(self, label: str, run: Path, split: str) -> dict[str, float]:
        return score_model(run / "merged", self.tasks, split, label, self.scores)

    def score_per_task(self, label: str, run: Path, split: str, tasks: list[str] | None = None) -> dict:
        out = {}
        for n in tasks or self.names:
            if self.scores.get(label, split, n) is None:
                exp = self.work / "export" / label / n
                merges.export(run, n, exp, self.work / "logs" / f"{label}.log")
                score_model(exp, {n: self.tasks[n]}, split, label, self.scores)
                shutil.rmtree(exp)
            out[n] = self.scores.get(label, split, n)
        return out

    def evaluate(self, label: str, spec: dict, split: str, tasks: list[str] | None = None) -> dict:
        names = tasks or self.names
        if self.scores.has(label, split, names):
            return {n: self.scores.get(label, split, n) for n in names}
        run = merges.merge(label, spec, self.base, self.models, self.work, self.workers)
        if spec["method"] in merges.PER_TASK_METHODS:
            return self.score_per_task(label, run, split, names)
        return {n: v for n, v in self.score_merged(label, run, split).items() if n in names}

    def retire(self, label: str) -> None:
        """A selection run is not needed once scored: free its disk (a later use re-merges)."""
        run = self.work / "runs" / label
        if run.exists():
            merges.drop_outputs(run)
            (run / "bench_config.yaml").unlink(missing_ok=True)

    def pick(self, key: str, candidates: list[tuple[str, dict]]) -> tuple[str, dict]:
        """Best mean validation accuracy; ties go to the earlier (smaller) value."""
        best = None
        for label, spec in candidates:
            acc = self.evaluate(label, spec, "valsel")
            mean = sum(acc.values()) / len(acc)
            print(f"  select {label:32s} val mean {mean:.4f}", flush=True)
            if best is None or mean > best[0] + 1e-12:
                best = (mean, label, spec)
            self.retire(label)
        self.chosen[key] = {"label": best[1], "val_mean": best[0]}
        return best[1], best[2]

    # -- the methods -------------------------------------------------------------
    def plan(self) -> list[tuple[str, str, dict]]:
        """(row key, label, spec) of every Table 1 and Table 4 entry, choosing on val."""
        rows = []

        def ta_like(key: str, sparsify: dict, grid: list[float], method="task_arithmetic"):
            cands = [(f"{key}@{lam}", {"method": method, "sparsify": sparsify, "lambda": lam})
                     for lam in grid]
            rows.append((key, *self.pick(key, cands)))

        ta_like("ta", NONE, GRID_TA)
        ta_like("ta_tadrop", TADROP, GRID_TA)
        ta_like("ties", {"kind": "topk", "density": 0.2, "scope": "tensor"}, GRID_TIES, "ties")
        ta_like("ties_tadrop", TADROP, GRID_TIES, "ties")
        rows.append(("emr", "emr", {"method": "emr", "sparsify": NONE}))
        rows.append(("emr_tadrop", "emr_tadrop", {"method": "emr", "sparsify": TADROP}))

        # TALL masks: lambda_k per task from GRID_TALL, each task on its own val, chosen by the
        # product (`tadrop tune` with tune_score.val_accuracy); the tuned masks equal a fresh merge
        # with those tall.lambdas, which is what the test rows below merge.
        lambdas, best = self.tune_tall()
        self.chosen["tall"] = {"lambdas": lambdas, "val_mean": sum(best.values()) / len(best)}
        tall = {"lambdas": lambdas, "default_lambda": 0.4, "inner": "task_arithmetic"}
        rows.append(("tall", "tall@selected", {"method": "tall_masks", "sparsify": NONE, "tall": tall}))

        # Consensus (TA inner) on the TALL masks chosen above; alpha on val.
        cands = [(f"consensus@{a}", {"method": "consensus", "sparsify": NONE, "tall": tall,
                                     "consensus": {"k_min": 2, "alpha": a, "inner": "task_arithmetic"}})
                 for a in GRID_TA]
        rows.append(("consensus", *self.pick("consensus", cands)))

        cands = [(f"dare_p{p}@{lam}", {"method": "task_arithmetic", "lambda": lam,
                                       "sparsify": {"kind": "dare", "p": p}})
                 for p in GRID_DARE_P for lam in GRID_TA]
        rows.append(("dare", *self.pick("dare", cands)))

        # Table 4: EMR ablations (no hyperparameter to choose).
        for key, change in [("emr_tadrop_rescale_none", {"rescale": "none"}),
                            ("emr_tadrop_inverse_keep", {"rescale": "inverse_keep"}),
                            ("emr_tadrop_scope_model", {"scope": "model"})]:
            rows.append((key, key, {"method": "emr", "sparsify": {**TADROP, **change}}))
        density = self.matched_density()
        self.chosen["emr_topk"] = {"density": density,
                                   "why": "the fraction EMR + TADrop keeps, so only adaptivity differs"}
        rows.append(("emr_topk", f"emr_topk@{density}",
                     {"method": "emr", "sparsify": {"kind": "topk", "density": density, "scope": "tensor"}}))
        return rows

    def tune_tall(self) -> tuple[dict[str, float], dict[str, float]]:
        """`tadrop tune` on a TALL run: per task the chosen lambda and its validation accuracy."""
        label = "tall@tune"
        spec = {"method": "tall_masks", "sparsify": NONE,
                "tall": {"default_lambda": 0.4, "inner": "task_arithmetic"}}
        run = merges.merge(label, spec, self.base, self.models, self.work, self.workers)
        os.environ["TADROP_EVAL_WORK"] = str(self.work)
        here = str(Path(__file__).resolve().parent)
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
        merges.tadrop("tune", run, "--grid", ",".join(map(str, GRID_TALL)),
                      "--score", "tune_score:val_accuracy", "--model-class", "AutoModel", "--quiet",
                      log=self.work / "logs" / f"{label}.log", timeout=7200)
        rec = json.loads((run / "run.json").read_text())["tune"]
        for n in self.names:
            print(f"  tune  {n:12s} lambda {rec['lambdas'][n]}  val "
                  + json.dumps({g: round(a, 3) for g, a in rec["scores"][n].items()}), flush=True)
        lambdas = {n: float(rec["lambdas"][n]) for n in self.names}
        best = {n: rec["scores"][n][str(lambdas[n])] for n in self.names}
        self.retire(label)
        return lambdas, best

    def matched_density(self) -> float:
        """Parameter-weighted fraction of task-vector entries EMR + TADrop keeps."""
        import pyarrow.parquet as pq
        run = merges.merge("emr_tadrop", {"method": "emr", "sparsify": TADROP}, self.base,
                           self.models, self.work, self.workers)
        t = pq.read_table(run / "stats.parquet").to_pylist()
        kept = sum(r["kept"] for r in t if r["kept"] is not None)
        numel = sum(r["numel"] for r in t if r["kept"] is not None)
        return round(kept / numel, 3)

    def test(self, rows: list[tuple[str, str, dict]]) -> dict[str, dict]:
        out = {}
        for key, label, spec in rows:
            t0 = time.time()
            out[key] = self.evaluate(label, spec, "test")
            mean = sum(out[key].values()) / len(out[key])
            print(f"test {key:26s} {label:28s} mean {mean:.4f} ({time.time() - t0:.0f}s)", flush=True)
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("eval_data"))
    ap.add_argument("--until", choices=STEPS, default="write", help="stop after this step")
    ap.add_argument("--workers", type=int, default=2, help="tadrop merge workers")
    ap.add_argument("--no-strict", action="store_true", help="go on when the data hash differs")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for fine-tuning and scoring (1: leave the other core to others)")
    ap.add_argument("--bench-out", type=Path, default=merges.REPO / "bench")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    b = Bench(a.work, a.workers)
    timings = {}

    def step(name, fn):
        t0 = time.time()
        r = fn()
        timings[name] = round(time.time() - t0, 1)
        print(f"== {name} done in {timings[name]}s", flush=True)
        return r

    manifest = step("data", lambda: build_data.build(a.work, strict=not a.no_strict))
    b.load_tasks()
    if a.until == "data":
        return
    step("finetune", b.finetune)
    if a.until == "finetune":
        return

    def individual():
        base = score_model(None, b.tasks, "test", "zeroshot", b.scores)
        ind = {n: score_model(b.models[n], {n: b.tasks[n]}, "test", "individual", b.scores)[n]
               for n in b.names}
        return base, ind
    base, ind = step("individual", individual)
    print(f"zero-shot mean {sum(base.values()) / 8:.4f}; individual mean {sum(ind.values()) / 8:.4f}")
    if a.until == "individual":
        return
    rows = step("select", b.plan)
    if a.until == "select":
        return
    test = step("test", lambda: b.test(rows))
    if a.until == "test":
        return
    timings["total"] = round(time.time() - t_start, 1)
    results.write(a.bench_out, b, rows, {"zeroshot": base, "individual": ind, **test},
                  manifest, timings, VAL_PER_CLASS)


if __name__ == "__main__":
    sys.exit(main())
