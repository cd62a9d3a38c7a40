"""The trainer (train/train.py) end to end on a tiny corpus and model: what a run writes, resume
after a stop being bit-for-bit the uninterrupted run, and the refusal of a foreign checkpoint.

Runs call train.main() in this process (a subprocess would spend seconds importing torch)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

import train

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, "
        "and void; and darkness was upon the face of the deep.\n")
HELDOUT = ("Blessed are the poor in spirit: for theirs is the kingdom of heaven. Blessed are they "
           "that mourn: for they shall be comforted.\n")
MODEL: Dict[str, Any] = {
    "architecture": "polysketchformer", "vocab_size": 256, "d_model": 16, "n_layers": 1,
    "n_heads": 2, "max_seq_len": 32,
    "attention": {"kind": "polysketch", "sketch": "learned", "sketch_size": 4,
                  "local_exact": True, "block_size": 8},
}
TRAIN: Dict[str, Any] = {"seq_len": 32, "batch_size": 2, "steps": 6, "eval_every": 3,
                         "eval_windows": 4, "ckpt_every": 3, "warmup_steps": 2}
STEPS = TRAIN["steps"]


def write_config(path: Path, model: Dict[str, Any]) -> Path:
    path.write_text(json.dumps({"model": model, "train": TRAIN}))
    return path


def run_train(config: Path, out: Path, data: Path, *extra: str) -> str:
    """train.main() with these arguments; returns what it printed. SystemExit propagates."""
    argv = ["train.py", "--config", str(config), "--out", str(out), "--data", str(data),
            "--device", "cpu", *extra]
    stdout = io.StringIO()
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(stdout):
            train.main()
    finally:
        sys.argv = saved
    return stdout.getvalue()


def read_log(out: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def timeless(log: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Log records without their (timing-dependent) throughput."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]


def load_ckpt(out: Path) -> Dict[str, Any]:
    return torch.load(out / "ckpt.pt", map_location="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """A corpus (~4 KB), the run config, and one uninterrupted run of STEPS steps."""
    root = tmp_path_factory.mktemp("train")
    data = root / "corpus"
    data.mkdir()
    (data / "train.txt").write_text(TEXT * 30)
    (data / "heldout.txt").write_text(HELDOUT * 8)
    config = write_config(root / "run.json", MODEL)
    out = root / "run"
    stdout = run_train(config, out, data)
    (root / "stdout.txt").write_text(stdout)
    return {"root": root, "data": data, "config": config, "out": out,
            "stdout": root / "stdout.txt"}


def test_run_writes_checkpoint_log_and_progress(trained: Dict[str, Path]) -> None:
    out = trained["out"]
    ck = load_ckpt(out)
    assert ck["step"] == STEPS
    assert ck["model_config"] == train.ModelConfig.from_json(MODEL).to_json()
    assert ck["train_config"]["steps"] == STEPS
    assert [h["step"] for h in ck["history"]] == [3, 6]

    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    for r in log:
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and math.isfinite(r["grad_norm"])
    evals = {r["step"]: r["heldout_bpb"] for r in log if "heldout_bpb" in r}
    assert sorted(evals) == [3, 6]
    assert all(0 < bpb < 16 for bpb in evals.values())
    assert evals == {h["step"]: h["heldout_bpb"] for h in ck["history"]}
    # Warm-up of 2 steps, then cosine decay to min_lr_ratio at the last step.
    tc = train.TrainConfig.from_json(TRAIN)
    assert [r["lr"] for r in log] == [train.lr_at(s, tc) for s in range(STEPS)]

    stdout = trained["stdout"].read_text()
    progress = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert progress and "tok/s" in progress[-1] and f"{STEPS}/{STEPS}" in progress[-1]
    assert "eval step 3:" in stdout and "eval step 6:" in stdout
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["train"]["steps"] == STEPS


def test_resume_after_stop_is_the_uninterrupted_run(trained: Dict[str, Path]) -> None:
    out = trained["root"] / "stopped"
    stdout = run_train(trained["config"], out, trained["data"], "--stop-after", "3")
    assert "resumed" not in stdout
    assert load_ckpt(out)["step"] == 3
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    # A kill after the checkpoint leaves records past it, the last one maybe cut short.
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 1.0, "lr": 1.0, "grad_norm": 1.0}) + '\n{"st')

    stdout = run_train(trained["config"], out, trained["data"])
    assert "resumed from" in stdout and "at step 3" in stdout
    whole, split = load_ckpt(trained["out"]), load_ckpt(out)
    assert split["step"] == whole["step"] == STEPS
    assert whole["model"].keys() == split["model"].keys()
    for name, t in whole["model"].items():
        assert torch.equal(split["model"][name], t), name
    for key in ("numpy_rng", "history"):
        assert split[key] == whole[key], key
    assert torch.equal(split["torch_rng"], whole["torch_rng"])
    for sw, ss in zip(whole["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        for k in sw:
            assert torch.equal(torch.as_tensor(ss[k]), torch.as_tensor(sw[k])), k
    assert timeless(read_log(out)) == timeless(read_log(trained["out"]))


def test_foreign_checkpoint_refused_unless_fresh(trained: Dict[str, Path]) -> None:
    out = trained["root"] / "foreign"
    shutil.copytree(trained["out"], out)
    before = (out / "ckpt.pt").read_bytes()
    config = write_config(trained["root"] / "wider.json", dict(MODEL, d_model=32))
    with pytest.raises(SystemExit) as info:
        run_train(config, out, trained["data"])
    msg = str(info.value.code)
    assert str(out / "ckpt.pt") in msg and "another model config" in msg and "--fresh" in msg
    assert (out / "ckpt.pt").read_bytes() == before

    stdout = run_train(config, out, trained["data"], "--fresh", "--steps", "2")
    assert "resumed" not in stdout
    ck = load_ckpt(out)
    assert ck["step"] == 2 and ck["model_config"]["d_model"] == 32
    assert [r["step"] for r in read_log(out)] == [1, 2]  # the old run's log is not kept


def test_init_starts_a_new_run_from_another_runs_weights(trained: Dict[str, Path]) -> None:
    """--init: the weights of another run's checkpoint, a new optimizer, step 0; a resume ignores
    it; a checkpoint of another model config or a missing file is refused by name."""
    source = load_ckpt(trained["out"])
    out = trained["root"] / "finetune"
    # Learning rate 0: the step leaves the weights as they were loaded.
    config = trained["root"] / "same.json"
    config.write_text(json.dumps({"model": MODEL, "train": dict(TRAIN, lr=0.0)}))
    stdout = run_train(config, out, trained["data"], "--init", str(trained["out"] / "ckpt.pt"),
                       "--steps", "1")
    assert f"initialised from {trained['out'] / 'ckpt.pt'}" in stdout and "resumed" not in stdout
    ck = load_ckpt(out)
    assert ck["step"] == 1 and [r["step"] for r in read_log(out)] == [1]
    for name, tensor in source["model"].items():
        assert torch.equal(ck["model"][name], tensor), name
    # A new optimizer: one step of moments, not the source run's.
    assert all(int(st["step"]) == 1 for st in ck["optimizer"]["state"].values())

    stdout = run_train(config, out, trained["data"], "--init", str(trained["out"] / "ckpt.pt"),
                       "--steps", "2")
    assert "resumed from" in stdout and "ignored: the run resumes" in stdout
    assert load_ckpt(out)["step"] == 2

    wider = write_config(trained["root"] / "wider-init.json", dict(MODEL, d_model=32))
    with pytest.raises(SystemExit) as info:
        run_train(wider, trained["root"] / "bad-init", trained["data"], "--init",
                  str(trained["out"] / "ckpt.pt"))
    assert "was made with another model config" in str(info.value.code)
    with pytest.raises(SystemExit) as info:
        run_train(config, trained["root"] / "bad-init", trained["data"], "--init",
                  str(trained["root"] / "missing.pt"))
    assert "missing.pt does not exist" in str(info.value.code)


def test_init_from_an_exported_model_directory_may_extend_the_context(
        trained: Dict[str, Path]) -> None:
    """--init also takes an exported model directory (what `models/` ships: run checkpoints stay
    out of git), and the fine-tune may raise max_seq_len, the training context; any other change
    of the model, a shorter context, or a directory that is not a model is refused by name."""
    from model import PolySketchFormer
    from modelio import save_model_dir

    source = load_ckpt(trained["out"])
    model = PolySketchFormer(train.ModelConfig.from_json(source["model_config"]))
    model.load_state_dict(source["model"])
    exported = trained["root"] / "exported"
    save_model_dir(model, exported)

    longer = dict(MODEL, max_seq_len=2 * MODEL["max_seq_len"])
    config = trained["root"] / "longer.json"
    config.write_text(json.dumps({"model": longer, "train": dict(TRAIN, lr=0.0)}))
    out = trained["root"] / "finetune-dir"
    stdout = run_train(config, out, trained["data"], "--init", str(exported), "--steps", "1")
    assert f"initialised from {exported} (exported model directory)" in stdout
    ck = load_ckpt(out)
    assert ck["model_config"]["max_seq_len"] == 2 * MODEL["max_seq_len"]
    for name, tensor in source["model"].items():  # lr 0: the weights exactly as exported
        assert torch.equal(ck["model"][name], tensor), name

    shorter = trained["root"] / "shorter.json"
    shorter.write_text(json.dumps({"model": dict(MODEL, max_seq_len=16), "train":
                                   dict(TRAIN, seq_len=16)}))
    with pytest.raises(SystemExit) as info:
        run_train(shorter, trained["root"] / "bad-dir", trained["data"], "--init", str(exported))
    assert "only max_seq_len may differ, and only upward" in str(info.value.code)
    wider = write_config(trained["root"] / "wider-dir.json", dict(MODEL, d_model=32))
    with pytest.raises(SystemExit) as info:
        run_train(wider, trained["root"] / "bad-dir", trained["data"], "--init", str(exported))
    assert "was made with another model config" in str(info.value.code)
    with pytest.raises(SystemExit) as info:
        run_train(config, trained["root"] / "bad-dir", trained["data"], "--init",
                  str(trained["data"]))
    assert f"--init {trained['data']}:" in str(info.value.code)
