"""Choosing methods: example configs, combinations that cannot work, layer-wise learning-rate
decay, the gradual-unfreezing schedule and `kftune methods --model`."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForSequenceClassification

from conftest import EXAMPLES, STORIES
from kftune.cli import main
from kftune.config import load_config, parse_config
from kftune.errors import KftuneError
from kftune.methods import (
    METHODS,
    apply_method,
    check_method_fits_model,
    on_step,
    optimizer_parameter_groups,
    trainable_parameters,
)
from kftune.methods.layers import parameter_positions

METHOD_EXAMPLES = sorted((EXAMPLES / "methods").glob("*.yaml"))


@pytest.mark.parametrize("path", METHOD_EXAMPLES, ids=lambda p: p.stem)
def test_method_examples_are_valid(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert '"method"' in capsys.readouterr().out


def test_every_method_family_has_an_example():
    named = {load_config(path).method.name for path in METHOD_EXAMPLES}
    families = {spec.apply.__module__ for name, spec in METHODS.items() if name in named}
    assert families == {spec.apply.__module__ for spec in METHODS.values()}


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {
                "model": {"task": "causal_lm"},
                "prompt": {"template": "text"},
                "eval": {"metrics": ["perplexity"]},
                "registry": {"gate": {"metric": "perplexity"}},
                "method": {"name": "head_only"},
            },
            "method.name: method 'head_only' does not support task causal_lm",
        ),
        (
            {"method": {"name": "gradual_unfreeze", "every_steps": 10}, "train": {"deepspeed": {"stage": 1}}},
            "train.deepspeed.stage: method gradual_unfreeze does not work under ZeRO stage 1",
        ),
        (
            {"method": {"name": "subnetwork"}, "train": {"weight_decay": 0.01}},
            "train.weight_decay: subnetwork masks gradients",
        ),
        (
            {"method": {"name": "attention_only", "heads": [0]}, "train": {"weight_decay": 0.01}},
            "train.weight_decay: attention_only masks gradients",
        ),
        (
            {"method": {"name": "lora"}, "train": {"layer_lr_decay": 0.8}},
            "train.layer_lr_decay: applies to methods that train whole layers",
        ),
        (
            {"method": {"name": "layer_range", "start": 3, "end": 3}},
            "method.end \\(3\\) must be greater than method.start \\(3\\)",
        ),
        ({"method": {"name": "prompt_tuning", "init": "text"}}, "method.init_text is required with init: text"),
        (
            {"method": {"name": "adapter", "placement": "parallel"}},
            "method.placement: Input should be 'houlsby' or 'pfeiffer'",
        ),
    ],
)
def test_impossible_combinations_fail_validation_naming_the_field(make_config, sections, expected):
    with pytest.raises(KftuneError, match=expected):
        parse_config(make_config(**sections))


def test_full_with_layer_lr_decay_and_attention_only_without_weight_decay_validate(make_config):
    assert parse_config(make_config(method={"name": "full"}, train={"layer_lr_decay": 0.9})).train.layer_lr_decay == 0.9
    assert parse_config(make_config(method={"name": "attention_only", "heads": [0]})).method.heads == [0]


@pytest.mark.parametrize(
    ("options", "model_config", "expected"),
    [
        ({"name": "bitfit"}, None, "method.name: bitfit trains bias terms and this llama model has none"),
        ({"name": "train_top", "layers": 9}, None, "method.layers: 9 but the model has 5 layers"),
        ({"name": "attention_only", "heads": [8]}, None, r"method.heads: \[8\] out of range; the model has 8 heads"),
        (
            {"name": "adapter"},
            GPT2Config(n_layer=2, n_embd=32, n_head=2),
            "method.name: 'adapter' knows the block layout of bert, llama models, not 'gpt2'",
        ),
    ],
)
def test_architecture_mismatches_fail_before_training(options, model_config, expected):
    method = METHODS[options["name"]].options.model_validate(options)
    if model_config is None:
        with pytest.raises(KftuneError, match=expected):
            check_method_fits_model(method, STORIES)
    else:
        from kftune.methods import architecture_problem

        assert architecture_problem(method, model_config).startswith(expected)


def test_validate_checks_the_method_against_the_model(make_config, write_config, capsys):
    bitfit_on_llama = make_config(
        model={"name_or_path": str(STORIES), "task": "causal_lm"},
        prompt={"template": "text"},
        method={"name": "bitfit"},
        eval={"metrics": ["perplexity"]},
        registry={"gate": {"metric": "perplexity"}},
    )
    path = write_config(bitfit_on_llama)
    assert main(["validate", str(path)]) == 2
    assert "method.name: bitfit trains bias terms and this llama model has none" in capsys.readouterr().err
    assert main(["validate", "--schema-only", str(path)]) == 0  # for models that only exist on the cluster


def tiny_llama_classifier():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        num_labels=2,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config)


def test_layer_lr_decay_groups_decay_from_the_top_block_down():
    model = tiny_llama_classifier()
    options = METHODS["full"].options.model_validate({"name": "full"})
    groups = optimizer_parameter_groups(
        apply_method(model, options, "sequence_classification"), options, 1.0, layer_lr_decay=0.5
    )
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert (
        lr_of[id(named["score.weight"])]
        == lr_of[id(named["model.norm.weight"])]
        == lr_of[id(named["model.layers.3.mlp.up_proj.weight"])]
        == 1.0
    )
    assert lr_of[id(named["model.layers.0.self_attn.q_proj.weight"])] == 0.5**3
    assert lr_of[id(named["model.embed_tokens.weight"])] == 0.5**4
    assert len(lr_of) == len(named)


def test_gradual_unfreeze_reports_each_layer_as_it_unfreezes():
    model = tiny_llama_classifier()
    options = METHODS["gradual_unfreeze"].options.model_validate(
        {"name": "gradual_unfreeze", "start_layers": 2, "every_steps": 3}
    )
    apply_method(model, options, "sequence_classification")
    positions, _ = parameter_positions(model)
    assert {positions[n] for n, p in model.named_parameters() if p.requires_grad} == {2, 3, 4}
    assert len(optimizer_parameter_groups(model, options, 1e-3)[0]["params"]) == len(list(model.parameters()))
    reported = {step: on_step(model, options, step) for step in range(1, 13)}
    assert {step: names for step, names in reported.items() if names} == {
        3: ["model.layers.1"],
        6: ["model.layers.0"],
        9: ["embeddings"],
    }
    assert all(p.requires_grad for p in model.parameters())


def test_attention_heads_mask_grouped_query_projections():
    model = tiny_llama_classifier()  # 4 query heads of 8 dims sharing 2 key/value heads
    options = METHODS["attention_only"].options.model_validate({"name": "attention_only", "heads": [3]})
    apply_method(model, options, "sequence_classification")
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.gradient_mask[:, 0].tolist() == [False] * 24 + [True] * 8
    assert attention.k_proj.weight.gradient_mask[:, 0].tolist() == [False] * 8 + [True] * 8
    assert attention.o_proj.weight.gradient_mask[0].tolist() == [False] * 24 + [True] * 8
    trainable, _ = trainable_parameters(model)
    per_layer = 8 * 32 + 8 * 32 * 2 + 32 * 8  # q rows, k and v rows, o columns of one head
    assert trainable == 4 * per_layer + model.score.weight.numel()


def test_kftune_methods_lists_every_method_and_its_share_on_a_model(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in METHODS)
    assert main(["methods", "--model", str(STORIES), "--task", "causal_lm"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(METHODS)
    assert "100.00%" in rows["full"] and "not for causal_lm" in rows["head_only"] and "has none" in rows["bitfit"]
    assert "%" in rows["layer_prompt"] and "%" in rows["prefix_tuning"]
