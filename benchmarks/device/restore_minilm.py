"""Restore the carried float16 MiniLM to a float32 folder at /tmp/minilm (what the shim package points to)."""
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

src, dst = Path(".gpu/minilm16"), Path("/tmp/minilm")
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model16.safetensors"))
sd = load_file(src / "model16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, dst / "model.safetensors")
print("restored", len(sd), "tensors")
