"""Entrypoint of a submitted Ray job (`python -m shardyard.cli.job_entry`, what `shardyard submit`
launches): the resolved spec arrives in $SHARDYARD_SPEC_JSON, the run directory in $SHARDYARD_RUN_DIR."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from shardyard import envvars
from shardyard.cli.output import training_summary
from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import RunDir
from shardyard.platform.spec import spec_from_json


def main() -> int:
    import ray

    from shardyard.runtime.entry import refuse_conflicting_resume, run_training
    from shardyard.tracking.live import LiveStatus

    spec = spec_from_json(os.environ[envvars.SPEC_JSON])
    run_dir = Path(os.environ.get(envvars.RUN_DIR) or RunDir.of(spec).path)
    try:
        refuse_conflicting_resume(spec, run_dir)
    except UserError as err:
        print(f"[shardyard] error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)  # Ray Jobs sets RAY_ADDRESS
    print(
        f"[shardyard] job {spec.name}: {spec.resources.describe_workers()} workers, run directory {run_dir}", flush=True
    )
    progress = LiveStatus(spec.training.steps, tty=False)  # a job log: plain periodic lines
    result = run_training(spec, run_dir, progress)
    print(training_summary(result, spec, resume_hint="submit the same spec again (same job name)"), flush=True)
    return result.exit_code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter teardown that can crash in Ray's threads (see main._exit_now)
