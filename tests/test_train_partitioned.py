"""ZeRO-3 from checkpoint to artifact over two real processes (gloo, DeepSpeed on the CPU) on stories260K.
Each worker builds the model partitioned and reads only its partition of every tensor from the
safetensors file; the partitions together are the checkpoint. After a training step, full fine-tuning
streams a normal Hugging Face folder of safetensors shards that transformers alone reloads to the
outputs of the partitioned model (the weights `train.keep_best` kept, partition by partition, not the
last step's); a LoRA run writes only its adapter, which reloads to them too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import STORIES, STORY_ROWS, free_port

FILE = STORIES / "model.safetensors"
SHARD_BYTES = 300_000  # stories260K's 1 MB of fp32 weights in several shards


def bytes_read() -> int:
    """Bytes this process has read through read/pread calls (`rchar`, proc(5))."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def run_config(method: dict, precision: str, ds_config: Path, model: Path = STORIES):
    from kftune.config import parse_config

    return parse_config(
        {
            "model": {"name_or_path": str(model), "task": "causal_lm"},
            "data": {"path": "unused.tsv", "split": {"test": 0.1}},
            "prompt": {"template": "text"},
            "method": method,
            "train": {
                "batch_size": 4,
                "workers": 2,
                "lr": 1e-2,
                "precision": precision,
                "deepspeed": {"stage": 3, "config_file": str(ds_config)},
            },
            "eval": {"metrics": ["perplexity"]},
            "registry": {"model_name": "t", "gate": {"metric": "perplexity"}},
        }
    )


