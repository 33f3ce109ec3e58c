"""Decode-mode scoring: log-probabilities of text continuations and of multiple-choice answers.

Every scored token's logits come from a *decode-mode* graph call (state non-empty:
fixed per-sequence partition, each token its own top-k mask), so pruning acts as it
does in generation:

* perplexity: each window of ``window`` tokens is split at ``prompt``; tokens
  ``[0, prompt-1)`` are prefilled (dense FFNs; builds the partitions), then tokens
  ``[prompt-1, window-1)`` go through one decode-mode call and predict tokens
  ``[prompt, window)``. One call over S tokens with non-empty state is exactly S
  one-token decode steps (each token's mask depends only on its own activations and
  the fixed partition); ``tests/test_eval.py`` checks this against a token-by-token
  ONNX decode loop.
* multiple choice: the question minus its last token is prefilled (dense), the
  prefilled state is forked (rows repeated) once per answer, and ``[last question
  token] + answer[:-1]`` is scored in decode mode: the answer's log-likelihood is the
  sum of its tokens' log-probabilities (BIG-bench's ``multiple_choice_grade``).

Feeding the prompt's last token in decode mode (instead of reading the first scored
token off the prefill's logits, which are always dense) makes every scored token,
including one-token answers, feel the pruning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from popc.datasets import ChoiceItem
from popc.errors import PopcError
from popc.pop import PopSettings
from popc.progress import Progress, or_silent

# --------------------------------------------------------------------------- math


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits)[target] in float64; logits [..., V], targets [...]."""
    flat = logits.reshape(-1, logits.shape[-1])
    picked = np.take_along_axis(flat, targets.reshape(-1, 1), axis=1)[:, 0].astype(np.float64)
    out = np.empty(flat.shape[0], np.float64)
    for start in range(0, flat.shape[0], 256):  # chunks bound the float64 copy's memory
        block = flat[start : start + 256].astype(np.float64)
        top = block.max(axis=1)
        out[start : start + 256] = top + np.log(np.exp(block - top[:, None]).sum(axis=1))
    return (picked - out).reshape(targets.shape)


