"""Checkpoints under damage and attack: truncated files fall back with a message, a planted pickle
never runs, non-finite weights are never saved, the best checkpoint is kept outside the rotation."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardyard.platform.run_dir import RunDir
from shardyard.platform.spec import load_spec_text
from shardyard.runtime import checkpoint as ckpt
from shardyard.runtime.entry import latest_step, resume_conflicts
from shardyard.runtime.safe_load import UnsafeCheckpoint
from shardyard.runtime.save_guard import NonFiniteWeights, best_val_bpb, keep_best
from shardyard.runtime.worker import LocalReporter, Trainer
from tests.helpers import tiny_spec_yaml, world_of_one

TINY_MODEL = "{kind: moe, width: 32, depth: 2, heads: 2, ffn: {hidden: 64}, moe: {num_experts: 4, top_k: 2}}"


def tiny_spec(root: Path, corpus: Path, name: str = "c", *extra: str):
    """One worker, 4 steps, checkpoints at 2 and 4, on the small corpus."""
    data = f"{{paths: [{corpus}], seq_len: 32, cache_dir: {root / 'cache'}}}"
    return load_spec_text(
        tiny_spec_yaml(name, root, model=TINY_MODEL, data=data),
        overrides=[
            "resources.workers=1",
            "training.steps=4",
            "training.eval_every=2",
            "checkpoint.every=2",
            "checkpoint.keep=3",
            "checkpoint.keep_best=true",
            "optim.schedule.warmup=1",
            "training.batch_size=4",
            "training.eval_bytes=1024",
            "tracking.mode=disabled",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    root = tmp_path_factory.mktemp("safety")
    spec = tiny_spec(root, small_corpus)
    run_dir = root / "c"
    Trainer(spec, run_dir, LocalReporter(run_dir, spec.checkpoint.keep)).fit()
    return run_dir


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def _falls_back_to_the_older_checkpoint(run: Path, tmp_path: Path, small_corpus: Path, message: str) -> None:
    older = run / "checkpoint_00000002"
    heard: list[str] = []
    assert ckpt.find_latest_checkpoint(run, report=heard.append) == older
    assert heard == [message]
    # the driver's own checks read the same run without a traceback
    assert latest_step(run) == 2
    assert resume_conflicts(tiny_spec(tmp_path, small_corpus), run) == []
    # and a resume continues from the older one
    trainer = Trainer(tiny_spec(tmp_path, small_corpus), run, LocalReporter(run, 3))
    trainer.resume(older)
    assert trainer.step == 2


def test_truncated_newest_shard_falls_back_with_a_message(
    finished_run: Path, tmp_path: Path, small_corpus: Path
) -> None:
    """Only the shard is cut (meta.json intact): the manifest's size check, not the meta, must catch it."""
    run = copy_run(finished_run, tmp_path)
    newest = run / "checkpoint_00000004"
    shard = next((newest / ckpt.SHARDS_DIR).glob("*.distcp"))
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    assert ckpt.read_meta(newest)["step"] == 4  # the meta still reads: the shard is what is wrong
    name = shard.relative_to(newest).as_posix()
    message = f"skipping checkpoint_00000004: {name} has {size // 2} bytes, the manifest says {size}"
    _falls_back_to_the_older_checkpoint(run, tmp_path, small_corpus, message)


def test_truncated_newest_meta_falls_back_with_a_message(
    finished_run: Path, tmp_path: Path, small_corpus: Path
) -> None:
    run = copy_run(finished_run, tmp_path)
    meta = run / "checkpoint_00000004" / ckpt.META_FILE
    meta.write_bytes(meta.read_bytes()[:20])  # cut inside the JSON; the shards are intact
    message = "skipping checkpoint_00000004: meta.json is missing or unreadable"
    _falls_back_to_the_older_checkpoint(run, tmp_path, small_corpus, message)


def _plant_executable_pickle(checkpoint: Path, marker: Path) -> None:
    """Replace the DCP metadata (what `dcp.load` unpickles first) with a pickle whose __reduce__
    writes `marker`, and rewrite the manifest so the checkpoint still verifies: what an attacker
    who can write the run directory would do."""

    class Exploit:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('code ran')",)

    (checkpoint / ckpt.SHARDS_DIR / ".metadata").write_bytes(pickle.dumps(Exploit()))
    (checkpoint / ckpt.MANIFEST_FILE).write_text(json.dumps({"files": ckpt.file_digests(checkpoint)}))


