"""The paths only a GPU runs (`pytest -m gpu`; skipped without CUDA). Each has a CPU twin elsewhere in
the suite: packed rows under flex attention (test_packing, forward only: no CPU backward), the DDP
engine and precision (test_train_engine), DeepSpeed offload with DeepSpeed's CPU Adam
(test_methods_zero), evaluation and batched generation on the CPU (test_evaluate_device), the per-token
losses and the distillation KL through the output layer (test_losses, test_retention).

`KFTUNE_GPU_TESTS_ON=cpu` runs these tests' code on the CPU, over gloo, leaving out what only a GPU
has (flash/flex kernels, NCCL): bench/gpu_check.sh --shape tiny does that before any GPU minute is spent.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import STORIES, STORY_ROWS, lora_under_zero, process_group
from kftune.config import TrainSection
from kftune.methods import METHODS, apply_method, optimizer_parameter_groups
from kftune.models import load_base_model, load_tokenizer
from kftune.train.engines import make_engine
from kftune.train.losses import summed_loss

DRY_RUN = os.environ.get("KFTUNE_GPU_TESTS_ON") == "cpu"
DEVICE = "cpu" if DRY_RUN else "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() or DRY_RUN), reason="needs a CUDA GPU (or KFTUNE_GPU_TESTS_ON=cpu for a dry run)"
    ),
]
needs_gpu_kernels = pytest.mark.skipif(DRY_RUN, reason="a GPU kernel: nothing to dry-run on the CPU")
LORA = {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """NCCL on the GPU (DeepSpeed and DDP reduce over it), gloo in a dry run."""
    with process_group("gloo" if DRY_RUN else "nccl"):
        yield


@pytest.fixture(scope="module")
def story_batch() -> dict:
    encoded = load_tokenizer(STORIES)(STORY_ROWS, padding=True, return_tensors="pt")
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100),
    }


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory) -> str:
    """A random Llama with stories260K's tokenizer and 16-wide attention heads: flex attention's GPU
    kernel takes none narrower (stories260K's are 8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wide_heads")
    tokenizer = load_tokenizer(STORIES)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@needs_gpu_kernels
@pytest.mark.parametrize(
    ("kernel", "dtype", "tolerance"),
    [("flex_attention", torch.float32, 1e-4), ("flash_attention_2", torch.bfloat16, 2e-2)],
)
def test_packed_rows_give_the_unpacked_loss_and_gradients(packed_build, wide_heads, kernel, dtype, tolerance):
    """Packed rows as variable-length sequences (flash: the varlen kernel from position ids; flex: a block
    mask) give the loss and LoRA gradients of the same examples unpacked and padded."""
    from kftune.prompts.collate import Collator, make_collator, uses_varlen_attention
    from kftune.train.loop import build_model

    if kernel == "flash_attention_2":
        pytest.importorskip(
            "flash_attn", reason="flash-attn is not installed here (it ships as source; the trainer image builds it)"
        )
    config, meta, packed, unpacked = packed_build
    config = config.model_copy(
        update={"model": config.model.model_copy(update={"name_or_path": wide_heads, "attn_implementation": kernel})}
    )
    model = build_model(config, None, for_training=True).to(device=DEVICE, dtype=dtype)
    collate = make_collator(meta, "causal_lm", varlen=uses_varlen_attention(model))
    assert collate.varlen
    rows = packed[:4]
    sources = {source for row in rows for source in row["sources"]}

    def loss_and_gradients(batch):
        model.zero_grad(set_to_none=True)
        loss = summed_loss(model, {k: v.to(DEVICE) for k, v in batch.items()}, "causal_lm")
        loss.backward()
        return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])

    expected_loss, expected_grad = loss_and_gradients(
        Collator(meta["pad_token_id"], "causal_lm")([r for r in unpacked if r["source"] in sources])
    )
    loss, grad = loss_and_gradients(collate(rows))
    assert loss == pytest.approx(expected_loss, rel=tolerance)
    assert (grad - expected_grad).norm() <= 10 * tolerance * expected_grad.norm()


