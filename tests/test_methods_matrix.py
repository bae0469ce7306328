"""Every method on both model families: the pretrained MiniLM encoder (SST-2 classification) and the
pretrained stories260K Llama (causal LM). For each: exactly the intended parameters get gradients,
everything else is bit-identical after a few AdamW steps, the loss falls on a small real batch,
and the saved artifact reloads to the same outputs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from kftune.methods import apply_method, calibrate_method, on_step, optimizer_parameter_groups, save_tuned_model
from kftune.methods.base import METHODS
from kftune.models import TUNED_CONFIG_FILE, load_base_model, load_tuned_model

STEPS = 4

HEAD = r"^(classifier|score)\."
MINILM_LAYER = r"^bert\.encoder\.layer\.(\d+)\."
STORIES_LAYER = r"^model\.layers\.(\d+)\."


def layers(pattern: str, chosen) -> str:
    return pattern.replace(r"(\d+)", "(" + "|".join(map(str, chosen)) + ")")


# method options, learning rate, and per family the regex of the parameters that must train
# (None: the method does not apply to that family)
CASES = {
    "full": ({"name": "full"}, 1e-4, {"minilm": r".", "stories": r"."}),
    "head_only": ({"name": "head_only"}, 1e-2, {"minilm": HEAD, "stories": None}),
    "freeze_bottom": (
        {"name": "freeze_bottom", "layers": 4},
        1e-4,
        {
            "minilm": layers(MINILM_LAYER, [4, 5]) + r"|^bert\.pooler\.|" + HEAD,
            "stories": layers(STORIES_LAYER, [4]) + r"|^model\.norm\.|^lm_head\.",
        },
    ),
    "train_top": (
        {"name": "train_top", "layers": 1},
        1e-4,
        {
            "minilm": layers(MINILM_LAYER, [5]) + r"|^bert\.pooler\.|" + HEAD,
            "stories": layers(STORIES_LAYER, [4]) + r"|^model\.norm\.|^lm_head\.",
        },
    ),
    "layer_range": (
        {"name": "layer_range", "start": 1, "end": 3},
        1e-4,
        {"minilm": layers(MINILM_LAYER, [1, 2]) + "|" + HEAD, "stories": layers(STORIES_LAYER, [1, 2])},
    ),
    "gradual_unfreeze": (
        {"name": "gradual_unfreeze", "start_layers": 1, "every_steps": 2},
        1e-4,
        {
            "minilm": layers(MINILM_LAYER, [4, 5]) + r"|^bert\.pooler\.|" + HEAD,
            "stories": layers(STORIES_LAYER, [3, 4]) + r"|^model\.norm\.|^lm_head\.",
        },
    ),
    "attention_only": (
        {"name": "attention_only"},
        1e-4,
        {
            "minilm": r"attention\.(self\.(query|key|value)|output\.dense)\.|" + HEAD,
            "stories": r"self_attn\.[qkvo]_proj\.",
        },
    ),
    "attention_heads": (
        {"name": "attention_only", "heads": [1, 6]},
        1e-3,
        {
            "minilm": r"attention\.(self\.(query|key|value)|output\.dense)\.weight|attention\.self\.(query|key|value)\.bias|"
            + HEAD,
            "stories": r"self_attn\.[qkvo]_proj\.",
        },
    ),
    "bitfit": ({"name": "bitfit"}, 1e-3, {"minilm": r"\.bias$|" + HEAD, "stories": None}),
    "subnetwork": (
        {"name": "subnetwork", "fraction": 0.1},
        1e-3,
        {
            "minilm": MINILM_LAYER + r".*weight$(?<!LayerNorm\.weight)|" + HEAD,
            "stories": STORIES_LAYER + r".*proj\.weight$",
        },
    ),
    "subnetwork_gradient": (
        {"name": "subnetwork", "fraction": 0.1, "score": "gradient"},
        1e-3,
        {
            "minilm": MINILM_LAYER + r".*weight$(?<!LayerNorm\.weight)|" + HEAD,
            "stories": STORIES_LAYER + r".*proj\.weight$",
        },
    ),
    "lora": ({"name": "lora", "r": 4}, 1e-3, {"minilm": r"lora_|modules_to_save", "stories": r"lora_"}),
    "lora_merged": (
        {"name": "lora", "r": 4, "merge": True, "use_rslora": True},
        1e-3,
        {"minilm": r"lora_|modules_to_save", "stories": r"lora_"},
    ),
    "dora": (
        {"name": "lora", "r": 4, "use_dora": True},
        1e-3,
        {"minilm": r"lora_|modules_to_save", "stories": r"lora_"},
    ),
    "ia3": ({"name": "ia3"}, 1e-2, {"minilm": r"ia3_l|modules_to_save", "stories": r"ia3_l"}),
    "prefix_tuning": (
        {"name": "prefix_tuning", "virtual_tokens": 4},
        1e-2,
        {"minilm": r"prompt_encoder|modules_to_save", "stories": r"prompt_encoder"},
    ),
    "prompt_tuning": (
        {"name": "prompt_tuning", "virtual_tokens": 4},
        1e-2,
        {"minilm": r"prompt_encoder|modules_to_save", "stories": r"prompt_encoder"},
    ),
    "prompt_tuning_text": (
        {"name": "prompt_tuning", "virtual_tokens": 4, "init": "text", "init_text": "the mood is"},
        1e-2,
        {"minilm": r"prompt_encoder|modules_to_save", "stories": r"prompt_encoder"},
    ),
    "p_tuning": (
        {"name": "p_tuning", "virtual_tokens": 4, "encoder_size": 32},
        1e-2,
        {"minilm": r"prompt_encoder|modules_to_save", "stories": r"prompt_encoder"},
    ),
    "adapter": (
        {"name": "adapter", "reduction_factor": 8},
        1e-3,
        {"minilm": r"\.adapter\.|LayerNorm|" + HEAD, "stories": r"\.adapter\.|layernorm|^model\.norm\."},
    ),
    "adapter_pfeiffer": (
        {"name": "adapter", "placement": "pfeiffer"},
        1e-3,
        {
            "minilm": r"\.output\.dense\.adapter\.|LayerNorm|" + HEAD,
            "stories": r"mlp\.down_proj\.adapter\.|layernorm|^model\.norm\.",
        },
    ),
    "layer_prompt": (
        {"name": "layer_prompt"},
        1e-2,
        {"minilm": r"\.layer_prompt(_kv)?$|" + HEAD, "stories": r"\.layer_prompt(_kv)?$"},
    ),
}


def outputs(model, batch, task):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return (
        logits if task == "sequence_classification" else logits[:, -batch["input_ids"].shape[1] :]
    )  # past any virtual tokens


@pytest.mark.parametrize("family", ["minilm", "stories"])
@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_exactly_its_parameters_and_reloads(case, family, families, tmp_path):
    options_data, lr, expected = CASES[case]
    if expected[family] is None:
        pytest.skip(f"{options_data['name']} does not apply to {family}")
    path, task, num_labels, batch = families[family]
    options = METHODS[options_data["name"]].options.model_validate(options_data)
    model = apply_method(load_base_model(path, task, num_labels, 0), options, task).eval()  # eval: no dropout noise
    calibrate_method(model, options, lambda rows: model(**{k: v[:rows] for k, v in batch.items()}).loss)
    intended = {name for name, _ in model.named_parameters() if re.search(expected[family], name)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_parameter_groups(model, options, lr), lr=lr, weight_decay=0.0)

    losses = []
    for step in range(1, STEPS + 1):
        loss = model(**batch).loss
        loss.backward()
        if step == 1 and options.name != "gradual_unfreeze":
            assert {name for name, p in model.named_parameters() if p.grad is not None} == intended
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        on_step(model, options, step)
        losses.append(loss.item())
    assert model(**batch).loss.item() < losses[0], losses

    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed == intended, sorted(changed ^ intended)[:5]
    for name, parameter in model.named_parameters():
        if hasattr(parameter, "gradient_mask"):  # masked-out entries are bit-identical too
            assert torch.equal(parameter.detach()[~parameter.gradient_mask], before[name][~parameter.gradient_mask]), (
                name
            )

    save_tuned_model(model, options, tmp_path)
    (tmp_path / TUNED_CONFIG_FILE).write_text(
        json.dumps(
            {
                "model": {"name_or_path": str(path), "task": task, "num_labels": num_labels},
                "train": {"seed": 0},
                "method": options.model_dump(),
            }
        )
    )
    torch.testing.assert_close(
        outputs(load_tuned_model(tmp_path), batch, task), outputs(model, batch, task), atol=1e-5, rtol=1e-4
    )


def test_gradient_scored_subnetwork_keeps_the_entries_with_the_largest_squared_task_gradient(families):
    path, task, num_labels, batch = families["stories"]
    options = METHODS["subnetwork"].options.model_validate(
        {"name": "subnetwork", "fraction": 0.05, "score": "gradient", "score_rows": 2}
    )
    reference = load_base_model(path, task, num_labels, 0)
    reference(**{k: v[:2] for k, v in batch.items()}).loss.backward()
    model = apply_method(load_base_model(path, task, num_labels, 0), options, task)
    calibrate_method(model, options, lambda rows: model(**{k: v[:rows] for k, v in batch.items()}).loss)
    name = "model.layers.2.mlp.up_proj.weight"
    mask = dict(model.named_parameters())[name].gradient_mask
    scores = dict(reference.named_parameters())[name].grad ** 2
    assert mask.sum() == round(0.05 * mask.numel())
    assert scores[mask].min() >= scores[~mask].max()  # exactly the top entries by squared gradient
    magnitude = dict(reference.named_parameters())[name].detach().abs()
    assert not torch.equal(
        mask, magnitude >= magnitude.flatten().topk(int(mask.sum())).values[-1]
    )  # not the magnitude mask
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no gradient behind
