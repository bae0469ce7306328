"""Knowledge retention (kftune.retention) on stories260K: where it cannot apply the config says so and
which field; L2-SP and EWC penalise exactly the change of the pretrained weights (in place, or a LoRA
update) and hold them closer under DDP and ZeRO-2; the Fisher is cached by content hash and refused for
another base; distillation's teacher is the base (adapter disabled); replay draws general rows per
micro-batch reproducibly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import kftune.train.linear_cross_entropy as chunked
from conftest import STORIES, build_on_stories, gradients, process_group, vocabulary_projections
from kftune.config import parse_config
from kftune.errors import KftuneError
from kftune.methods import METHODS, may_train
from kftune.models import load_base_model, load_tokenizer
from kftune.retention.anchor import Anchor, anchored_weights
from kftune.retention.distill import Projected, Teacher, distillation_sum, language_model_loss, output_logits
from kftune.retention.fisher import cache_path, check_fisher_file, general_fingerprint, model_fingerprint
from kftune.retention.general import language_model_rows, training_lines
from kftune.retention.terms import GeneralBatches, _fisher

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one intra-op thread


FULL = METHODS["full"].options.model_validate({"name": "full"})
LORA = METHODS["lora"].options.model_validate({"name": "lora", "r": 4, "target_modules": "all-linear"})


def stories_config(tmp_path, retention: dict, method: dict | None = None, **sections) -> dict:
    return {
        "model": {"name_or_path": str(STORIES), "task": "causal_lm"},
        "data": {"path": str(tmp_path / "data.jsonl")},
        "prompt": {"template": "text", "max_length": 48},
        "method": method or {"name": "full"},
        "eval": {"metrics": ["perplexity"]},
        "registry": {"model_name": "retention", "gate": {"metric": "perplexity"}},
        "retention": retention,
        **sections,
    }


@pytest.mark.parametrize(
    ("retention", "method", "sections", "expected"),
    [
        (
            {"l2_sp": {"alpha": 1.0}},
            {"name": "prompt_tuning"},
            {},
            "retention.l2_sp: method prompt_tuning trains only new parameters (virtual-token embeddings)",
        ),
        ({"ewc": {"strength": 1.0}}, {"name": "adapter"}, {}, "retention.ewc: method adapter trains only new"),
        ({"replay": {"ratio": 0.0}}, None, {}, "retention.replay.ratio"),
        ({"distill": {"weight": 1.0, "inputs": []}}, None, {}, "retention.distill.inputs"),
        (
            {},
            None,
            {
                "eval": {"forgetting": False, "metrics": ["perplexity"]},
                "registry": {"model_name": "r", "gate": {"metric": "perplexity", "max_forgetting": 0.1}},
            },
            "registry.gate.max_forgetting: needs the forgetting measured",
        ),
    ],
)
def test_retention_where_it_cannot_apply_names_the_field(tmp_path, retention, method, sections, expected):
    with pytest.raises(KftuneError) as error:
        parse_config(stories_config(tmp_path, retention, method, **sections))
    assert expected in str(error.value)


def test_distillation_of_full_fine_tuning_under_zero3_takes_a_partitioned_teacher(tmp_path):
    from kftune.retention.config import retention_problem

    config = parse_config(
        stories_config(tmp_path, {"distill": {"weight": 1.0}}, None, train={"deepspeed": {"stage": 3}})
    )
    assert config.method.name == "full" and retention_problem(config) is None  # kftune.train.partitioned's copy


def test_classification_refuses_what_needs_a_language_model_head(make_config):
    with pytest.raises(KftuneError, match=r"retention.replay: a classification model has no language-model head"):
        parse_config(make_config(retention={"replay": {"ratio": 0.5}}))
    parse_config(make_config(retention={"l2_sp": {"alpha": 0.1}}))  # L2-SP applies to the pretrained encoder
    parse_config(make_config(retention={"ewc": {"strength": 1.0}, "distill": {"weight": 1.0}}))  # embedding forms


def test_l2_sp_penalises_the_change_of_weights_trained_in_place():
    model = build_on_stories(FULL)
    anchor = Anchor(anchored_weights(model, may_train(model, FULL), set()), 2.0, 0.0, None, "retention.l2_sp")
    assert anchor.penalty()[1].item() == 0.0
    weight = model.model.layers[0].mlp.up_proj.weight
    change = torch.randn_like(weight) * 0.01
    with torch.no_grad():
        weight += change
    penalty, value = anchor.penalty()
    assert value.item() == penalty.item() == pytest.approx(0.5 * 2.0 * change.pow(2).sum().item(), rel=1e-4)
    penalty.backward()
    assert torch.allclose(weight.grad, 2.0 * change, atol=1e-6)


def test_l2_sp_on_lora_is_the_distance_of_the_merged_weights_from_the_base():
    model = build_on_stories(LORA)
    anchor = Anchor(anchored_weights(model, may_train(model, LORA), set()), 1.0, 0.0, None, "retention.l2_sp")
    assert not any(w.reference is not None for w in anchor.weights)  # no copy of theta_0 under LoRA
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    penalty = anchor.penalty()[1].item()
    base = dict(load_base_model(STORIES, "causal_lm", None, seed=0).named_parameters())
    merged = dict(model.merge_and_unload().named_parameters())
    expected = 0.5 * sum((merged[n] - base[n]).pow(2).sum().item() for n in base)
    assert penalty == pytest.approx(expected, rel=1e-3)


def test_the_fisher_is_cached_by_content_hash_and_refused_for_another_base(tmp_path, capsys):
    config = parse_config(stories_config(tmp_path, {"ewc": {"strength": 1.0, "fisher_rows": 4}}))
    tokenizer = load_tokenizer(STORIES)
    rows = language_model_rows(training_lines(None, 8), tokenizer, "causal_lm", 48)
    fisher = _fisher(config, rows, str(tmp_path))
    assert "computed on 4 general rows, cached at" in capsys.readouterr().out
    assert set(fisher) == {n for n, _ in load_base_model(STORIES, "causal_lm", None, 0).named_parameters()}
    assert torch.cat([f.flatten() for f in fisher.values()]).mean().item() == pytest.approx(1.0, rel=1e-4)
    again = _fisher(config, rows, str(tmp_path))
    assert "EWC Fisher reused from" in capsys.readouterr().out
    assert all(torch.equal(fisher[n], again[n]) for n in fisher)

    base = model_fingerprint(STORIES)
    cached = cache_path(tmp_path, base, general_fingerprint([str(r["input_ids"]) for r in rows[:4]], "causal_lm", 48))
    assert cached.is_file()
    with pytest.raises(KftuneError, match=r"retention.ewc.fisher_file: .* was made for another base model"):
        check_fisher_file(cached, "sha256:another-base")
    other = parse_config(
        stories_config(tmp_path, {"ewc": {"strength": 1.0, "fisher_rows": 2, "fisher_file": str(cached)}})
    )
    with pytest.raises(KftuneError, match=r"retention.ewc.fisher_file: .* was made on other general data"):
        _fisher(other, rows, None)


def test_ewc_weighs_each_weight_by_its_fisher():
    model = build_on_stories(FULL)
    weights = anchored_weights(model, may_train(model, FULL), set())
    fisher = {w.name: torch.full_like(w.reference, 3.0) for w in weights}
    anchor = Anchor(weights, 0.5, 2.0, fisher, "retention.ewc")
    weight = model.model.norm.weight
    with torch.no_grad():
        weight += 0.1
    assert anchor.penalty()[1].item() == pytest.approx(0.5 * (0.5 + 2.0 * 3.0) * 0.01 * weight.numel(), rel=1e-4)


def test_distillation_teacher_is_the_base_with_the_adapter_disabled(families):
    batch = families["stories"][3]
    model = build_on_stories(LORA)
    teacher = Teacher(model).logits(batch, "causal_lm")
    base = load_base_model(STORIES, "causal_lm", None, seed=0)
    with torch.no_grad():
        assert torch.allclose(
            teacher.logits(),
            base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            atol=1e-5,
        )
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    student = output_logits(model, batch, "causal_lm")
    assert distillation_sum(teacher, teacher, batch["attention_mask"], 2.0).item() == pytest.approx(0.0, abs=1e-6)
    kl = distillation_sum(student, teacher, batch["attention_mask"], 2.0)
    assert kl.item() > 1e-4
    kl.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("method", [LORA, FULL], ids=["lora", "full"])
def test_distillation_and_replay_through_the_output_layer_match_the_full_logits(monkeypatch, families, method):
    """A Llama's distillation KL and replay loss go through the output layers a few positions at a time, the
    teacher's with no gradient: the values and every trained parameter's gradient are those of both models'
    full logits. LoRA's teacher is the model itself, its adapter disabled; full fine-tuning's a frozen copy."""
    batch = families["stories"][3]
    model = build_on_stories(method).eval()  # no dropout: both computations must see the same network
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or method is FULL:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    teacher = Teacher(model) if method is LORA else Teacher(model, load_base_model(STORIES, "causal_lm", None, seed=0))
    vocab, mask = model.config.vocab_size, batch["attention_mask"]

    def terms(student, taught) -> tuple[torch.Tensor, torch.Tensor]:
        return distillation_sum(student, taught, mask, 2.0), language_model_loss(student, batch["labels"], "causal_lm")

    def own_logits(module) -> torch.Tensor:
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    with torch.no_grad():  # the teacher's own logits: the adapter disabled, or the frozen copy
        if method is LORA:
            with model.disable_adapter():
                taught = own_logits(model)
        else:
            taught = own_logits(teacher.frozen)
    expected = [(value, gradients(model, value)) for value in terms(own_logits(model), taught)]

    monkeypatch.setattr(chunked, "KL_CHUNK_LOGITS", vocab * 3)
    monkeypatch.setattr(chunked, "CHUNK_LOGITS", vocab * 3)
    rows = vocabulary_projections(monkeypatch, vocab)
    projected = [output_logits(model, batch, "causal_lm"), teacher.logits(batch, "causal_lm")]
    assert all(isinstance(p, Projected) for p in projected)
    got = [(value, gradients(model, value)) for value in terms(*projected)]

    assert 0 < max(rows) <= 3  # every chunk of 3 positions, the models' own forward passes projecting none
    for (want, want_gradients), (have, have_gradients) in zip(expected, got, strict=True):
        assert have.item() == pytest.approx(want.item(), rel=1e-5) and want.item() > 1e-4
        assert have_gradients.keys() == want_gradients.keys() and have_gradients
        for name, gradient in want_gradients.items():
            assert (have_gradients[name] - gradient).abs().max() <= 1e-4 * gradient.abs().max(), name


def test_general_rows_are_drawn_reproducibly_per_micro_batch_and_worker():
    rows = [{"input_ids": [i + 1, i + 2], "labels": [i + 1, i + 2]} for i in range(10)]
    first = [GeneralBatches(rows, 3, 0, "causal_lm", seed=0, rank=r, world=2) for r in (0, 1)]
    again = GeneralBatches(rows, 3, 0, "causal_lm", seed=0, rank=0, world=2)
    assert torch.equal(first[0].draw(5)["input_ids"], again.draw(5)["input_ids"])
    assert not torch.equal(first[0].draw(0)["input_ids"], first[1].draw(0)["input_ids"])
    with pytest.raises(KftuneError, match=r"retention.general_data"):
        GeneralBatches([], 3, 0, "causal_lm", 0, 0, 1)


def anchored_training(tmp_path, families, retention: dict, deepspeed: dict | None) -> tuple[dict, dict]:
    """The base's weights and those of 4 steps of full fine-tuning (lr 1e-2) with `retention` plugged in as
    the training loop does, under DDP or a DeepSpeed engine (a world of one)."""
    from kftune.methods import optimizer_parameter_groups
    from kftune.retention.terms import build_retention
    from kftune.train.engines import make_engine
    from kftune.train.losses import summed_loss

    config = parse_config(
        stories_config(
            tmp_path,
            retention,
            train={"batch_size": 4, "workers": 1, "lr": 1e-2, "gradient_accumulation": 2, "deepspeed": deepspeed},
        )
    )
    batch = families["stories"][3]
    model = build_on_stories(FULL)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with process_group("gloo"):
        engine = make_engine(
            model, optimizer_parameter_groups(model, FULL, 1e-2), config.train, 4, 1, torch.device("cpu")
        )
        try:
            terms = build_retention(config, engine.module, FULL, str(tmp_path), 0, 1, torch.device("cpu"))
            for step in range(4):
                for half in (batch_rows(batch, 0, 2), batch_rows(batch, 2, 4)):
                    with engine.micro_step():
                        loss = summed_loss(engine.model, half, "causal_lm") / (batch["labels"][:, 1:] != -100).sum()
                        engine.backward(
                            loss + (terms.loss(engine.module, half, step, torch.tensor(4)) if terms else 0.0)
                        )
                    if terms:
                        terms.before_step(engine)
                    engine.step()
            trained = engine.consolidated(lambda: build_on_stories(FULL), rank=0)
        finally:
            if deepspeed:
                engine.engine.destroy()
    return base, {n: p.detach() for n, p in trained.named_parameters()}


def distance(weights: tuple[dict, dict]) -> float:
    base, trained = weights
    return sum((p - base[n]).pow(2).sum().item() for n, p in trained.items()) ** 0.5


def batch_rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


ANCHORED = {"l2_sp": {"alpha": 50.0}, "ewc": {"strength": 50.0, "fisher_rows": 4}}


def test_l2_sp_and_ewc_hold_the_weights_near_the_base_under_zero2_and_zero3_alike(tmp_path, families):
    """Under ZeRO-3 the penalty's gradient goes into each partition's fp32 gradient before the step (theta_0
    and the Fisher kept per partition) instead of through the loss: the same update. DDP with two workers:
    tests/test_retention_train.py; ZeRO-1/2 fragments and ZeRO-3 partitions over two workers:
    tests/test_retention_zero.py and tests/test_train_partitioned.py."""
    free = distance(anchored_training(tmp_path, families, {}, {"stage": 2}))
    _, zero2 = anchored_training(tmp_path, families, ANCHORED, {"stage": 2})
    base, zero3 = anchored_training(tmp_path, families, ANCHORED, {"stage": 3})
    assert distance((base, zero2)) < 0.7 * free
    assert distance((base, zero3)) == pytest.approx(distance((base, zero2)), rel=1e-5)
    # weights within 1e-3 (plain ZeRO-2 and ZeRO-3 differ by 4e-4 here, sums in another order; anchoring moves them 3e-2)
    assert all(torch.allclose(zero3[n], zero2[n], atol=1e-3) for n in zero2)


def test_lora_factors_partitioned_by_zero3_are_refused_for_the_penalty(tmp_path):
    """The penalty on LoRA's B A needs both factors whole; ZeRO-3 keeps them so below its persistence threshold."""
    from kftune.config import TrainSection
    from kftune.methods import optimizer_parameter_groups
    from kftune.train.engines import make_engine

    every_parameter_partitioned = tmp_path / "ds.json"
    every_parameter_partitioned.write_text(
        json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    )
    train = TrainSection(
        batch_size=2, workers=1, deepspeed={"stage": 3, "config_file": str(every_parameter_partitioned)}
    )
    model = build_on_stories(LORA)
    with process_group("gloo"):
        engine = make_engine(model, optimizer_parameter_groups(model, LORA, 1e-3), train, 1, 1, torch.device("cpu"))
        try:
            with pytest.raises(KftuneError, match="ZeRO-3 partitions this run's LoRA factors"):
                anchored_weights(engine.module, may_train(engine.module, LORA), set())
        finally:
            engine.engine.destroy()


