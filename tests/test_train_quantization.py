"""QLoRA: a 4-bit (NF4) or 8-bit frozen base through bitsandbytes with LoRA on top. bitsandbytes runs
both on CPU here (0.46+), so a real 2-worker run trains a 4-bit stories260K and its adapter reloads
onto a freshly quantized base to the outputs the run recorded. A device its kernels cannot run and
combinations that cannot work are refused naming the field."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import stories_run
from kftune import steps
from kftune.config import parse_config
from kftune.errors import KftuneError
from kftune.models import check_quantization_runs, keep_generic_cpu_kernel_where_unpackable, load_tuned_model
from kftune.prompts.build import read_meta, read_prompts
from kftune.train.launch import run_training
from kftune.train.loop import PROBE_FILE, PROBE_ROWS, TRAIN_LOG_FILE, build_model, probe_outputs

LORA = {"name": "lora", "r": 4, "target_modules": "all-linear"}


def story_config(tmp_path, quantization="4bit", method=LORA, **train):
    train = {"max_steps": 8, "lr": 1e-2, "log_every_steps": 4, **train}
    return stories_run(tmp_path, "qlora", method, train, quantization=quantization)


@pytest.mark.parametrize(("quantization", "layer"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_the_frozen_base_is_quantized_and_only_lora_trains(tmp_path, quantization, layer):
    model = build_model(parse_config(story_config(tmp_path, quantization)), None, for_training=True)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == layer and not q_proj.base_layer.weight.is_floating_point()
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_4bit_layers_bitsandbytes_cannot_pack_for_its_avx512_cpu_kernel_keep_the_generic_one(tmp_path):
    """stories260K's attention layers are 64 -> 64 or 32 wide (packable); its MLP's are 64 <-> 172 (not)."""
    model = build_model(parse_config(story_config(tmp_path)), None, for_training=True)
    layers = {name: m for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    for layer in layers.values():  # as on a CPU with AVX512-bf16
        layer.support_avx512bf16_for_cpu = True
    keep_generic_cpu_kernel_where_unpackable(model)
    kernels = {(".mlp." in name, layer.support_avx512bf16_for_cpu) for name, layer in layers.items()}
    assert kernels == {(False, True), (True, False)}


def test_a_4bit_lora_run_trains_and_its_adapter_reloads_onto_a_quantized_base(tmp_path):
    raw = story_config(tmp_path)
    steps.prepare_data(raw, str(tmp_path / "data"), str(tmp_path / "card.md"))
    steps.build_prompts(raw, str(tmp_path / "data"), str(tmp_path / "prompts"), str(tmp_path / "preview.html"))
    run_training(parse_config(raw), tmp_path / "prompts", tmp_path / "model", tmp_path / "ray")
    history = json.loads((tmp_path / "model" / TRAIN_LOG_FILE).read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file() and not (
        tmp_path / "model" / "model.safetensors"
    ).exists()
    reloaded = load_tuned_model(tmp_path / "model")
    assert type(reloaded.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    rows = read_prompts(tmp_path / "prompts", "test")[:PROBE_ROWS]
    outputs = probe_outputs(reloaded, rows, read_meta(tmp_path / "prompts")["pad_token_id"], "causal_lm")
    expected = json.loads((tmp_path / "model" / PROBE_FILE).read_text())["outputs"]
    assert torch.allclose(torch.tensor(outputs), torch.tensor(expected), rtol=1e-5)


def test_a_device_bitsandbytes_cannot_run_is_refused_naming_the_field():
    check_quantization_runs("4bit", torch.device("cpu"))  # runs here
    with pytest.raises(
        KftuneError,
        match=r"model\.quantization: bitsandbytes cannot run 4bit on meta .*leave model\.quantization empty",
    ):
        check_quantization_runs("4bit", torch.device("meta"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"method": {"name": "full"}},
            r"model\.quantization: a quantized base trains LoRA adapters on top \(method\.name: lora\), not full",
        ),
        ({"method": {**LORA, "merge": True}}, r"method\.merge: cannot fold LoRA into a quantized base"),
        ({"train": {"deepspeed": {"stage": 2}}}, r"train\.deepspeed: a quantized base trains under DDP"),
    ],
)
def test_combinations_a_quantized_base_cannot_take_are_refused(tmp_path, change, message):
    raw = story_config(tmp_path, method=change.get("method", LORA), **change.get("train", {}))
    with pytest.raises(KftuneError, match=message):
        parse_config(raw)
