"""The registered pyfunc, loaded back from a real MLflow store (sqlite), serves what evaluation measured:
on the data's raw rows, the labels evaluation predicts (a classification head; a causal LM through a
PET verbalizer or entailment hypotheses; a masked LM at its [MASK] slot), and for other causal LMs
the continuations evaluation generates."""

import json

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from conftest import STORIES, register_tuned
from kftune.config import parse_config
from kftune.evaluate import metrics
from kftune.evaluate.evaluate import class_logits, generate, label_predictions, label_scores
from kftune.models import load_base_model, load_tokenizer, load_tuned_model, resolve_model_path
from kftune.prompts.build import read_meta, read_prompts
from kftune.prompts.templates import get_template


def registered(config, tmp_path, evaluation=None):
    """A LoRA model standing in for training, evaluated and registered (conftest.register_tuned); returns the served pyfunc."""
    evaluation = register_tuned(config, tmp_path, evaluation)
    mlflow.set_tracking_uri(config.registry.tracking_uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/{config.registry.model_name}@champion"), evaluation
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize(
    ("task", "template"),
    [
        ("sequence_classification", "plain"),
        ("causal_lm", "pet_sst2"),
        ("causal_lm", "entail_sst2"),
        ("masked_lm", "pet_sst2_mlm"),
    ],
)
def test_served_labels_are_the_ones_evaluation_predicts(task, template, make_config, tiny_data, tmp_path, request):
    model = {"sequence_classification": "minilm-l6", "causal_lm": str(STORIES), "masked_lm": None}[task] or str(
        request.getfixturevalue("random_mlm")
    )
    config = parse_config(
        make_config(
            model={"name_or_path": model, "task": task},
            prompt={"template": template, "max_length": 192},
            method={
                "name": "lora",
                "r": 4,
                "target_modules": "all-linear" if task == "causal_lm" else ["query", "value"],
            },
            eval={"batch_size": 8, "compare_base": False, "forgetting": False},
        )
    )
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
        assert not torch.allclose(
            best.values,
            class_logits(base, rows, tokenizer.pad_token_id, 8).softmax(dim=-1).max(dim=-1).values,
            atol=1e-3,
        )
    else:
        _, expected = label_predictions(tuned, rows, tokenizer, get_template(template), label_names, task, 8)
        scores = torch.tensor([[s[name] for name in label_names] for s in predicted["scores"]])
        torch.testing.assert_close(
            scores, torch.tensor(label_scores(tuned, rows, tokenizer, get_template(template), label_names, task, 8))
        )
        assert not torch.allclose(
            scores,
            torch.tensor(label_scores(base, rows, tokenizer, get_template(template), label_names, task, 8)),
            atol=1e-3,
        )
    assert len(expected) == len(raw) and predicted["label"].tolist() == [label_names[i] for i in expected]
    gold = [label_names.index(str(label)) for label in raw["label"]]
    served_matrix = metrics.confusion_matrix(
        gold, [label_names.index(name) for name in predicted["label"]], len(label_names)
    )
    assert served_matrix == evaluation["tuned"]["confusion_matrix"]

    # A missing column is named, in an error both MLflow's server and MLServer answer with 400 (test_serving_env).
    with pytest.raises(MlflowException, match=r"input needs column\(s\) 'sentence'") as bad:
        served.predict(raw.rename(columns={"sentence": "review"}))
    assert bad.value.get_http_status_code() == 400
    if task != "sequence_classification":  # a head's rows are truncated, as evaluation truncates them
        with pytest.raises(Exception, match=r"rows \[1\] are longer than prompt.max_length=192 tokens"):
            served.predict(pd.DataFrame({"sentence": ["short .", "long " * 200]}))
    served.unwrap_python_model().config["prompt"]["few_shot"] = 2
    with pytest.raises(
        Exception, match=r"prompt.few_shot=2 demonstrations from its train split, which serving does not have"
    ):
        served.predict(raw[["sentence"]])


def test_served_generation_is_evaluations(make_config, tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text(
        "".join(
            json.dumps(
                {"instruction": f"What did Lily see in story {i}?", "input": "", "output": f"Lily saw a cat {i}."}
            )
            + "\n"
            for i in range(20)
        )
    )
    config = parse_config(
        make_config(
            model={"name_or_path": str(STORIES), "task": "causal_lm"},
            data={"path": str(source), "columns": {}, "split": {"test": 0.2}},
            prompt={"template": "alpaca", "max_length": 160},
            method={"name": "lora", "r": 4, "target_modules": "all-linear"},
            eval={"metrics": ["perplexity"], "max_new_tokens": 8},
            registry={"gate": {"metric": "perplexity"}},
        )
    )
    served, _ = registered(config, tmp_path, evaluation={"tuned": {"perplexity": 10.0}})
    tests = [json.loads(line) for line in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    prompts = [get_template("alpaca").render(row)[0][0] for row in tests]
    generated = served.predict(pd.DataFrame({"prompt": prompts}))["generated"].tolist()
    rows = read_prompts(tmp_path / "prompts", "test")
    assert generated == generate(load_tuned_model(tmp_path / "model"), rows, load_tokenizer(STORIES), 8)[0]
    with pytest.raises(MlflowException, match=r"input needs a column 'prompt'"):
        served.predict(pd.DataFrame({"instruction": ["Hi."]}))


MERGED_PROBE = """
import importlib.abc, json, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "kftune":
            raise ImportError("kftune is not needed to load a merged model")
sys.meta_path.insert(0, Refuse())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
ids = tokenizer(sys.argv[2], return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits[0].tolist()
print(json.dumps({"ids": ids[0].tolist(), "logits": logits, "architectures": model.config.architectures, "peft": "peft" in sys.modules}))
"""


def test_merged_lora_is_a_plain_hugging_face_folder(tmp_path):
    """`method.merge: true`: the folder a text-generation server loads as a Hugging Face model; read here
    by transformers alone (no peft) in a process where importing kftune fails, it gives the tuned model's logits."""
    import subprocess
    import sys

    from kftune.methods import apply_method, save_tuned_model
    from kftune.methods.lora import LoraOptions

    options = LoraOptions(r=4, target_modules="all-linear", merge=True)
    tuned = apply_method(load_base_model(STORIES, "causal_lm", None, 0), options, "causal_lm")
    torch.manual_seed(1)
    for name, parameter in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    save_tuned_model(tuned.eval(), options, tmp_path)
    load_tokenizer(STORIES).save_pretrained(str(tmp_path))
    assert not (tmp_path / "adapter_config.json").exists() and (tmp_path / "model.safetensors").is_file()

    done = subprocess.run(
        [sys.executable, "-c", MERGED_PROBE, str(tmp_path), "Lily saw a cat"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout)
    assert loaded["architectures"] == ["LlamaForCausalLM"] and not loaded["peft"]
    with torch.no_grad():
        expected = tuned(torch.tensor([loaded["ids"]])).logits[0]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base = load_base_model(STORIES, "causal_lm", None, 0)(torch.tensor([loaded["ids"]])).logits[0]
    assert not torch.allclose(base, expected, atol=1e-3)  # the merged weights carry the update


def test_a_missing_base_model_is_named_where_the_version_is_served(make_config, tmp_path):
    """A LoRA version holds the adapter only; served where its base folder is not, loading says which base it needs."""
    import shutil

    base = tmp_path / "volume" / "stories"
    shutil.copytree(STORIES, base)
    source = tmp_path / "qa.jsonl"
    source.write_text(
        "".join(
            json.dumps({"instruction": f"What did Lily see in story {i}?", "input": "", "output": f"A cat {i}."}) + "\n"
            for i in range(10)
        )
    )
    config = parse_config(
        make_config(
            model={"name_or_path": str(base), "task": "causal_lm"},
            data={"path": str(source), "columns": {}, "split": {"test": 0.2}},
            prompt={"template": "alpaca", "max_length": 160},
            method={"name": "lora", "r": 4, "target_modules": "all-linear"},
            eval={"metrics": ["perplexity"]},
            registry={"gate": {"metric": "perplexity"}},
        )
    )
    register_tuned(config, tmp_path, evaluation={"tuned": {"perplexity": 10.0}})
    shutil.rmtree(tmp_path / "volume")
    mlflow.set_tracking_uri(config.registry.tracking_uri)
    try:
        with pytest.raises(
            Exception,
            match=rf"this version's base model '{base}' is not available where it is served .*not a directory.*mount its folder at the same path",
        ):
            mlflow.pyfunc.load_model(f"models:/{config.registry.model_name}@champion")
    finally:
        mlflow.set_tracking_uri(None)
