"""Commands on what a run left behind (its directory, a checkpoint) and on models coming in:
report | sync | eval | generate | export | import. Modules that import torch are imported inside the
command that needs them."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shardyard.cli.output import eval_line
from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import SPEC_FILE
from shardyard.platform.schema import parse_size
from shardyard.tracking.sync import sync_command, sync_run


def cmd_sync(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if args.dry_run:
        print(" ".join(sync_command(run_dir, args.project, args.entity)))
        return 0
    return sync_run(run_dir, args.project, args.entity)


def cmd_report(args: argparse.Namespace) -> int:
    from shardyard.tracking.report import write_report

    out = write_report([Path(d) for d in args.run_dirs], Path(args.out) if args.out else None)
    print(f"report written: {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from shardyard.models.bytes.generate import generate
    from shardyard.runtime.export import load_for_inference

    spec, model = load_for_inference(Path(args.run_or_checkpoint), args.step)
    prompt = args.prompt.encode("utf-8")
    start = time.perf_counter()
    out = generate(model, prompt, args.bytes, args.temperature, args.top_k, not args.no_cache, args.seed)
    elapsed = time.perf_counter() - start
    sys.stdout.buffer.write(prompt + out + b"\n")
    sys.stdout.flush()
    print(
        f"[{len(out)} bytes in {elapsed:.2f} s ({len(out) / max(elapsed, 1e-9):.0f} bytes/s) from {spec.name}, "
        f"{'with' if not args.no_cache else 'without'} cache]",
        file=sys.stderr,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        from shardyard.runtime.export import export_hf

        try:
            max_shard = parse_size(args.max_shard_size, "--max-shard-size")
        except ValueError as err:
            raise UserError(str(err)) from None
        start = time.perf_counter()
        family, files = export_hf(
            Path(args.run_or_checkpoint), Path(args.out), args.target, args.dtype, args.step, max_shard
        )
        size = sum(f.stat().st_size for f in files)
        print(
            f"exported {family} ({args.dtype}) to {args.out}: {len(files)} safetensors file(s), {size / 1e6:.2f} MB, "
            f"config.json, generation_config.json, tokenizer ({time.perf_counter() - start:.1f} s)"
        )
        return 0
    if args.target != "auto" or args.dtype != "fp32":
        raise UserError("--target and --dtype apply to --format hf")
    from shardyard.runtime.export import export

    weights = export(Path(args.run_or_checkpoint), Path(args.out), args.step)
    print(f"exported {weights} ({weights.stat().st_size / 1e6:.2f} MB) and {weights.parent / SPEC_FILE}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from shardyard.runtime.hf_import import job_spec_from_hf

    out = Path(args.out)
    text = job_spec_from_hf(Path(args.hf_dir), out.stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}: model from {args.hf_dir}/config.json, init_from set; fill in data and training")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from shardyard.runtime.evaluation import evaluate_run

    start = time.perf_counter()
    spec, result = evaluate_run(Path(args.run_dir), args.data or None, args.step, args.set)
    where = ", ".join(args.data) if args.data else f"the held-out split of {', '.join(spec.data.paths)}"
    print(
        f"{eval_line(result)}  on {where}  [{spec.name}, step {args.step if args.step is not None else 'newest'}, "
        f"{time.perf_counter() - start:.1f} s]"
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sync", help="push a run's offline wandb runs (every restart) to wandb as one run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (runs/<job name>)")
    p.add_argument("--project", help="wandb project (default: the one in the run's spec)")
    p.add_argument("--entity", help="wandb entity (default: your wandb default)")
    p.add_argument("--dry-run", action="store_true", help="print the wandb command instead of running it")
    p.set_defaults(fn=cmd_sync)

    p = sub.add_parser("report", help="one self-contained HTML page about a run, or comparing runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<job name>)")
    p.add_argument("--out", help="where to write the page (default: RUN_DIR/report.html, or ./report-A-vs-B.html)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("generate", help="continue a byte prompt with a trained model")
    p.add_argument("run_or_checkpoint", help="a run directory (newest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue (UTF-8)")
    p.add_argument("--bytes", type=int, default=256, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="re-run the whole model per byte (slow; for comparison)")
    p.add_argument(
        "--step", type=int, default=None, help="the checkpoint at this step (default: the newest complete one)"
    )
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "export",
        help="consolidate a checkpoint of any layout into one safetensors file plus its spec, or (--format hf) a "
        "Hugging Face model directory",
    )
    p.add_argument("run_or_checkpoint", help="a run directory (newest complete checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (model.safetensors, spec.yaml)")
    p.add_argument(
        "--step", type=int, default=None, help="the checkpoint at this step (default: the newest complete one)"
    )
    p.add_argument("--format", choices=["shardyard", "hf"], default="shardyard", help="hf: transformers' layout")
    p.add_argument(
        "--target",
        default="auto",
        help="hf family: auto (the one that holds the spec exactly) | llama | qwen3 | mixtral | qwen3_moe | olmoe | "
        "qwen2_moe | ernie4_5_moe",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="hf: tensor dtype")
    p.add_argument("--max-shard-size", default="2GiB", help="hf: split safetensors above this size (with an index)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("import", help="write a job spec from a Hugging Face model directory's config.json")
    p.add_argument("hf_dir", help="a Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="the job spec to write, e.g. jobs/NAME.yaml")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("eval", help="bits per byte (+- standard error) of a trained run on held-out text")
    p.add_argument("run_dir", help="a run directory")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH",
        help="file, directory or glob to evaluate on, repeatable (default: the run's held-out split)",
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the run's spec, e.g. --set training.eval_bytes=1000000 or "
        "--set data.extensions=[.txt] (repeatable)",
    )
    p.set_defaults(fn=cmd_eval)
