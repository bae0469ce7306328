"""Training settings without Ray: validation of engine combinations, the generated DeepSpeed config,
schedules, storage and checkpoint errors, gradient checkpointing and torch.compile."""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch

from conftest import STORIES
from kftune.config import TrainSection, parse_config
from kftune.errors import KftuneError
from kftune.prompts.build import write_split
from kftune.train.checkpoints import check_writable, load_trainer_state, run_identity, save_trainer_state
from kftune.train.deepspeed_config import deepspeed_config
from kftune.train.loop import build_model
from kftune.train.losses import summed_loss
from kftune.train.schedules import lr_multiplier


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ({"precision": "fp16"}, r"train\.precision: fp16 needs GPUs"),
        (
            {"deepspeed": {"stage": 2, "offload_params": True}},
            r"train\.deepspeed\.offload_params: offloading parameters needs ZeRO stage 3",
        ),
        (
            {"deepspeed": {"stage": 0, "offload_optimizer": True}},
            r"train\.deepspeed\.offload_optimizer: .*stage 1 or higher",
        ),
        ({"deepspeed": {"stage": 4}}, r"train\.deepspeed\.stage: Input should be 0, 1, 2 or 3"),
        (
            {"batch_size": 16, "workers": 2, "gradient_accumulation": 3},
            r"train\.batch_size: 16 does not split evenly over train\.workers=2 x train\.gradient_accumulation=3",
        ),
        ({"schedule": "cyclical", "cycle_steps": 1}, r"train\.cycle_steps: Input should be greater than or equal to 2"),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_field(make_config, train, expected):
    with pytest.raises(KftuneError, match=expected):
        parse_config(make_config(train=train))


def test_compile_goes_with_either_engine(make_config):
    assert parse_config(make_config(train={"deepspeed": {"stage": 3}, "compile": True})).train.compile


def test_deepspeed_config_comes_from_the_run_config_and_a_user_file_extends_it(tmp_path):
    extra = tmp_path / "ds.json"
    extra.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1000}, "communication_data_type": "fp32"}
        )
    )
    train = TrainSection(
        batch_size=32,
        workers=2,
        gradient_accumulation=4,
        precision="bf16",
        max_grad_norm=0.5,
        deepspeed={"stage": 3, "offload_optimizer": True, "config_file": str(extra)},
    )
    config = deepspeed_config(train, world=2)
    assert (
        config["train_batch_size"],
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
    ) == (32, 4, 4)
    assert (
        config["bf16"] == {"enabled": True}
        and config["fp16"]["enabled"] is False
        and config["gradient_clipping"] == 0.5
    )
    assert config["zero_optimization"]["stage3_max_live_parameters"] == 1000  # the file's section replaces ours
    assert config["communication_data_type"] == "fp32"

    extra.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(KftuneError, match=r"ds\.json: train_batch_size come from the run config"):
        deepspeed_config(train, world=2)
    extra.write_text('{"zero_optimization":\n  {"stage": 2,}\n}')
    with pytest.raises(KftuneError, match=r"ds\.json:2: not valid JSON"):
        deepspeed_config(train, world=2)


