"""The passkey retrieval format: one source of truth for the eval tool and the trainer's mix.

`polysketch_eval passkey` asks a served model for a key planted in filler text; train/train.py's
retrieval mix (TrainConfig.retrieval_fraction) trains on sequences of exactly this form, so a
model can learn the task it is evaluated on. Pure standard library (no torch, no gRPC): the
trainer imports it from clients/python, the eval tool from its package (docs/evaluation.md).

A prompt of L bytes is
    filler[:offset] + NEEDLE(key) + filler[offset:] + QUESTION
and the expected continuation is ANSWER(key). Depth d (percent) puts the needle after
floor(d * len(filler) / 100) filler bytes. Keys are 5 decimal digits without a leading zero.
"""

from __future__ import annotations

import re
from typing import Optional

KEY_MIN = 10000  # smallest key: 5 digits, no leading zero
KEY_MAX = 99999  # largest key (inclusive)
NEEDLE_TEMPLATE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is "
ANSWER_TEMPLATE = "{key}.\n"
KEY_DIGITS = len(str(KEY_MIN))
_FIRST_NUMBER = re.compile(rb"[0-9]+")


def format_key(value: int) -> str:
    """The key text of an integer in [KEY_MIN, KEY_MAX]; ValueError outside."""
    if not KEY_MIN <= value <= KEY_MAX:
        raise ValueError(f"key {value} is outside [{KEY_MIN}, {KEY_MAX}]")
    return str(value)


def _check_key(key: str) -> None:
    if len(key) != KEY_DIGITS or not key.isdigit() or not KEY_MIN <= int(key) <= KEY_MAX:
        raise ValueError(f"key {key!r} is not {KEY_DIGITS} digits in [{KEY_MIN}, {KEY_MAX}]")


def needle(key: str) -> bytes:
    _check_key(key)
    return NEEDLE_TEMPLATE.format(key=key).encode("ascii")


def answer(key: str) -> bytes:
    _check_key(key)
    return ANSWER_TEMPLATE.format(key=key).encode("ascii")


def question() -> bytes:
    return QUESTION.encode("ascii")


# Every key has the same length, so the bytes around the filler do not depend on the key.
NEEDLE_BYTES = len(needle(str(KEY_MIN)))
QUESTION_BYTES = len(question())
ANSWER_BYTES = len(answer(str(KEY_MIN)))
PROMPT_OVERHEAD_BYTES = NEEDLE_BYTES + QUESTION_BYTES  # prompt bytes that are not filler


def filler_bytes(prompt_bytes: int) -> int:
    """Filler bytes in a prompt of `prompt_bytes` bytes; ValueError when there is no room for
    at least one filler byte."""
    n = prompt_bytes - PROMPT_OVERHEAD_BYTES
    if n < 1:
        raise ValueError(f"a passkey prompt of {prompt_bytes} bytes leaves no room for filler: "
                         f"needle and question take {PROMPT_OVERHEAD_BYTES} bytes")
    return n


def depth_offset(depth_percent: float, num_filler: int) -> int:
    """Filler bytes before the needle at depth `depth_percent` in (0, 100)."""
    if not 0.0 < depth_percent < 100.0:
        raise ValueError(f"depth {depth_percent} is outside (0, 100) percent")
    # d * n first: exact for integer depths (29 / 100 * 100 would be 28.999...).
    return int(depth_percent * num_filler / 100.0)


def build_prompt(filler: bytes, key: str, offset: int) -> bytes:
    """filler[:offset] + needle + filler[offset:] + question: len(filler) + PROMPT_OVERHEAD_BYTES
    bytes. `offset` is in [0, len(filler)]."""
    if not 0 <= offset <= len(filler):
        raise ValueError(f"needle offset {offset} is outside [0, {len(filler)}]")
    return filler[:offset] + needle(key) + filler[offset:] + question()


def build_training_sequence(filler: bytes, key: str, offset: int) -> bytes:
    """A training sequence: the prompt and its answer, len(filler) + PROMPT_OVERHEAD_BYTES +
    ANSWER_BYTES bytes."""
    return build_prompt(filler, key, offset) + answer(key)


def extract_key(generated: bytes) -> Optional[str]:
    """The first run of decimal digits of a model's answer (None without one). The answer is
    correct when this equals the key exactly (a longer or shorter number is wrong)."""
    m = _FIRST_NUMBER.search(generated)
    return m.group(0).decode("ascii") if m else None
