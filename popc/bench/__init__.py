"""``popc bench``: prefill and decode latency of dense vs POP, against the memory roofline.

One run measures, on the same machine, with the same random prompts and the same thread
count for every variant:

* **variants**: the dense ONNX Runtime export of the model (``dense-ort``, the baseline
  every ratio is taken against), the POP export with the ai.popc ops' ONNX function
  bodies (``pop-body``) and with the popc op library's kernels (``pop-oplib``), Hugging
  Face PyTorch eager (``hf-eager``), the PyTorch POP reference (``pop-reference``),
  onnxruntime-genai's own build of the same model (``ort-genai``) and popc's dense export
  under genai's runtime (``dense-genai-runtime``), the last two where ``onnxruntime_genai``
  is installed;
* **TTFT** (time to first token) at each prompt length (batch 1): the prefill plus picking
  the first token, what a user waits for;
* **decode** ms per step and tokens/s at each batch size, at each POP sparsity (the POP
  export takes its regions as the ``pop_config`` input, so one export serves all);
* ratios against dense ORT and against the fastest **dense peer** of the same run
  (``ort-genai``, ``hf-eager``), each the median of per-round (paired) ratios;
* **peak memory** of each variant at the largest decode batch (or those asked for), each
  measured in a fresh process that loads that variant alone (``memory``): the peak
  resident set, and the peak less the bare process's (Python and the runtime's libraries);
* a **bytes model**: the weight bytes one batch-1 decode step reads per variant (FFN and
  total), the machine's read bandwidth, and from them each variant's ideal ms/token and
  fraction of that roofline.

Every figure is the median over repeats, with min and max, after warm-up runs.

Modules: ``plan`` (what to measure), ``machine``, ``bytes_model``, ``runners`` (the
``Runner`` protocol; ORT and PyTorch), ``peers`` (onnxruntime-genai), ``exports`` (the
exports compared), ``run`` (the timing), ``memory`` (peak memory, one process per
variant), ``result`` (what was measured) and ``report`` (tables, Markdown, plot, JSON).
"""

from popc.bench.plan import FULL_MATRIX, LABELS, VARIANTS, BenchPlan
from popc.bench.result import BenchResult
from popc.bench.run import run_bench

__all__ = ["FULL_MATRIX", "LABELS", "VARIANTS", "BenchPlan", "BenchResult", "run_bench"]