def perturbed_lora(path, task: str, num_labels=None, std: float = 0.1):
    """A LoRA model whose random B makes it differ from its base."""
    from kftune.methods import apply_method

    model = apply_method(load_base_model(path, task, num_labels, seed=0), LORA, task).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=std)
    return model


def test_forgetting_of_a_causal_lm_on_held_out_text_and_the_bases_own_answers():
    from kftune.retention.forgetting import measure_forgetting
    from kftune.retention.general import held_out_lines

    lines, tokenizer = held_out_lines(None)[:12], load_tokenizer(STORIES)
    assert not set(lines) & set(training_lines(None, 1000))  # retention never trains on what forgetting is scored on
    base = load_base_model(STORIES, "causal_lm", None, seed=0).eval()
    same = measure_forgetting(base, base, lines, tokenizer, "causal_lm", 48, 8)
    assert same["score"] == pytest.approx(0.0, abs=1e-6)
    changed = measure_forgetting(base, perturbed_lora(STORIES, "causal_lm"), lines, tokenizer, "causal_lm", 48, 8)
    assert changed["score"] > 0.01 and changed["tuned"] > changed["base"]
    assert changed["base_answer_loss"]["tuned"] > changed["base_answer_loss"]["base"] + 0.01


def test_forgetting_of_an_encoder_is_how_well_its_similarity_structure_survives():
    from kftune.models import resolve_model_path
    from kftune.retention.forgetting import measure_forgetting
    from kftune.retention.general import held_out_lines

    path = resolve_model_path("minilm-l6")
    lines, tokenizer = held_out_lines(None)[:16], load_tokenizer(path)
    base = load_base_model(path, "sequence_classification", 2, seed=0).eval()
    same = measure_forgetting(base, base, lines, tokenizer, "sequence_classification", 48, 16)
    assert same["tuned"] == pytest.approx(1.0) and same["score"] == pytest.approx(0.0, abs=1e-9)
    changed = measure_forgetting(
        base,
        perturbed_lora(path, "sequence_classification", 2, std=0.02),
        lines,
        tokenizer,
        "sequence_classification",
        48,
        16,
    )
    assert 0.001 < changed["score"] < 0.5 and changed["metric"] == "similarity_rank_correlation"