def test_schedules():
    def lrs(**settings):
        multiplier = lr_multiplier(TrainSection(**settings), total_steps=100)
        return [multiplier(step) for step in range(100)]

    linear = lrs(schedule="linear", warmup=0.1)
    assert linear[0] == pytest.approx(0.1) and linear[9] == pytest.approx(1.0) and linear[10] == pytest.approx(1.0)
    assert linear[55] == pytest.approx(0.5) and linear[99] == pytest.approx(1 / 90)
    cosine = lrs(schedule="cosine")
    assert (
        cosine[0] == 1.0
        and cosine[50] == pytest.approx(0.5)
        and cosine[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    )
    cyclical = lrs(schedule="cyclical", cycle_steps=20, cycle_floor=0.2)
    assert (
        cyclical[0] == pytest.approx(0.2) and cyclical[10] == pytest.approx(1.0) and cyclical[20] == pytest.approx(0.2)
    )
    assert cyclical[5] == pytest.approx(0.6) and cyclical[:20] == cyclical[20:40]  # periodic: it climbs back out
    assert set(lrs(schedule="constant")) == {1.0}


def test_unwritable_storage_is_refused_before_anything_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(KftuneError, match=r"train\.checkpoint\.storage: cannot write to .*a-file/checkpoints"):
        check_writable(str(blocker / "checkpoints"))
    check_writable(str(tmp_path / "fine" / "nested"))
    assert (tmp_path / "fine" / "nested").is_dir()


def test_storage_is_handed_to_ray_as_a_uri_or_an_absolute_path(tmp_path, monkeypatch):
    from kftune.train.launch import storage_location

    monkeypatch.chdir(tmp_path)
    assert storage_location("./checkpoints", "/unused") == str(tmp_path / "checkpoints")  # Ray rejects './checkpoints'
    assert storage_location("s3://bucket/runs?scheme=http", "/unused") == "s3://bucket/runs?scheme=http"
    assert storage_location(None, tmp_path / "scratch") == str(tmp_path / "scratch")


def test_checkpoints_of_another_run_or_corrupt_ones_are_errors_not_fresh_starts(tmp_path):
    save_trainer_state(
        tmp_path, 0, {"identity": "a" * 64, "workers": 2, "step": 10, "history": [], "resumed_at": [], "seconds": 1.0}
    )
    assert load_trainer_state(tmp_path, 0, "a" * 64, 2)["step"] == 10
    with pytest.raises(KftuneError, match=r"trainer_state\.json: written by another run"):
        load_trainer_state(tmp_path, 0, "b" * 64, 2)
    with pytest.raises(KftuneError, match=r"written by 2 workers, this run has 4"):
        load_trainer_state(tmp_path, 0, "a" * 64, 4)
    (tmp_path / "trainer_state.json").write_text('{"identity": ')
    with pytest.raises(KftuneError, match=r"checkpoint .* is unreadable .*delete it to start over"):
        load_trainer_state(tmp_path, 0, "a" * 64, 2)


def test_run_identity_follows_what_shapes_the_weights(make_config, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    write_split(prompts, "train", [{"input_ids": [1, 2]}])
    (prompts / "prompts_meta.json").write_text("{}")
    base = parse_config(make_config())
    same = parse_config(
        make_config(train={"checkpoint": {"storage": str(tmp_path), "every_steps": 5}, "log_every_steps": 3})
    )
    before = run_identity(base, prompts)
    assert before == run_identity(same, prompts)  # where and how often to checkpoint does not change the weights
    assert before != run_identity(parse_config(make_config(train={"lr": 1e-5})), prompts)
    assert before != run_identity(parse_config(make_config(retention={"l2_sp": {"alpha": 1.0}})), prompts)
    write_split(prompts, "train", [{"input_ids": [1, 3]}])  # scheduled retraining on new data starts its own run
    assert before != run_identity(base, prompts)


def stories_config(make_config, **train):
    return parse_config(
        make_config(
            model={"name_or_path": str(STORIES), "task": "causal_lm"},
            prompt={"template": "text"},
            method={"name": "lora", "r": 4, "dropout": 0.0},
            eval={"metrics": ["perplexity"]},
            registry={"model_name": "t", "gate": {"metric": "perplexity"}},
            train=train,
        )
    )


def gradients(model, batch) -> dict[str, torch.Tensor]:
    summed_loss(model, batch, "causal_lm").backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def story_batch():
    ids = torch.tensor([[1, 403, 407, 261, 378, 259, 297, 315, 342, 2], [1, 300, 301, 302, 303, 304, 305, 306, 307, 2]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_recomputes_to_the_same_gradients(make_config, story_batch, every):
    plain = build_model(stories_config(make_config), None, for_training=True)
    checkpointed = build_model(
        stories_config(make_config, gradient_checkpointing=True, gradient_checkpointing_every=every),
        None,
        for_training=True,
    )
    assert (
        checkpointed.base_model.model.is_activation_checkpointing
        and not plain.base_model.model.is_activation_checkpointing
    )
    calls = collections.Counter()
    for index, layer in enumerate(checkpointed.base_model.model.model.layers):
        layer.self_attn.register_forward_hook(lambda *_, index=index: calls.update([index]))
    checkpointed.train(), plain.train()
    expected, got = gradients(plain, story_batch), gradients(checkpointed, story_batch)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[n], got[n], atol=1e-6) for n in expected)
    recomputed = {index for index, count in calls.items() if count == 2}  # forward, then again in the backward pass
    assert recomputed == set(range(0, len(calls), every)) and set(calls.values()) <= {1, 2}


def test_selective_checkpointing_needs_checkpointing(make_config):
    with pytest.raises(
        KftuneError,
        match=r"train\.gradient_checkpointing_every: selects the layers to recompute; set train\.gradient_checkpointing: true",
    ):
        stories_config(make_config, gradient_checkpointing_every=2)


def test_flash_and_flex_attention_are_for_gpu_runs(make_config):
    with pytest.raises(
        KftuneError,
        match=r"model\.attn_implementation: flex_attention trains only on GPUs .*set train\.use_gpu: true or use sdpa",
    ):
        parse_config(make_config(model={"attn_implementation": "flex_attention"}))
    assert (
        parse_config(
            make_config(model={"attn_implementation": "flash_attention_2"}, train={"use_gpu": True})
        ).model.attn_implementation
        == "flash_attention_2"
    )


def test_a_batch_that_cannot_fit_the_gpu_is_refused_with_the_numbers():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kftune.train.memory import GIB, check_fits, estimate_bytes

    with torch.device("meta"):  # Llama-3.2-1B's shape, no memory
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                vocab_size=128256,
            )
        )
    full = TrainSection(batch_size=8, workers=1, precision="bf16", deepspeed={"stage": 2})
    parts = estimate_bytes(model, full, 2048, 1, "causal_lm")
    assert parts["weights"] / GIB == pytest.approx(
        2 * 1.498e9 / GIB, rel=0.01
    )  # 1.5 B parameters in bf16 (untied embeddings)
    assert parts["optimizer"] == 6 * parts["weights"]  # fp32 master + two moments
    assert parts["logits"] == 2 * 4 * 2**26  # one chunk of fp32 logits and their gradient, not 8 x 2048 x 128256
    with pytest.raises(
        KftuneError,
        match=r"train\.batch_size: a micro-batch of 8 rows x 2048 tokens needs about .* GiB per GPU .*the GPU has 36\.0 GiB",
    ):
        check_fits(model, full, 2048, 1, "causal_lm", 36 * GIB)
    smaller = TrainSection(
        batch_size=8,
        workers=1,
        gradient_accumulation=4,
        precision="bf16",
        gradient_checkpointing=True,
        deepspeed={"stage": 2},
    )
    check_fits(model, smaller, 2048, 1, "causal_lm", 36 * GIB)
    every_other = TrainSection(
        batch_size=8,
        workers=1,
        precision="bf16",
        gradient_checkpointing=True,
        gradient_checkpointing_every=2,
        deepspeed={"stage": 2},
    )
    checkpointed = {
        k: estimate_bytes(model, t, 2048, 1, "causal_lm")["activations"]
        for k, t in (
            ("all", full.model_copy(update={"gradient_checkpointing": True})),
            ("half", every_other),
            ("none", full),
        )
    }
    assert checkpointed["all"] < checkpointed["half"] < checkpointed["none"]
    zero3 = TrainSection(batch_size=8, workers=8, precision="bf16", deepspeed={"stage": 3})
    assert estimate_bytes(model, zero3, 2048, 8, "causal_lm")["weights"] == parts["weights"] / 8


def test_a_model_that_cannot_fit_the_gpus_even_sharded_is_refused_naming_the_workers():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kftune.train.memory import GIB, check_fits

    with torch.device("meta"):
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                vocab_size=128256,
            )
        )
    full = TrainSection(batch_size=8, workers=2, precision="bf16", deepspeed={"stage": 2})
    # 1.5 B parameters x (2 + 2 + 12) bytes over 2 GPUs: about 11 GiB each however the batch is cut
    with pytest.raises(
        KftuneError,
        match=r"train\.workers: .* need about 11\.\d GiB per GPU even partitioned with ZeRO-3 over 2 GPUs of 8\.0 GiB",
    ):
        check_fits(model, full, 2048, 2, "causal_lm", 8 * GIB)
    with pytest.raises(
        KftuneError, match=r"train\.batch_size: a micro-batch"
    ):  # fits sharded: then the batch is what to change
        check_fits(model, full, 2048, 2, "causal_lm", 16 * GIB)
