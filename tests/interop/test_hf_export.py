"""HF export: for each family, a tiny trained run exported with `export_hf` loads in transformers with no
custom code and no missing or unexpected keys; fp32 logits within 1e-5 of shardyard's, greedy
generation of 64 tokens identical, one backward's gradients (mapped back through transformers' own
save_pretrained layout) within 1e-5; the tokenizer gives ids = bytes. Refusals name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shardyard.interop import FAMILIES, Unsupported, from_hf, layouts, pick_family
from shardyard.interop.hf_dir import HFCheckpoint
from shardyard.platform.errors import UserError
from shardyard.platform.schema import ModelSpec
from shardyard.platform.spec import load_spec_text
from shardyard.runtime.export import export_hf, load_for_inference
from shardyard.runtime.worker import LocalReporter, Trainer
from tests.helpers import run_cli, tiny_spec_yaml

transformers = pytest.importorskip("transformers")

SEQ = 96
BASE = "width: 64, depth: 3, heads: 4, ffn: {hidden: 96}"
MOE = "moe: {num_experts: 4, top_k: 2, aux_loss: 0.01, z_loss: 0.001"
MODELS = {
    "llama": f"{{kind: dense, {BASE}, kv_heads: 2, qkv_bias: true, rope_theta: 50000.0, norm_eps: 1.0e-5, "
    "rope_scaling: {type: llama3, factor: 4.0, original_context: 32}}",
    "qwen3": f"{{kind: dense, {BASE}, kv_heads: 1, head_dim: 24, qk_norm: head, tie_embeddings: true}}",
    "mixtral": f"{{kind: moe, {BASE}, kv_heads: 2, {MOE}}}}}",
    "qwen3_moe": f"{{kind: moe, {BASE}, kv_heads: 2, qk_norm: head, {MOE}, expert_hidden: 32, renormalize: false, "
    "first_dense_layers: 1}}",
    "olmoe": f"{{kind: moe, {BASE}, qk_norm: full, qkv_bias: true, {MOE}, expert_hidden: 48}}}}",
    "qwen2_moe": f"{{kind: moe, {BASE}, kv_heads: 2, qkv_bias: true, {MOE}, expert_hidden: 32, shared_experts: 2, "
    "shared_hidden: 16, shared_gate: true, every: 2}}",
    "ernie4_5_moe": f"{{kind: moe, {BASE}, kv_heads: 2, {MOE}, router: aux_free, bias_update_rate: 0.05, "
    "expert_hidden: 32, shared_experts: 2, first_dense_layers: 1}}",
}


def trained_run(tmp: Path, model: str, steps: int = 5) -> Path:
    # an odd number of steps: the aux-free bias moves by +-rate per step, so after an even number it
    # can be back at exactly zero
    text = tiny_spec_yaml(
        "x",
        tmp,
        model=model,
        data=f"{{paths: [stdlib], seq_len: {SEQ}, max_bytes: 3000000}}",
        training=f"{{steps: {steps}, batch_size: 4, eval_every: 0, eval_bytes: 2048}}",
        resources="{workers: 1, cpus_per_worker: 1, max_failures: 0}",
        checkpoint=f"{{dir: {tmp}, every: {steps}, keep: 2}}",
    )
    spec = load_spec_text(text)
    run_dir = tmp / "run"
    Trainer(spec, run_dir, LocalReporter(run_dir, 1)).fit()
    return run_dir


def load_hf(out: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


def hf_gradients_in_checkpoint_layout(hf, tmp: Path) -> HFCheckpoint:
    """The HF model's gradients written by transformers' own save_pretrained (per-expert layout)."""
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    hf.save_pretrained(str(tmp / "grads"))
    return HFCheckpoint(tmp / "grads")


@pytest.mark.parametrize("family", list(MODELS))
def test_export_loads_in_transformers_with_equal_logits_generation_and_gradients(tmp_path: Path, family: str) -> None:
    run_dir = trained_run(tmp_path, MODELS[family])
    spec, model = load_for_inference(run_dir)
    assert pick_family(spec.model).name == family  # auto picks it
    if family == "ernie4_5_moe":  # the trained selection bias moved: the export must carry it
        assert model.stack.blocks[1].ffn.router.expert_bias.abs().max() > 0
    out = tmp_path / "hf"
    name, files = export_hf(run_dir, out)
    assert name == family and files == [out / "model.safetensors"]
    hf = load_hf(out)
    assert hf.config.model_type == family

    x = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(x, -1, 1)
    logits, ce = model(x, targets)  # eval mode: no aux loss, no jitter
    hf_logits = hf(input_ids=x).logits
    assert (hf_logits - logits).abs().max().item() <= 1e-5

    from shardyard.models.bytes import generate

    prompt = bytes(range(65, 81))
    ours = generate(model, prompt, 64, temperature=0)
    theirs = hf.generate(torch.tensor([list(prompt)]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert bytes(theirs[0, len(prompt) :].tolist()) == ours

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "héllo, wörld\n\tbytes"
    assert tok(text)["input_ids"] == list(text.encode()) and tok.decode(list(text.encode())) == text

    # one backward through each; HF gradients mapped back to shardyard names equal ours
    model.zero_grad()
    ce.backward()
    hf_ce = F.cross_entropy(hf(input_ids=x).logits.view(-1, 256), targets.reshape(-1))
    hf_ce.backward()
    assert abs(hf_ce.item() - ce.item()) < 1e-5
    grads = hf_gradients_in_checkpoint_layout(hf, tmp_path)
    maps, _ = layouts(FAMILIES[family], spec.model, 256)
    checked = 0
    for key, p in model.named_parameters():
        if key not in maps:
            continue
        mapped = from_hf(maps[key], grads.read, 0, p.shape[0])
        torch.testing.assert_close(mapped, p.grad, rtol=1e-4, atol=1e-5, msg=key)
        checked += 1
    assert checked == len(list(model.named_parameters()))


def test_sharded_bf16_export_writes_an_index(tmp_path: Path) -> None:
    run_dir = trained_run(tmp_path, MODELS["mixtral"], steps=2)
    out = tmp_path / "hf"
    proc = run_cli(
        "export", str(run_dir), "--format", "hf", "--dtype", "bf16", "--max-shard-size", "200KB", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exported mixtral (bf16)" in proc.stdout
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 2
    hf = load_hf(out)
    _, model = load_for_inference(run_dir)
    x = torch.randint(0, 256, (1, 32))
    diff = (hf(input_ids=x).logits - model(x)[0]).abs().max().item()
    assert diff < 0.1  # bf16 weights


@pytest.mark.parametrize(
    ("model", "target", "field"),
    [
        ("{kind: moe, moe: {router: expert_choice}}", "auto", "model.moe.router: 'expert_choice'"),
        ("{kind: moe, moe: {capacity_factor: 1.25}}", "auto", "model.moe.capacity_factor"),
        ("{kind: moe, moe: {score: sigmoid}}", "auto", "model.moe.score"),
        ("{kind: moe, moe: {routed_scale: 2.0}}", "auto", "model.moe.routed_scale"),
        ("{kind: moe, moe: {router: aux_free}}", "mixtral", "model.moe.router: 'aux_free'"),
        ("{kind: moe, moe: {router: aux_free, shared_experts: 1, shared_gate: true}}", "auto", "shared_gate"),
        ("{kind: moe, moe: {expert_kind: gelu}}", "auto", "model.moe.expert_kind"),
        ("{kind: dense, ffn: {kind: gelu}}", "auto", "model.ffn.kind"),
        ("{kind: dense, qk_norm: full}", "auto", "model.qk_norm"),
        ("{kind: moe, moe: {shared_experts: 1}}", "mixtral", "model.moe.shared_experts: 1"),
        ("{kind: moe}", "qwen2_moe", "model.moe.shared_experts: 0"),
        ("{kind: moe, moe: {every: 2}}", "olmoe", "model.moe.every"),
        ("{kind: moe, moe: {router: switch, top_k: 1}}", "mixtral", "model.moe.renormalize: false"),
        ("{kind: dense}", "mixtral", "model.kind: 'dense'"),
        ("{kind: dense}", "gpt2", "--target 'gpt2'"),
    ],
)
def test_what_no_family_holds_is_refused_naming_the_field(model: str, target: str, field: str) -> None:
    import yaml

    spec = ModelSpec(**yaml.safe_load(model))
    with pytest.raises(Unsupported, match=field.replace("(", r"\(").replace(".", r"\.")):
        pick_family(spec, target)


def test_byte_models_are_refused_by_the_cli(tmp_path: Path) -> None:
    spec_model = ModelSpec(kind="megabyte", stages=[{"width": 32, "depth": 1, "heads": 2, "patch_size": 4}] * 2)
    with pytest.raises(Unsupported, match="model.kind: 'megabyte'"):
        pick_family(spec_model)


def test_refusal_reaches_the_user_as_a_user_error(tmp_path: Path) -> None:
    run_dir = trained_run(
        tmp_path, "{kind: moe, width: 32, depth: 1, heads: 2, moe: {num_experts: 4, score: sigmoid}}", 1
    )
    with pytest.raises(UserError, match=r"model\.moe\.score: 'sigmoid'"):
        export_hf(run_dir, tmp_path / "hf")


def test_an_ungated_shared_expert_exports_exactly_to_qwen2_moe(tmp_path: Path) -> None:
    """Qwen2-MoE always gates its shared expert: a zero gate weight (sigmoid 0 = 1/2) and a doubled down
    projection hold an ungated one exactly."""
    model = f"{{kind: moe, {BASE}, {MOE}, shared_experts: 1}}}}"
    run_dir = trained_run(tmp_path, model, steps=3)
    spec, ours = load_for_inference(run_dir)
    assert pick_family(spec.model).name == "qwen2_moe"
    export_hf(run_dir, tmp_path / "hf")
    hf = load_hf(tmp_path / "hf")
    gate = hf.state_dict()["model.layers.0.mlp.shared_expert_gate.weight"]
    assert gate.abs().max() == 0
    x = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - ours(x)[0]).abs().max().item() <= 1e-5


def test_cli_refusals_name_the_field(tmp_path: Path) -> None:
    run_dir = trained_run(tmp_path, MODELS["llama"], steps=1)
    proc = run_cli("export", str(run_dir), "--format", "hf", "--target", "mixtral", "--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "model.kind: 'dense'" in proc.stderr
    proc = run_cli("export", str(run_dir), "--format", "hf", "--max-shard-size", "lots", "--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "--max-shard-size" in proc.stderr


def test_a_bpe_run_exports_its_trained_tokenizer(tmp_path: Path) -> None:
    """A `bpe:N` run's export carries the tokenizer it trained on: AutoTokenizer gives the ids the run's
    own tokenizer gives, and decodes them back to the text; the model loads with its vocabulary."""
    from shardyard.data.prepare import ensure_prepared

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["def", "return", "import", "class", "self", "value", "index", "print", "lambda", "yield"]
    for i in range(4):
        lines = [" ".join(words[(i * 7 + j * 3 + k) % len(words)] for k in range(8)) for j in range(400)]
        (corpus / f"part{i}.py").write_text("\n".join(lines) + "\n")
    text = tiny_spec_yaml(
        "bpe",
        tmp_path,
        model=MODELS["llama"],
        data=f"{{sources: [{{path: '{corpus}', format: text}}], tokenizer: 'bpe:300', seq_len: 32, "
        f"prepared_dir: '{tmp_path / 'prepared'}'}}",
        training="{steps: 2, batch_size: 2, eval_every: 0, eval_bytes: 2048}",
        resources="{workers: 1, cpus_per_worker: 1, max_failures: 0}",
        checkpoint=f"{{dir: {tmp_path}, every: 2, keep: 2}}",
    )
    spec = load_spec_text(text)
    Trainer(spec, tmp_path / "run", LocalReporter(tmp_path / "run", 1)).fit()
    out = tmp_path / "hf"
    export_hf(tmp_path / "run", out, "llama")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    tokenizer = ensure_prepared(spec.data, parallel="local").tokenizer()
    sample = "def value(self):\n    return index + lambda\n"
    ids = hf_tok(sample, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode([sample.encode()])[0].tolist()
    assert len(ids) < len(sample.encode())  # merges in use: not the byte tokenizer
    assert hf_tok.decode(ids) == sample
    assert load_hf(out).config.vocab_size == 300
