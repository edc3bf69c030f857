"""HF export and import against model size: wall time and peak resident memory above the process's
baseline, each in a fresh subprocess, from a one-worker checkpoint (DCP) and from DeepSpeed ZeRO-2 and
ZeRO-3 checkpoints written by 2 gloo ranks.

Peers in the same run: `shardyard export` (the consolidating single-file export, which holds the whole
model) next to `export --format hf` (streams one tensor at a time), and for ZeRO DeepSpeed's own
`zero_to_fp32` consolidation (what export did before it streamed); the model's own size is the limit
an import on one worker cannot go below (it holds the weights it loads).

    PYTHONPATH=. python benchmarks/interop.py [--sizes 256x4,512x6] [--zero 2,3] [--out benchmarks/results/interop-DATE.md]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import json, sys, time
from pathlib import Path
import torch
import shardyard.models, shardyard.runtime.export, shardyard.runtime.hf_import, safetensors.torch  # imports first
import shardyard.interop.hf_dir, shardyard.data.tokenize, shardyard.runtime.parallel.deepspeed_zero
import torch.distributed.checkpoint, torch.distributed.checkpoint.state_dict, safetensors, yaml
from shardyard.platform.schema import ModelSpec
with torch.device("meta"):  # the first meta-device build loads ~100 MB of torch code: not data
    shardyard.models.build_model(ModelSpec(kind="moe", width=32, depth=1, heads=2), 8)

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

def measure(fn):
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = rss_kb("VmRSS")
    start = time.perf_counter()
    result = fn()
    return {"seconds": time.perf_counter() - start, "peak_extra_mb": (rss_kb("VmHWM") - before) / 1024, "result": result}
"""

TRAIN = """
from shardyard.platform.spec import load_spec_text
from shardyard.runtime.worker import LocalReporter, Trainer
spec = load_spec_text(sys.argv[1])
run_dir = Path(sys.argv[2])
Trainer(spec, run_dir, LocalReporter(run_dir, 2)).fit()
"""

EXPORT_HF = """
from shardyard.runtime.export import export_hf
m = measure(lambda: export_hf(Path(sys.argv[1]), Path(sys.argv[2]))[0])
print(json.dumps(m))
"""

TRAIN_RANKS = """
from shardyard.comm.launch import spawn
from benchmarks.interop import train_rank
spawn(train_rank, 2, 2, sys.argv[1], sys.argv[2])
"""

EXPORT_DEEPSPEED = """
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from shardyard.runtime.checkpoint import find_latest_checkpoint
checkpoint = str(find_latest_checkpoint(Path(sys.argv[1])))
m = measure(lambda: len(get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag="deepspeed")))
print(json.dumps(m))
"""

EXPORT_OLD = """
from shardyard.runtime.export import export
m = measure(lambda: str(export(Path(sys.argv[1]), Path(sys.argv[2]))))
print(json.dumps(m))
"""

IMPORT = """
from shardyard.models import build_model
from shardyard.platform.spec import load_spec_text
from shardyard.runtime.hf_import import init_from_hf
spec = load_spec_text(sys.argv[1])
def load():
    with torch.device("meta"):
        model = build_model(spec.model, spec.data.seq_len)
    model = model.to_empty(device="cpu")
    return init_from_hf(model, spec, 256)
m = measure(load)
print(json.dumps(m))
"""


def train_rank(topology, text: str, run_dir: str) -> None:
    """One gloo rank of a multi-worker training run (comm.launch.spawn calls it by reference)."""
    from shardyard.platform.spec import load_spec_text
    from shardyard.runtime.worker import LocalReporter, Trainer

    Trainer(load_spec_text(text), Path(run_dir), LocalReporter(Path(run_dir), 2)).fit()


