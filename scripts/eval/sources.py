"""Raw (text, label) pools for each task, read from files that Debian and PyPI
packages put on the machine (scripts/eval/setup_data.sh installs them).

Every reader walks its inputs in sorted order so that the same installed
packages give the same pools; build_data.py then dedupes, balances and
splits, and checks the result against the committed manifest, since any
other installed package (a man page, a source file) changes these pools.
"""
from __future__ import annotations

import glob
import os
import random
import re
import subprocess
from collections import defaultdict
from pathlib import Path

Pools = dict[str, list[str]]


def _ws(s: str) -> str:
    return " ".join(s.split())


# -- fortune file -> topic ---------------------------------------------------
FORTUNE_DIR = Path("/usr/share/games/fortunes")


def fortune(labels: list[str]) -> Pools:
    out: Pools = {}
    for lab in labels:
        text = (FORTUNE_DIR / lab).read_text(encoding="utf-8", errors="replace")
        items = [_ws(x) for x in re.split(r"^%\s*$", text, flags=re.M)]
        out[lab] = [x[:400] for x in items if len(x) >= 10]
    return out


# -- package short description -> section -------------------------------------
def _packages_files() -> list[str]:
    # Debian's own main index of the release only: -updates/-security move every
    # week, and third-party repositories differ between machines.
    files = sorted(glob.glob("/var/lib/apt/lists/*_debian_dists_*_main_binary-amd64_Packages*"))
    files = [f for f in files if "-updates_" not in f and "-security_" not in f]
    if not files:
        raise SystemExit("no apt Packages index: run `apt-get update` (setup_data.sh does)")
    return files


def debsec(labels: list[str]) -> Pools:
    out: Pools = defaultdict(list)
    want = set(labels)
    for f in _packages_files():
        raw = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", f],
                             check=True, capture_output=True, text=True).stdout
        for rec in raw.split("\n\n"):
            sec = desc = None
            for line in rec.splitlines():
                if line.startswith("Section: "):
                    sec = line[9:].strip()
                elif line.startswith("Description: "):
                    desc = line[13:].strip()
            if sec in want and desc:
                out[sec].append(desc)
    return dict(out)


# -- noun gloss -> WordNet lexicographer file ---------------------------------
LEXFILE = {"05": "animal", "06": "artifact", "08": "body", "13": "food",
           "15": "location", "18": "person", "20": "plant", "27": "substance"}


def wordnet(labels: list[str]) -> Pools:
    out: Pools = defaultdict(list)
    with open("/usr/share/wordnet/data.noun", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:
                continue
            head, gloss = line.split(" | ", 1)
            lab = LEXFILE.get(head.split()[1])
            if lab in labels:
                definition = gloss.split('; "')[0].strip().rstrip(";")
                if len(definition) >= 8:
                    out[lab].append(definition)
    return dict(out)


# -- man page "name - description" -> section ---------------------------------
def manpage(labels: list[str]) -> Pools:
    env = dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="1000")
    raw = subprocess.run(["apropos", "-l", "."], capture_output=True, text=True, env=env).stdout
    out: Pools = defaultdict(list)
    for line in raw.splitlines():
        m = re.match(r"^(.+?) \((\w+)\)\s+- (.+)$", line)
        if m and m.group(2) in labels and "(unknown subject)" not in m.group(3):
            out[m.group(2)].append(f"{m.group(1)} - {_ws(m.group(3))}")
    return dict(out)


# -- word -> language ---------------------------------------------------------
DICTS = {"english": ("american-english", "utf-8"), "french": ("french", "utf-8"),
         "german": ("ngerman", "utf-8"), "spanish": ("spanish", "utf-8"),
         "italian": ("italian", "utf-8"), "portuguese": ("portuguese", "utf-8"),
         "dutch": ("dutch", "utf-8"), "swedish": ("swedish", "latin-1")}


def language(labels: list[str]) -> Pools:
    out: Pools = {}
    for lab in labels:
        fname, enc = DICTS[lab]
        words = Path("/usr/share/dict", fname).read_text(encoding=enc).split("\n")
        # German capitalises nouns; elsewhere a capital marks a proper noun.
        keep = [w for w in words if w.isalpha() and 4 <= len(w) <= 20
                and (lab == "german" or w[0].islower())]
        out[lab] = [w.lower() for w in keep]
    return out


# -- first name -> country group ----------------------------------------------
# Column order of nam_dict.txt, as gender_guesser.Detector.COUNTRIES.
COUNTRIES = """great_britain ireland usa italy malta portugal spain france belgium
luxembourg the_netherlands east_frisia germany austria swiss iceland denmark norway
sweden finland estonia latvia lithuania poland czech_republic slovakia hungary romania
bulgaria bosniaand croatia kosovo macedonia montenegro serbia slovenia albania greece
russia belarus moldova ukraine armenia azerbaijan georgia the_stans turkey arabia israel
china india japan korea vietnam other_countries""".split()
GROUPS = {
    "english": "great_britain ireland usa", "italian": "italy malta",
    "iberian": "portugal spain", "french": "france belgium luxembourg",
    "german": "east_frisia germany austria swiss",
    "nordic": "iceland denmark norway sweden finland",
    "slavic": "poland czech_republic slovakia bulgaria bosniaand croatia macedonia "
              "montenegro serbia slovenia russia belarus ukraine",
    "asian": "china japan korea vietnam",
}


