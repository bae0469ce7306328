"""L2-SP/EWC under DeepSpeed ZeRO-1 and ZeRO-2 over two real gloo processes (stories260K, full fine-tuning):
each worker keeps theta_0 and the EWC strengths of its optimizer's fragment of every weight only (the two
workers' fragments tile each weight), yet the penalty's value and its gradient after DeepSpeed's reduction
are those of the whole weights. ZeRO-3's partitions: tests/test_train_partitioned.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES, STORY_ROWS, build_on_stories, free_port

ALPHA, STRENGTH = 0.5, 2.0
STAGES = (1, 2)


def made_up_fisher(name: str, shape) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(len(name)))


def worker(rank: int, port: int, out: Path) -> None:
    """One of two workers, per stage: a training step moves the weights from theta_0, then the anchor's term
    alone goes backward with the loop's share (1/world), and DeepSpeed reduces its gradient."""
    from deepspeed.utils import safe_get_full_grad

    from kftune.config import TrainSection
    from kftune.methods import METHODS, may_train, optimizer_parameter_groups
    from kftune.models import load_tokenizer
    from kftune.retention.anchor import Anchor, anchored_weights
    from kftune.train.engines import make_engine
    from kftune.train.losses import summed_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    encoded = load_tokenizer(STORIES)(STORY_ROWS[:4], padding=True, return_tensors="pt")
    batch = {**encoded, "labels": encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)}
    full = METHODS["full"].options.model_validate({"name": "full"})
    for stage in STAGES:
        model = build_on_stories(full)
        train = TrainSection(batch_size=4, workers=2, lr=1e-2, deepspeed={"stage": stage})
        engine = make_engine(model, optimizer_parameter_groups(model, full, 1e-2), train, 2, 2, torch.device("cpu"))
        weights = anchored_weights(engine.module, may_train(engine.module, full), set())
        fisher = {w.name: made_up_fisher(w.name, w.parameter.shape) for w in weights} if rank == 0 else None
        anchor = Anchor(weights, ALPHA, STRENGTH, fisher, "retention.ewc")
        engine.backward(summed_loss(engine.model, batch, "causal_lm") / 100)
        engine.step()
        term, value = anchor.penalty()
        engine.backward(term / 2)
        parameters = dict(engine.module.named_parameters())
        run = {
            "held": {w.name: (w.fragment, w.reference.numel()) for w in anchor.fragments},
            "whole": [w.name for w in anchor.weights],
            "value": value.item(),
            "weights": {n: p.detach().clone() for n, p in parameters.items()},
            "gradients": {n: safe_get_full_grad(p).clone() for n, p in parameters.items()},
        }
        torch.save(run, out / f"{stage}-{rank}.pt")
        engine.engine.destroy()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero12")
    torch.multiprocessing.start_processes(worker, args=(free_port(), out), nprocs=2, start_method="spawn")
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_each_worker_anchors_only_its_fragment_and_the_fragments_tile_every_weight(two_workers, stage):
    runs = [torch.load(two_workers / f"{stage}-{rank}.pt") for rank in (0, 1)]
    sizes = {n: p.numel() for n, p in runs[0]["weights"].items()}
    assert not runs[0]["whole"] and set(runs[0]["held"]) == set(sizes)
    for name, numel in sizes.items():
        (first, kept_first), (second, kept_second) = (run["held"][name] for run in runs)
        assert (kept_first, kept_second) == (first[1], second[1])  # theta_0 of the fragment, no more
        ordered = sorted(part for part in (first, second) if part[1])  # end to end over the flattened weight
        ends = [start + count for start, count in ordered]
        assert [start for start, _ in ordered] == [0, *ends[:-1]] and ends[-1] == numel
    for run in runs:
        assert sum(kept for _, kept in run["held"].values()) < 0.6 * sum(sizes.values())


@pytest.mark.parametrize("stage", STAGES)
def test_fragment_penalties_add_up_to_the_whole_weights_value_and_gradient(two_workers, stage):
    runs = [torch.load(two_workers / f"{stage}-{rank}.pt") for rank in (0, 1)]
    base = load_file(str(STORIES / "model.safetensors"))
    weights, expected_value = runs[0]["weights"], 0.0
    for name, weight in weights.items():
        assert torch.equal(weight, runs[1]["weights"][name])
        strength = ALPHA + STRENGTH * made_up_fisher(name, weight.shape)
        change = weight - base[name]
        expected_value += 0.5 * (strength * change.pow(2)).sum().item()
        for run in runs:
            assert torch.allclose(run["gradients"][name], strength * change, rtol=1e-4, atol=1e-7), name
    assert expected_value > 0
    assert runs[0]["value"] == runs[1]["value"] == pytest.approx(expected_value, rel=1e-5)