def spec_text(width: int, depth: int, storage: Path, init_from: Path | None = None, zero: int = 0) -> str:
    model = (
        f"{{kind: moe, width: {width}, depth: {depth}, heads: {width // 64}, kv_heads: {max(1, width // 256)}, "
        f"ffn: {{hidden: {3 * width}}}, moe: {{num_experts: 8, top_k: 2}}"
        + (f", init_from: '{init_from}'" if init_from else "")
        + "}"
    )
    return textwrap.dedent(
        f"""\
        name: bench
        seed: 0
        model: {model}
        data: {{paths: [stdlib], seq_len: 64, max_bytes: 1000000}}
        training: {{steps: 1, batch_size: 1, eval_every: 0, eval_bytes: 1024}}
        resources: {{workers: {2 if zero else 1}, cpus_per_worker: 1, max_failures: 0}}
        parallel: {{zero: {zero}}}
        checkpoint: {{dir: {storage}, every: 1, keep: 2}}
        tracking: {{mode: disabled}}
        """
    )


def python(code: str, *args: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the OS: honest peaks
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + code, *args], capture_output=True, text=True, cwd=ROOT, check=False, env=env
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def measure_layout(width: int, depth: int, work: Path, zero: int) -> dict:
    """Train one step at `width`x`depth` (one worker, or ZeRO `zero` on 2 gloo ranks), then export and
    import it, each measurement in a fresh subprocess."""
    run_dir = work / "run"
    text = spec_text(width, depth, work, zero=zero)
    python(TRAIN_RANKS if zero else TRAIN, text, str(run_dir))
    pattern = "checkpoint_*/deepspeed/*.pt" if zero else "checkpoint_*/**/*.distcp"
    checkpoint_mb = sum(f.stat().st_size for f in run_dir.glob(pattern)) / 1e6
    hf = python(EXPORT_HF, str(run_dir), str(work / "hf"))
    old = python(EXPORT_OLD, str(run_dir), str(work / "old"))
    deepspeed = python(EXPORT_DEEPSPEED, str(run_dir)) if zero else None
    weights_mb = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors")) / 1e6
    imp = python(IMPORT, spec_text(width, depth, work, work / "hf"))
    return {
        "size": f"{width}x{depth}",
        "checkpoint": f"zero{zero}" if zero else "replicated",
        "weights_mb": round(weights_mb, 1),
        "checkpoint_mb_incl_adam": round(checkpoint_mb, 1),
        "export_hf_s": round(hf["seconds"], 2),
        "export_hf_peak_extra_mb": round(hf["peak_extra_mb"], 1),
        "export_consolidated_s": round(old["seconds"], 2),
        "export_consolidated_peak_extra_mb": round(old["peak_extra_mb"], 1),
        "deepspeed_zero_to_fp32_peak_extra_mb": round(deepspeed["peak_extra_mb"], 1) if deepspeed else "-",
        "import_s": round(imp["seconds"], 2),
        "import_peak_extra_mb": round(imp["peak_extra_mb"], 1),
        "import_bytes_read_mb": round(imp["result"]["bytes_read"] / 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256x4,512x6")
    ap.add_argument("--zero", default="2,3", help="ZeRO stages to export from as well ('' for none)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="one tiny size (seconds): the same path, nothing written")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.out = "64x1", None
        args.zero = "2" if args.zero else ""
    stages = [0] + (
        [int(z) for z in args.zero.split(",")] if args.zero and importlib.util.find_spec("deepspeed") else []
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="interop-bench-") as tmp:
        for size in args.sizes.split(","):
            width, depth = map(int, size.split("x"))
            for zero in stages:
                row = measure_layout(width, depth, Path(tmp) / f"{size}-{zero}", zero)
                rows.append(row)
                print(json.dumps(row), flush=True)
    header = list(rows[0])
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    text = (
        f"# HF export / import vs model size ({datetime.date.today()})\n\n"
        f"Command: `PYTHONPATH=. python benchmarks/interop.py --sizes {args.sizes} --zero {args.zero}`; MoE 8 experts "
        "top-2, ffn 3 x width, trained one step on one CPU worker (replicated) or on 2 gloo ranks (zeroN: "
        "DeepSpeed ZeRO stage N); each measurement in a fresh subprocess; peak_extra = peak RSS above the RSS just "
        "before the call (VmHWM reset through /proc/self/clear_refs), with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors return "
        "to the OS; imports and torch's one-time meta-device code are loaded before the baseline.\n\n"
        + "\n".join(table)
        + "\n"
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
