"""Helpers both merging benchmarks use (scripts/eval/, MiniLM; scripts/eval_llm/, a small LLaMA):
the data manifest's canonical JSON and package versions, a run's completeness and merge time,
and the generated block of a docs/ page.

The benchmarks run as scripts (`python3 scripts/eval/bench.py`), each with its own folder first
on sys.path and modules of the same names (build_data, merges, results); this file sits one
level up so that both import it under one unambiguous name:
`sys.path.append(str(Path(__file__).resolve().parents[1])); import eval_common`.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Callable


def canonical(obj) -> bytes:
    """The bytes a manifest hashes: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def apt_versions(packages: list[str]) -> dict[str, str]:
    """{'apt:NAME': version} of the installed Debian packages the data comes from."""
    out = {}
    q = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *packages],
                       capture_output=True, text=True).stdout
    for line in q.splitlines():
        name, _, ver = line.partition(" ")
        out[f"apt:{name}"] = ver
    return out


def run_complete(run: Path) -> bool:
    """Whether `tadrop merge` finished RUN (run.json says complete)."""
    try:
        return bool(json.loads((Path(run) / "run.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def merge_seconds(run: Path) -> float | None:
    """The merge's wall time the benchmark stamped into RUN/bench_timing.json."""
    try:
        return json.loads((Path(run) / "bench_timing.json").read_text())["merge_s"]
    except (OSError, ValueError, KeyError):
        return None


def update_doc(doc: Path, lines: list[str], start: str, end: str,
               heading: Callable[[str], str] = lambda ln: ln) -> None:
    """Replace the block between the `start` and `end` markers of `doc` with `lines` (each
    passed through `heading`, which demotes headings to fit the page); the prose around the
    block stays hand-written. A page without both markers is left alone."""
    if not doc.exists():
        return
    text = doc.read_text()
    if start not in text or end not in text:
        return
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    block = "\n".join(heading(ln) for ln in lines)
    doc.write_text(f"{head}{start}\n{block}\n{end}{tail}")
