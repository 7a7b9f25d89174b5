#!/usr/bin/env bash
# The runs of record, and the chapters in the gpu setting, on a lent GPU (the device tool's machine:
# one H100 or H200, 16 cores, no network).
#
#   bash benchmarks/gpu_record.sh probe      # cheap: the software there, and a tiny LoRA run on CUDA
#   bash benchmarks/gpu_record.sh keep       # keep the payload part this call carried (/tmp/parts)
#   bash benchmarks/gpu_record.sh grid       # both grids of record at once (lorabook.record)
#   GRIDS="lm qlora variants" bash benchmarks/gpu_record.sh grid   # any of lm encoder qlora variants
#   bash benchmarks/gpu_record.sh chapters   # every chapter under nbval, LORABOOK_MODE=gpu, timed
#
# The offline models (and, for `chapters`, the wheels the image lacks) travel as the payload that
# benchmarks/gpu_payload.sh makes here: an xz-compressed tar split in parts under .dev0/ .dev1/ ...
# (one part per call: a call carries at most 64 MiB; the machine keeps what earlier calls brought
# while it stays warm). `grid` and `chapters` keep the part they carry, check the whole payload
# against its manifest, unpack it once and convert the models. Results are copied to $OUT as they
# grow, so a call stopped at its time limit still returns every finished run or chapter.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LORABOOK_CACHE=/tmp/lorabook_cache
export PYTHONPATH=/tmp/site:$PWD/src
if [ "${1:-}" = probe ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "
import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)
from transformers import LlamaConfig, LlamaForCausalLM
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
from lorabook.lora import apply_lora
from lorabook.train import TrainConfig, train
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
m = LlamaForCausalLM(cfg).to(dev); m.requires_grad_(False); apply_lora(m, ['q_proj', 'v_proj'], r=4, alpha=8)
items = [{'input_ids': list(range(1, 9)), 'labels': list(range(1, 9)), 'attention_mask': [1] * 8}] * 8
coll = lambda b: {k: torch.tensor([x[k] for x in b]) for k in b[0]}
h = train(m, items, TrainConfig(steps=3, batch_size=4, progress=False, autocast='bfloat16'), coll)
print('tiny LoRA on CUDA under bf16 autocast: losses', [round(x, 3) for x in h.loss])
from lorabook.baselines import PrefixTuning, add_adapters
from lorabook.qlora import heldout_metrics
m2 = LlamaForCausalLM(cfg).to(dev); pt = PrefixTuning(m2, n_prefix=4)
h = train(pt, items, TrainConfig(steps=2, batch_size=4, progress=False, autocast='bfloat16'), coll)
print('prefix tuning:', [round(x, 3) for x in h.loss], heldout_metrics(pt, items, coll, per_example=True)['exact_per_example'])
m3 = add_adapters(LlamaForCausalLM(cfg).to(dev), bottleneck=4)
h = train(m3, items, TrainConfig(steps=2, batch_size=4, progress=False, autocast='bfloat16'), coll)
print('adapters:', [round(x, 3) for x in h.loss])
"; } > "$OUT/probe.txt" 2>&1
  cat "$OUT/probe.txt"; ls -la .dev[0-9]* 2>/dev/null; exit 0
