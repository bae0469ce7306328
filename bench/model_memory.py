"""Per-worker memory of real model sizes on CPU, 2 Ray workers, one invocation, printed as ratios:

- LoRA with bf16 frozen weights against the same run loading fp32 (bar: <= 0.55x), and the lowest ratio
  any loading could reach: that of workers holding only the weights and their imports;
- ZeRO-3 LoRA (bf16), built under deepspeed.zero.Init, against one whole fp32 copy of the model
  (bar: <= 0.6x while building: each worker's high-water mark once model and engine are built, from the
  train log's `peak_gb_when_built`; the whole run's is printed too), and whether the saved adapter reloads
  to the outputs the run recorded;
- the training split at 200,000 rows against 2,000 rows on a small model (bar: within 100 MB);
- evaluation of the bf16 model in one process: what kftune's next-token loss and answer-word scoring hold
  above the loaded weights, against transformers computing the same from the model's full logits.

The model is Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32/8 heads, vocab 128,256, tied
embeddings: 1.24 B parameters, 4.9 GB in fp32), random-initialised once, layer by layer, and saved
as sharded safetensors (`--layers` makes a shallower one when memory is short). Peak RSS is each
worker's VmHWM (the kernel's high-water mark), sampled until the worker exits; anonymous and file
pages are reported apart (memory-mapped data shows up as file pages: page cache, shared).

    python bench/model_memory.py                 # the 1B shape; about 12 GB at the fp32 run's peak
    python bench/model_memory.py --layers 4      # a shallower model of the same width
    python bench/model_memory.py --only evaluation  # one comparison (repeat --only for more)

Results are appended to bench/results/model_memory.jsonl with the exact command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"  # the shipped SST-2 data and stories260K (its tokenizer serves the random model)
STORIES = EXAMPLES / "models" / "stories260K"

LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "max_position_embeddings": 2048,
}
GB = 1e9
COMPARISONS = ("precision", "zero3", "data", "evaluation")
SST2 = EXAMPLES / "data" / "sst2_train_16k.tsv"


def make_model(folder: Path, layers: int) -> int:
    """A random Llama-3.2-1B-shaped model saved one shard per decoder layer (never whole in memory); returns its parameter count."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(".".join(name.split(".")[:3]) if ".layers." in name else name, []).append(name)
    generator = torch.Generator().manual_seed(0)
    index = {}
    for i, names in enumerate(groups.values()):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            n: torch.ones(shapes[n])
            if n.endswith("norm.weight")
            else torch.randn(shapes[n], generator=generator) * 0.02
            for n in names
        }
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        index.update(dict.fromkeys(names, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(folder)
    for file in STORIES.glob("tokenizer*"):
        shutil.copy(file, folder)
    shutil.copy(STORIES / "special_tokens_map.json", folder)
    return sum(torch.Size(s).numel() for s in shapes.values())


def run_config(model: Path, data: Path, rows: int, tmp: Path, **train) -> dict:
    return {
        "model": {"name_or_path": str(model), "task": "causal_lm"},
        "data": {"path": str(data), "columns": {"text": "sentence"}, "max_rows": rows, "split": {"test": 0.1}},
        "prompt": {"template": "text", "max_length": 32},
        "method": {"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"batch_size": 2, "max_steps": 2, "lr": 1e-3, "workers": 2, "log_every_steps": 1, **train},
        "eval": {"metrics": ["perplexity"], "compare_base": False, "forgetting": False},
        "registry": {
            "model_name": "bench",
            "gate": {"metric": "perplexity"},
            "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        },
    }


def memory_status(pid: int | str = "self") -> dict[str, int]:
    """A process's VmHWM (resident high-water mark), RssAnon and RssFile in bytes, from /proc/PID/status."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    status = dict(line.split(":", 1) for line in lines if ":" in line)
    return {key: int(status[key].split()[0]) * 1024 for key in ("VmHWM", "RssAnon", "RssFile")}


def worker_peaks(stop: threading.Event, peaks: dict[int, dict[str, int]]) -> None:
    """Every 0.2 s: `memory_status` of this process's Ray Train workers (high-water marks kept)."""
    while not stop.is_set():
        for process in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" not in " ".join(process.cmdline()):
                    continue
                now = memory_status(process.pid)
            except (psutil.Error, OSError):
                continue
            mine = peaks.setdefault(process.pid, dict.fromkeys(now, 0))
            for key, value in now.items():
                mine[key] = max(mine[key], value)
        time.sleep(0.2)


def worker_floor_bytes() -> int:
    """RSS of a Ray worker that has imported what a LoRA training worker imports, before any weights: what
    the fp32 and the bf16 run both hold besides the model (on the Ray the runs started)."""
    import ray

    @ray.remote
    def imported_rss() -> int:
        import peft  # noqa: F401
        import ray.train.torch  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401

        import kftune.train.loop  # noqa: F401

        return psutil.Process().memory_info().rss

    return ray.get(imported_rss.remote())


def train_and_measure(name: str, config: dict, prompts: Path, tmp: Path) -> dict:
    from kftune.config import parse_config
    from kftune.train.launch import run_training

    peaks: dict[int, dict[str, int]] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=worker_peaks, args=(stop, peaks), daemon=True)
    watcher.start()
    started = time.perf_counter()
    try:
        run_training(parse_config(config), prompts, tmp / name, tmp / f"ray-{name}")
    finally:
        stop.set()
        watcher.join()
    workers = sorted(peaks.values(), key=lambda p: -p["VmHWM"])
    result = {
        "name": name,
        "seconds": round(time.perf_counter() - started, 1),
        "workers_peak_gb": [{k.lower(): round(v / GB, 3) for k, v in w.items()} for w in workers],
    }
    print(json.dumps(result), flush=True)
    return result


def build_prompts(config: dict, folder: Path) -> Path:
    from kftune import steps

    steps.prepare_data(config, str(folder / "data"), str(folder / "card.md"))
    steps.build_prompts(config, str(folder / "data"), str(folder / "prompts"), str(folder / "preview.html"))
    return folder / "prompts"


def many_rows(folder: Path, rows: int) -> Path:
    """SST-2's training phrases, numbered so every row is distinct, repeated up to `rows` rows."""
    lines = SST2.read_text(encoding="utf-8").splitlines()
    header, body = lines[0], lines[1:]
    path = folder / f"sst2_{rows}.tsv"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(header + "\n")
        for i in range(rows):
            sentence, label = body[i % len(body)].rsplit("\t", 1)
            handle.write(f"{sentence} {i}\t{label}\n")
    return path


EVAL_ROWS, EVAL_TOKENS = 8, 256
"""The evaluation batch: rows of random tokens (the loss), or prompts of these lengths and fewer (word scoring)."""


def evaluation_peaks(way: str, model: Path) -> dict[str, float]:
    """In a fresh process: the bf16 model's high-water mark above its loaded size (GB) while computing a
    batch's next-token loss, then while scoring two answer words after each prompt, done `way`:
    "kftune" (`next_token_losses`, `word_scores`) or "transformers" (the model's full logits: its own loss,
    the log-softmax at each prompt's end)."""
    import ctypes

    from kftune.evaluate.evaluate import word_scores
    from kftune.models import load_base_model, load_tokenizer
    from kftune.train.losses import next_token_losses

    loaded = load_base_model(model, "causal_lm", None, 0, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 500, (EVAL_ROWS, EVAL_TOKENS), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    lengths = [EVAL_TOKENS - 16 * i for i in range(EVAL_ROWS)]
    prompts = {
        "input_ids": ids.clone(),
        "attention_mask": (torch.arange(EVAL_TOKENS) < torch.tensor(lengths)[:, None]).long(),
    }
    rows = [{"input_ids": ids[i, :n].tolist(), "labels": [-100] * n} for i, n in enumerate(lengths)]
    tokenizer = load_tokenizer(STORIES)

    def above_loaded(work) -> float:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
        before = psutil.Process().memory_info().rss
        with torch.no_grad():
            work()
        return round((memory_status()["VmHWM"] - before) / GB, 3)

    if way == "kftune":
        return {
            "loss": above_loaded(lambda: next_token_losses(loaded, batch)),
            "word_scores": above_loaded(
                lambda: word_scores(loaded, rows, tokenizer, [[" happy"], [" big"]], "causal_lm", EVAL_ROWS)
            ),
        }
    ends = torch.tensor(lengths) - 1
    return {
        "loss": above_loaded(lambda: loaded(**batch).loss),
        "word_scores": above_loaded(
            lambda: loaded(**prompts).logits.float()[torch.arange(EVAL_ROWS), ends].log_softmax(-1)
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, default=LLAMA_1B["num_hidden_layers"], help="decoder layers (16: Llama-3.2-1B)"
    )
    parser.add_argument(
        "--only",
        choices=COMPARISONS,
        action="append",
        help="run only these comparisons",
    )
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results")
    args = parser.parse_args()
    only = set(args.only or COMPARISONS)
    record = {
        "command": " ".join(["python", "bench/model_memory.py", *sys.argv[1:]]),
        "host": platform.node(),
        "cpus": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / GB, 1),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),  # the code measured
    }
    with tempfile.TemporaryDirectory(prefix="kftune-bench-") as scratch:
        tmp = Path(scratch)
        if only & {"precision", "zero3", "evaluation"}:
            (tmp / "model").mkdir()
            parameters = make_model(tmp / "model", args.layers)
            fp32_copy = parameters * 4
            record["model"] = {"parameters": parameters, "layers": args.layers, "fp32_gb": round(fp32_copy / GB, 2)}
            print(json.dumps(record["model"]), flush=True)
        if only & {"precision", "zero3"}:
            prompts = build_prompts(run_config(tmp / "model", SST2, 200, tmp), tmp / "big")
        if "evaluation" in only:
            spawn = multiprocessing.get_context("spawn")
            ways = {}
            for way in ("kftune", "transformers"):
                with ProcessPoolExecutor(1, mp_context=spawn) as fresh:
                    ways[way] = fresh.submit(evaluation_peaks, way, tmp / "model").result()
            record["evaluation"] = {
                "rows": EVAL_ROWS,
                "tokens": EVAL_TOKENS,
                "gb_above_weights": ways,
                "ratio_kftune_over_transformers": {
                    k: round(ways["kftune"][k] / ways["transformers"][k], 3) for k in ways["kftune"]
                },
            }
            print(json.dumps(record["evaluation"]), flush=True)
        if "precision" in only:
            fp32 = train_and_measure("lora-fp32", run_config(tmp / "model", SST2, 200, tmp), prompts, tmp)
            bf16 = train_and_measure(
                "lora-bf16", run_config(tmp / "model", SST2, 200, tmp, precision="bf16"), prompts, tmp
            )
            ratio = max(w["vmhwm"] for w in bf16["workers_peak_gb"]) / max(w["vmhwm"] for w in fp32["workers_peak_gb"])
            floor = worker_floor_bytes()
            record["precision"] = {
                "fp32": fp32,
                "bf16": bf16,
                "peak_ratio_bf16_over_fp32": round(ratio, 3),
                "bar": 0.55,
                "worker_floor_gb": round(floor / GB, 3),
                # the ratio of a worker holding the weights and nothing else besides its imports
                "floor_ratio": round((parameters * 2 + floor) / (fp32_copy + floor), 3),
            }
        if "zero3" in only:
            zero3 = train_and_measure(
                "zero3-lora-bf16",
                run_config(tmp / "model", SST2, 200, tmp, precision="bf16", deepspeed={"stage": 3}),
                prompts,
                tmp,
            )
            built = json.loads((tmp / "zero3-lora-bf16" / "train_log.json").read_text())["peak_gb_when_built"]
            record["zero3"] = {
                **zero3,
                "peak_over_fp32_copy": [round(w["vmhwm"] * GB / fp32_copy, 3) for w in zero3["workers_peak_gb"]],
                "built_peak_gb": built,  # each worker's high-water mark once model and engine were built
                "built_peak_over_fp32_copy": [round(w["host_rss"] * GB / fp32_copy, 3) for w in built],
                "bar": 0.6,
                "reloads_to_recorded_outputs": reloads(tmp / "zero3-lora-bf16", prompts),
            }
        if "data" in only:
            sizes = {}
            for rows in (2_000, 200_000):
                data = many_rows(tmp, rows)
                config = run_config(STORIES, data, rows, tmp)
                sizes[rows] = train_and_measure(f"data-{rows}", config, build_prompts(config, tmp / f"rows{rows}"), tmp)
            small, large = (max(w["vmhwm"] for w in sizes[n]["workers_peak_gb"]) for n in (2_000, 200_000))
            record["data"] = {
                "2000_rows": sizes[2_000],
                "200000_rows": sizes[200_000],
                "peak_difference_mb": round((large - small) * 1000, 1),
                "bar_mb": 100,
            }
    print(json.dumps({k: v for k, v in record.items() if k in COMPARISONS}, indent=1))
    if not args.no_save:
        with open(REPO / "bench" / "results" / "model_memory.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


def reloads(model_dir: Path, prompts: Path) -> bool:
    """The saved adapter on a freshly loaded base gives the probe outputs the run recorded."""
    from kftune.models import load_tuned_model
    from kftune.prompts.build import read_meta, read_prompts
    from kftune.train.loop import PROBE_FILE, PROBE_ROWS, probe_outputs

    rows = read_prompts(prompts, "test")[:PROBE_ROWS]
    outputs = probe_outputs(load_tuned_model(model_dir), rows, read_meta(prompts)["pad_token_id"], "causal_lm")
    expected = json.loads((model_dir / PROBE_FILE).read_text())["outputs"]
    return bool(torch.allclose(torch.tensor(outputs), torch.tensor(expected), rtol=1e-4))


if __name__ == "__main__":
    sys.exit(main())
