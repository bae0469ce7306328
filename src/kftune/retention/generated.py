"""The base model's own answers to general prompts: generative replay data, and a forgetting probe.

Each general passage is cut in half; the first half is the prompt, and the base model's greedy
continuation is the answer. Training on such rows (labels on the answer only) keeps the tuned
model producing what the base produced; scoring their likelihood under the tuned model measures how
far it moved from the base's behaviour.
"""

from __future__ import annotations

import torch

from kftune.prompts.packing import IGNORE_INDEX

ANSWER_TOKENS = 24


@torch.no_grad()
def base_answers(model, tokenizer, lines: list[str], max_length: int, batch_size: int = 16) -> list[dict]:
    """Rows `{"input_ids": prompt + answer, "labels": -100 on the prompt, the answer}`, one per line."""
    prompt_length = max(1, max_length - ANSWER_TOKENS)
    prompts = []
    for line in lines:
        ids = tokenizer(line, truncation=True, max_length=max_length)["input_ids"]
        prompts.append(ids[: max(1, min(len(ids) // 2, prompt_length))])
    from kftune.evaluate.evaluate import greedy_token_ids  # evaluate imports this module's users

    was_training = model.training
    model.eval()
    rows = []
    pad = tokenizer.pad_token_id
    for prompt, generated in zip(
        prompts, greedy_token_ids(model, prompts, tokenizer, ANSWER_TOKENS, batch_size), strict=True
    ):
        answer = (
            generated[: generated.index(tokenizer.eos_token_id) + 1]
            if tokenizer.eos_token_id in generated
            else generated
        )
        answer = [t for t in answer if t != pad or t == tokenizer.eos_token_id]
        if answer:
            rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    model.train(was_training)
    return rows
