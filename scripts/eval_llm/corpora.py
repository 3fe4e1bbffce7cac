"""Raw documents of each text domain, read from files that Debian packages put
on the machine (scripts/eval_llm/setup_data.sh installs the few that a base
image lacks).

Why these readers: the language model, its tokenizer and every fine-tune are
trained here, offline, so the only text available is what packages ship.
Each reader takes its files from named packages (`dpkg -L`) or from packages
of priority required/important, not from a glob over the whole file system,
so that another engineer's `apt-get install` does not silently add documents;
build_data.py still checks the built data against a hash manifest. Readers
walk files in sorted order and cap each document, so no single file dominates.
"""
from __future__ import annotations

import glob
import gzip
import os
import re
import subprocess
from pathlib import Path

Docs = list[str]
DOC_CHARS = 6000         # a document is at most this many characters of one file


def _ws_lines(text: str) -> str:
    """Trim trailing blanks and collapse runs of empty lines (keeps code layout)."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _dpkg_files(*packages: str) -> list[str]:
    out = subprocess.run(["dpkg", "-L", *packages], capture_output=True, text=True)
    files = sorted({f for f in out.stdout.splitlines() if os.path.isfile(f) and not os.path.islink(f)})
    if not files:
        raise SystemExit(f"no files from packages {packages}: run scripts/eval_llm/setup_data.sh")
    return files


def _base_packages() -> list[str]:
    """Packages of priority required/important: the base system, which every Debian has."""
    q = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Priority} ${db:Status-Abbrev}\n"],
                       capture_output=True, text=True, check=True).stdout
    return sorted(p.split(":")[0] for p, prio, st in (ln.split(" ", 2) for ln in q.splitlines())
                  if prio in ("required", "important") and st.startswith("ii"))


def _read(path: str) -> str | None:
    try:
        raw = gzip.open(path).read() if path.endswith(".gz") else Path(path).read_bytes()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def _docs(paths: list[str], clean=_ws_lines, min_chars: int = 200) -> Docs:
    out = []
    for p in paths:
        text = _read(p)
        if text is None:
            continue
        text = clean(text)
        if len(text) >= min_chars:
            out.append(text[:DOC_CHARS])
    return out


# -- man pages (roff source, macros reduced to their text) ----------------------
_ROFF_ESC = re.compile(r"\\f[BIRPC]|\\f\(..|\\f\[[A-Z]*\]|\\[&|^]|\\\*\(..|\\\*.")


def _deroff(text: str) -> str:
    out = []
    for ln in text.splitlines():
        if ln.startswith(('.\\"', "'\\\"", '.\\}', '.if', '.ie', '.el', '.de', '.ds', '.nr')):
            continue
        if ln.startswith((".", "'")):
            parts = ln[1:].split(None, 1)
            if not parts:
                continue
            macro, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            if macro in ("SH", "SS"):
                out.append("")
            ln = rest.replace('"', "")
            if not ln:
                continue
        ln = _ROFF_ESC.sub("", ln).replace("\\-", "-").replace("\\e", "\\").replace("\\(aq", "'")
        out.append(ln)
    # roff puts a word or two on a line: join lines into paragraphs.
    paras = re.split(r"\n\s*\n", "\n".join(out))
    return "\n\n".join(" ".join(p.split()) for p in paras if p.strip())


def man() -> Docs:
    files = [f for f in _dpkg_files("manpages", "manpages-dev") if re.search(r"/man\d/[^/]+\.gz$", f)]
    return _docs(files, _deroff)


# -- source code ---------------------------------------------------------------------
def python() -> Docs:
    files = sorted(f for f in glob.glob("/usr/lib/python3.11/**/*.py", recursive=True)
                   if "-packages/" not in f and os.path.isfile(f))
    return _docs(files)


def c() -> Docs:
    files = [f for f in _dpkg_files("libc6-dev", "linux-libc-dev") if f.endswith(".h")]
    return _docs(files)


def perl() -> Docs:
    files = [f for f in _dpkg_files("perl-modules-5.36") if f.endswith(".pm")]
    return _docs(files)


# -- Debian changelogs and copyright / licence texts of the base system -----------------
def changelog() -> Docs:
    files = []
    for p in _base_packages():
        files += sorted(glob.glob(f"/usr/share/doc/{p}/changelog.Debian.gz"))
    return _docs(files)


def licence() -> Docs:
    common = sorted(f for f in glob.glob("/usr/share/common-licenses/*") if not os.path.islink(f))
    copyrights = [f for p in _base_packages() for f in sorted(glob.glob(f"/usr/share/doc/{p}/copyright"))]
    # A licence runs to tens of kB: cut it into pages so that test and train
    # both see several licences instead of one each.
    out = []
    for f in common:
        text = _ws_lines(_read(f) or "")
        out += [text[i:i + DOC_CHARS] for i in range(0, len(text), DOC_CHARS)
                if len(text[i:i + DOC_CHARS]) >= 400]
    return out + _docs(copyrights, min_chars=400)


# -- dictionary definitions (WordNet glosses) ------------------------------------------
def definitions() -> Docs:
    """One document per 40 consecutive synsets: 'word, word (pos): gloss; "example"'."""
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        lines = []
        with open(f"/usr/share/wordnet/data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue
                head, gloss = line.split(" | ", 1)
                h = head.split()
                n = int(h[3], 16)
                words = [h[4 + 2 * i].replace("_", " ") for i in range(n)]
                lines.append(f"{', '.join(words)} ({pos}): {gloss.strip()}")
        out += ["\n".join(lines[i:i + 40]) for i in range(0, len(lines), 40)]
    return out


# -- fortune cookies -------------------------------------------------------------------
def fortune() -> Docs:
    files = [f for f in _dpkg_files("fortunes") if re.search(r"/fortunes/[^./]+$", f)]
    out = []
    for f in files:
        text = _read(f)
        if not text:
            continue
        items = [x.strip() for x in re.split(r"^%\s*$", text, flags=re.M) if len(x.strip()) >= 10]
        out += ["\n%\n".join(items[i:i + 20]) for i in range(0, len(items), 20)]
    return out


# -- general text for pretraining: Debian's package descriptions ---------------------------
def _packages_index() -> str:
    files = sorted(glob.glob("/var/lib/apt/lists/*_debian_dists_*_main_binary-amd64_Packages*"))
    files = [f for f in files if "-updates_" not in f and "-security_" not in f]
    if not files:
        raise SystemExit("no apt Packages index: run `apt-get update` (setup_data.sh does)")
    return files[0]


def general() -> Docs:
    """Package long descriptions, 30 to a document (the pretraining corpus' general part)."""
    raw = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", _packages_index()],
                         check=True, capture_output=True, text=True).stdout
    descs = []
    for rec in raw.split("\n\n"):
        m = re.search(r"^Package: (\S+)$", rec, flags=re.M)
        d = re.search(r"^Description: (.*(?:\n .*)*)", rec, flags=re.M)
        if m and d:
            body = "\n".join(ln[1:] if ln.startswith(" ") else ln for ln in d.group(1).splitlines())
            body = body.replace("\n.\n", "\n\n")
            descs.append(f"{m.group(1)}: {body}")
    return ["\n\n".join(descs[i:i + 30]) for i in range(0, len(descs), 30)]


DOMAINS = {"man": man, "python": python, "c": c, "perl": perl, "changelog": changelog,
           "licence": licence, "definitions": definitions, "fortune": fortune}
