"""The peak FLOP/s of one worker, the denominator of MFU.

On GPU a table of dense tensor-core peaks by device name and dtype; on CPU a matmul probe,
measured once per (CPU model, threads, dtype) and cached under ~/.cache/shardyard (delete the file
to measure again, e.g. after a measurement on a loaded machine).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

# Dense (no sparsity) peak FLOP/s per GPU, from the vendors' data sheets: (bf16, fp32 without tensor cores).
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 67e12),
    "H100 SXM": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "A10": (125e12, 31.2e12),
    "V100": (125e12, 15.7e12),
}


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "shardyard" / "peak_flops.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak(threads: int, dtype: torch.dtype, size: int = 512, seconds: float = 0.3) -> float:
    """Best matmul FLOP/s over a short probe with `threads` intra-op threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(previous)


def cpu_peak_flops(threads: int, dtype: torch.dtype) -> float:
    """Measured once per (CPU model, threads, dtype), then read from the cache."""
    key = f"{_cpu_name()}|{threads}|{dtype}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return float(cache[key])
    peak = measure_cpu_peak(threads, dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**(cache if isinstance(cache, dict) else {}), key: peak}))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable home: measure again next time
    return peak


def gpu_peak_flops(name: str, bf16: bool) -> float | None:
    """The table's peak for a device name (longest matching key), or None when unknown."""
    for key in sorted(GPU_PEAKS, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAKS[key][0 if bf16 else 1]
    return None


def peak_flops(device: torch.device, precision: str, threads: int) -> tuple[float | None, str]:
    """(peak FLOP/s of one worker, where the figure comes from)."""
    bf16 = precision == "bf16"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak_flops(name, bf16), f"table ({name}, {'bf16' if bf16 else 'fp32'})"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return cpu_peak_flops(threads, dtype), f"measured matmul probe ({_cpu_name()}, {threads} threads, {dtype})"
