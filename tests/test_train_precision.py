"""Precision-aware loading: with 16-bit training a method's frozen weights load in 16 bits while what
AdamW steps stays fp32 under DDP; DeepSpeed gets the whole model in 16 bits (it keeps its own fp32
master copies); full fine-tuning under DDP keeps fp32. A bf16 LoRA run trains on CPU over 2 Ray
workers and its artifact reloads to the outputs the run recorded. Wrapping for DDP sends only what trains."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import build_on_stories, free_port, stories_run
from kftune import steps
from kftune.config import parse_config
from kftune.methods import may_train
from kftune.models import load_tuned_model
from kftune.prompts.build import read_meta, read_prompts
from kftune.train.launch import run_training
from kftune.train.loop import PROBE_FILE, PROBE_ROWS, TRAIN_LOG_FILE, build_model, probe_outputs

LORA = {"name": "lora", "r": 4, "target_modules": "all-linear"}


def story_config(tmp_path, method=LORA, **train):
    return parse_config(
        stories_run(tmp_path, "precision", method, {"max_steps": 6, "lr": 5e-3, "log_every_steps": 3, **train})
    )


def dtypes(model, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad == trainable}


@pytest.mark.parametrize(
    ("method", "train", "frozen", "trained"),
    [
        (LORA, {"precision": "bf16"}, {torch.bfloat16}, {torch.float32}),
        (LORA, {"precision": "fp32"}, {torch.float32}, {torch.float32}),
        ({"name": "train_top", "layers": 1}, {"precision": "bf16"}, {torch.bfloat16}, {torch.float32}),
        (
            LORA,
            {"precision": "bf16", "deepspeed": {"stage": 3}},
            {torch.bfloat16},
            {torch.bfloat16},
        ),  # DeepSpeed keeps the fp32 masters
        ({"name": "full"}, {"precision": "bf16"}, set(), {torch.float32}),
        ({"name": "full"}, {"precision": "bf16", "deepspeed": {"stage": 2}}, set(), {torch.bfloat16}),
    ],
)
def test_frozen_weights_load_in_the_training_precision_and_trained_ones_stay_fp32(
    tmp_path, method, train, frozen, trained
):
    model = build_model(story_config(tmp_path, method, **train), None, for_training=True)
    assert dtypes(model, trainable=False) == frozen
    assert dtypes(model, trainable=True) == trained


def test_layers_gradual_unfreezing_turns_on_later_are_fp32_from_the_start(tmp_path):
    config = story_config(tmp_path, {"name": "gradual_unfreeze", "start_layers": 1, "every_steps": 2}, precision="bf16")
    model = build_model(config, None, for_training=True)
    later = may_train(model, config.method)
    assert any(not p.requires_grad for p in later)
    assert {p.dtype for p in later} == {torch.float32}


@pytest.mark.parametrize(
    ("method", "inputs_seen"),
    [
        (LORA, True),
        ({**LORA, "use_dora": True}, False),  # DoRA also feeds its layers an fp32 identity
        ({"name": "ia3"}, False),  # IA3 casts inside its layers whatever the setting
    ],
)
def test_adapted_layers_take_bf16_inputs_as_they_come(tmp_path, method, inputs_seen):
    """Under bf16 mixed precision PEFT's layers do not copy their input to their fp32 weights' dtype (autocast
    would copy it back for the matmul): their fp32 parameters see bf16 inputs, and the loss is unchanged."""
    from kftune.train.engines import mixed_precision
    from kftune.train.losses import summed_loss

    model = build_model(story_config(tmp_path, method, precision="bf16"), None, for_training=True)
    adapted = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32]
    seen = set()
    for module in adapted:
        module.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype))
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with mixed_precision(model, "bf16", torch.device("cpu")):
        loss = summed_loss(model, batch, "causal_lm")
    if inputs_seen:
        assert adapted and seen == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # PEFT casting the inputs: the same loss
        assert summed_loss(model, batch, "causal_lm").item() == pytest.approx(loss.item(), rel=1e-3)


@pytest.mark.parametrize("rows", [1, 3])
def test_the_output_layer_gets_the_last_positions_row_major(tmp_path, rows):
    """Generating, transformers hands the head a strided view of the last positions; torch's 16-bit CPU
    linear layer would copy the whole weight once per row for it (`kftune.models._row_major_input`)."""
    model = build_model(story_config(tmp_path, precision="bf16"), None, for_training=True)
    strides = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _head, args: strides.append(args[0].stride()))
    model(input_ids=torch.ones(rows, 5, dtype=torch.long), logits_to_keep=1)
    assert strides == [torch.empty(rows, 1, model.config.hidden_size).stride()]


def test_a_bf16_lora_run_trains_on_cpu_and_its_artifact_reloads_to_the_recorded_outputs(tmp_path):
    conf = story_config(tmp_path, precision="bf16")
    raw = json.loads(conf.model_dump_json(exclude_none=True))
    steps.prepare_data(raw, str(tmp_path / "data"), str(tmp_path / "card.md"))
    steps.build_prompts(raw, str(tmp_path / "data"), str(tmp_path / "prompts"), str(tmp_path / "preview.html"))
    run_training(conf, tmp_path / "prompts", tmp_path / "model", tmp_path / "ray")
    history = json.loads((tmp_path / "model" / TRAIN_LOG_FILE).read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    reloaded = load_tuned_model(tmp_path / "model")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    rows = read_prompts(tmp_path / "prompts", "test")[:PROBE_ROWS]
    outputs = probe_outputs(reloaded, rows, read_meta(tmp_path / "prompts")["pad_token_id"], "causal_lm")
    expected = json.loads((tmp_path / "model" / PROBE_FILE).read_text())["outputs"]
    assert torch.allclose(torch.tensor(outputs), torch.tensor(expected), rtol=1e-5)


def ddp_worker(rank: int, port: int, out) -> None:
    """One of two DDP workers whose weights all differ from rank 0's before the engine wraps the model."""
    from kftune.config import TrainSection
    from kftune.methods import METHODS, optimizer_parameter_groups
    from kftune.train.engines import make_engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    lora = METHODS["lora"].options.model_validate(LORA)
    model = build_on_stories(lora)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(rank)
    make_engine(
        model,
        optimizer_parameter_groups(model, lora, 1e-3),
        TrainSection(batch_size=2, workers=2),
        1,
        2,
        torch.device("cpu"),
    )
    torch.save({n: p.detach() for n, p in model.named_parameters()}, out / f"{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_sends_only_the_trained_weights_from_rank_0(tmp_path):
    """Every worker loads the same frozen weights from the same files; DDP's own start-up sync would send
    them all again (0.5 GB of buckets on a 1B model), so only the method's weights are sent."""
    torch.multiprocessing.start_processes(ddp_worker, args=(free_port(), tmp_path), nprocs=2, start_method="spawn")
    first, second = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    trained = [name for name in first if "lora_" in name]
    assert trained and all(torch.equal(first[name], second[name]) for name in trained)
    assert all(not torch.equal(first[name], second[name]) for name in first if name not in trained)