def special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before any text (e.g. BOS), so windows start like prompts."""
    try:
        ids = tokenizer("", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - any tokenizer without that behaviour: no prefix
        return []
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(i) for i in ids if i != eos]


def make_windows(ids: Sequence[int], prefix: Sequence[int], window: int, count: int | None) -> np.ndarray:
    """Non-overlapping windows of ``window`` tokens (``prefix`` + text), evenly spread over the text."""
    body = window - len(prefix)
    if body < 2:
        raise PopcError(f"window of {window} tokens is too short")
    available = len(ids) // body
    if available == 0:
        raise PopcError(f"the text is {len(ids)} tokens, shorter than one window of {body}; give a longer --text")
    starts = [i * body for i in range(available)]
    if count is not None and count < available:
        step = available / count
        starts = [starts[int(i * step)] for i in range(count)]
    return np.array([list(prefix) + list(ids[s : s + body]) for s in starts], np.int64)


# --------------------------------------------------------------------------- scoring


def continuation_logprobs(
    model: Any,
    windows: np.ndarray,
    prompt: int,
    pop: PopSettings | None,
    batch: int = 8,
    progress: Progress | None = None,
) -> np.ndarray:
    """Log-probabilities [N, W - prompt] of tokens ``[prompt, W)`` of each window, decode mode.

    Prefill ``[0, prompt-1)``; one decode-mode call over ``[prompt-1, W-1)``. Advances
    ``progress`` by one per window.
    """
    progress = or_silent(progress)
    count, width = windows.shape
    if not 2 <= prompt < width:
        raise PopcError(f"prompt length {prompt} must be in [2, {width})")
    out = np.empty((count, width - prompt), np.float64)
    for start in range(0, count, batch):
        ids = windows[start : start + batch]
        rows = ids.shape[0]
        _, state = model.step(
            ids[:, : prompt - 1], np.ones((rows, prompt - 1), np.int64), model.initial_state(rows), pop
        )
        logits, _ = model.step(ids[:, prompt - 1 : -1], np.ones((rows, width - 1), np.int64), state, pop)
        out[start : start + rows] = token_logprobs(logits, ids[:, prompt:])
        progress.advance(rows)
    return out


@dataclass
class EncodedItem:
    context: list[int]
    answers: list[list[int]]
    answer: int


def encode_item(tokenizer: Any, item: ChoiceItem, max_positions: int) -> EncodedItem:
    """Token ids of the question and of each answer (lm-eval style: trailing spaces of the
    prompt move to the answer, and answers are tokenized in context)."""
    stripped = item.prompt.rstrip(" ")
    spaces = item.prompt[len(stripped) :]
    context = [int(i) for i in tokenizer(stripped)["input_ids"]]
    answers = []
    for choice in item.choices:
        whole = [int(i) for i in tokenizer(stripped + spaces + choice)["input_ids"]]
        if whole[: len(context)] == context and len(whole) > len(context):
            answer = whole[len(context) :]
        else:
            answer = [int(i) for i in tokenizer(spaces + choice, add_special_tokens=False)["input_ids"]]
        if not answer:
            raise PopcError(f"answer {choice!r} tokenizes to nothing")
        answers.append(answer)
    longest = max(len(a) for a in answers)
    room = max_positions - longest
    if room < 2:
        raise PopcError(f"an answer of {longest} tokens does not fit the model's context of {max_positions}")
    if len(context) > room:
        context = context[-room:]
    if len(context) < 2:
        context = [int(getattr(tokenizer, "eos_token_id", 0) or 0)] * (2 - len(context)) + context
    return EncodedItem(context, answers, item.answer)


def choice_loglikelihoods(
    model: Any,
    items: Sequence[EncodedItem],
    pop: PopSettings | None,
    batch: int = 8,
    progress: Progress | None = None,
) -> list[np.ndarray]:
    """Per item, the summed log-likelihood of each answer, scored in decode mode; advances
    ``progress`` by one per item."""
    progress = or_silent(progress)
    results: list[np.ndarray] = []
    pad = int(model.pad_token_id)
    for start in range(0, len(items), batch):
        group = items[start : start + batch]
        prefixes = [it.context[:-1] for it in group]
        longest = max(len(p) for p in prefixes)
        ids = np.full((len(group), longest), pad, np.int64)
        mask = np.zeros((len(group), longest), np.int64)
        for row, prefix in enumerate(prefixes):
            ids[row, longest - len(prefix) :] = prefix
            mask[row, longest - len(prefix) :] = 1
        _, state = model.step(ids, mask, model.initial_state(len(group)), pop)
        owner = np.array([i for i, it in enumerate(group) for _ in it.answers], np.int64)
        answers = [a for it in group for a in it.answers]
        width = max(len(a) for a in answers)
        chunk = np.full((len(answers), width), pad, np.int64)
        for row, (item_index, answer) in enumerate(zip(owner, answers)):
            tokens = [group[item_index].context[-1], *answer[:-1]]
            chunk[row, : len(tokens)] = tokens
        forked = [np.take(s, owner, axis=0) for s in state]
        # Right padding of the answer chunk is harmless: causal attention keeps real
        # tokens from seeing the pads after them, and the pads' outputs are ignored.
        full_mask = np.concatenate([mask[owner], np.ones((len(answers), width), np.int64)], axis=1)
        logits, _ = model.step(chunk, full_mask, forked, pop)
        scores = np.empty(len(answers), np.float64)
        for row, answer in enumerate(answers):
            scores[row] = token_logprobs(logits[row, : len(answer)], np.array(answer, np.int64)).sum()
        offset = 0
        for it in group:
            results.append(scores[offset : offset + len(it.answers)])
            offset += len(it.answers)
        progress.advance(len(group))
    return results


# --------------------------------------------------------------------------- other runtimes' models


class OnnxDecoder:
    """Another exporter's plain ONNX decoder (onnxruntime-genai's model builder output:
    ``input_ids``, ``attention_mask``, ``past_key_values.{i}.key|value`` -> ``logits``,
    ``present.{i}.key|value``) behind the interface the scoring functions use (``step``,
    ``initial_state``, ``tokenizer``, ``pad_token_id``, ``max_positions``), run with ONNX
    Runtime directly, so it is scored on the same windows and questions as popc's rows.

    Dense only (``pop`` is ignored). onnxruntime's GroupQueryAttention takes a multi-token
    call over a non-empty cache for one sequence at a time, so such calls run row by row;
    it also reads positions off the mask's length (no left padding): score questions with
    ``batch=1``."""

    def __init__(
        self, model_path: Any, tokenizer: Any, max_positions: int, pad_token_id: int, threads: int | None = None
    ):
        import json
        from pathlib import Path

        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        path = Path(model_path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.tokenizer, self.max_positions, self.pad_token_id = tokenizer, max_positions, pad_token_id
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.input_names = {i.name for i in self.session.get_inputs()}
        decoder = {}
        config_path = path.parent / "genai_config.json"
        if config_path.is_file():
            decoder = json.loads(config_path.read_text()).get("model", {}).get("decoder", {})
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        first = shapes[self.past_names[0]]
        self.kv_heads = int(decoder.get("num_key_value_heads") or first[1])
        self.head_size = int(decoder.get("head_size") or first[3])

    def initial_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_size), np.float32) for _ in self.past_names]

    def _run(self, ids: np.ndarray, mask: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, list]:
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        feed.update(zip(self.past_names, state))
        if "position_ids" in self.input_names:  # builds for other families take positions
            past = state[0].shape[2]
            feed["position_ids"] = np.broadcast_to(
                np.arange(past, past + ids.shape[1], dtype=np.int64), ids.shape
            ).copy()
        out = self.session.run(["logits", *self.present_names], feed)
        return out[0], out[1:]

    def step(self, ids: np.ndarray, mask: np.ndarray, state: Sequence[np.ndarray], pop: Any = None):
        rows, length = ids.shape
        if rows == 1 or length == 1 or state[0].shape[2] == 0:
            return self._run(ids, mask, state)
        parts = [self._run(ids[r : r + 1], mask[r : r + 1], [s[r : r + 1] for s in state]) for r in range(rows)]
        logits = np.concatenate([p[0] for p in parts], axis=0)
        presents = [np.concatenate([p[1][i] for p in parts], axis=0) for i in range(len(self.present_names))]
        return logits, presents