def test_a_planted_executable_pickle_is_refused_and_never_runs(
    finished_run: Path, tmp_path: Path, small_corpus: Path
) -> None:
    run = copy_run(finished_run, tmp_path)
    newest = run / "checkpoint_00000004"
    marker = tmp_path / "pwned"
    _plant_executable_pickle(newest, marker)
    # the planted file really is executable: plain pickle (what DCP uses) runs it in a child process
    subprocess.run(
        [sys.executable, "-c", f"import pickle; pickle.load(open({str(newest / 'shards' / '.metadata')!r}, 'rb'))"],
        check=False,
        capture_output=True,
        env={"PATH": ""},
        timeout=60,
    )
    assert marker.exists(), "the planted pickle should run code under plain pickle.load"
    marker.unlink()

    heard: list[str] = []
    assert ckpt.verify_checkpoint(newest, full=True) is not None  # sizes and hashes match, the content is refused
    assert ckpt.find_latest_checkpoint(run, report=heard.append) == run / "checkpoint_00000002"
    assert "builtins.exec" in heard[0] and "checkpoint_00000004" in heard[0]
    trainer = Trainer(tiny_spec(tmp_path, small_corpus), run, LocalReporter(run, 3))
    with pytest.raises(UnsafeCheckpoint, match="refusing to load builtins.exec"):
        trainer.resume(newest)  # loading it directly is refused as well
    from shardyard.runtime.export import consolidated_state

    with pytest.raises(UnsafeCheckpoint):
        consolidated_state(newest, trainer.model)
    assert not marker.exists()


def test_a_planted_pickle_in_a_deepspeed_partition_is_refused(tmp_path: Path) -> None:
    from shardyard.runtime.safe_load import check_torch_files

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('code ran')",)

    (tmp_path / "deepspeed").mkdir()
    torch.save({"module": {"w": torch.zeros(2)}}, tmp_path / "deepspeed" / "mp_rank_00_model_states.pt")
    check_torch_files(tmp_path / "deepspeed")  # plain tensors pass
    torch.save({"module": Exploit()}, tmp_path / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafeCheckpoint, match="optim_states.pt"):
        check_torch_files(tmp_path / "deepspeed")
    from shardyard.runtime.parallel.deepspeed_zero import ZeroWeights

    with pytest.raises(UnsafeCheckpoint, match=r"optim_states.pt.*refusing to load __builtin__.exec"):
        ZeroWeights(tmp_path)  # export's streaming reader unpickles the file's tree: refused as well
    assert not marker.exists()


def test_non_finite_weights_are_never_saved_and_name_the_step(tmp_path: Path, small_corpus: Path) -> None:
    spec = tiny_spec(tmp_path, small_corpus, "nan")
    run = tmp_path / "nan"
    trainer = Trainer(spec, run, LocalReporter(run, 3))
    trainer.train_step()
    trainer.step = 1
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = math.nan
    with pytest.raises(NonFiniteWeights, match=r"^step 1: the weights are not finite \(NaN or Inf in embed"):
        trainer.save_and_report({"step": 1})
    assert not list(run.glob("checkpoint_*"))


def test_the_best_checkpoint_is_kept_outside_the_rotation(finished_run: Path, tmp_path: Path) -> None:
    run = copy_run(finished_run, tmp_path)
    best = RunDir(run).best
    assert ckpt.verify_checkpoint(best, full=True) is None  # complete, the fit kept one
    assert best not in [path for _, path in ckpt.checkpoints_newest_first(run)]  # never rotated or resumed from
    first = run / "checkpoint_00000002"
    keep_best(run, first, val_bpb=0.5, step=2, group=world_of_one())
    assert best_val_bpb(run) == 0.5 and ckpt.read_meta(best)["step"] == 2
    assert not keep_best(
        run, run / "checkpoint_00000004", val_bpb=0.7, step=4, group=world_of_one()
    )  # worse: the best stays
    assert ckpt.read_meta(best)["step"] == 2 and ckpt.verify_checkpoint(best, full=True) is None