def names(labels: list[str]) -> Pools:
    import gender_guesser
    path = Path(gender_guesser.__file__).parent / "data" / "nam_dict.txt"
    group_of = {c: g for g, cs in GROUPS.items() for c in cs.split()}
    out: Pools = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line[0] in "#=":
            continue
        name = line.split()[1]
        if not re.fullmatch(r"[A-Z][a-z]{2,}", name):   # skips encoded letters, compounds
            continue
        vals = line[30:30 + len(COUNTRIES)]
        where = {COUNTRIES[i] for i, ch in enumerate(vals) if ch.strip()}
        groups = {group_of.get(c) for c in where}
        # Only names seen in one group's countries and nowhere else.
        if len(groups) == 1 and None not in groups:
            g = groups.pop()
            if g in labels:
                out[g].append(name)
    return dict(out)


# -- word -> sentiment sign ---------------------------------------------------
def sentiment(labels: list[str]) -> Pools:
    import vaderSentiment
    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    out: Pools = {"negative": [], "positive": []}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].isalpha():
            continue
        mean = float(parts[1])
        if abs(mean) >= 1.0:
            out["positive" if mean > 0 else "negative"].append(parts[0])
    return out


# -- four source lines -> programming language --------------------------------
def _shell_scripts() -> list[str]:
    found = []
    for d in ("/usr/bin", "/usr/sbin"):
        for f in sorted(os.listdir(d)):
            p = os.path.join(d, f)
            if os.path.isfile(p) and not os.path.islink(p):
                try:
                    with open(p, "rb") as fh:
                        first = fh.readline(80)
                except OSError:
                    continue
                if re.match(rb"#! ?/(usr/)?bin/(env )?(ba|da)?sh\b", first):
                    found.append(p)
    return found


def _globs(*patterns: str, exclude: str | None = None) -> list[str]:
    files = sorted({f for p in patterns for f in glob.glob(p, recursive=True) if os.path.isfile(f)})
    return [f for f in files if not (exclude and re.search(exclude, f))]


CODE_FILES = {
    "python": lambda: _globs("/usr/lib/python3.11/**/*.py"),
    # glibc's and the kernel's headers: plain C (LLVM's and others' are C++).
    "c": lambda: _globs("/usr/include/*.h", "/usr/include/linux/**/*.h",
                        "/usr/include/x86_64-linux-gnu/**/*.h", "/usr/include/asm-generic/*.h"),
    "cpp": lambda: _globs("/usr/include/c++/12/**/*", exclude=r"\.(py|gdb)$"),
    "shell": _shell_scripts,
    "perl": lambda: _globs("/usr/share/perl5/**/*.pm", "/usr/share/perl/5.36*/**/*.pm",
                           exclude=r"/unicore/"),
    "javascript": lambda: _globs("/usr/lib/node_modules/npm/**/*.js"),
    "sql": lambda: _globs("/usr/share/postgresql/15/**/*.sql"),
    "cmake": lambda: _globs("/usr/share/cmake-3.25/Modules/**/*.cmake"),
}
_HASH = re.compile(r"^\s*#")
_SLASH = re.compile(r"^\s*(//|/\*|\*)")
COMMENT = {"python": _HASH, "c": _SLASH, "cpp": _SLASH, "shell": _HASH, "perl": _HASH,
           "javascript": _SLASH, "sql": re.compile(r"^\s*(--|/\*|\*)"), "cmake": _HASH}
PER_FILE = 3          # snippets a file may give (more when files are few), so none dominates
PER_CLASS = 900       # enough for 360 after dedupe


def _code_lines(text: str, lab: str) -> list[str]:
    if lab == "perl":   # POD is prose, not Perl
        text = re.sub(r"^=\w+.*?^=cut\s*$", "", text, flags=re.M | re.S)
    if lab == "cmake":  # module docs live in bracket comments
        text = re.sub(r"#\[(=*)\[.*?\]\1\]", "", text, flags=re.S)
    lines = [ln.rstrip() for ln in text.splitlines()]
    return [ln for ln in lines if ln.strip() and not COMMENT[lab].match(ln) and len(ln) <= 160]


def code(labels: list[str], seed: int = 0) -> Pools:
    out: Pools = {}
    for lab in labels:
        files = CODE_FILES[lab]()
        rng = random.Random(f"{seed}:code:{lab}")
        rng.shuffle(files)
        snippets: list[str] = []
        per_file = max(PER_FILE, -(-PER_CLASS // max(1, len(files))))
        for f in files:
            try:
                text = Path(f).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            lines = _code_lines(text, lab)
            if len(lines) < 8:
                continue
            starts = list(range(0, len(lines) - 3, 4))
            for s in rng.sample(starts, min(per_file, len(starts))):
                snippets.append("\n".join(ln.strip() for ln in lines[s:s + 4]))
            if len(snippets) >= PER_CLASS:
                break
        out[lab] = snippets
    return out


READERS = {"fortune": fortune, "debsec": debsec, "wordnet": wordnet, "manpage": manpage,
           "language": language, "names": names, "sentiment": sentiment, "code": code}
