"""The decoder-LLM merging benchmark end to end: data -> tokenizer -> pretrain a
small LLaMA -> 8 domain fine-tunes in three settings (full, LoRA, long full) ->
`tadrop merge` / `tadrop export` (through the pipeline API) for every method ->
held-out loss, normalised as the share of the base-to-fine-tune gap the merge
keeps -> bench/eval_llm.{md,json,png}.

Hyperparameters (lambda, alpha, DARE p, TALL lambda_k per domain) are chosen on
the validation split; the test split is scored once per chosen configuration.
Everything is cached under WORK (checkpoints, runs, scores), so an
interrupted benchmark resumes where it stopped.

    nice -n 10 python3 scripts/eval_llm/bench.py [--work eval_llm_data] [--size small|toy]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

import build_data
import lm
import merges
import results
from scores import Scores, mean_share

TADROP = {"kind": "tadrop", "a": 0.5, "b": 0.95, "rescale": "norm", "scope": "tensor"}
NONE = {"kind": "none"}
GRID_TA = [0.1, 0.2, 0.5, 1.0]     # TA, TA + TADrop (DARE keeps TA's lambda)
GRID_TIES = [0.5, 1.0]
GRID_DARE_P = [0.5, 0.9]
GRID_ALPHA = [0.2, 0.5]            # consensus
GRID_TALL = [0.2, 0.3, 0.4, 0.5, 0.6]   # per domain, by `tadrop tune` (the TALL paper's grid)
GRID_A = [0.3, 0.5, 0.7]           # quantile sensitivity (EMR + TADrop): a cross through
GRID_B = [0.9, 0.95, 0.99]         # the default (0.5, 0.95), not the full 3 x 3
TEST_SCORED = 24       # of the 40 test sequences built per domain: the cost of ~45 scored rows on 2 cores
STEPS = ["data", "pretrain", "finetune", "individual", "write"]

# Recipes per size. "long" is the setting where adaptivity can show: more steps
# at a larger learning rate, so task vectors move far from Gaussian noise.
RECIPES = {
    "small": {"pretrain": lm.Recipe(steps=200, lr=3e-3, weight_decay=0.01),
              "full": lm.Recipe(steps=16, lr=1e-3),
              "lora": lm.Recipe(steps=16, lr=1e-2, lora_r=8, lora_alpha=16),
              "long": lm.Recipe(steps=48, lr=3e-3, batch=4)},
    "toy": {"pretrain": lm.Recipe(steps=30, lr=3e-3, batch=4, weight_decay=0.01),
            "full": lm.Recipe(steps=6, lr=1e-3, batch=4),
            "lora": lm.Recipe(steps=6, lr=3e-3, batch=4, lora_r=4, lora_alpha=8),
            "long": lm.Recipe(steps=12, lr=3e-3, batch=4)},
}


class Bench:
    def __init__(self, work: Path, size: str):
        self.work = work.resolve()
        self.size = size
        self.recipes = RECIPES[size]
        self.domains = list(build_data.corpora.DOMAINS)
        self.scores = Scores(self.work / "scores.json")
        self.chosen: dict = {}
        self.not_run: dict[str, str] = {}
        self.rows: dict[str, dict[str, tuple[str, dict]]] = {}   # setting -> key -> (label, spec)
        self.base = self.work / "models" / "base"
        self.loader = lm.Loader()
        self.deadline: float | None = None
        self.tested: dict[str, dict] = {}

    # -- data and training ---------------------------------------------------------------
    def load_data(self) -> None:
        self.tokens = torch.load(self.work / "data" / "tokens.pt")
        self.manifest = json.loads((self.work / "data_check.json").read_text())

    def pretrain(self) -> None:
        if not (self.base / "config.json").exists():
            info = lm.pretrain(self.size, self.manifest["vocab"], self.manifest["seq"],
                               self.tokens["pretrain"], self.recipes["pretrain"],
                               self.work / "tokenizer", self.base)
            print(json.dumps(info), flush=True)

    def model_dir(self, setting: str, d: str) -> Path:
        return self.work / "models" / setting / d

    def adapter_dir(self, d: str) -> Path:
        return self.work / "adapters" / d

    def finetune(self, settings=("full", "lora")) -> None:
        for s in settings:
            r = self.recipes[s]
            for d in self.domains:
                out = self.model_dir(s, d)
                if (out / "config.json").exists():
                    continue
                data = self.tokens[f"{d}/train"]
                if r.lora_r:
                    info = lm.finetune_lora(self.base, data, r, self.adapter_dir(d), out, f"{s}:{d}")
                else:
                    info = lm.finetune_full(self.base, data, r, out, f"{s}:{d}")
                print(json.dumps(info), flush=True)

    def inputs(self, setting: str) -> list[dict]:
        """The merge config's `models:`. LoRA fine-tunes enter as what a user merges, the PEFT
        adapter directories (`models: - {name, adapter: DIR}`, read by the product); their
        merge_and_unload checkpoints only score the individual fine-tunes."""
        if setting == "lora":
            return [{"name": d, "adapter": str(self.adapter_dir(d))} for d in self.domains]
        return [{"name": d, "path": str(self.model_dir(setting, d))} for d in self.domains]

    # -- scoring -----------------------------------------------------------------------
    def score_dir(self, path: Path, label: str, split: str, domains: list[str]) -> None:
        todo = [d for d in domains if self.scores.get(label, split, d) is None]
        if not todo:
            return
        model = self.loader.load(path)
        for d in todo:
            data = self.tokens[f"{d}/{split}"]
            self.scores.put(label, split, d, lm.seq_losses(model, data[:TEST_SCORED] if split == "test" else data))

    def individual(self) -> None:
        for split in ("val", "test"):
            self.score_dir(self.base, "base", split, self.domains)
            for s in self.settings_trained():
                for d in self.domains:
                    self.score_dir(self.model_dir(s, d), f"{s}/individual", split, [d])

    def check_gaps(self) -> None:
        """Every fine-tune must lower its domain's held-out loss, or the kept share
        (normalised by that gap) means nothing: stop here, naming the domain."""
        for s in self.settings_trained():
            for split in ("val", "test"):
                for d in self.domains:
                    b = self.scores.mean_loss("base", split, d)
                    i = self.scores.mean_loss(f"{s}/individual", split, d)
                    if not i < b:
                        raise SystemExit(f"{s} fine-tune of {d}: {split} loss {i:.4f} is not below the "
                                         f"base's {b:.4f}; a stronger recipe is needed")

    def settings_trained(self) -> list[str]:
        return [s for s in ("full", "lora", "long") if (self.model_dir(s, self.domains[-1]) / "config.json").exists()]

    def share(self, setting: str, label: str, split: str) -> dict[str, float]:
        return mean_share(self.scores, f"{setting}/{label}", "base", f"{setting}/individual", split,
                          self.domains)

    def evaluate(self, setting: str, label: str, spec: dict, split: str) -> dict[str, float]:
        """Merge (cached) and score `spec` on `split`; the kept share per domain and its mean."""
        key = f"{setting}/{label}"
        if not self.scores.has(key, split, self.domains):
            run = merges.merge(key.replace("/", "__"), spec, self.base, self.inputs(setting), self.work)
            if spec["method"] in merges.PER_TASK_METHODS:
                for d in self.domains:
                    self.score_dir(merges.export(run, d), key, split, [d])
            else:
                self.score_dir(run / "merged", key, split, self.domains)
        return self.share(setting, label, split)

    def out_of_time(self, setting: str, key: str) -> bool:
        """Past --deadline no new work starts: the row is listed as not run."""
        if self.deadline is not None and time.time() > self.deadline:
            self.not_run.setdefault(f"{setting}/{key}", "time budget of the run spent (--deadline)")
            return True
        return False

    def pick(self, setting: str, key: str, candidates: list[tuple[str, dict]]) -> None:
        """Best mean validation share; ties go to the earlier candidate."""
        best = None
        if self.out_of_time(setting, key):
            return
        for label, spec in candidates:
            why = merges.supports(spec, self.domains)
            if why:
                self.not_run[f"{setting}/{key}"] = why
                return
            m = self.evaluate(setting, label, spec, "val")["mean"]
            print(f"  [{setting}] select {label:34s} val share {m:.4f}", flush=True)
            if best is None or m > best[0] + 1e-12:
                best = (m, label, spec)
        self.chosen[f"{setting}/{key}"] = {"label": best[1], "val_share": best[0]}
        self.rows.setdefault(setting, {})[key] = (best[1], best[2])

    def fixed(self, setting: str, key: str, spec: dict, label: str | None = None) -> None:
        if self.out_of_time(setting, key):
            return
        why = merges.supports(spec, self.domains)
        if why:
            self.not_run[f"{setting}/{key}"] = why
            return
        self.rows.setdefault(setting, {})[key] = (label or key, spec)

    # -- the methods -----------------------------------------------------------------------
    def table1(self, setting: str) -> None:
        def ta_like(key, sparsify, grid, method="task_arithmetic"):
            self.pick(setting, key, [(f"{key}@{lam}", {"method": method, "sparsify": sparsify,
                                                      "lambda": lam}) for lam in grid])

        ta_like("ta", NONE, GRID_TA)
        ta_like("ta_tadrop", TADROP, GRID_TA)
        ta_like("ties", {"kind": "topk", "density": 0.2, "scope": "tensor"}, GRID_TIES, "ties")
        ta_like("ties_tadrop", TADROP, GRID_TIES, "ties")
        self.fixed(setting, "emr", {"method": "emr", "sparsify": NONE})
        self.fixed(setting, "emr_tadrop", {"method": "emr", "sparsify": TADROP})
        for key, sp in (("tall", NONE), ("tall_tadrop", TADROP)):
            tall = self.tall_lambdas(setting, key, sp)
            if tall is None:
                continue
            tag = hashlib.sha256(json.dumps(tall, sort_keys=True).encode()).hexdigest()[:8]
            self.fixed(setting, key, {"method": "tall_masks", "sparsify": sp, "tall": tall},
                       f"{key}@tuned-{tag}")
            ckey = key.replace("tall", "consensus")
            self.pick(setting, ckey, [
                (f"{ckey}@{a}", {"method": "consensus", "sparsify": sp, "tall": tall,
                                 "consensus": {"k_min": 2, "alpha": a, "inner": "task_arithmetic"}})
                for a in GRID_ALPHA])
        # DARE rescales its survivors by 1/(1-p), so it keeps TA's lambda (as the DARE
        # paper does); p is chosen on validation.
        lam = self.rows[setting]["ta"][1]["lambda"]
        self.pick(setting, "dare", [(f"dare_p{p}@{lam}", {"method": "task_arithmetic", "lambda": lam,
                                                          "sparsify": {"kind": "dare", "p": p}})
                                    for p in GRID_DARE_P])

    def tall_lambdas(self, setting: str, key: str, sparsify: dict) -> dict | None:
        """TALL's lambda_k per domain, chosen by the product: `tadrop tune` (pipeline.tune.tune,
        the CLI's code) on a TALL run, each domain scored by its own validation loss
        (tune_score.val_neg_loss). The tuned masks equal a fresh merge with those `tall.lambdas`,
        which is the row the test split scores."""
        if self.out_of_time(setting, key):
            return None
        from pipeline.tune import tune

        import tune_score
        run = merges.merge(f"{setting}__{key}@tune", {
            "method": "tall_masks", "sparsify": sparsify,
            "tall": {"default_lambda": 0.4, "inner": "task_arithmetic"}}, self.base, self.inputs(setting),
            self.work)
        os.environ["TADROP_EVAL_LLM_WORK"] = str(self.work)
        t0 = time.time()
        rec = tune(run, GRID_TALL, "tune_score:val_neg_loss", model_class="LlamaForCausalLM",
                   score_fn=tune_score.val_neg_loss, quiet=True, out=io.StringIO())
        lambdas = {d: float(rec["lambdas"][d]) for d in self.domains}
        self.chosen[f"{setting}/{key}"] = {
            "lambdas": lambdas, "by": "tadrop tune (pipeline.tune), score tune_score:val_neg_loss",
            "grid": GRID_TALL, "val_loss": {d: {g: -v for g, v in rec["scores"][d].items()} for d in self.domains}}
        print(f"  [{setting}] {key} lambda_k {lambdas} (tadrop tune, {time.time() - t0:.0f}s)", flush=True)
        return {"lambdas": lambdas, "default_lambda": 0.4, "inner": "task_arithmetic"}

    def table4(self, setting: str) -> None:
        """EMR ablations: both integrations x three rescales, both global scopes, matched top-k."""
        for integ in ("rescaled", "mask"):
            for resc in ("norm", "none", "inverse_keep"):
                key = f"emr_{integ}_{resc}"
                if key == "emr_rescaled_norm":
                    continue           # the default: Table 1's EMR + TADrop row, already there
                spec = {"method": "emr", "sparsify": {**TADROP, "rescale": resc}}
                if integ == "mask":
                    spec["emr"] = {"tadrop": "mask"}
                self.fixed(setting, key, spec)
        for scope in ("model", "global_threshold"):
            self.fixed(setting, f"emr_scope_{scope}", {"method": "emr", "sparsify": {**TADROP, "scope": scope}})
        self.matched_topk(setting)

    def matched_topk(self, setting: str) -> None:
        density = self.kept_fraction(setting)
        self.chosen[f"{setting}/emr_topk"] = {"density": density,
                                              "why": "the fraction EMR + TADrop keeps: only adaptivity differs"}
        self.fixed(setting, "emr_topk", {"method": "emr",
                                         "sparsify": {"kind": "topk", "density": density, "scope": "tensor"}},
                   f"emr_topk@{density}")

    def kept_fraction(self, setting: str) -> float:
        """Parameter-weighted fraction of task-vector entries EMR + TADrop keeps."""
        import pyarrow.parquet as pq
        run = merges.merge(f"{setting}__emr_tadrop", {"method": "emr", "sparsify": TADROP}, self.base,
                           self.inputs(setting), self.work)
        t = [r for r in pq.read_table(run / "stats.parquet").to_pylist() if r["kept"] is not None]
        return round(sum(r["kept"] for r in t) / sum(r["numel"] for r in t), 3)

    def grid(self, setting: str) -> dict[str, float]:
        """Quantile sensitivity of EMR + TADrop, scored on the validation split
        (a sensitivity map, not a selection: no choice is made from it)."""
        out = {}
        for a, b in [(a, 0.95) for a in GRID_A] + [(0.5, b) for b in GRID_B if b != 0.95]:
            if self.out_of_time(setting, f"grid a={a} b={b}"):
                continue
            label = "emr_tadrop" if (a, b) == (0.5, 0.95) else f"emr_tadrop_a{a}_b{b}"
            spec = {"method": "emr", "sparsify": {**TADROP, "a": a, "b": b}}
            out[f"{a},{b}"] = self.evaluate(setting, label, spec, "val")["mean"]
            print(f"  [{setting}] grid a={a} b={b} val share {out[f'{a},{b}']:.4f}", flush=True)
        self.grid_val = out
        return out

    def long(self) -> None:
        s = "long"
        for key, sp, grid, method in (("ta", NONE, GRID_TA, "task_arithmetic"),
                                      ("ta_tadrop", TADROP, GRID_TA, "task_arithmetic"),
                                      ("ties", {"kind": "topk", "density": 0.2, "scope": "tensor"}, GRID_TIES, "ties"),
                                      ("ties_tadrop", TADROP, GRID_TIES, "ties")):
            self.pick(s, key, [(f"{key}@{lam}", {"method": method, "sparsify": sp, "lambda": lam})
                               for lam in grid])
        self.fixed(s, "emr", {"method": "emr", "sparsify": NONE})
        self.fixed(s, "emr_tadrop", {"method": "emr", "sparsify": TADROP})
        self.fixed(s, "emr_mask_norm", {"method": "emr", "sparsify": TADROP, "emr": {"tadrop": "mask"}})
        self.fixed(s, "emr_scope_global_threshold",
                   {"method": "emr", "sparsify": {**TADROP, "scope": "global_threshold"}})
        self.matched_topk(s)

    def test(self, setting: str) -> dict[str, dict]:
        out = {}
        for key, (label, spec) in self.rows.get(setting, {}).items():
            if key in self.tested.get(setting, {}):
                out[key] = self.tested[setting][key]
                continue
            if self.out_of_time(setting, key):
                continue
            t0 = time.time()
            out[key] = self.evaluate(setting, label, spec, "test")
            self.tested.setdefault(setting, {})[key] = out[key]
            print(f"test [{setting}] {key:28s} {label:28s} share {out[key]['mean']:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("eval_llm_data"))
    ap.add_argument("--size", choices=sorted(RECIPES), default="small")
    ap.add_argument("--until", choices=STEPS, default="write", help="stop after this step")
    ap.add_argument("--no-strict", action="store_true", help="go on when the data hash differs")
    ap.add_argument("--rebuild-data", action="store_true",
                    help="rebuild and re-check the data even when WORK already holds it")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: leave the other core to others)")
    ap.add_argument("--deadline", help="UTC HH:MM after which no new merge starts (rows left are listed as not run)")
    ap.add_argument("--bench-out", type=Path, default=merges.REPO / "bench")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    b = Bench(a.work, a.size)
    # Step times add up over invocations on one WORK, so that a resumed run
    # reports the whole cost (bench/eval_llm.md says how many invocations).
    tfile = b.work / "timings.json"
    b.work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = json.loads(tfile.read_text()) if tfile.exists() else {}
    timings["invocations"] = timings.get("invocations", 0) + 1

    def step(name, fn):
        t0 = time.time()
        r = fn()
        timings[name] = round(timings.get(name, 0) + time.time() - t0, 1)
        tfile.write_text(json.dumps(timings, indent=1))
        print(f"== {name} done in {time.time() - t0:.1f}s (total {time.time() - t_start:.0f}s)", flush=True)
        return r

    if a.rebuild_data or not (b.work / "data" / "tokens.pt").exists() \
            or not (b.work / "data_check.json").exists():
        step("data", lambda: build_data.build(b.work, strict=not a.no_strict))
    b.load_data()
    if a.until == "data":
        return
    step("pretrain", b.pretrain)
    if a.until == "pretrain":
        return
    step("finetune", lambda: b.finetune(("full", "lora", "long")))
    if a.until == "finetune":
        return
    step("individual", b.individual)
    b.check_gaps()
    if a.until == "individual":
        return
    # Each section is selected and then tested at once, most important first, so
    # that a run cut by --deadline leaves whole sections. A row whose config the
    # product refuses (merges.supports) is listed as not run, with the reason.
    if a.deadline:
        hh, mm = map(int, a.deadline.split(":"))
        now = time.gmtime()
        b.deadline = time.time() + ((hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    for name, fn, setting in (("table1_full", lambda: b.table1("full"), "full"),
                              ("long", b.long, "long"),
                              ("table4", lambda: b.table4("full"), "full"),
                              ("table1_lora", lambda: b.table1("lora"), "lora"),
                              ("grid", lambda: b.grid("full"), None)):
        step(name, fn)
        if setting:
            step(f"test_{setting}", lambda s=setting: b.test(s))
    test = {s: b.test(s) for s in ("full", "lora", "long")}
    timings["total"] = round(sum(v for k, v in timings.items() if k not in ("total", "invocations")), 1)
    tfile.write_text(json.dumps(timings, indent=1))
    results.write(a.bench_out, b, test, timings)


if __name__ == "__main__":
    sys.exit(main())
