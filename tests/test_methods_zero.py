"""Every method under DeepSpeed ZeRO-2 and ZeRO-3 (one CPU process over gloo) on stories260K: the
method's parameters train, masked entries stay put, and the weights gathered from the ZeRO shards
are the ones the loss was computed with. Methods a stage cannot take are refused by config validation.
The engine's options change where state lives or how the model runs, never what it learns: CPU
offload trains the same weights, torch.compile gives the same loss history."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import STORIES, build_on_stories, lora_under_zero, process_group, train_under_zero
from kftune.config import TrainSection
from kftune.errors import KftuneError
from kftune.methods import METHODS, calibrate_method, optimizer_parameter_groups
from kftune.train.engines import make_engine
from kftune.train.losses import plain_output_head, summed_loss
from test_methods_matrix import CASES

LORA = METHODS["lora"].options.model_validate({"name": "lora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"})
STORY_CASES = {name: case for name, case in CASES.items() if case[2]["stories"] is not None}


@pytest.fixture(scope="module", autouse=True)
def gloo_world():
    with process_group("gloo"):
        yield


build = build_on_stories


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("case", sorted(STORY_CASES))
def test_method_trains_under_zero(case, stage, families):
    raw, lr, patterns = STORY_CASES[case]
    options = METHODS[raw["name"]].options.model_validate(raw)
    if stage not in METHODS[options.name].zero_stages:
        pytest.skip(f"{options.name} is refused under ZeRO-{stage} (see test_unsupported_stage_is_refused)")
    batch = families["stories"][3]
    before = {n: p.detach().clone() for n, p in build(options).named_parameters()}
    train = TrainSection(
        batch_size=len(batch["input_ids"]), workers=1, lr=lr, max_grad_norm=None, deepspeed={"stage": stage}
    )
    model = build(options)
    calibrate_method(
        model, options, lambda rows: summed_loss(model, {k: v[:rows] for k, v in batch.items()}, "causal_lm")
    )
    losses, trained = train_under_zero(model, options, batch, train)
    assert losses[-1] < losses[0], losses

    after = dict(trained.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    intended = {n for n in before if re.search(patterns["stories"], n)}
    assert changed and changed <= intended, sorted(changed - intended)[:5]
    for name, parameter in model.named_parameters():
        if hasattr(parameter, "gradient_mask"):  # attention heads, subnetwork: masked entries never move
            masked = ~parameter.gradient_mask.bool()
            assert torch.equal(after[name].detach()[masked], before[name][masked]), name


def test_unsupported_stage_is_refused(make_config):
    from kftune.config import parse_config

    with pytest.raises(
        KftuneError, match=r"train\.deepspeed\.stage: method gradual_unfreeze does not work under ZeRO stage 2"
    ):
        parse_config(
            make_config(
                method={"name": "gradual_unfreeze", "start_layers": 1, "every_steps": 2},
                train={"deepspeed": {"stage": 2}},
            )
        )


@pytest.mark.parametrize(
    "offload",
    [{"stage": 2, "offload_optimizer": True}, {"stage": 3, "offload_optimizer": True, "offload_params": True}],
)
def test_cpu_offload_trains_the_same_weights(offload, families):
    """The offloaded engine steps DeepSpeed's CPU Adam (the C++ op GPU runs use; built on first use) on
    DeepSpeed's CPU copies; without offload, torch's AdamW. The two sum in another order: hence 1e-5."""
    batch = families["stories"][3]
    losses, weights = lora_under_zero(batch, deepspeed=offload)
    expected_losses, expected = lora_under_zero(batch, deepspeed={"stage": offload["stage"]})
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert all((weights[n] - expected[n]).norm() <= 1e-5 * expected[n].norm() for n in expected)


def one_step_engine(model, options, train: TrainSection):
    """The engine `train` asks for, on the CPU, over the method's parameter groups (one step, constant schedule)."""
    groups = optimizer_parameter_groups(model, options, train.lr)
    return make_engine(model, groups, train, total_steps=1, world=1, device=torch.device("cpu"))


