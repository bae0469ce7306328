"""Sentence embeddings of an encoder: what its forgetting is measured on, and what its retention keeps.

A classifier's head is new, so the base has no output distribution to distil; what the base knew is
how its encoder places sentences (mean-pooled last hidden states, as sentence-transformers pools
MiniLM). Encoder forgetting is scored on the similarity structure of these embeddings
(`kftune.retention.forgetting`), and the encoder forms of the remedies keep them:

- distillation: the cosine distance of each sentence's embedding from the base's, on general and/or
  task inputs (feature distillation of sentence embeddings, as in Reimers & Gurevych 2020, "Making
  monolingual sentence embeddings multilingual using knowledge distillation", with the cosine the
  forgetting measure is built on; preserving the old model's outputs on new inputs is Li & Hoiem 2016's
  "Learning without Forgetting").
- EWC: the Fisher of the embedding under a unit Gaussian around it, diag(J^T J), one sampled gradient
  per general row (`gaussian_fisher_loss`): the empirical Fisher of the distance itself is zero at the
  base, where every distance is 0.
"""

from __future__ import annotations

import torch


def head_size(task: str) -> int | None:
    """`num_labels` to load a base classifier with when only its encoder is used (the teacher, the Fisher)."""
    return 2 if task == "sequence_classification" else None


def sentence_rows(lines: list[str], tokenizer, max_length: int) -> list[dict]:
    """General passages as classifier rows (their label is never read: only the embeddings are)."""
    return [
        {"input_ids": tokenizer(line, truncation=True, max_length=max_length)["input_ids"], "labels": 0}
        for line in lines
    ]


def sentence_embeddings(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled last hidden states over each row's tokens, one row per sentence (differentiable). Prompt tuning
    and P-tuning put their virtual tokens before the row's: the row's own are the last positions."""
    mask = batch["attention_mask"]
    hidden = _encoder_output(model, batch)[:, -mask.shape[1] :]
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def _encoder_output(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden states of the model's encoder body (`base_model`, under PEFT's wrapper too), taken by a
    hook while the whole model runs (so prompt learning adds its virtual tokens). Asking the model for
    `output_hidden_states` instead would keep every layer's states until the forward ends, which without
    gradients (the teacher, the forgetting measure) nothing else does."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    taken: list[torch.Tensor] = []
    handle = inner.base_model.register_forward_hook(lambda _module, _args, output: taken.append(output[0]))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return taken[0]


def cosine_distance_sum(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Sum over rows of 1 - cos(student, teacher)."""
    return (1 - torch.nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1)).sum()


def gaussian_fisher_loss(model, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """A loss whose gradient squared is, in expectation over the noise, the Fisher diag(J^T J) of the
    embedding e under N(e, I): 1/2 ||e - (e + noise)||^2 with the target held fixed."""
    embedding = sentence_embeddings(model, batch).float()
    noise = torch.randn(embedding.shape, generator=generator).to(embedding.device)
    return 0.5 * (embedding - (embedding.detach() + noise)).pow(2).sum()
