"""bench/methods_table.py times its rows, so it runs alone: it refuses a busy machine before any work (its sweeps
included), and its table and records carry seconds per optimizer step and the swept grid each rate was chosen
from. (The table itself takes hours; it is not run here.)"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

from methods_table import TABLES, grid_rates, markdown, past_the_edge, rate_text  # noqa: E402
from step_tables import RESULTS, busy_machine  # noqa: E402


def test_a_busy_machine_is_refused_before_any_work_or_marked_in_every_record():
    record = RESULTS / "methods.jsonl"
    before = record.read_bytes() if record.exists() else b""
    done = subprocess.run(  # a load average is never below -1: the machine counts as busy
        [sys.executable, str(BENCH / "methods_table.py"), "minilm", "--max-load", "-1", "lora r8 q,v"],
        capture_output=True,
        text=True,
        timeout=30,  # the refusal comes before any work; were it gone, the table would start
    )
    assert done.returncode != 0 and "the machine is busy: 1-minute load average" in done.stderr
    assert "--allow-busy" in done.stderr
    assert (record.read_bytes() if record.exists() else b"") == before
    marked = busy_machine(-1, allow_busy=True)
    assert marked["max_load"] == -1 and marked["load_average_1m"] >= 0
    assert busy_machine(1e9, allow_busy=False) is None


def test_the_table_shows_seconds_per_step_and_the_grid_each_rate_was_chosen_from():
    chosen_by = {"lr": 1e-3, "space": {"train.lr": "grid(1e-3, 3e-3, 1e-2, 3e-2)"}}
    row = {"row": "bitfit", "lr": 1e-3, "lr_chosen_by": chosen_by, "trainable": 10, "trainable_percent": 0.1}
    record = {**row, "test": {"perplexity": 12.5, "rouge_l": 0.25}, "train_seconds": 12.0, "seconds_per_step": 0.1875}
    table = markdown(TABLES["stories260K"], [{**record, "artifact_mb": 0.1}])
    assert "| test perplexity | test rouge_l |" in table and "| s/step |" in table
    assert "| **0.001**† of 1e-3, 3e-3, 1e-2, 3e-2 | 12.5000 | 0.2500 |" in table  # at the grid's edge
    assert "| 12.0 | 0.188 | 0.10 |" in table
    inside = markdown(TABLES["stories260K"], [{**record, "lr": 3e-3, "artifact_mb": 0.1}])
    assert "| **0.003** of 1e-3, 3e-3, 1e-2, 3e-2 |" in inside


def test_a_best_rate_on_the_grids_edge_extends_the_sweep_two_rates_further_that_way():
    assert past_the_edge(3e-4, grid_rates("grid(1e-5, 3e-5, 1e-4, 3e-4)")) == "grid(1e-3, 3e-3)"
    assert past_the_edge(1e-2, grid_rates("grid(1.0, 3e-1, 1e-1, 3e-2, 1e-2)")) == "grid(3e-3, 1e-3)"
    assert past_the_edge(0.3, [1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3]) == "grid(1, 3)"
    assert past_the_edge(3e-3, [1e-3, 3e-3, 0.01, 0.03]) is None
    assert [rate_text(rate) for rate in (1e-5, 3e-4, 0.1, 1.0, 3.0, 10.0)] == ["1e-5", "3e-4", "1e-1", "1", "3", "1e1"]


def test_the_long_table_sweeps_the_minilm_rows_again_at_its_own_budget():
    short, long = TABLES["minilm"], TABLES["minilm-long"]
    assert all(long.rows[row] == short.rows[row] for row in long.rows)
    changed = set(long.budget) - set(short.budget)
    assert changed == {"data.max_rows=8000", "train.epochs=2"}  # each once: no earlier value left to override
    assert len(long.budget) == len(short.budget)
    assert set(long.sweep_budget) - set(short.sweep_budget) == {"train.eval_every_steps=50"}
    assert len(long.sweep_budget) == len(short.sweep_budget)