def worker(rank: int, port: int, out: Path) -> None:
    """One of two workers: build twice (the second build's reads are measured, past any first-use
    imports), train a step, save the artifact, record the partitioned model's logits."""
    from kftune.alignment.losses import sequence_logps
    from kftune.config import config_to_dict
    from kftune.methods import optimizer_parameter_groups
    from kftune.models import TUNED_CONFIG_FILE, load_tokenizer
    from kftune.train import partitioned
    from kftune.train.engines import make_engine, partitioned_construction
    from kftune.train.loop import build_model
    from kftune.train.losses import summed_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    partitioned.SHARD_BYTES = SHARD_BYTES
    partitioned.READ_ELEMENTS = 1000  # each partition read in several pieces, the last one short
    encoded = load_tokenizer(STORIES)(STORY_ROWS[:4], padding=True, return_tensors="pt")
    batch = {**encoded, "labels": encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)}
    ds_config = out / "ds.json"  # every parameter partitioned, however small
    for name, method, precision in (
        ("full", {"name": "full"}, "fp32"),
        ("lora", {"name": "lora", "r": 4}, "bf16"),
        ("merged", {"name": "lora", "r": 4, "merge": True}, "fp32"),
    ):
        config = run_config(method, precision, ds_config)
        with partitioned_construction(config.train, 2, config.method.name):
            build_model(config, None, for_training=True)
            before = bytes_read()
            model = build_model(config, None, for_training=True)
            read = bytes_read() - before
        partitions = {n: p.ds_tensor.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        whole = [n for n, p in model.named_parameters() if p.data.numel() and "lora_" not in n]  # LoRA's are new
        groups = optimizer_parameter_groups(model, config.method, 1e-2)
        engine = make_engine(model, groups, config.train, 2, 2, torch.device("cpu"))  # 2 steps: both move weights
        anchor = ewc_anchor(engine.module, rank) if name == "full" else None  # theta_0: the base's partitions
        engine.backward(summed_loss(engine.model, batch, "causal_lm") / 100)
        engine.step()
        kept, last, penalties = None, None, None
        if name == "full":  # train.keep_best: this step's weights are kept, a later step's are not saved
            kept = engine.kept_state(rank)
            engine.backward(summed_loss(engine.model, batch, "causal_lm") / 100)
            penalties = (anchor.add_partition_gradients(1.0).item(), whole_penalty(engine.module))
            engine.step()
            last = logits_of(engine.module, batch)
        partitioned.save_partitioned(engine.module, config.method, out / name, rank, kept)
        if rank == 0:  # the run config kftune's reload reads (the loop writes it with the run's other files)
            (out / name / TUNED_CONFIG_FILE).write_text(json.dumps(config_to_dict(config)))
        run = {"read": read, "partitions": partitions, "whole": whole, "logits": logits_of(engine.module, batch)}
        run |= {"batch": batch, "last_logits": last, "kept_numel": sum(t.numel() for t in (kept or {}).values())}
        run["penalties"] = penalties
        torch.save(run, out / f"{name}-{rank}.pt")
        engine.engine.destroy()
    # A frozen reference (KTO's, distillation's teacher) for a method that trains the whole model
    reference = partitioned.frozen_partitioned_copy(run_config({"name": "full"}, "fp32", ds_config), None)
    scored = {
        "logps": sequence_logps(reference, batch)[0],
        "whole": [n for n, p in reference.named_parameters() if p.data.numel()],
    }
    torch.save(scored, out / f"reference-{rank}.pt")
    # A model whose output layer is tied to its embedding (Llama-3.2-1B's), whose checkpoint has no lm_head
    initialised = []
    initialize_missing = partitioned.initialize_missing
    partitioned.initialize_missing = lambda model, names: (initialised.extend(names), initialize_missing(model, names))
    tied = partitioned.frozen_partitioned_copy(run_config({"name": "full"}, "fp32", ds_config, out / "tied"), None)
    scored = {
        "logps": sequence_logps(tied, batch)[0],
        "initialised": initialised,
        "shared": tied.lm_head.weight is tied.model.embed_tokens.weight,
    }
    torch.save(scored, out / f"tied-{rank}.pt")


def test_the_anchor_keeps_theta_0_and_the_fisher_per_partition_and_sums_the_whole_penalty(two_workers):
    """L2-SP/EWC under ZeRO-3: each worker holds its partitions of theta_0 (DeepSpeed's fp32 master copy when
    the engine was built) and of the Fisher (sent by rank 0); their penalties sum to the whole weights' one."""
    for rank in (0, 1):
        from_partitions, whole = recorded(two_workers, "full", rank)["penalties"]
        assert whole > 0 and from_partitions == pytest.approx(whole, rel=1e-5)


def test_a_tied_output_layer_shares_the_embeddings_partition_and_is_never_initialised(two_workers):
    """Tied before the partitions are filled: the output layer is not "missing" from the checkpoint, so no
    worker gathers it whole to initialise it (a 0.5 GB transient on Llama-3.2-1B) only for tying to replace it."""
    from transformers import AutoModelForCausalLM

    from kftune.alignment.losses import sequence_logps

    batch = recorded(two_workers, "full", 0)["batch"]
    with torch.no_grad():
        expected, _ = sequence_logps(AutoModelForCausalLM.from_pretrained(two_workers / "tied").eval(), batch)
    for rank in (0, 1):
        tied = torch.load(two_workers / f"tied-{rank}.pt", weights_only=False)
        assert tied["shared"] and tied["initialised"] == []
        assert torch.allclose(tied["logps"], expected, atol=1e-4), (tied["logps"], expected)


def test_a_frozen_reference_copy_is_partitioned_and_scores_like_the_whole_base(two_workers):
    from kftune.alignment.losses import sequence_logps
    from kftune.models import load_base_model

    ranks = [torch.load(two_workers / f"reference-{rank}.pt", weights_only=False) for rank in (0, 1)]
    batch = recorded(two_workers, "full", 0)["batch"]
    with torch.no_grad():
        expected, _ = sequence_logps(load_base_model(STORIES, "causal_lm", None, 0).eval(), batch)
    for rank in ranks:
        assert rank["whole"] == []  # no parameter of the copy is whole on a worker
        assert torch.allclose(rank["logps"], expected, atol=1e-4), (rank["logps"], expected)


def logits_of(model, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    model.train()
    return logits


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3")
    for name in ("full", "lora", "merged"):
        (out / name).mkdir()
    (out / "ds.json").write_text(
        json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    )
    tied_copy_of_stories(out / "tied")
    torch.multiprocessing.start_processes(worker, args=(free_port(), out), nprocs=2, start_method="spawn")
    return out


ALPHA, STRENGTH = 0.5, 2.0


def made_up_fisher(name: str, shape) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(len(name)))


def ewc_anchor(module, rank: int):
    """L2-SP and EWC on every weight of a full fine-tune: the Fisher on rank 0 only, as training hands it."""
    from kftune.retention.anchor import Anchor, anchored_weights

    weights = anchored_weights(module, [p for p in module.parameters() if p.requires_grad], set())
    fisher = {w.name: made_up_fisher(w.name, w.parameter.ds_shape) for w in weights} if rank == 0 else None
    return Anchor(weights, ALPHA, STRENGTH, fisher, "retention.ewc")


def whole_penalty(module) -> float:
    """The same penalty from the whole weights, gathered, against the checkpoint's."""
    import deepspeed
    from safetensors.torch import load_file

    base = load_file(str(FILE))
    parameters = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(parameters.values())):
        return sum(
            0.5 * ((ALPHA + STRENGTH * made_up_fisher(n, p.shape)) * (p.detach() - base[n]).pow(2)).sum().item()
            for n, p in parameters.items()
        )


