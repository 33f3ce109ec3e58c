"""Long-context tasks: synthetic passkey retrieval and continuation perplexity.

* Passkey (needle in a haystack): an instruction, filler sentences from the held text
  (``lee_background.cor``, see :mod:`popc.datasets`), the sentence
  ``"The pass key is NNNNN. Remember it. NNNNN is the pass key."`` inserted at a given
  depth (a fraction of the filler's tokens), and the question at the end. Everything
  comes from a seeded ``random.Random``: the same (length, depth, seed) gives the same
  prompt and key. Correct means the first five digits generated are the key.
* Continuation perplexity: a prefix of the held text of a given token length, then the
  NLL of the next ``continuation`` tokens, scored after whatever the prefix's cache
  became (eviction included).

Prompts are built as token ids from separately tokenized pieces (each sentence with a
leading space), so that the needle's token offset is known exactly and the prompt has
the requested length. Plain text, no chat template: at full cache SmolLM2-135M-Instruct
retrieves the key from it (every 1k and 2k prompt of the eviction benchmark; 2 of 3 at 4k
in a smoke run, the needle at depth 0.9 missed), and the chat template, which retrieved
too in a 1k check, would only add tokens the eviction must keep.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
PASSKEY_LENGTHS = (1024, 2048, 4096)
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
KEY_DIGITS = 5


@dataclass
class PasskeyItem:
    """One passkey prompt: its ids, the key, where the needle sits (token index into the
    prompt) and the depth asked for (a fraction of the filler tokens)."""

    ids: list[int]
    key: str
    needle_start: int
    needle_length: int
    depth: float
    seed: int


@dataclass
class ContinuationItem:
    """A prefix of the held text and the tokens that follow it."""

    prefix: list[int]
    continuation: list[int]
    offset: int  # the prefix's first token in the tokenized held text


def held_text(path: str | Path | None = None) -> str:
    """The held text (``lee_background.cor`` from the gensim wheel unless ``path``)."""
    if path is None:
        from popc.datasets import default_text_path

        path = default_text_path()
    return Path(path).read_text(encoding="utf-8", errors="replace")


def sentences(text: str) -> list[str]:
    """The text's sentences (split after . ! ?), whitespace collapsed, empty ones dropped."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+", flat) if len(s) > 1]


def _encode(tokenizer, piece: str) -> list[int]:
    return list(tokenizer(" " + piece, add_special_tokens=False)["input_ids"])


def passkey_item(tokenizer, text: str, length: int, depth: float, seed: int) -> PasskeyItem:
    """A passkey prompt of exactly ``length`` tokens with the needle at ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError("depth must be in [0, 1]")
    rng = random.Random(f"passkey-{length}-{depth}-{seed}")
    key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
    head = list(tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"])
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    question = _encode(tokenizer, QUESTION)
    room = length - len(head) - len(needle) - len(question)
    if room < 1:
        raise ValueError(f"length {length} leaves no room for filler")
    pool = sentences(text)
    start = rng.randrange(len(pool))
    filler: list[list[int]] = []
    count = 0
    while count < room:  # whole sentences from a random start, wrapping around
        piece = _encode(tokenizer, pool[(start + len(filler)) % len(pool)])
        filler.append(piece)
        count += len(piece)
    flat = [t for piece in filler for t in piece][:room]
    # The needle goes at the sentence boundary nearest the requested depth.
    bounds, total = [0], 0
    for piece in filler:
        total += len(piece)
        if total <= room:
            bounds.append(total)
    cut = min(bounds, key=lambda b: abs(b - depth * room))
    ids = head + flat[:cut] + needle + flat[cut:] + question
    return PasskeyItem(ids, key, len(head) + cut, len(needle), depth, seed)


def passkey_items(
    tokenizer, text: str, lengths=PASSKEY_LENGTHS, depths=PASSKEY_DEPTHS, seeds=(0,)
) -> list[PasskeyItem]:
    """Every (length, depth, seed) prompt, in that order."""
    return [passkey_item(tokenizer, text, n, d, s) for n in lengths for d in depths for s in seeds]


def passkey_correct(generated: str, key: str) -> bool:
    """Whether the first ``KEY_DIGITS`` digits of ``generated`` are the key."""
    return "".join(re.findall(r"\d", generated))[:KEY_DIGITS] == key


def continuation_items(
    tokenizer, text: str, prefix: int, continuation: int = 128, count: int = 3, seed: int = 0
) -> list[ContinuationItem]:
    """``count`` non-overlapping (where the text allows) prefix/continuation pairs."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    span = prefix + continuation
    if len(ids) < span:
        raise ValueError(f"the held text has {len(ids)} tokens, fewer than {span}")
    rng = random.Random(f"continuation-{prefix}-{seed}")
    slots = max(len(ids) // span, 1)
    starts = sorted(rng.sample(range(slots), min(count, slots)))
    items = []
    for slot in starts:
        offset = slot * span
        items.append(ContinuationItem(ids[offset : offset + prefix], ids[offset + prefix : offset + span], offset))
    return items
