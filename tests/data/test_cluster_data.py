"""On the session's real 2-node Ray cluster: `prepare` spreads over both nodes and
writes shards byte-identical to a single-process prepare; a job with data, prepared shards and
checkpoints in a loopback S3 bucket loses a worker process to SIGKILL and resumes from the bucket."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardyard import envvars
from shardyard.data.prepare import prepare
from shardyard.platform.run_dir import RunDir
from shardyard.platform.schema import DataSpec
from tests.data.test_prepare import documents, write_jsonl
from tests.helpers import tiny_spec_yaml, two_node_ray_cluster

pytestmark = [pytest.mark.slow, pytest.mark.ray]
FAULT_STEP = 6


@pytest.fixture(scope="module")
def cluster(s3_bucket: str) -> Iterator[Any]:
    """The session's 2-node cluster, connected with the S3 server's AWS_* variables and the fault hook
    (rank 0's process SIGKILLs itself once at FAULT_STEP) in the job's runtime env: every Ray task and
    training worker sees them."""
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env_vars[envvars.FAULT_STEP] = f"{FAULT_STEP}:kill"
    with two_node_ray_cluster(env_vars) as c:
        yield c


def shard_bytes(directory: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.name != "index.json"}


def test_prepare_on_two_nodes_equals_one_process(tmp_path: Path, cluster: Any) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        write_jsonl(corpus / f"part{i}.jsonl", documents(30, seed=i))
    specs = {
        tok: {
            where: DataSpec(
                sources=[{"path": str(corpus), "format": "jsonl"}],
                tokenizer=tok,
                seq_len=16,
                prepared_dir=str(tmp_path / f"{where}-{tok.replace(':', '')}"),
                shard_tokens=5000,
            )
            for where in ("ray", "local")
        }
        for tok in ("bytes", "bpe:300")
    }
    ray_reports = {tok: prepare(s["ray"], parallel="ray") for tok, s in specs.items()}
    assert prepare(specs["bytes"]["ray"], parallel="ray").skipped
    for tok, s in specs.items():
        local = prepare(s["local"], parallel="local")
        report = ray_reports[tok]
        assert len(report.units_per_node) == 2 and sum(report.units_per_node.values()) == 8, report.units_per_node
        assert shard_bytes(report.directory) == shard_bytes(local.directory)
        assert len(shard_bytes(local.directory)) > 3  # several shards per split


def test_job_with_data_and_checkpoints_in_the_bucket_resumes_from_it(
    tmp_path: Path, s3_bucket: str, cluster: Any
) -> None:
    """Rank 0's process is SIGKILLed at step 6 (no exception, no clean-up); the group restarts from the
    step-4 checkpoint, which exists only in the bucket, and replays steps 5-6 with the same losses."""
    from shardyard.data.storage import filesystem
    from shardyard.platform.spec import load_spec_text
    from shardyard.runtime.entry import run_training
    from shardyard.runtime.run_events import read_events

    fs, _ = filesystem(s3_bucket)
    fs.put_file(str(write_jsonl(tmp_path / "corpus.jsonl", documents(120))), f"{s3_bucket[5:]}/job-data/corpus.jsonl")
    spec = load_spec_text(
        tiny_spec_yaml(
            "s3job",
            tmp_path,
            model="{kind: moe, width: 32, depth: 2, heads: 2, ffn: {hidden: 64}, moe: {num_experts: 4, top_k: 2}}",
            data=f"{{sources: [{{path: '{s3_bucket}/job-data'}}], tokenizer: 'bpe:300', seq_len: 32, "
            f"prepared_dir: '{s3_bucket}/prepared', cache_dir: '{tmp_path / 'cache'}'}}",
            training="{steps: 8, batch_size: 4, eval_every: 8, eval_bytes: 1024, log_every: 1}",
            optim="{lr: 3.0e-3, schedule: {warmup: 2}}",
            checkpoint=f"{{dir: '{s3_bucket}/runs', every: 4, keep: 2}}",
        )
    )
    run_dir = RunDir.of(spec).path
    assert str(run_dir).startswith(str(Path.home() / ".cache"))
    try:
        result = run_training(spec, run_dir)
        assert result.error is None and result.final_step == 8, result.error
        assert any("checkpoint_" in p for p in fs.ls(f"{s3_bucket[5:]}/runs/s3job", detail=False))
        assert not list(run_dir.glob("checkpoint_*"))  # checkpoints live in the bucket only
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [r for r in lines if r.get("kind") == "train"]
        assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
        retries = [e for e in read_events(run_dir)[0] if e["event"] == "retry"]
        assert len(retries) == 1 and retries[0]["message"].startswith("rank 0 "), retries
        assert "died: its process died" in retries[0]["message"], retries  # a dead process, not an exception
        for first, replay in zip(train[4:6], train[6:8]):  # replayed from the bucket's step-4 checkpoint
            assert abs(first["loss"] - replay["loss"]) < 1e-5, (first, replay)
        assert train[-1]["bytes_per_s"] > 1.5 * train[-1]["tokens_per_s"]  # BPE tokens cover several bytes
    finally:
        import shutil

        shutil.rmtree(run_dir.parent, ignore_errors=True)
