#!/bin/bash
# On the device machine (device tool: run "bash .gpu/run.sh" with carry [".gpu"], after prepare_minilm.sh here):
# benchmarks/compress_minilm.py with 2000 distillation steps on the GPU, one process and one JSON per method and budget.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GSM_WORDNET_ROOT=/tmp/wn/wordnet
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=.gpu/shim:.:/tmp/site
mkdir -p /tmp/wn && tar -C /tmp/wn -xJf .gpu/wordnet.tar.xz && python3 .gpu/restore.py || exit 1
nvidia-smi -L; python3 -c "import torch, transformers, lightning; print(torch.__version__, transformers.__version__, lightning.__version__)"
S=${STEPS:-2000}
python3 -m benchmarks.compress_minilm --quick --methods gblr --budgets 0.5 --structure-lr 2.5e-4 --accelerator gpu 2>&1 | tail -4 || exit 1
for b in 0.5 0.3; do
  for m in wsvd gblr; do
    start=$(date +%s)
    python3 -m benchmarks.compress_minilm --methods $m --budgets $b --steps $S --structure-lr 2.5e-4 --accelerator gpu \
      --json $OUT/long_${m}_${b}.json > $OUT/log_${m}_${b}.txt 2>&1
    echo "$m $b rc=$? $(( $(date +%s) - start )) s"; grep '^{' $OUT/log_${m}_${b}.txt | cut -c1-300
  done
done