def lora_steps(batch: dict, precision: str, steps: int = 6) -> list[float]:
    """Per-step losses of LoRA on stories260K through the DDP engine, as the training loop steps it."""
    options = METHODS["lora"].options.model_validate(LORA)
    model = apply_method(load_base_model(STORIES, "causal_lm", None, seed=0), options, "causal_lm")
    train = TrainSection(
        batch_size=len(batch["input_ids"]), workers=1, lr=5e-3, precision=precision, use_gpu=not DRY_RUN
    )
    engine = make_engine(
        model,
        optimizer_parameter_groups(model, options, train.lr),
        train,
        total_steps=steps,
        world=1,
        device=torch.device(DEVICE),
    )
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    losses = []
    for _ in range(steps):
        with engine.micro_step():
            loss = summed_loss(engine.model, batch, "causal_lm") / (batch["labels"][:, 1:] != -100).sum()
            engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_bf16_training_falls_and_follows_fp32(story_batch):
    """Autocast to bf16 (the DDP engine's precision) learns what fp32 learns: the loss falls the same way,
    within bf16's rounding (2% after six steps)."""
    full = lora_steps(story_batch, "fp32")
    half = lora_steps(story_batch, "bf16")
    assert half[-1] < half[0] and full[-1] < full[0], (half, full)
    assert half == pytest.approx(full, rel=2e-2)


def test_ddp_over_the_process_group_averages_what_one_process_computes(story_batch):
    """DDP (over NCCL on the GPU) in a world of one: its all-reduce runs and the gradients are the
    unwrapped model's. (Several GPUs on one machine: Ray Train starts one process per GPU, the same engine.)"""
    options = METHODS["lora"].options.model_validate(LORA)
    batch = {k: v.to(DEVICE) for k, v in story_batch.items()}
    gradients = []
    for wrap in (False, True):
        model = apply_method(load_base_model(STORIES, "causal_lm", None, seed=0), options, "causal_lm").to(DEVICE)
        runner = (
            torch.nn.parallel.DistributedDataParallel(model, device_ids=None if DRY_RUN else [0]) if wrap else model
        )
        summed_loss(runner, batch, "causal_lm").backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-5, atol=1e-7)
    total = torch.ones(1, device=DEVICE)
    torch.distributed.all_reduce(total)
    assert total.item() == torch.distributed.get_world_size()


ENGINES = {
    "zero2": {"stage": 2},
    "zero2-offload": {"stage": 2, "offload_optimizer": True},
    "zero3": {"stage": 3},
    "zero3-offload": {"stage": 3, "offload_optimizer": True, "offload_params": True},
}


@pytest.fixture(scope="module")
def zero2_reference(story_batch):
    return lora_under_zero(story_batch, device=DEVICE, deepspeed=ENGINES["zero2"])


@pytest.mark.parametrize("engine", ["zero2-offload", "zero3", "zero3-offload"])
def test_deepspeed_engines_train_the_same_weights(engine, story_batch, zero2_reference):
    """ZeRO-2 and ZeRO-3, each with the optimizer state offloaded to DeepSpeed's CPU Adam or not, train
    LoRA to the weights plain ZeRO-2 trains (fp32: the engines differ in where state lives, not in math)."""
    losses, weights = lora_under_zero(story_batch, device=DEVICE, deepspeed=ENGINES[engine])
    expected_losses, expected = zero2_reference
    assert losses == pytest.approx(expected_losses, rel=1e-4)
    assert all((weights[n] - expected[n]).norm() <= 1e-4 * expected[n].norm() for n in expected)


