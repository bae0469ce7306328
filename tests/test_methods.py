import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import STORIES
from kftune.config import parse_config
from kftune.methods import apply_method, trainable_parameters
from kftune.models import load_base_model, resolve_model_path


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def minilm_path():
    return resolve_model_path("minilm-l6")


def method(make_config, **options):
    return parse_config(make_config(method=options)).method


def test_lora_trains_adapters_and_head_only(make_config, minilm_path):
    model = apply_method(
        load_base_model(minilm_path, "sequence_classification", 2, 0),
        method(make_config, name="lora", r=4),
        "sequence_classification",
    )
    names = trainable_names(model)
    assert names and all(("lora_" in n and ("query" in n or "value" in n)) or "classifier" in n for n in names)
    assert any("classifier" in n for n in names)
    trainable, total = trainable_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in names) and trainable < total * 0.01


def test_head_only_trains_exactly_the_classifier(make_config, minilm_path):
    model = apply_method(
        load_base_model(minilm_path, "sequence_classification", 2, 0),
        method(make_config, name="head_only"),
        "sequence_classification",
    )
    assert trainable_names(model) == {"classifier.weight", "classifier.bias"}


def test_full_trains_everything_on_a_decoder():
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    )
    for p in model.parameters():
        p.requires_grad_(False)
    options = parse_config({"data": {"path": "x"}, "method": {"name": "full"}, "registry": {"model_name": "m"}}).method
    model = apply_method(model, options, "causal_lm")
    assert trainable_parameters(model)[0] == trainable_parameters(model)[1]


def test_lora_on_real_tiny_llama_targets_llama_projections(make_config):
    model = apply_method(
        load_base_model(STORIES, "causal_lm", None, 0),
        method(make_config, name="lora", r=2, target_modules="all-linear"),
        "causal_lm",
    )
    names = trainable_names(model)
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(projection in n for n in names)
    assert not any("lm_head" in n for n in names)
    batch = torch.tensor([[1, 5, 9, 2]])
    assert torch.isfinite(model(input_ids=batch, labels=batch).loss)


def test_seeded_head_is_identical_across_loads(minilm_path):
    a = load_base_model(minilm_path, "sequence_classification", 2, seed=3)
    b = load_base_model(minilm_path, "sequence_classification", 2, seed=3)
    c = load_base_model(minilm_path, "sequence_classification", 2, seed=4)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
