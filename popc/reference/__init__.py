"""The PyTorch references: POP's math in eager PyTorch over the Hugging Face model.

Every exported graph is checked against these. They import the graph side
(``popc.modeling``) for shared pieces, never the reverse.

* :class:`PopReference` — POP-online (``pop_online.py``);
* :class:`SkipReference` — POP-prefill and the layer-dropping baseline, optionally
  with POP-online (``pop_prefill.py``);
* :func:`fake_quantize_model` — the weights a quantized export stores (``quantized.py``);
* :func:`greedy_generate` — greedy decoding with either (``generate.py``);
* :class:`EvictionReference` — KV-cache eviction after the prompt: LaProx and its
  baselines (``kv_eviction.py``).
"""

from popc.reference.generate import greedy_generate
from popc.reference.kv_eviction import EvictionReference
from popc.reference.pop_online import (
    GatedWeights,
    PopExperts,
    PopFFN,
    PopReference,
    PopState,
    pop_ffn,
    top_indices,
)
from popc.reference.pop_prefill import PARTITION_SOURCES, SkipReference, continuation_nll, ffn_input_norm
from popc.reference.quantized import fake_quantize_model

__all__ = [
    "EvictionReference",
    "PARTITION_SOURCES",
    "GatedWeights",
    "PopExperts",
    "PopFFN",
    "PopReference",
    "PopState",
    "SkipReference",
    "continuation_nll",
    "fake_quantize_model",
    "ffn_input_norm",
    "greedy_generate",
    "pop_ffn",
    "top_indices",
]
