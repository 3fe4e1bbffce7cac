#!/usr/bin/env bash
# Installs the Debian packages whose files become the LLM benchmark's text
# domains (the rest, such as glibc headers and perl modules, are in any Debian
# with python3 and a compiler) and refreshes the apt index (package
# descriptions: the general part of the pretraining text). No model weights
# are downloaded: the tokenizer and the model are trained by bench.py. The
# versions the committed data came from are in scripts/eval_llm/manifest.json;
# build_data.py checks the built data's hashes against it.
set -euo pipefail
APT="fortunes wordnet-base manpages manpages-dev libc6-dev linux-libc-dev perl-modules-5.36"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $APT