def tied_copy_of_stories(folder: Path) -> None:
    """stories260K with its output layer tied to the embedding, saved as tied checkpoints are: without lm_head."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    config = json.loads((STORIES / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = {k: v for k, v in load_file(str(FILE)).items() if k != "lm_head.weight"}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def recorded(out: Path, name: str, rank: int) -> dict:
    return torch.load(out / f"{name}-{rank}.pt", weights_only=False)


@pytest.mark.parametrize(("name", "dtype"), [("full", torch.float32), ("lora", torch.bfloat16)])
def test_each_worker_reads_only_its_partition_of_the_checkpoint(two_workers, name, dtype):
    from safetensors.torch import load_file

    checkpoint = load_file(str(FILE))
    ranks = [recorded(two_workers, name, rank) for rank in (0, 1)]
    for rank in ranks:
        assert rank["whole"] == []  # no parameter was ever whole in the built model
        assert rank["read"] < 0.6 * FILE.stat().st_size, rank["read"]  # its half, the header and config.json
    assert ranks[0]["read"] > 0.4 * FILE.stat().st_size
    for key, tensor in checkpoint.items():
        pieces = [rank["partitions"].get(key, rank["partitions"].get(f"base_model.model.{key}")) for rank in ranks]
        if pieces[0] is None:  # LoRA wraps the linear layers: their weight is ...base_layer.weight
            stem, leaf = key.rsplit(".", 1)
            pieces = [rank["partitions"][f"base_model.model.{stem}.base_layer.{leaf}"] for rank in ranks]
        assert torch.equal(torch.cat(pieces)[: tensor.numel()], tensor.to(dtype).flatten()), key


@pytest.mark.parametrize("name", ["full", "merged"])
def test_streamed_whole_model_is_a_folder_transformers_alone_reloads_to_the_same_outputs(two_workers, name):
    """Full fine-tuning, and LoRA merged layer by layer in the partitions (`method.merge`)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = two_workers / name
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert all(shard.stat().st_size < 2 * SHARD_BYTES for shard in shards)  # written as gathered, a shard at a time
    names = {key for shard in shards for key in load_file(str(shard))}
    assert names == set(load_file(str(FILE)))  # the base model's tensors, no LoRA ones
    run = recorded(two_workers, name, 0)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    batch = run["batch"]
    with torch.no_grad():
        logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(logits, run["logits"], atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(STORIES)
    with torch.no_grad():
        untrained = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(untrained, run["logits"], atol=1e-3)  # the step moved the weights that were saved
    if name == "full":  # keep_best's weights, copied partition by partition, not the last step's
        assert not torch.allclose(run["last_logits"], run["logits"], atol=1e-3)
        whole = sum(t.numel() for t in load_file(str(FILE)).values())
        assert 0 < run["kept_numel"] < 0.51 * whole and 0 < recorded(two_workers, name, 1)["kept_numel"] < 0.51 * whole


def test_partitioned_lora_run_saves_only_its_adapter_which_reloads_to_the_same_outputs(two_workers):
    """Reloaded as kftune reloads it (`load_tuned_model`): the base in bf16, the adapter cast to it, the
    RoPE frequencies (buffers) left in fp32 as they trained; a whole-module `.to(bf16)` would round them."""
    from safetensors.torch import load_file

    from kftune.models import load_tuned_model

    folder = two_workers / "lora"
    assert not list(folder.glob("model*.safetensors"))
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)
    run = recorded(two_workers, "lora", 0)
    reloaded = load_tuned_model(folder)
    batch = run["batch"]
    with torch.no_grad():
        logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert torch.allclose(logits, run["logits"], atol=1e-5), (logits - run["logits"]).abs().max()
