"""`prepare` on a real 2-node Ray cluster: work spreads over both nodes, shards are byte-identical to a
single-process prepare (bytes and BPE), and a second call finds the fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardyard.data.prepare import prepare
from shardyard.platform.schema import DataSpec
from tests.data.test_prepare import documents, write_jsonl
from tests.helpers import two_node_ray_cluster


def shard_bytes(directory: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.name != "index.json"}


@pytest.mark.slow
def test_prepare_on_two_nodes_equals_one_process(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        write_jsonl(corpus / f"part{i}.jsonl", documents(30, seed=i))
    specs = {tok: {where: DataSpec(sources=[{"path": str(corpus), "format": "jsonl"}], tokenizer=tok, seq_len=16,
                                   prepared_dir=str(tmp_path / f"{where}-{tok.replace(':', '')}"), shard_tokens=5000)
                   for where in ("ray", "local")} for tok in ("bytes", "bpe:300")}
    with two_node_ray_cluster():
        ray_reports = {tok: prepare(s["ray"], parallel="ray") for tok, s in specs.items()}
        assert prepare(specs["bytes"]["ray"], parallel="ray").skipped
    for tok, s in specs.items():
        local = prepare(s["local"], parallel="local")
        report = ray_reports[tok]
        assert len(report.units_per_node) == 2 and sum(report.units_per_node.values()) == 8, report.units_per_node
        assert shard_bytes(report.directory) == shard_bytes(local.directory)
        assert len(shard_bytes(local.directory)) > 3  # several shards per split
