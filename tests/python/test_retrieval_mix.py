"""The trainer's synthetic retrieval mix (TrainConfig.retrieval_fraction): off, batches are
exactly those of the trainer before the mix existed; on, the share of passkey sequences and
their format, which must be the one the eval tool asks (polysketch_eval/retrieval.py)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch

import train
from conftest import REPO_DIR
from polysketch_eval import passkey, retrieval

CPU = torch.device("cpu")
NEEDLE = re.compile(rb"\nThe pass key is ([0-9]{5})\. Remember it\. \1 is the pass key\.\n")


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    words = [b"In", b"the", b"beginning", b"God", b"created", b"heaven", b"and", b"earth.\n"]
    rng = np.random.default_rng(0)
    text = b" ".join(words[i] for i in rng.integers(0, len(words), size=6000))
    return np.frombuffer(text, dtype=np.uint8)


def old_sample_batch(data: np.ndarray, tc: train.TrainConfig, rng: np.random.Generator,
                     device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """train.sample_batch as it was before the retrieval mix (commit bf68f65)."""
    starts = rng.integers(0, len(data) - tc.seq_len - 1, size=tc.batch_size)
    window = np.stack([data[s:s + tc.seq_len + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(window).to(device)
    return t[:, :-1], t[:, 1:]


@pytest.mark.parametrize("config", [{}, {"retrieval_fraction": 0.0}])
def test_off_gives_the_batches_of_before(corpus: np.ndarray, config: dict) -> None:
    tc = train.TrainConfig.from_json({"seq_len": 200, "batch_size": 4, **config})
    new, old = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(30):
        x, y, _ = train.sample_batch(corpus, tc, new, CPU)
        x0, y0 = old_sample_batch(corpus, tc, old, CPU)
        assert torch.equal(x, x0) and torch.equal(y, y0)
    assert new.bit_generator.state == old.bit_generator.state  # no extra draw


def test_shipped_configs_keep_the_mix_off() -> None:
    for path in sorted((REPO_DIR / "train" / "configs").glob("*.json")):
        _, tc = train.load_run_config(path)
        assert tc.retrieval_fraction == 0.0, path


def retrieval_rows(corpus: np.ndarray, tc: train.TrainConfig, batches: int,
                   seed: int) -> Tuple[List[bytes], int]:
    """The rows (x followed by y's last byte) of `batches` batches that carry a needle."""
    rng = np.random.default_rng(seed)
    rows, total = [], 0
    for _ in range(batches):
        x, y, _ = train.sample_batch(corpus, tc, rng, CPU)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for r in range(x.shape[0]):
            row = bytes(x[r].tolist() + [int(y[r, -1])])
            total += 1
            if NEEDLE.search(row):
                rows.append(row)
    return rows, total


def test_on_share_and_format(corpus: np.ndarray) -> None:
    tc = train.TrainConfig.from_json({"seq_len": 256, "batch_size": 8,
                                      "retrieval_fraction": 0.25})
    rows, total = retrieval_rows(corpus, tc, batches=300, seed=3)
    # Binomial(2400, 0.25): mean 600, standard deviation 21; 5 sigma is a sure bound.
    assert total == 2400 and abs(len(rows) - 600) < 5 * 21.2, len(rows)
    num_filler = tc.seq_len + 1 - retrieval.PROMPT_OVERHEAD_BYTES - retrieval.ANSWER_BYTES
    text = corpus.tobytes()
    offsets = []
    for row in rows:
        m = NEEDLE.search(row)
        key, offset = m.group(1).decode(), m.start()
        filler = row[:offset] + row[m.end():m.end() + num_filler - offset]
        assert len(filler) == num_filler and text.find(filler) >= 0  # corpus bytes, in order
        # The trainer's sequence is the eval's prompt for this filler, key and depth, then the
        # answer: the same bytes the passkey eval sends, and the continuation it scores.
        assert row == retrieval.build_prompt(filler, key, offset) + retrieval.answer(key)
        assert row.endswith(b"\nWhat is the pass key? The pass key is " + key.encode() + b".\n")
        assert retrieval.extract_key(row[-retrieval.ANSWER_BYTES:]) == key
        offsets.append(offset)
    # Depths spread over the whole filler.
    assert min(offsets) < num_filler // 10 and max(offsets) > num_filler * 9 // 10
    assert len({NEEDLE.search(r).group(1) for r in rows}) > len(rows) * 0.9  # random keys


def test_eval_prompt_is_a_training_sequence_without_its_answer() -> None:
    """A passkey trial's prompt, followed by the answer, is what the trainer would build from the
    same filler, key and offset."""
    text = b"And the earth was without form, and void.\n" * 100
    trial = passkey.make_trial(text, 1024, 30, 0, seed=4)
    num_filler = 1024 - retrieval.PROMPT_OVERHEAD_BYTES
    filler = text[trial.filler_start:trial.filler_start + num_filler]
    assert retrieval.build_training_sequence(filler, trial.key, trial.offset) == (
        trial.prompt + retrieval.answer(trial.key))


def test_on_is_deterministic_across_a_resume(corpus: np.ndarray) -> None:
    """The mix draws only from the trainer's generator, whose state the checkpoint keeps."""
    tc = train.TrainConfig.from_json({"seq_len": 128, "batch_size": 4,
                                      "retrieval_fraction": 0.5})
    whole = np.random.default_rng(9)
    batches = [train.sample_batch(corpus, tc, whole, CPU)[0] for _ in range(6)]
    first = np.random.default_rng(9)
    for b in batches[:3]:
        assert torch.equal(train.sample_batch(corpus, tc, first, CPU)[0], b)
    resumed = np.random.default_rng(0)
    resumed.bit_generator.state = first.bit_generator.state
    for b in batches[3:]:
        assert torch.equal(train.sample_batch(corpus, tc, resumed, CPU)[0], b)


@pytest.mark.parametrize("config, message", [
    ({"retrieval_fraction": -0.1}, "retrieval_fraction must be in [0, 1], got -0.1"),
    ({"retrieval_fraction": 1.5}, "retrieval_fraction must be in [0, 1], got 1.5"),
    ({"retrieval_fraction": 0.1, "seq_len": 100}, "needs seq_len + 1 >"),
    ({"retrieval_answer_weight": 0}, "retrieval_answer_weight must be > 0, got 0"),
    ({"retrieval_answer_weight": -2.0}, "retrieval_answer_weight must be > 0, got -2.0"),
])
def test_bad_mix_config_is_refused(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        train.TrainConfig.from_json(config)


def weighted_batch(corpus: np.ndarray, weight: float) -> Tuple[train.TrainConfig, train.Batch]:
    tc = train.TrainConfig.from_json({"seq_len": 160, "batch_size": 6, "retrieval_fraction": 0.5,
                                      "retrieval_answer_weight": weight})
    rng = np.random.default_rng(5)
    while True:  # a batch with both kinds of rows (half of the batches have, on average)
        batch = train.sample_batch(corpus, tc, rng, CPU)
        if 1 < len(batch.retrieval_rows) < 6:
            return tc, batch


def test_answer_weight_one_is_the_plain_mean(corpus: np.ndarray) -> None:
    tc, batch = weighted_batch(corpus, 1.0)
    logits = torch.randn(*batch.y.shape, 256, generator=torch.Generator().manual_seed(1))
    loss, stats = train.batch_loss(logits, batch, tc)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.y.flatten())
    assert torch.allclose(loss, plain) and set(stats) == {"key_bpb", "key_acc"}


def test_answer_weight_weighs_exactly_the_answer_bytes(corpus: np.ndarray) -> None:
    tc, batch = weighted_batch(corpus, 8.0)
    rows = batch.retrieval_rows
    for r in rows:  # the weighted targets are the answer: the key and ".\n"
        tail = bytes(batch.y[r, -retrieval.ANSWER_BYTES:].tolist())
        assert re.fullmatch(rb"[0-9]{5}\.\n", tail), tail
    logits = torch.randn(*batch.y.shape, 256, generator=torch.Generator().manual_seed(2))
    loss, _ = train.batch_loss(logits, batch, tc)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.y.flatten(),
                                           reduction="none").view(batch.y.shape)
    n_answer = len(rows) * retrieval.ANSWER_BYTES
    answer_sum = float(ce[torch.from_numpy(rows), -retrieval.ANSWER_BYTES:].sum())
    expected = (float(ce.sum()) - answer_sum + 8.0 * answer_sum) / (ce.numel() + 7.0 * n_answer)
    assert abs(float(loss) - expected) < 1e-5


