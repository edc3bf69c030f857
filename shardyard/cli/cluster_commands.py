"""Commands about a cluster and its jobs: status | logs | stop | list | cluster up/down."""

from __future__ import annotations

import argparse
import sys

from shardyard.cli.arguments import add_jobs_address
from shardyard.cli.output import job_row
from shardyard.cluster import jobs
from shardyard.cluster.head import cluster_down, cluster_up
from shardyard.platform.run_dir import RunDir
from shardyard.tracking.live import fold_progress


def cmd_status(args: argparse.Namespace) -> int:
    state, message = jobs.status(args.job_id, args.address)
    print(state if not message else f"{state}: {message}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    if args.follow:
        fold_progress(jobs.follow_logs(args.job_id, args.address))
    else:
        sys.stdout.write(jobs.logs(args.job_id, args.address))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """A run directory (or a job name under ./runs) gets a stop request file: its workers checkpoint and
    exit at the next step boundary. Anything else is a Ray job id, stopped through Ray Jobs (its
    entrypoint gets SIGTERM, which does the same)."""
    from shardyard.runtime.run_events import request_stop

    run_dir = RunDir.find(args.job_id)
    if run_dir is not None:
        request_stop(run_dir.path, "shardyard stop")
        print(f"stop requested: {run_dir.path.name} checkpoints and exits at its next step boundary")
        return 0
    stopped = jobs.stop(args.job_id, args.address)
    print(
        "stop requested (the job checkpoints and exits at its next step boundary)"
        if stopped
        else "job already finished"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = jobs.list_jobs(args.address)
    if not rows:
        print("no jobs")
    for row in rows:
        print(job_row(row))
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    if args.action == "up":
        print(cluster_up(args.num_cpus, args.port, args.dashboard_port))
    else:
        print(cluster_down(args.port))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    for name, fn, text in (
        ("status", cmd_status, "state of a submitted job"),
        ("stop", cmd_stop, "stop a run (its directory or name) or a submitted job (its id) with a checkpoint"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        add_jobs_address(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("logs", help="logs of a submitted job")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    add_jobs_address(p)
    p.set_defaults(fn=cmd_logs)

    p = sub.add_parser("list", help="jobs on the cluster")
    add_jobs_address(p)
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("cluster", help="start or stop a local Ray head with token authentication")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.set_defaults(fn=cmd_cluster)
