"""Decoding one token at a time without the framework's per-layer overhead.

:func:`decoder` returns an object with ``prefill(ids) -> logits``, ``step(token) -> logits``
and ``generate(ids, new_tokens) -> DecodeResult`` (batch 1, greedy):

* :class:`FastDecoder` for **Llama-family** causal LMs (this path is Llama-specific): pre-norm
  blocks of RMSNorm, rotary position embedding (rotate-half), grouped-query attention and a
  SwiGLU MLP, recognised by structure (``model.model.layers[i].self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``, RMSNorms, ``model.model.rotary_emb``; SmolLM2, Llama 2/3,
  TinyLlama, Qwen2-style biases). The prompt runs through the model itself (its prefill is
  already fast); its keys and values are copied into a static cache; then each token is one
  call into the compiled step (``csrc/decode_step.cpp``): every block, the final norm and the
  head, with the quantised kernels for ``sparsecraft.quant``'s ``QuantLinear`` layers (see
  :func:`linear_parts`) and a float32 GEMV for ``nn.Linear`` ones.
  Without the compiled library the same step runs in pure torch (slow, but the same numbers
  up to rounding), and says so in the log.
* :class:`EagerDecoder` for everything else: the model's own forward with its own cache.
  :func:`decoder` logs why a model is not taken by the fast path.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .qkernels import qlinear_int8_activations, quantized_linear, takes_int8_activations
from .timing import DecodeResult

__all__ = ["decoder", "FastDecoder", "EagerDecoder", "llama_structure_problem", "linear_parts"]

log = logging.getLogger(__name__)

KIND = {(8, 0): 0, (4, 0): 1, (4, 8): 2, (4, 16): 3}
FLOAT = 4


def linear_parts(module: nn.Module, what: str) -> dict:
    """What the decode step needs of one Linear-like layer.

    ``nn.Linear`` (float32) -> its weight; a quantised layer (anything with a ``quantized()``
    method returning a :class:`sparsecraft.quant.QuantizedWeight`: ``QuantLinear``, also the
    head tied to a ``QuantEmbedding``) -> that weight. Anything else is refused.
    """
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
    if callable(getattr(module, "quantized", None)):
        q = module.quantized()
        out, cols = q.shape
        return {"kind": KIND[(q.spec.bits, q.sparse_group or 0)], "q": q, "bias": bias, "out": out, "in": cols}
    if type(module) is nn.Linear:
        w = module.weight.detach()
        if w.dtype != torch.float32 or w.device.type != "cpu":
            raise ConfigError(f"{what}: the fast decoder runs float32 on CPU, not {w.dtype} on {w.device}")
        return {"kind": FLOAT, "weight": w.contiguous(), "bias": bias, "out": w.shape[0], "in": w.shape[1]}
    raise ConfigError(f"{what}: {type(module).__name__} is neither nn.Linear nor a quantised layer")


def llama_structure_problem(model: nn.Module) -> str | None:
    """Why ``model`` is not a Llama-family decoder the fast path can run (None when it is)."""
    core = getattr(model, "model", None)
    cfg = getattr(model, "config", None)
    if core is None or cfg is None or not hasattr(core, "layers") or not hasattr(model, "lm_head"):
        return "no model.model.layers / lm_head (not a Hugging Face causal LM of the Llama family)"
    for attr in ("embed_tokens", "norm", "rotary_emb"):
        if not hasattr(core, attr):
            return f"model.model has no {attr}"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"activation {getattr(cfg, 'hidden_act', None)!r} (the fused step does SwiGLU with silu)"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if not (isinstance(getattr(core.embed_tokens, "weight", None), torch.Tensor)
            or callable(getattr(core.embed_tokens, "dequantize", None))):
        return "the token embedding has neither a weight tensor nor a quantised table"
    for i, layer in enumerate(core.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return f"layer {i} has no self_attn / mlp"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                return f"layer {i}.self_attn has no {name}"
        for name in ("q_norm", "k_norm"):
            if getattr(attn, name, None) is not None:
                return f"layer {i}.self_attn has {name} (per-head norms are not in the fused step)"
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(mlp, name):
                return f"layer {i}.mlp has no {name} (not a SwiGLU MLP)"
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            if norm is None or not hasattr(norm, "variance_epsilon") or getattr(norm, "weight", None) is None:
                return f"layer {i}.{name} is not an RMSNorm"
        extra = set(dict(layer.named_children())) - {"self_attn", "mlp", "input_layernorm",
                                                     "post_attention_layernorm"}
        if extra:
            return f"layer {i} has extra parts {sorted(extra)} the fused step would skip"
    if not hasattr(core.norm, "variance_epsilon"):
        return "the final norm is not an RMSNorm"
    return None


class EagerDecoder:
    """The model's own forward and cache, one token per call (any causal LM)."""

    fast = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = None

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, use_cache=True, **_logits_kwargs(self.model))
        self.cache = out.past_key_values
        return out.logits[0, -1]

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        if self.cache is None:
            raise ConfigError("step() before prefill()")
        ids = torch.tensor([[int(token)]])
        out = self.model(ids, past_key_values=self.cache, use_cache=True, **_logits_kwargs(self.model))
        self.cache = out.past_key_values
        return out.logits[0, -1]

    def generate(self, ids: torch.Tensor, new_tokens: int) -> DecodeResult:
        return _generate(self, ids, new_tokens)


