"""bench/train_throughput.py end to end on cells small enough for CI: a sweep writes one record per
cell with wall and CPU timings, a second sweep resumes instead of measuring again, and the report
tabulates either measure with the ratio to the tiled softmax."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO_DIR

SCRIPT = REPO_DIR / "bench" / "train_throughput.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600)


def test_sweep_resume_and_report(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    sweep = ["--shapes", "tiny", "--variants", "polysketch-random,softmax-tiled", "--lengths",
             "128,256", "--chunk", "64", "--threads", "1", "--results", str(results)]
    proc = run(*sweep)
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((r["variant"], r["n"]) for r in recs) == [
        ("polysketch-random", 128), ("polysketch-random", 256), ("softmax-tiled", 128),
        ("softmax-tiled", 256)]
    for r in recs:
        assert r["batch"] == 1 and len(r["step_seconds"]) == len(r["step_cpu_seconds"]) == 1
        assert r["tokens_per_s"] == r["n"] / r["step_seconds"][0]
        assert r["tokens_per_cpu_s"] == r["n"] / r["step_cpu_seconds"][0]
        assert r["step_cpu_seconds"][0] > 0
        assert r["heap"] == "kept"  # the default, as train.py runs
        assert r["recompute_sketch"] is False

    again = run(*sweep)  # every cell is in the results: nothing is measured twice
    assert again.returncode == 0 and again.stdout.count("already in") == 4, again.stdout
    assert len(results.read_text().splitlines()) == 4

    table = tmp_path / "table.md"
    proc = run("--report", str(results), "--measure", "cpu", "--table", str(table))
    assert proc.returncode == 0, proc.stderr
    text = table.read_text()
    assert "tokens per CPU-second" in text
    by = {(r["variant"], r["n"]): r for r in recs}
    ratio = by[("polysketch-random", 256)]["tokens_per_cpu_s"] / by[("softmax-tiled", 256)][
        "tokens_per_cpu_s"]
    row = next(line for line in text.splitlines()
               if line.startswith("| polysketch-random / softmax-tiled |"))
    assert row.split("|")[3].strip() == f"{ratio:.2f}x"


def test_cpu_report_refuses_records_without_cpu_time(tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"shape": "tiny", "variant": "softmax-tiled", "n": 1024,
                               "batch": 1, "threads": 2, "tokens_per_s": 100.0,
                               "activation_peak_bytes": 1, "params": 1}) + "\n")
    # Records from before the heap setting was recorded ran with glibc's defaults.
    proc = run("--report", str(old), "--measure", "cpu", "--heap", "glibc-default")
    assert proc.returncode != 0
    assert "1 results lack tokens_per_cpu_s" in proc.stderr
    assert run("--report", str(old), "--measure", "wall", "--heap",
               "glibc-default").returncode == 0


def test_report_tabulates_one_heap_setting(tmp_path: Path) -> None:
    results = tmp_path / "mixed.jsonl"
    base = {"shape": "tiny", "variant": "softmax-tiled", "n": 1024, "batch": 1, "threads": 2,
            "activation_peak_bytes": 1, "params": 1}
    results.write_text(json.dumps({**base, "tokens_per_s": 111.0}) + "\n" +
                       json.dumps({**base, "tokens_per_s": 222.0, "heap": "kept"}) + "\n")
    kept = run("--report", str(results))
    assert kept.returncode == 0, kept.stderr
    assert "heap kept" in kept.stdout and "| 222 (0) |" in kept.stdout
    assert "111" not in kept.stdout
    default = run("--report", str(results), "--heap", "glibc-default")
    assert default.returncode == 0, default.stderr
    assert "| 111 (0) |" in default.stdout and "222" not in default.stdout
    recomputed = tmp_path / "recomputed.jsonl"
    learned = {**base, "variant": "polysketch-learned-local", "heap": "kept"}
    recomputed.write_text(json.dumps({**learned, "tokens_per_s": 50.0}) + "\n" +
                          json.dumps({**learned, "tokens_per_s": 40.0,
                                      "recompute_sketch": True}) + "\n")
    both = run("--report", str(recomputed))
    assert both.returncode == 0, both.stderr
    assert "| polysketch-learned-local | 50 (0) |" in both.stdout
    assert "| polysketch-learned-local (sketch recomputed) | 40 (0) |" in both.stdout
    only_default = tmp_path / "old.jsonl"
    only_default.write_text(json.dumps({**base, "tokens_per_s": 111.0}) + "\n")
    none = run("--report", str(only_default))
    assert none.returncode != 0 and "with --heap kept" in none.stderr


def test_recompute_sketch_reaches_the_cell_and_marks_its_row(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    sweep = ["--shapes", "tiny", "--variants", "polysketch-learned-local", "--lengths", "128",
             "--chunk", "64", "--threads", "1", "--results", str(results)]
    for extra in ([], ["--recompute-sketch"]):
        proc = run(*sweep, *extra)
        assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["recompute_sketch"] for r in recs] == [False, True]  # two cells, not one resumed
    table = run("--report", str(results))
    assert table.returncode == 0, table.stderr
    assert "| polysketch-learned-local (sketch recomputed) |" in table.stdout
