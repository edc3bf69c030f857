"""Train one job in this process with the workers' own Trainer (no Ray): a benchmark's single-worker
runs, which must not depend on an embedded Ray cluster surviving a heavily loaded machine.

    python benchmarks/train_local.py SPEC [--set KEY=VALUE ...]
    python benchmarks/train_local.py --smoke    # jobs/moe-tiny.yaml shrunk to seconds, in a temp dir

Same loop, data order, evaluation and checkpoints (LocalReporter writes <dir>/<name>/checkpoint_*
as Ray Train does) as `shardyard run` with resources.workers 1; refuses more workers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardyard.platform.run_dir import RunDir  # noqa: E402
from shardyard.platform.schema import JobSpec  # noqa: E402
from shardyard.platform.spec import load_spec, spec_to_yaml  # noqa: E402
from shardyard.runtime import checkpoint as ckpt  # noqa: E402
from shardyard.runtime.worker import LocalReporter, Trainer  # noqa: E402


def train(spec: JobSpec) -> Path:
    """Train (or resume) one single-worker job in this process; its run directory."""
    run_dir = RunDir.of(spec).path
    run_dir.mkdir(parents=True, exist_ok=True)
    RunDir(run_dir).spec_file.write_text(spec_to_yaml(spec))
    trainer = Trainer(spec, run_dir, LocalReporter(run_dir, spec.checkpoint.keep))
    trainer.resume(ckpt.find_latest_checkpoint(run_dir))
    trainer.fit()
    print(f"done at step {trainer.step}/{spec.training.steps}: {run_dir}", flush=True)
    return run_dir


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec", nargs="?")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--smoke", action="store_true", help="jobs/moe-tiny.yaml, tiny, in a temp dir (seconds)")
    args = parser.parse_args()
    if args.smoke:
        from benchmarks.smoke import smoke_dir, tiny_run_dir

        tiny_run_dir(smoke_dir("train_local"), overrides=args.set)
        return 0
    if args.spec is None:
        parser.error("a job spec is required (or --smoke)")
    spec = load_spec(args.spec, args.set)
    if spec.resources.workers != 1:
        print(f"train_local runs one worker; {args.spec} asks for {spec.resources.workers}", file=sys.stderr)
        return 2
    train(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