def test_evaluate_reports_forgetting_next_to_the_task_metrics(make_config, tmp_path):
    """A LoRA model with random B saved as the train step saves it, scored by the evaluate step."""
    from conftest import SERVING_TRAIN_LOG
    from kftune.data.prepare import prepare, write_prepared
    from kftune.evaluate.evaluate import evaluate
    from kftune.evaluate.report import render_report
    from kftune.prompts.build import build_prompts
    from kftune.retention.forgetting import forgetting_refusal
    from kftune.train.loop import save_artifact

    config = parse_config(
        make_config(
            model={"name_or_path": str(STORIES), "task": "causal_lm"},
            prompt={"template": "text", "max_length": 48},
            method={"name": "lora", "r": 4, "target_modules": "all-linear"},
            eval={"metrics": ["perplexity"], "compare_base": False, "batch_size": 16},
            registry={"gate": {"metric": "perplexity", "max_forgetting": 0.05}},
        )
    )
    write_prepared(prepare(config), tmp_path / "data")
    meta = build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    resolved = json.loads(config.model_dump_json(exclude_none=True))
    save_artifact(
        perturbed_lora(STORIES, "causal_lm"),
        config,
        resolved,
        SERVING_TRAIN_LOG,
        meta,
        str(tmp_path / "prompts"),
        tmp_path / "model",
    )
    evaluation = evaluate(config, tmp_path / "prompts", tmp_path / "model")
    forgetting = evaluation["forgetting"]
    assert "perplexity" in evaluation["tuned"] and forgetting["lines"] == 79 and forgetting["score"] > 0.05, forgetting
    assert forgetting["base_answer_loss"]["tuned"] > forgetting["base_answer_loss"]["base"]
    report = render_report(
        "r", evaluation, {**SERVING_TRAIN_LOG, "steps": 1, "total_parameters": 100, "workers": 1}, ["perplexity"]
    )
    assert "own answers to general prompts" in report and f"forgetting score: {forgetting['score']:.4f}" in report
    assert "forgot too much" in forgetting_refusal(config.registry.gate.max_forgetting, evaluation)


