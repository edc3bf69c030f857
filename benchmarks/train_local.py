"""Train one job in this process with the workers' own Trainer (no Ray): a benchmark's single-worker
runs, which must not depend on an embedded Ray cluster surviving a heavily loaded machine.

    python benchmarks/train_local.py SPEC [--set KEY=VALUE ...]

Same loop, data order, evaluation and checkpoints (LocalReporter writes <dir>/<name>/checkpoint_*
as Ray Train does) as `shardyard run` with resources.workers 1; refuses more workers.
"""

from __future__ import annotations

import argparse
import sys

from shardyard.platform.spec import load_spec, spec_to_yaml
from shardyard.runtime import checkpoint as ckpt
from shardyard.runtime.entry import run_directory
from shardyard.runtime.worker import LocalReporter, Trainer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    spec = load_spec(args.spec, args.set)
    if spec.resources.workers != 1:
        print(f"train_local runs one worker; {args.spec} asks for {spec.resources.workers}", file=sys.stderr)
        return 2
    run_dir = run_directory(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(spec_to_yaml(spec))
    trainer = Trainer(spec, run_dir, LocalReporter(run_dir, spec.checkpoint.keep))
    trainer.resume(ckpt.find_latest_checkpoint(run_dir))
    trainer.fit()
    print(f"done at step {trainer.step}/{spec.training.steps}: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