def test_key_stats(corpus: np.ndarray) -> None:
    """key_acc counts rows whose every key byte is the argmax; key_bpb is their loss in bits."""
    tc, batch = weighted_batch(corpus, 1.0)
    perfect = torch.nn.functional.one_hot(batch.y, 256).float() * 50.0
    _, stats = train.batch_loss(perfect, batch, tc)
    assert stats["key_acc"] == 1.0 and stats["key_bpb"] < 1e-6
    rows = batch.retrieval_rows
    wrong_one = perfect.clone()
    key_start = batch.y.shape[1] - retrieval.ANSWER_BYTES
    digit = int(batch.y[rows[0], key_start + 2])  # the third key byte of the first row
    wrong_one[rows[0], key_start + 2, digit] = 0.0
    wrong_one[rows[0], key_start + 2, (digit + 1) % 256] = 50.0
    _, stats = train.batch_loss(wrong_one, batch, tc)
    assert stats["key_acc"] == pytest.approx(1.0 - 1.0 / len(rows))
    assert stats["key_bpb"] > 1.0


def test_training_with_the_mix_runs(tmp_path: Path, corpus: np.ndarray) -> None:
    """A 2-step run with the mix on: the progress line names it and the config records it."""
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "train.txt").write_bytes(corpus.tobytes())
    (data / "heldout.txt").write_bytes(corpus.tobytes()[:3000])
    model = {"architecture": "polysketchformer", "vocab_size": 256, "d_model": 16,
             "n_layers": 1, "n_heads": 2, "max_seq_len": 160,
             "attention": {"kind": "polysketch", "sketch": "learned", "sketch_size": 4,
                           "local_exact": True, "block_size": 8}}
    cfg = {"seq_len": 160, "batch_size": 2, "steps": 2, "eval_every": 2, "eval_windows": 2,
           "ckpt_every": 2, "warmup_steps": 1, "retrieval_fraction": 0.5,
           "retrieval_answer_weight": 4.0}
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": model, "train": cfg}))
    from test_train import run_train

    stdout = run_train(config, tmp_path / "run", data)
    assert "retrieval mix: 50.0% of sequences carry a passkey" in stdout
    assert re.search(r"step +2/2 .* key acc [01]\.[0-9]{2} ", stdout), stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["key_acc"] <= 1.0 and r["key_bpb"] > 0 for r in records if "key_acc" in r)
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["train"]["retrieval_fraction"] == 0.5
    assert dataclasses.asdict(train.TrainConfig.from_json(cfg))["retrieval_fraction"] == 0.5