def story_rows(tokenizer, words: int = 6) -> list[dict]:
    """Each story's first words as the prompt (-100-labelled), the rest as the answer: evaluation's row format."""
    rows = []
    for text in STORY_ROWS:
        prompt = tokenizer(" ".join(text.split()[:words]))["input_ids"]
        ids = tokenizer(text)["input_ids"]
        rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt) :]})
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluation_and_generation_on_the_gpu_give_the_cpu_predictions(dtype):
    """The evaluate step's scoring and generation with the model on the GPU: the CPU's fp32 predictions.
    fp32 on the GPU generates the same text; bf16 the same first words (its rounding may fork a
    continuation late) and the same best-scored word per row."""
    from kftune.evaluate.evaluate import generate, word_scores

    tokenizer = load_tokenizer(STORIES)
    rows = story_rows(tokenizer)
    words = [["girl", "boy"], ["dog", "cat"], ["park", "shop"]]
    model = load_base_model(STORIES, "causal_lm", None, seed=0).eval()
    cpu_text, _ = generate(model, rows, tokenizer, max_new_tokens=12, batch_size=4)
    cpu_best = [
        max(range(len(s)), key=s.__getitem__) for s in word_scores(model, rows, tokenizer, words, "causal_lm", 4)
    ]
    model.to(device=DEVICE, dtype=dtype)
    text, _ = generate(model, rows, tokenizer, max_new_tokens=12, batch_size=4)
    best = [max(range(len(s)), key=s.__getitem__) for s in word_scores(model, rows, tokenizer, words, "causal_lm", 4)]
    assert best == cpu_best
    if dtype == torch.float32:
        assert text == cpu_text
    else:
        assert [t.split()[:3] for t in text] == [t.split()[:3] for t in cpu_text], (text, cpu_text)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_per_token_losses_and_distillation_through_the_output_layer_give_the_full_logits_ones(
    story_batch, dtype, tolerance
):
    """Online RL's per-token losses (the head frozen) and retention's distillation KL go through the output
    layer in chunks, their gradients computed in the forward pass: on the GPU, in fp32 and in bf16, the
    values and LoRA gradients are those of the full logits computed there (bf16: within its rounding, which
    moves either computation's gradient about 12% from fp32's here, advantages of both signs cancelling)."""
    from kftune.retention.distill import Teacher, distillation_sum, output_logits
    from kftune.train.losses import next_token_losses

    options = METHODS["lora"].options.model_validate(LORA)
    model = apply_method(load_base_model(STORIES, "causal_lm", None, seed=0), options, "causal_lm")
    with torch.no_grad():  # an adapter away from zero: the student differs from its teacher
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    model.to(device=DEVICE, dtype=dtype)
    batch = {k: v.to(DEVICE) for k, v in story_batch.items()}
    labels = batch["labels"][:, 1:]
    advantages = torch.linspace(-1, 1, labels.numel(), device=DEVICE).reshape(labels.shape)
    teacher = Teacher(model)

    def full_logits(module) -> torch.Tensor:
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def values_and_gradients(chunked: bool) -> list[tuple[float, torch.Tensor]]:
        if chunked:
            losses = next_token_losses(model, batch)
            student, taught = output_logits(model, batch, "causal_lm"), teacher.logits(batch, "causal_lm")
        else:
            logits = full_logits(model)
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )
            with torch.no_grad(), model.disable_adapter():  # the teacher: the base
                taught = full_logits(model)
            student = logits
        values = [(advantages * losses).sum(), distillation_sum(student, taught, batch["attention_mask"], 2.0)]
        results = []
        for value in values:
            model.zero_grad(set_to_none=True)
            value.backward(retain_graph=True)
            results.append(
                (value.item(), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad]))
            )
        return results

    for (want, want_grad), (have, have_grad) in zip(
        values_and_gradients(False), values_and_gradients(True), strict=True
    ):
        assert have == pytest.approx(want, rel=tolerance)
        assert (have_grad - want_grad).norm() <= tolerance * want_grad.norm()


def test_evaluation_places_models_on_the_gpu():
    from kftune.config import EvalSection
    from kftune.evaluate.evaluate import placement

    if DRY_RUN:
        assert placement(EvalSection()) == (torch.device("cpu"), torch.float32)
    else:
        assert placement(EvalSection()) == (torch.device("cuda"), torch.bfloat16)
        assert placement(EvalSection(device="cpu")) == (torch.device("cpu"), torch.float32)