class FastDecoder:
    """Static KV cache + one fused call per token for Llama-family models (see the module docs).

    ``max_len`` bounds prompt + generated tokens (default: the model's
    ``max_position_embeddings``, at most 4096). ``backend``: ``"auto"`` (compiled when
    available), ``"cpp"`` (compiled or an error) or ``"torch"`` (the pure-torch step).
    ``activations="int8"``: dense int4 layers round their input to int8 per block of 32 and
    multiply in integers (:func:`~.qkernels.qlinear_int8_activations`, llama.cpp's way:
    faster, no longer float-exact); the default ``"float32"`` keeps the float kernels.
    """

    fast = True

    def __init__(self, model: nn.Module, max_len: int | None = None, backend: str = "auto",
                 activations: str = "float32"):
        problem = llama_structure_problem(model)
        if problem is not None:
            raise ConfigError(f"the fast decoder needs a Llama-family model: {problem}")
        if backend not in ("auto", "cpp", "torch"):
            raise ConfigError(f"backend must be auto, cpp or torch, got {backend!r}")
        if activations not in ("float32", "int8"):
            raise ConfigError(f"activations must be float32 or int8, got {activations!r}")
        self.int8_activations = activations == "int8"
        self.model = model
        core, cfg = model.model, model.config
        attn0 = core.layers[0].self_attn
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(attn0, "head_dim", cfg.hidden_size // self.n_heads))
        self.scaling = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.eps = float(core.layers[0].input_layernorm.variance_epsilon)
        limit = int(getattr(cfg, "max_position_embeddings", 4096) or 4096)
        self.max_len = int(max_len or min(limit, 4096))
        if self.max_len < 2:
            raise ConfigError(f"max_len must be >= 2, got {self.max_len}")
        table = getattr(core.embed_tokens, "weight", None)
        if not isinstance(table, torch.Tensor):  # a QuantEmbedding: the step reads one float32 row
            table = core.embed_tokens.dequantize()
        self.embed = table.detach().to(torch.float32).contiguous()
        self.final_norm = core.norm.weight.detach().to(torch.float32).contiguous()
        with torch.no_grad():  # the model's own rotary tables, attention scaling included
            pos = torch.arange(self.max_len)[None]
            cos, sin = core.rotary_emb(self.embed[:1][None], pos)
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        n_layers = len(core.layers)
        shape = (n_layers, self.n_kv, self.max_len, self.head_dim)
        self.k_cache, self.v_cache = torch.zeros(shape), torch.zeros(shape)
        self.blocks = []
        for i, layer in enumerate(core.layers):
            a, m = layer.self_attn, layer.mlp
            parts = {n: linear_parts(getattr(a, n), f"layer {i}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj",
                                                                                              "o_proj")}
            parts.update({n: linear_parts(getattr(m, n), f"layer {i}.mlp.{n}") for n in ("gate_proj", "up_proj",
                                                                                       "down_proj")})
            parts["norm1"] = layer.input_layernorm.weight.detach().float().contiguous()
            parts["norm2"] = layer.post_attention_layernorm.weight.detach().float().contiguous()
            self.blocks.append(parts)
        self.head = linear_parts(model.lm_head, "lm_head")
        self.pos = 0
        self._cpp = None
        if backend != "torch":
            from .extension import get_quant_extension, quant_extension_status

            ext = get_quant_extension()
            if ext is None:
                if backend == "cpp":
                    raise ConfigError(f"compiled decode step unavailable: {quant_extension_status()}")
                log.warning("fast decoder: compiled step unavailable (%s); running the pure-torch step",
                            quant_extension_status())
            else:
                self._cpp = self._build_cpp(ext)
        self.backend = "cpp" if self._cpp is not None else "torch"

    # -- building -------------------------------------------------------------------------
    def _uses_int8_activations(self, p: dict) -> bool:
        return self.int8_activations and p["kind"] != FLOAT and takes_int8_activations(p["q"])

    def _cpp_linear(self, ext, p: dict, what: str):
        if p["kind"] == FLOAT:
            return ext.make_linear(what, FLOAT, None, None, None, None, p["weight"], p["bias"], 0, 0)
        q = p["q"]
        return ext.make_linear(what, p["kind"], q.packed.contiguous(), q.scale.contiguous(), q.offset.contiguous(),
                               None if q.group_index is None else q.group_index.contiguous(), None, p["bias"],
                               q.spec.group, q.sparse_group or 0, self._uses_int8_activations(p))

    def _build_cpp(self, ext):
        lin = self._cpp_linear
        cpp = ext.DecodeModel(self.n_heads, self.n_kv, self.head_dim, self.eps, self.scaling, self.embed,
                              self.final_norm, lin(ext, self.head, "lm_head"), self.cos, self.sin, self.k_cache,
                              self.v_cache)
        for i, p in enumerate(self.blocks):
            cpp.add_block(p["norm1"], [lin(ext, p[n], f"layer {i}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj")],
                          lin(ext, p["o_proj"], f"layer {i}.self_attn.o_proj"), p["norm2"],
                          [lin(ext, p[n], f"layer {i}.mlp.{n}") for n in ("gate_proj", "up_proj")],
                          lin(ext, p["down_proj"], f"layer {i}.mlp.down_proj"))
        return cpp

    # -- decoding -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids`` ([1, T]) through the model, cache its keys and values."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ConfigError(f"the fast decoder decodes one sequence: ids must be [1, T], got {tuple(ids.shape)}")
        n = ids.shape[1]
        if n >= self.max_len:
            raise ConfigError(f"prompt of {n} tokens does not fit the static cache of {self.max_len} positions")
        out = self.model(ids, use_cache=True, **_logits_kwargs(self.model))
        cache = out.past_key_values
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(self.blocks):
            raise ConfigError("the model's cache does not expose one key/value layer per block")
        self.k_cache.zero_()
        self.v_cache.zero_()
        for i, layer in enumerate(layers):
            self.k_cache[i, :, :n] = layer.keys[0].float()
            self.v_cache[i, :, :n] = layer.values[0].float()
        self.pos = n
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Logits after feeding ``token`` at the next position (its keys and values get cached)."""
        if self.pos == 0:
            raise ConfigError("step() before prefill()")
        if self.pos >= self.max_len:
            raise ConfigError(f"the static cache of {self.max_len} positions is full")
        logits = self._cpp.step(int(token), self.pos) if self._cpp is not None else self._torch_step(int(token))
        self.pos += 1
        return logits

    def generate(self, ids: torch.Tensor, new_tokens: int) -> DecodeResult:
        return _generate(self, ids, new_tokens)

    def set_profiling(self, on: bool) -> None:
        """Time the phases of the compiled step (embedding, rmsnorm, qkv_proj, ...), summed over steps."""
        if self._cpp is None:
            raise ConfigError("phase timing needs the compiled step")
        self._cpp.set_profiling(bool(on))

    def profile(self) -> dict[str, float]:
        if self._cpp is None:
            raise ConfigError("phase timing needs the compiled step")
        return dict(self._cpp.profile())

    # -- the pure-torch step (no compiled library) --------------------------------------------
    def _linear(self, p: dict, x: torch.Tensor) -> torch.Tensor:
        if p["kind"] == FLOAT:
            return F.linear(x, p["weight"], p["bias"])
        if self._uses_int8_activations(p):
            q = p["q"]
            return qlinear_int8_activations(x, q.packed, q.scale, q.offset, p["bias"], group_size=q.spec.group)
        return quantized_linear(x, p["q"], p["bias"])

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rotate(self, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        return v * cos + torch.cat((-v[..., half:], v[..., :half]), dim=-1) * sin

    def _torch_step(self, token: int) -> torch.Tensor:
        pos, hd = self.pos, self.head_dim
        x = self.embed[token][None]  # [1, hidden]
        cos, sin = self.cos[pos], self.sin[pos]
        group = self.n_heads // self.n_kv
        for i, p in enumerate(self.blocks):
            h = self._rms(x, p["norm1"])
            q = self._rotate(self._linear(p["q_proj"], h).view(self.n_heads, hd), cos, sin)
            k = self._rotate(self._linear(p["k_proj"], h).view(self.n_kv, hd), cos, sin)
            v = self._linear(p["v_proj"], h).view(self.n_kv, hd)
            self.k_cache[i, :, pos] = k
            self.v_cache[i, :, pos] = v
            keys = self.k_cache[i, :, : pos + 1].repeat_interleave(group, dim=0)  # [heads, T, hd]
            values = self.v_cache[i, :, : pos + 1].repeat_interleave(group, dim=0)
            scores = torch.einsum("hd,htd->ht", q, keys) * self.scaling
            att = torch.einsum("ht,htd->hd", scores.softmax(-1), values).reshape(1, -1)
            x = x + self._linear(p["o_proj"], att)
            h = self._rms(x, p["norm2"])
            x = x + self._linear(p["down_proj"], F.silu(self._linear(p["gate_proj"], h)) * self._linear(p["up_proj"], h))
        return self._linear(self.head, self._rms(x, self.final_norm))[0]

    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (block linears, head, norms, one embedding row)."""
        def nbytes(p):
            if p["kind"] == FLOAT:
                w = p["weight"].numel() * 4
            else:  # what the kernels read: codes, grids and the int32 index of the kept groups
                q = p["q"]
                w = sum(t.numel() * t.element_size() for t in (q.packed, q.scale, q.offset, q.group_index)
                        if t is not None)
            return w + (0 if p["bias"] is None else p["bias"].numel() * 4)

        total = nbytes(self.head) + self.final_norm.numel() * 4 + self.embed.shape[1] * 4
        for p in self.blocks:
            total += sum(nbytes(p[n]) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"))
            total += (p["norm1"].numel() + p["norm2"].numel()) * 4
        return total

    def cache_bytes(self, positions: int) -> int:
        """Bytes of keys and values one step reads at ``positions`` cached positions."""
        return 2 * len(self.blocks) * self.n_kv * positions * self.head_dim * 4


def decoder(model: nn.Module, max_len: int | None = None, backend: str = "auto", activations: str = "float32"):
    """A :class:`FastDecoder` when ``model`` has the Llama-family structure, else an
    :class:`EagerDecoder` (logged with the reason)."""
    problem = llama_structure_problem(model)
    if problem is None:
        try:
            return FastDecoder(model, max_len=max_len, backend=backend, activations=activations)
        except ConfigError as exc:
            if backend == "cpp":
                raise
            problem = str(exc)
    log.warning("fast decoder not used (%s); decoding with the model's own forward", problem)
    return EagerDecoder(model)


def _logits_kwargs(model) -> dict:
    from .timing import _forward_kwargs

    return _forward_kwargs(model)


def _generate(dec, ids: torch.Tensor, new_tokens: int) -> DecodeResult:
    """Greedy: the first token from the prefill, each further one from a one-token step;
    ``decode_seconds`` covers the ``new_tokens - 1`` steps."""
    if new_tokens < 2:
        raise ConfigError("generate needs new_tokens >= 2 (one prefill token, one decode step)")
    start = time.perf_counter()
    nxt = int(dec.prefill(ids).argmax())
    prefill = time.perf_counter() - start
    produced = [nxt]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        nxt = int(dec.step(nxt).argmax())
        produced.append(nxt)
    return DecodeResult(produced, prefill, time.perf_counter() - start)