def test_offloaded_optimizer_state_is_stepped_by_deepspeeds_cpu_adam():
    """With offload_optimizer the engine hands DeepSpeed its CPU Adam (the generated config names no
    optimizer, so without one handed in there would be none to step)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    lora = METHODS["lora"].options.model_validate({"name": "lora", "r": 4})
    model = build(lora)
    train = TrainSection(batch_size=4, workers=1, deepspeed={"stage": 2, "offload_optimizer": True})
    engine = one_step_engine(model, lora, train)
    try:
        assert isinstance(engine.engine.optimizer.optimizer, DeepSpeedCPUAdam)
    finally:
        engine.engine.destroy()


def test_compiled_engine_has_the_same_loss_history(families):
    """Through DeepSpeed's engine.compile (inductor on CPU), under ZeRO-3, whose parameter hooks break the
    graph at every layer (ZeRO-2 compiles one graph through the same engine.compile: not repeated here,
    27-115 s of compiling each on this machine)."""
    stage = 3
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # recompile limits count per code object, across models: start as a fresh process would
    graphs = counters["stats"]["unique_graphs"]
    batch = families["stories"][3]
    losses, _ = lora_under_zero(batch, deepspeed={"stage": stage}, compile=True)
    assert counters["stats"]["unique_graphs"] > graphs  # the forward really ran compiled
    expected, _ = lora_under_zero(batch, deepspeed={"stage": stage})
    assert losses == pytest.approx(expected, rel=1e-5)


def test_zero3_gathers_a_frozen_head_for_the_chunked_loss(families, tmp_path):
    """Under ZeRO-3 the output layer is a shard: a frozen one (LoRA) is gathered for the chunked loss,
    which equals the full-logits loss; a trained one (full fine-tuning) keeps the model's own logits.
    (test_method_trains_under_zero trains every method through these paths.)"""
    batch = families["stories"][3]
    lora = METHODS["lora"].options.model_validate({"name": "lora", "r": 4})
    every_parameter_partitioned = tmp_path / "ds.json"  # by default ZeRO-3 keeps parameters this small whole
    every_parameter_partitioned.write_text(
        json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    )
    train = TrainSection(
        batch_size=len(batch["input_ids"]),
        workers=1,
        lr=1e-2,
        max_grad_norm=None,
        deepspeed={"stage": 3, "config_file": str(every_parameter_partitioned)},
    )
    model = build(lora)
    engine = one_step_engine(model, lora, train)
    try:
        head = plain_output_head(engine.model)
        assert head is not None and head.weight.numel() == 0  # a shard
        chunked = summed_loss(engine.model, batch, "causal_lm")
        logits = engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        plain = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="sum"
        )
        assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
        assert head.weight.numel() == 0  # partitioned again after the loss
        before = [p.ds_tensor.clone() for p in engine.module.parameters() if p.requires_grad]
        engine.backward(chunked)  # the gradients came from the gathered weights; none are needed now
        engine.step()
        assert any(
            not torch.equal(b, p.ds_tensor)
            for b, p in zip(before, (p for p in engine.module.parameters() if p.requires_grad), strict=False)
        )
    finally:
        engine.engine.destroy()
    full = METHODS["full"].options.model_validate({"name": "full"})
    model = build(full)
    engine = one_step_engine(model, full, train)
    try:
        assert plain_output_head(engine.model) is None
    finally:
        engine.engine.destroy()


def test_zero3_partitions_the_model_as_it_is_built_and_trains_it_like_a_whole_one(families, make_config, tmp_path):
    """The training loop builds under transformers' DeepSpeed integration (`deepspeed.zero.Init`): every
    base parameter is a partition from construction on (with the persistence threshold at 0, even the
    small ones), and three steps give the losses of a model built whole and partitioned by the engine."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from kftune.config import parse_config
    from kftune.train.engines import partitioned_construction
    from kftune.train.loop import build_model

    batch = families["stories"][3]
    every_parameter_partitioned = tmp_path / "ds.json"
    every_parameter_partitioned.write_text(
        json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    )
    config = parse_config(
        make_config(
            model={"name_or_path": str(STORIES), "task": "causal_lm"},
            prompt={"template": "text"},
            method=LORA.model_dump(),
            eval={"metrics": ["perplexity"]},
            registry={"model_name": "t", "gate": {"metric": "perplexity"}},
            train={
                "batch_size": len(batch["input_ids"]),
                "lr": 5e-3,
                "deepspeed": {"stage": 3, "config_file": str(every_parameter_partitioned)},
            },
        )
    )
    with partitioned_construction(config.train, 1, "lora"):
        model = build_model(config, None, for_training=True)
    assert not is_deepspeed_zero3_enabled()  # only inside the block: later (rank-0-only) builds are whole
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert base and all(hasattr(p, "ds_id") and p.data.numel() == 0 for p in base.values()), [
        n for n, p in base.items() if p.data.numel()
    ][:3]
    losses, _ = train_under_zero(model, config.method, batch, config.train)
    expected, _ = train_under_zero(build_model(config, None, for_training=True), config.method, batch, config.train)
    assert losses == pytest.approx(expected, rel=1e-5)
