"""Turning zeros into speed: sparse kernels, a planner that measures, activation sparsity.

* :func:`compile_` swaps the sparse ``nn.Linear`` layers of a finalised model for
  :class:`SparseLinear` modules, each computed by the kernel that measured fastest on the
  input shapes the layer really sees (never one slower than dense); :func:`decompile_`
  undoes it. Kernels: :mod:`.kernels`; the optional compiled ones: :mod:`.extension`.
* :func:`sparsify_activations_` skips small inputs of each Linear when decoding one token
  (TEAL / WINA thresholds calibrated on text); ``remove()`` on its handle undoes it.
* :mod:`.timing` measures prefill latency and decode tokens per second.
* :mod:`.qkernels`: int8 / int4 / int4 group-sparse kernels for the quantised-weight layout,
  as ``torch.library`` ops (``torch.ops.sparsecraft.qlinear_*``) and the reference
  :func:`dequantize`; they run ``sparsecraft.quant``'s ``QuantLinear`` layers.
* :func:`decoder` (:mod:`.decode`): batch-1 greedy decoding with a static KV cache and one
  compiled call per token for Llama-family models (:class:`FastDecoder`), the model's own
  forward for others (:class:`EagerDecoder`).

Only torch is imported here; the CLI commands live in :mod:`.commands`.
"""

from .activation import ActivationSparseLinear, ActivationSparsity, sparsify_activations_
from .decode import EagerDecoder, FastDecoder, decoder
from .kernels import KERNELS, Kernel, KernelUnavailable, register_kernel
from .modules import SparseLinear
from .planner import CompileReport, LayerPlan, apply_plan_, compile_, decompile_
from .qkernels import dequantize, qlinear, quantized_linear
from .timing import greedy_decode, interleaved_medians, interleaved_samples, prefill_seconds

__all__ = [
    "compile_", "decompile_", "apply_plan_", "CompileReport", "LayerPlan", "SparseLinear",
    "KERNELS", "Kernel", "KernelUnavailable", "register_kernel",
    "sparsify_activations_", "ActivationSparsity", "ActivationSparseLinear",
    "interleaved_medians", "interleaved_samples", "prefill_seconds", "greedy_decode", "load_compiled", "PLAN_FILE",
    "dequantize", "qlinear", "quantized_linear", "decoder", "FastDecoder", "EagerDecoder",
]

PLAN_FILE = "runtime_plan.json"


def load_compiled(path):
    """Load a folder written by ``sparsecraft compile --out`` and apply its saved plan
    (no measuring); returns ``(model, tokenizer)``. Kernels unavailable here run dense."""
    import json
    from pathlib import Path

    from .. import models
    from ..errors import FormatError

    model, tok = models.load(str(path))
    plan_file = Path(path) / PLAN_FILE
    if not plan_file.is_file():
        raise FormatError(f"'{path}' has no {PLAN_FILE}; it was not written by `sparsecraft compile --out`")
    apply_plan_(model, json.loads(plan_file.read_text())["plan"])
    return model, tok