def test_the_gate_refuses_a_version_that_forgot_more_than_allowed(make_config, tmp_path):
    from conftest import TRAIN_LOG
    from kftune.registry.mlflow_registry import register_model

    folder = tmp_path / "model"
    folder.mkdir()
    config = parse_config(make_config(registry={"gate": {"metric": "accuracy", "max_forgetting": 0.2}}))

    def register(accuracy: float, forgetting: float, run: str) -> dict:
        evaluation = {
            "tuned": {"accuracy": accuracy},
            "forgetting": {"metric": "similarity_rank_correlation", "score": forgetting},
        }
        return register_model(config, folder, evaluation, TRAIN_LOG, [], {"kftune.pipeline_run_id": run})

    assert register(0.80, 0.1, "a")["promoted"]
    refused = register(0.90, 0.35, "b")  # better at the task, but forgot too much
    assert not refused["promoted"]
    assert "forgot too much (forgetting score 0.3500 > registry.gate.max_forgetting 0.2)" in refused["gate"]
    assert register(0.90, 0.15, "c")["promoted"]


def test_missing_or_empty_general_data_fails_before_training(make_config, tmp_path):
    from kftune.preflight import check_retention_files

    empty = tmp_path / "general.txt"
    empty.write_text("\n  \n")
    for general, expected in ((tmp_path / "absent.txt", "is not a file"), (empty, "holds no text")):
        config = parse_config(stories_config(tmp_path, {"replay": {"ratio": 0.5}, "general_data": str(general)}))
        with pytest.raises(KftuneError, match=f"retention.general_data: .*{expected}"):
            check_retention_files(config)
    fisher = tmp_path / "fisher.safetensors"
    save_file({"w": torch.zeros(1)}, str(fisher), metadata={"base": "sha256:another", "general": "x"})
    config = parse_config(stories_config(tmp_path, {"ewc": {"strength": 1.0, "fisher_file": str(fisher)}}))
    with pytest.raises(KftuneError, match=r"retention.ewc.fisher_file: .* was made for another base model"):
        check_retention_files(config)


