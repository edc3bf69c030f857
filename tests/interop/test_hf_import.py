"""HF import: tiny transformers models built locally (random init from a config; no hub) load through
`model.init_from` with logits within 1e-5; HF -> shardyard -> HF is bit-equal in fp32; `shardyard
import` writes a spec that validates; a spec that disagrees is refused naming both values; sparse
upcycling keeps the dense model's step-0 logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardyard.interop import FAMILIES, pick_family
from shardyard.interop.hf_dir import HFCheckpoint, write_hf
from shardyard.models import build_model
from shardyard.platform.errors import UserError
from shardyard.platform.spec import load_spec, load_spec_text
from shardyard.runtime.hf_import import init_from_hf, job_spec_from_hf
from shardyard.runtime.worker import LocalReporter, Trainer
from tests.helpers import run_cli, tiny_spec_yaml

transformers = pytest.importorskip("transformers")

COMMON = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
}
CONFIGS = {
    "llama": ("LlamaConfig", {"head_dim": 24}),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "tie_word_embeddings": True}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True},
    ),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 4}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "mlp_only_layers": [0],
        },
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        {
            "moe_num_experts": 4,
            "moe_k": 2,
            "moe_intermediate_size": 32,
            "moe_num_shared_experts": 2,
            "moe_layer_start_index": 1,
            "moe_layer_end_index": 1,
        },
    ),
}


def tiny_hf(tmp: Path, family: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    cls, extra = CONFIGS[family]
    config = getattr(transformers, cls)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # larger than the init so routing and norms matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name and "o_proj" not in name:
                p.normal_(0, 0.1)
    out = tmp / f"hf-{family}"
    model.save_pretrained(str(out))
    return out, model


def imported_spec(tmp: Path, hf_dir: Path, world: int = 1, overrides: list[str] | None = None):
    text = job_spec_from_hf(hf_dir, "imported")
    spec = load_spec_text(text)
    model = spec.model.model_dump_json()
    text = tiny_spec_yaml(
        "imported",
        tmp,
        model=model,
        data="{paths: [stdlib], seq_len: 64, max_bytes: 3000000}",
        training=f"{{steps: 4, batch_size: {8 // world}, eval_every: 0, eval_bytes: 2048}}",
        resources=f"{{workers: {world}, cpus_per_worker: 1, max_failures: 0}}",
        checkpoint=f"{{dir: {tmp}, every: 0, keep: 2}}",
    )
    return load_spec_text(text, overrides=overrides)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_init_from_gives_the_hf_logits_and_round_trips_bit_equal(tmp_path: Path, family: str) -> None:
    hf_dir, hf = tiny_hf(tmp_path, family)
    spec = imported_spec(tmp_path, hf_dir)
    assert pick_family(spec.model).name == family
    model = build_model(spec.model, 64).eval()
    counts = init_from_hf(model, spec, 256)
    biases = [n for n, _ in model.named_buffers() if n.endswith("expert_bias")] if family == "ernie4_5_moe" else []
    assert counts["tensors"] == len(list(model.named_parameters())) + len(biases)
    for name in biases:  # the selection bias came across (tiny_hf made it non-zero)
        assert model.get_buffer(name).abs().max() > 0
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(x)[0] - hf(input_ids=x).logits).abs().max().item()
    assert diff <= 1e-5

    # HF -> shardyard -> HF: every tensor bit-equal (names and values)
    state = model.state_dict()
    out = tmp_path / "again"
    write_hf(
        out,
        FAMILIES[family],
        spec.model,
        {k: tuple(v.shape) for k, v in state.items()},
        state.__getitem__,
        vocab_size=256,
        seq_len=64,
    )
    a, b = HFCheckpoint(hf_dir), HFCheckpoint(out)
    assert a.names() == b.names()
    for name in a.names():
        assert torch.equal(a.read(name), b.read(name)), name


def test_a_disagreeing_spec_is_refused_naming_both_values(tmp_path: Path) -> None:
    hf_dir, _ = tiny_hf(tmp_path, "mixtral")
    spec = imported_spec(tmp_path, hf_dir, overrides=["model.width=32", "model.moe.num_experts=8"])
    model = build_model(spec.model, 64)
    with pytest.raises(UserError) as err:
        init_from_hf(model, spec, 256)
    text = str(err.value)
    assert "model.width: the spec says 32" in text and "says 64" in text
    assert "model.moe.num_experts: the spec says 8" in text and "says 4" in text
    with pytest.raises(UserError, match="vocabulary: the spec's data.tokenizer gives 300"):
        init_from_hf(build_model(spec.model, 64, 300), spec.model_copy(), 300)


def test_import_cli_writes_a_job_spec_that_validates(tmp_path: Path) -> None:
    hf_dir, _ = tiny_hf(tmp_path, "qwen2_moe")
    out = tmp_path / "jobs" / "from-hf.yaml"
    proc = run_cli("import", str(hf_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spec = load_spec(out)
    moe = spec.model.moe
    assert spec.model.init_from == str(hf_dir.resolve()) and spec.name == "from-hf"
    assert (moe.num_experts, moe.expert_hidden, moe.shared_hidden, moe.shared_gate) == (4, 32, 48, True)
    assert spec.model.kv_heads == 2 and spec.model.qkv_bias and moe.first_dense_layers == 1
    proc = run_cli("validate", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "gpt2"}')
    proc = run_cli("import", str(bad), "--out", str(tmp_path / "x.yaml"))
    assert proc.returncode != 0 and "model_type 'gpt2'" in proc.stderr


def test_init_from_trains_with_a_falling_loss(tmp_path: Path) -> None:
    hf_dir, _ = tiny_hf(tmp_path, "qwen3_moe")
    spec = imported_spec(tmp_path, hf_dir, overrides=["training.steps=12", "optim.lr=3e-3"])
    trainer = Trainer(spec, tmp_path / "run", LocalReporter(tmp_path / "run", 2))
    trainer.fit()
    from tests.helpers import train_losses

    losses = list(train_losses(tmp_path / "run").values())
    assert len(losses) == 12 and losses[-1] < losses[0]


@pytest.mark.parametrize("source", ["shardyard_run", "hf_llama"])
def test_upcycled_moe_starts_with_the_dense_models_logits(tmp_path: Path, source: str) -> None:
    dense_model = "{kind: dense, width: 64, depth: 2, heads: 4, kv_heads: 2, ffn: {hidden: 96}}"
    text = tiny_spec_yaml(
        "dense",
        tmp_path,
        model=dense_model,
        training="{steps: 4, batch_size: 4, eval_every: 0, eval_bytes: 2048}",
        resources="{workers: 1, cpus_per_worker: 1, max_failures: 0}",
        checkpoint=f"{{dir: {tmp_path}, every: 4, keep: 2}}",
    )
    dense_spec = load_spec_text(text)
    run_dir = tmp_path / "dense"
    dense = Trainer(dense_spec, run_dir, LocalReporter(run_dir, 2))
    dense.fit()
    path = run_dir
    if source == "hf_llama":
        from shardyard.runtime.export import export_hf

        export_hf(run_dir, tmp_path / "hf")
        path = tmp_path / "hf"
    moe_model = (
        "{kind: moe, width: 64, depth: 2, heads: 4, kv_heads: 2, ffn: {hidden: 96}, "
        f"upcycle_from: '{path}', moe: {{num_experts: 4, top_k: 2, shared_experts: 1, shared_hidden: 32}}}}"
    )
    moe_spec = load_spec_text(text.replace(dense_model, moe_model).replace("name: dense", "name: moe"))
    moe = Trainer(moe_spec, tmp_path / "moe", LocalReporter(tmp_path / "moe", 2))
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = dense.model.eval()(x)[0]
        got = moe.model.eval()(x)[0]
    assert (got - want).abs().max().item() <= 1e-5
    experts = moe.model.stack.blocks[0].ffn.experts.w_up
    assert torch.equal(experts[0], experts[3])  # no noise: identical copies
    if source == "shardyard_run":  # training continues from the dense model's level, not from scratch
        from tests.helpers import train_losses

        moe.model.train()
        moe.fit()
        dense_losses, moe_losses = train_losses(run_dir), train_losses(tmp_path / "moe")
        # same batches, step for step: the upcycled model continues from the dense model's level
        # (measured here: 4.90 / 4.49 at steps 1 / 4 against the dense run's 5.53 / 5.05)
        assert all(moe_losses[s] < dense_losses[s] for s in dense_losses)
        assert moe_losses[4] < dense_losses[4]


def test_a_non_zero_output_bias_is_refused(tmp_path: Path) -> None:
    """Llama's attention_bias also biases o_proj; shardyard has no place for a non-zero one."""
    config = transformers.LlamaConfig(**{**COMMON, "attention_bias": True})
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        hf.model.layers[1].self_attn.o_proj.bias.fill_(0.5)
    hf.save_pretrained(str(tmp_path / "hf"))
    spec = imported_spec(tmp_path, tmp_path / "hf")
    assert spec.model.qkv_bias
    with pytest.raises(UserError, match=r"model\.init_from: .*layers\.1\.self_attn\.o_proj\.bias is non-zero"):
        init_from_hf(build_model(spec.model, 64), spec, 256)
