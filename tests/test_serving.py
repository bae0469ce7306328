"""The registered pyfunc, loaded back from a real MLflow store (sqlite), serves what evaluation measured:
on the data's raw rows, the labels evaluation predicts (a classification head; a causal LM through a
PET verbalizer or entailment hypotheses; a masked LM at its [MASK] slot), and for other causal LMs
the continuations evaluation generates."""

import json

import mlflow
import pandas as pd
import pytest
import torch

from kftune.config import parse_config
from kftune.data.prepare import prepare, write_prepared
from kftune.evaluate import metrics
from kftune.evaluate.evaluate import class_logits, evaluate, generate, label_predictions, label_scores
from kftune.methods import apply_method
from kftune.models import load_base_model, load_tokenizer, load_tuned_model, resolve_model_path
from kftune.prompts.build import build_prompts, read_meta, read_prompts
from kftune.prompts.templates import get_template
from kftune.registry.mlflow_registry import register_model
from kftune.train.loop import save_artifact

from conftest import STORIES

TRAIN_LOG = {"final_loss": 0.5, "seconds": 1.0, "seconds_per_step": 0.1, "trainable_parameters": 10, "history": []}


def registered(config, tmp_path, evaluation=None):
    """Prepare, build, a LoRA model standing in for training (random B, so the adapter changes the
    outputs) saved as the train step saves it, evaluated, registered; returns the served pyfunc."""
    write_prepared(prepare(config), tmp_path / "data")
    meta = build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    path = resolve_model_path(config.model.name_or_path)
    model = apply_method(load_base_model(path, config.model.task, len(meta["label_names"]) or None, 0), config.method, config.model.task)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    resolved = json.loads(config.model_dump_json(exclude_none=True))
    resolved["model"]["num_labels"] = len(meta["label_names"]) or None
    save_artifact(model.eval(), config, resolved, TRAIN_LOG, meta, str(tmp_path / "prompts"), tmp_path / "model")
    evaluation = evaluation or evaluate(config, tmp_path / "prompts", tmp_path / "model")
    register_model(config, tmp_path / "model", evaluation, TRAIN_LOG, [], {"kftune.pipeline_run_id": "run-1"})
    mlflow.set_tracking_uri(config.registry.tracking_uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/{config.registry.model_name}@champion"), evaluation
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("task, template", [
    ("sequence_classification", "plain"), ("causal_lm", "pet_sst2"), ("causal_lm", "entail_sst2"), ("masked_lm", "pet_sst2_mlm"),
])
def test_served_labels_are_the_ones_evaluation_predicts(task, template, make_config, tiny_data, tmp_path, request):
    model = {"sequence_classification": "minilm-l6", "causal_lm": str(STORIES), "masked_lm": None}[task] or str(request.getfixturevalue("random_mlm"))
    config = parse_config(make_config(
        model={"name_or_path": model, "task": task}, prompt={"template": template, "max_length": 192},
        method={"name": "lora", "r": 4, "target_modules": "all-linear" if task == "causal_lm" else ["query", "value"]},
        eval={"batch_size": 8, "compare_base": False, "forgetting": False},
    ))
    served, evaluation = registered(config, tmp_path)
    raw = pd.read_csv(tiny_data["test"], sep="\t")  # the data file's own columns: sentence, label
    predicted = served.predict(raw[["sentence"]])

    label_names = read_meta(tmp_path / "prompts")["label_names"]
    rows = read_prompts(tmp_path / "prompts", "test")
    tuned, tokenizer = load_tuned_model(tmp_path / "model"), load_tokenizer(tmp_path / "model")
    base = load_base_model(resolve_model_path(model), task, len(label_names), 0).eval()
    if task == "sequence_classification":
        best = class_logits(tuned, rows, tokenizer.pad_token_id, 8).softmax(dim=-1).max(dim=-1)
        expected = best.indices.tolist()
        torch.testing.assert_close(torch.tensor(predicted["score"].tolist()), best.values)
        assert not torch.allclose(best.values, class_logits(base, rows, tokenizer.pad_token_id, 8).softmax(dim=-1).max(dim=-1).values, atol=1e-3)
    else:
        _, expected = label_predictions(tuned, rows, tokenizer, get_template(template), label_names, task, 8)
        scores = torch.tensor([[s[name] for name in label_names] for s in predicted["scores"]])
        torch.testing.assert_close(scores, torch.tensor(label_scores(tuned, rows, tokenizer, get_template(template), label_names, task, 8)))
        assert not torch.allclose(scores, torch.tensor(label_scores(base, rows, tokenizer, get_template(template), label_names, task, 8)), atol=1e-3)
    assert len(expected) == len(raw) and predicted["label"].tolist() == [label_names[i] for i in expected]
    gold = [label_names.index(str(label)) for label in raw["label"]]
    served_matrix = metrics.confusion_matrix(gold, [label_names.index(name) for name in predicted["label"]], len(label_names))
    assert served_matrix == evaluation["tuned"]["confusion_matrix"]

    # A column named after the template field works too (`text`, as the README shows); a missing one is named.
    assert served.predict(raw[["sentence"]].rename(columns={"sentence": "text"})[:3])["label"].tolist() == predicted["label"].tolist()[:3]
    with pytest.raises(Exception, match=r"input needs column\(s\) 'sentence' or 'text'; it has \['review', 'label'\]"):
        served.predict(raw.rename(columns={"sentence": "review"}))
    if task != "sequence_classification":  # a head's rows are truncated, as evaluation truncates them
        with pytest.raises(Exception, match=r"rows \[1\] are longer than prompt.max_length=192 tokens"):
            served.predict(pd.DataFrame({"sentence": ["short .", "long " * 200]}))
    served.unwrap_python_model().config["prompt"]["few_shot"] = 2
    with pytest.raises(Exception, match="prompt.few_shot=2 demonstrations from its train split, which serving does not have"):
        served.predict(raw[["sentence"]])


def test_served_generation_is_evaluations(make_config, tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"What did Lily see in story {i}?", "input": "", "output": f"Lily saw a cat {i}."}) + "\n" for i in range(20)))
    config = parse_config(make_config(
        model={"name_or_path": str(STORIES), "task": "causal_lm"}, data={"path": str(source), "columns": {}, "split": {"test": 0.2}},
        prompt={"template": "alpaca", "max_length": 160}, method={"name": "lora", "r": 4, "target_modules": "all-linear"},
        eval={"metrics": ["perplexity"], "max_new_tokens": 8}, registry={"gate": {"metric": "perplexity"}},
    ))
    served, _ = registered(config, tmp_path, evaluation={"tuned": {"perplexity": 10.0}})
    tests = [json.loads(line) for line in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    prompts = [get_template("alpaca").render(row)[0][0] for row in tests]
    generated = served.predict(pd.DataFrame({"prompt": prompts}))["generated"].tolist()
    rows = read_prompts(tmp_path / "prompts", "test")
    assert generated == generate(load_tuned_model(tmp_path / "model"), rows, load_tokenizer(STORIES), 8)[0]
    with pytest.raises(Exception, match=r"input needs a column 'prompt'; it has \['instruction'\]"):
        served.predict(pd.DataFrame({"instruction": ["Hi."]}))
