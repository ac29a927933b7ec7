"""The speed benchmarks of ``bench_speed.py`` on a CUDA GPU, timed with CUDA events.

    python benchmarks/bench_speed_gpu.py [--quick] [--output FILE]

Prints a markdown report (and writes it to ``--output`` when given; it never edits BENCHMARKS.md).
Exits with status 2 and a clear message when no CUDA device is available.  About 1-3 minutes on an H200.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/bench_speed_gpu.py`: see benchmarks/README.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_speed as cpu  # noqa: E402


def cuda_timer(reps: int) -> cpu.Timer:
    """Median over ``reps`` calls of the CUDA-event time of ``fn`` (after 3 warm-up calls)."""
    def run(fn: Callable[[], Any], threads: int) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    return run


def peak_cuda_memory(fn: Callable[[], Any]) -> int:
    """Peak CUDA memory allocated during one call, above the level before it (torch.cuda.max_memory_allocated)."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_speed_gpu: no CUDA device available (torch.cuda.is_available() is False); "
              "run benchmarks/bench_speed.py for the CPU benchmark", file=sys.stderr)
        return 2
    q, dev = args.quick, torch.device("cuda")
    timer = cuda_timer(5 if q else 30)
    t0 = time.time()
    p1, notes = cpu.bench_p1([(256, 1024)] if q else [(768, 768), (768, 3072), (3072, 768)], 1024 if q else 8192,
                             [1], timer, device=dev)
    p2 = cpu.bench_p2([(768, 3072)] if q else [(768, 3072), (3072, 768)], [0.3] if q else [0.3, 0.5],
                      [1, 256] if q else [1, 256, 8192], [1], timer, list(cpu.STRUCTURES), device=dev, reps=10)
    mem = ["| shape | tokens | nn.Linear peak (MiB) | GBLRLinear peak (MiB) | ratio |", "|---|---|---|---|---|"]
    for n_in, n_out in [(768, 3072)]:
        x = torch.randn(8192, n_in, device=dev, requires_grad=True)
        gy = torch.randn(8192, n_out, device=dev)
        m_d = peak_cuda_memory(cpu.train_step(nn.Linear(n_in, n_out, device=dev), x, gy))
        m_g = peak_cuda_memory(cpu.train_step(cpu.learning_layer(n_in, n_out, dev), x, gy))
        mem.append(f"| {n_in} x {n_out} | 8192 | {m_d / 2**20:.1f} | {m_g / 2**20:.1f} | {m_g / max(m_d, 1):.2f}x |")
    sc = cpu.bench_scaling([256, 1024] if q else [256, 512, 1024, 2048, 4096], 8192, 1, timer, device=dev)
    body = "\n".join([
        f"## Speed (GPU: {torch.cuda.get_device_name()})" + (" -- QUICK" if q else ""),
        "",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}; command: `python benchmarks/bench_speed_gpu.py"
        f"{' --quick' if q else ''}` (took {time.time() - t0:.0f} s); date: {_dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "- Timings: CUDA events, median; ratios against nn.Linear in the same run ('threads' column is meaningless here).",
        "", "### P1: training step (structure learning, sigma = 1)", "", *p1, "", *notes, "",
        "### P2: frozen inference, latency relative to nn.Linear", "", *p2, "",
        "### Memory: peak CUDA memory of one training step (torch.cuda.max_memory_allocated above the start level)", "", *mem, "",
        "### Scaling with n (K = n, 8192 tokens)", "", *sc,
    ])
    print(body)
    if args.output is not None:
        args.output.write_text(body + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