fi
keep() {  # the payload parts this call carried, kept for the calls after it
  mkdir -p /tmp/parts
  for d in .dev[0-9]*; do [ -d "$d" ] && cp "$d"/part* "$d/manifest" /tmp/parts/; done
  ls -la /tmp/parts
}
unpack() {  # once per machine: check the whole payload, unpack it, install its wheels, convert the models
  [ -f /tmp/site/.ready ] && return 0
  local want have
  want=$(sed -n 's/^parts //p' /tmp/parts/manifest)
  have=$(ls /tmp/parts/part? 2>/dev/null | wc -l)
  [ "$have" = "$want" ] || { echo "have $have of the payload's $want parts: carry the others with 'keep'"; exit 3; }
  cat $(ls /tmp/parts/part? | sort -V) > /tmp/payload.tar.xz
  have=$(sha256sum /tmp/payload.tar.xz | cut -c1-64)
  want=$(sed -n 's/^sha256 //p' /tmp/parts/manifest)
  [ "$have" = "$want" ] || { echo "payload sha256 $have, manifest says $want"; exit 3; }
  python3 -c "import lzma, tarfile; tarfile.open(fileobj=lzma.open('/tmp/payload.tar.xz'), mode='r|').extractall('/tmp')" || exit 4
  if ls /tmp/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/wheels/*.whl || exit 4
  fi
  LORABOOK_MODE=record python3 -m lorabook.models > "$OUT/models.txt" 2>&1 || { cat "$OUT/models.txt"; exit 5; }
  touch /tmp/site/.ready
  echo "payload unpacked and models ready after $(( $(date +%s) - t0 )) s"
}
t0=$(date +%s)
case "${1:-}" in
  keep) keep; exit 0 ;;
  grid|chapters) keep; unpack ;;
  *) echo "usage: $0 probe|keep|grid|chapters"; exit 2 ;;
esac
export LORABOOK_COMMIT=$(sed -n 's/^commit //p' /tmp/parts/manifest)
if [ "$1" = chapters ]; then
  # Every chapter as a Colab reader runs it: nbval executes its cells in a kernel (LORABOOK_MODE=gpu,
  # bf16 autocast on CUDA), one chapter after another, so that each one's time is its own.
  # CHAPTERS: names under notebooks/ (default: all, in book order); a chapter already done on this
  # machine is skipped, so a call stopped at its limit is continued by the next. Each chapter's
  # line (name, seconds, passed or failed, device) goes to $OUT/chapters.jsonl as it ends, its log
  # to $OUT/chapters.log, and the executed notebooks, with outputs, to $OUT/executed.tgz.
  export LORABOOK_MODE=${CHAPTER_MODE:-gpu}
  touch /tmp/chapters.jsonl
  device=$(python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
  for nb in ${CHAPTERS:-$(cd notebooks && ls *.ipynb | grep -v claims_ledger) claims_ledger.ipynb}; do
    nb=${nb%.ipynb}.ipynb
    grep -q "\"$nb\"" /tmp/chapters.jsonl && continue
    s0=$(date +%s%N)
    python3 -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 "notebooks/$nb" -q \
      -p no:cacheprovider -p tests.nbval_outputs --nbval-keep-outputs /tmp/executed >> "$OUT/chapters.log" 2>&1
    rc=$?
    printf '{"chapter": "%s", "seconds": %.1f, "passed": %s, "mode": "%s", "device": "%s", "commit": "%s"}\n' \
      "$nb" "$(( ($(date +%s%N) - s0) / 1000000 ))e-3" "$([ $rc = 0 ] && echo true || echo false)" \
      "$LORABOOK_MODE" "$device" "$LORABOOK_COMMIT" >> /tmp/chapters.jsonl
    cp /tmp/chapters.jsonl "$OUT/chapters.jsonl"
    tar -czf "$OUT/.executed.tgz" -C /tmp executed 2>/dev/null && mv "$OUT/.executed.tgz" "$OUT/executed.tgz"
  done
  cat /tmp/chapters.jsonl; echo "chapters done after $(( $(date +%s) - t0 )) s"
  exit 0
fi
export OMP_NUM_THREADS=1 LORABOOK_MODE=record
BUDGET=${BUDGET:-400}
mkdir -p benchmarks/results
# GRIDS: which grids run at once (all resumable): lm and encoder (the main grids of record), qlora
# (chapters 6, 7) and variants (chapter 8; reads stage 1's learning rate from lm_record_gpu.jsonl).
pids=()
for grid in ${GRIDS:-lm encoder}; do
  case $grid in
    lm) args=(--model lm --workers "${LM_WORKERS:-10}" --out benchmarks/results/lm_record_gpu.jsonl) ;;
    encoder) args=(--model encoder --workers "${ENC_WORKERS:-4}" --out benchmarks/results/encoder_record_gpu.jsonl) ;;
    qlora) args=(--model lm --grid qlora --workers "${QLORA_WORKERS:-8}" --out benchmarks/results/qlora_record_gpu.jsonl) ;;
    variants) args=(--model lm --stages variants --workers "${VARIANT_WORKERS:-8}"
                    --lr-from benchmarks/results/lm_record_gpu.jsonl
                    --out benchmarks/results/lm_variants_record_gpu.jsonl) ;;
    *) echo "unknown grid $grid (lm, encoder, qlora, variants)"; exit 2 ;;
  esac
  python3 -m lorabook.record "${args[@]}" --budget-s "$BUDGET" > "$OUT/$grid.log" 2>&1 &
  pids+=($!)
done
snapshot() { tar -czf "$OUT/.results.tgz" benchmarks/results/*_record_gpu* 2>/dev/null && mv "$OUT/.results.tgz" "$OUT/results.tgz"; }
running() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while running; do
  sleep 15; snapshot; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> "$OUT/gpu_use.txt"
done
wait
snapshot
echo "grid done after $(( $(date +%s) - t0 )) s"; for grid in ${GRIDS:-lm encoder}; do tail -3 "$OUT/$grid.log"; done