def test_a_masked_lm_replays_and_distils_with_its_own_objective(random_mlm, tmp_path):
    """Replay rows mask some tokens and label only those; EWC's Fisher and the terms run on the MLM head."""
    from kftune.retention.terms import build_retention

    config = parse_config(
        {
            **stories_config(
                tmp_path,
                {
                    "ewc": {"strength": 1.0, "fisher_rows": 4},
                    "replay": {"ratio": 1.0},
                    "distill": {"weight": 1.0, "inputs": ["general"]},
                },
                {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
                train={"batch_size": 2, "workers": 1},
            ),
            "model": {"name_or_path": str(random_mlm), "task": "masked_lm"},
            "prompt": {"template": "pet_sst2_mlm", "max_length": 32},
            "eval": {"metrics": ["accuracy"]},
            "registry": {"model_name": "mlm", "gate": {"metric": "accuracy"}},
        }
    )
    tokenizer = load_tokenizer(random_mlm)
    rows = language_model_rows(training_lines(None, 4), tokenizer, "masked_lm", 32)
    for row in rows:
        masked = [i for i, label in enumerate(row["labels"]) if label != -100]
        assert masked and all(row["input_ids"][i] == tokenizer.mask_token_id for i in masked)
    model = perturbed_lora(random_mlm, "masked_lm")
    terms = build_retention(config, model.train(), config.method, str(tmp_path), 0, 1, torch.device("cpu"))
    batch = GeneralBatches(rows, 2, tokenizer.pad_token_id, "masked_lm", 0, 0, 1).draw(0)
    loss = terms.loss(model, batch, 0, torch.tensor(2))
    loss.backward()
    assert set(terms.report()) == {"retention_anchor", "retention_distill_general", "retention_replay"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)


def test_generated_replay_rows_are_the_bases_answers_cached_in_the_storage(tmp_path, capsys):
    from kftune.retention.terms import _generated_rows

    config = parse_config(stories_config(tmp_path, {"replay": {"ratio": 0.5, "generated": True}}))
    lines, tokenizer = training_lines(None, 4), load_tokenizer(STORIES)
    rows = _generated_rows(config, lines, tokenizer, str(tmp_path), torch.device("cpu"))
    assert len(rows) == 4 and all(r["labels"][0] == -100 and r["labels"][-1] != -100 for r in rows)
    assert "cached at" in capsys.readouterr().out
    assert _generated_rows(config, lines, tokenizer, str(tmp_path), torch.device("cpu")) == rows
    assert "reused from" in capsys.readouterr().out


def test_general_data_and_a_fisher_file_are_found_next_to_the_config(tmp_path, write_config):
    from kftune.config import load_config

    (tmp_path / "general.txt").write_text("One passage.\n")
    (tmp_path / "data.jsonl").write_text("")
    path = write_config(
        stories_config(
            tmp_path, {"general_data": "general.txt", "ewc": {"strength": 1.0, "fisher_file": "f.safetensors"}}
        )
    )
    retention = load_config(path).retention
    assert retention.general_data == str(tmp_path / "general.txt")
    assert retention.ewc.fisher_file == "f.safetensors"  # absent: left as written, preflight names it


def test_an_encoder_classifier_keeps_the_bases_sentence_embeddings(make_config, tmp_path):
    """Distillation compares pooled embeddings with the base's (adapter disabled), on task and general rows;
    EWC's Fisher is that of the embedding: zero on the new head, which the embedding does not pass through."""
    from kftune.methods import apply_method
    from kftune.models import resolve_model_path
    from kftune.prompts.collate import Collator
    from kftune.retention.embedding import sentence_rows
    from kftune.retention.fisher import load_fisher
    from kftune.retention.general import held_out_lines
    from kftune.retention.terms import build_retention

    retention = {
        "distill": {"weight": 1.0, "inputs": ["task", "general"]},
        "ewc": {"strength": 1.0, "fisher_rows": 4},
        "general_rows": 8,
    }
    config = parse_config(make_config(retention=retention, train={"batch_size": 2, "workers": 1}))
    path = resolve_model_path("minilm-l6")
    model = apply_method(
        load_base_model(path, "sequence_classification", 2, seed=0), config.method, "sequence_classification"
    )
    terms = build_retention(config, model.train(), config.method, str(tmp_path), 0, 1, torch.device("cpu"))
    tokenizer = load_tokenizer(path)
    batch = Collator(tokenizer.pad_token_id, "sequence_classification")(
        sentence_rows(held_out_lines(None)[:2], tokenizer, 32)
    )
    model.eval()  # no dropout: the base and the untouched adapter agree exactly
    assert terms.loss(model, batch, 0, torch.tensor(2)).item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    loss = terms.loss(model, batch, 1, torch.tensor(2))
    loss.backward()
    report = terms.report()
    assert set(report) == {"retention_anchor", "retention_distill_task", "retention_distill_general"}
    assert report["retention_distill_task"] > 1e-4 and report["retention_distill_general"] > 1e-4, report
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
    (fisher_file,) = (tmp_path / "retention").glob("fisher-*.safetensors")
    fisher = load_fisher(fisher_file)
    assert fisher["classifier.weight"].abs().sum() == 0
    assert fisher["bert.encoder.layer.0.attention.self.query.weight"].sum() > 0


def test_sentence_embeddings_free_each_layers_states_as_the_forward_goes():
    """Without gradients (the teacher, the forgetting measure) the embeddings keep only the encoder's output:
    when its last layer runs, no earlier layer's output is alive (`output_hidden_states` would keep them all),
    and they are the mean-pooled last hidden states."""
    import weakref

    from kftune.models import resolve_model_path
    from kftune.retention.embedding import sentence_embeddings

    model = load_base_model(resolve_model_path("minilm-l6"), "sequence_classification", 2, seed=0).eval()
    tokenizer = load_tokenizer(resolve_model_path("minilm-l6"))
    batch = dict(tokenizer(["a small dog", "the weather is fine today"], padding=True, return_tensors="pt"))
    outputs, alive_at_the_end = [], []
    layers = model.bert.encoder.layer
    for layer in layers[:-1]:
        layer.register_forward_hook(
            lambda _l, _a, out: outputs.append(weakref.ref(out[0] if isinstance(out, tuple) else out))
        )
    layers[-1].register_forward_pre_hook(
        lambda *_: alive_at_the_end.append(sum(ref() is not None for ref in outputs[:-1]))
    )
    with torch.no_grad():
        embeddings = sentence_embeddings(model, batch)
        assert len(outputs) == len(layers) - 1 > 1 and alive_at_the_end == [0]
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(embeddings, (hidden * mask).sum(1) / mask.sum(1), atol=1e-6)


def test_sentence_embeddings_of_a_prompt_tuned_encoder_pool_the_rows_own_tokens():
    """Peft puts the virtual tokens before the row's (its hidden states are longer than the attention mask)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from kftune.retention.embedding import sentence_embeddings

    torch.manual_seed(0)
    base = BertForSequenceClassification(
        BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).eval()
    tuned = get_peft_model(base, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=3)).eval()
    batch = {
        "input_ids": torch.tensor([[2, 5, 7, 9], [2, 6, 0, 0]]),
        "attention_mask": torch.tensor([[1] * 4, [1, 1, 0, 0]]),
    }
    hidden = tuned(**batch, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape[1] == 3 + 4
    expected = torch.stack([hidden[0, 3:].mean(0), hidden[1, 3:5].mean(0)])
    torch.testing.assert_close(sentence_embeddings(tuned, batch), expected)


def test_the_embedding_fisher_estimates_the_gaussian_fisher_diag_jtj():
    """Averaged over noise, the squared gradient of `gaussian_fisher_loss` is sum_k (d e_k / d w)^2."""
    from transformers import BertConfig, BertForSequenceClassification

    from kftune.retention.embedding import gaussian_fisher_loss, sentence_embeddings

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).eval()
    batch = {"input_ids": torch.tensor([[2, 5, 7, 9]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    exact = torch.zeros_like(weight)
    for k in range(8):
        (gradient,) = torch.autograd.grad(sentence_embeddings(model, batch)[0, k], weight)
        exact += gradient.pow(2)
    sampled, generator = torch.zeros_like(weight), torch.Generator().manual_seed(0)
    for _ in range(400):
        (gradient,) = torch.autograd.grad(gaussian_fisher_loss(model, batch, generator), weight)
        sampled += gradient.pow(2) / 400
    assert sampled.sum().item() == pytest.approx(exact.sum().item(), rel=0.15)
