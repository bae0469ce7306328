"""The registered model as an MLflow pyfunc: serving loads `models:/NAME@champion` and predicts.

The logged artifact is kftune's Model folder (an adapter plus the recorded base-model reference, or
full weights); `load_context` rebuilds base + adapter with `kftune.models.load_tuned_model`.
Input is a DataFrame with a `text` column (classification) or a `prompt` column (causal LM).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc

MODEL_ARTIFACT = "kftune_model"
MAX_NEW_TOKENS = 64


class TunedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from kftune.models import LABELS_FILE, TUNED_CONFIG_FILE, load_tokenizer, load_tuned_model

        folder = Path(context.artifacts[MODEL_ARTIFACT])
        self.config = json.loads((folder / TUNED_CONFIG_FILE).read_text())
        self.labels = json.loads((folder / LABELS_FILE).read_text()) if (folder / LABELS_FILE).is_file() else []
        self.model = load_tuned_model(folder)
        self.tokenizer = load_tokenizer(folder)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        task = self.config["model"]["task"]
        max_length = self.config["prompt"]["max_length"]
        column = "text" if task == "sequence_classification" else "prompt"
        if column not in model_input.columns:
            raise ValueError(f"input needs a {column!r} column (got {list(model_input.columns)})")
        texts = model_input[column].astype(str).tolist()
        with torch.no_grad():
            if task == "sequence_classification":
                batch = self.tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
                probabilities = self.model(**batch).logits.softmax(dim=-1)
                ids = probabilities.argmax(dim=-1).tolist()
                return pd.DataFrame({
                    "label": [self.labels[i] if self.labels else i for i in ids],
                    "score": probabilities.max(dim=-1).values.tolist(),
                })
            outputs = []
            for text in texts:  # one at a time: no padding side effects on greedy decoding
                batch = self.tokenizer(text, return_tensors="pt")
                generated = self.model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
                outputs.append(self.tokenizer.decode(generated[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
            return pd.DataFrame({"generated": outputs})
