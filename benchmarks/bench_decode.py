"""Decode speed of SmolLM2-135M: today's eager path, the fast decoder (fp32, W4, W4 + 50% group
sparsity) and llama.cpp on the same GGUF file, side by side.

    python benchmarks/bench_decode.py                       # 1 and 2 threads -> results/decode.json, decode.md
    python benchmarks/bench_decode.py --install-llama-cpp   # first build llama-cpp-python from source
    python benchmarks/bench_decode.py table                 # rewrite decode.md from decode.json
    python benchmarks/bench_decode.py --smoke               # a few tokens, 1 thread, nothing written

Same prompt tokens for every row (the first ``--prompt-len`` tokens of the held-out Lee text,
tokenised by the tokenizer built from the GGUF; llama.cpp is fed the token ids, not text),
``--new-tokens`` greedy tokens, batch 1. For each thread count the rows run in rounds, each round
timing every row once in a seeded random order; medians over ``--repeats`` rounds. Prefill = the
prompt's forward pass; decode = the ``new_tokens - 1`` one-token steps after it.

Rows: *eager-fp32* (the model's own forward and cache: today's path), *fast-fp32*
(:class:`sparsecraft.runtime.FastDecoder`, float32 GEMV), *fast-w4g64* (every block linear and the
head int4, group 64), *fast-w4g64-x8* (the same weights, each layer's input rounded to int8 per
block of 32 and multiplied in integers, as llama.cpp's Q4 kernels do; its perplexity is computed
with every quantised layer on that path), *fast-w4g64-gs16* (block linears int4 + group:16
sparsity keeping 50% of the groups per row, head int4), *fast-w4g64-gs16-x8* (the same weights;
the dense int4 head takes int8 activations, the group-sparse linears keep float ones), *llama.cpp* (llama-cpp-python, the GGUF's Q4_1 weights). The W4 weights
come from round-to-nearest (``sparsecraft.quant.rtn_quantize``, asymmetric), with the 16-column
groups of largest norm kept: a speed baseline, not the error-compensated quantiser of ``sparsecraft.quant``; the
perplexity column says what that costs.

Per-token breakdown: one extra run of each fast row with the compiled step's phase timers on.
Memory-bandwidth bound: bytes a step must read (weights + the KV cache at the average decode
position) divided by the read bandwidth measured here (``torch.sum`` over 256 MiB, same threads).

llama.cpp is a benchmark-only dependency: ``--install-llama-cpp`` builds llama-cpp-python 0.3.36
from source (the nearest 0.3.x if that one fails) with AMX off and AVX2/AVX-512 on (the native build
crashes in ``llama_decode`` on CPUs with AMX); without it, and without llama_cpp installed, the
llama.cpp row is left out and the table says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import RESULTS, bench_lock, command_line, cpu_info, git_commit, load_average, write_json, write_text

OUT = RESULTS / "decode.json"
LLAMA_CPP_VERSION = "0.3.36"


def _cmake_args() -> str:
    """The issue's build flags (a native build crashes in llama_decode on AMX machines), with
    AVX-512 only where this CPU has it: an AVX-512 build dies of an illegal instruction on
    CPUs without it (this machine's AMD EPYC has AVX2, FMA and F16C only)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    avx512 = "ON" if "avx512f" in flags else "OFF"
    return (f"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512={avx512} "
            "-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF")

log = logging.getLogger("bench_decode")


# -- llama.cpp (optional) -------------------------------------------------------------------------
def install_llama_cpp() -> None:
    """Build llama-cpp-python from source (heavy: several minutes) unless it imports already."""
    try:
        import llama_cpp  # noqa: F401

        return
    except ImportError:
        pass
    cmake_args = _cmake_args()
    env = {**os.environ, "CMAKE_ARGS": cmake_args}
    for spec in (f"llama-cpp-python=={LLAMA_CPP_VERSION}", "llama-cpp-python>=0.3,<0.4"):
        log.warning("building %s from source (CMAKE_ARGS=%s)", spec, cmake_args)
        done = subprocess.run([sys.executable, "-m", "pip", "install", spec, "--no-binary", "llama-cpp-python"],
                              env=env)
        if done.returncode == 0:
            return
    log.warning("llama-cpp-python could not be built; the llama.cpp row is left out")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


class LlamaCppRow:
    """llama.cpp on the GGUF: greedy decoding from token ids, logits read after every eval."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        import numpy as np

        llama_cpp = _llama_cpp()
        self.np = np
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, logits_all=False, verbose=False)
        self.version = llama_cpp.__version__
        self._lib, self._vocab = llama_cpp, self.llm.n_vocab()

    def _next_token(self) -> int:
        # without logits_all, Llama.eval fills no `scores` row (llama-cpp-python 0.3.36): the last token's
        # logits are read from the context, as llama.cpp's own sampler reads them
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self.np.argmax(self.np.ctypeslib.as_array(ptr, shape=(self._vocab,))))

    def generate(self, ids: list[int], new_tokens: int):
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        nxt = self._next_token()
        prefill = time.perf_counter() - start
        produced = [nxt]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([nxt])
            nxt = self._next_token()
            produced.append(nxt)
        return produced, prefill, time.perf_counter() - start


def llama_cpp_perplexity(gguf: Path, tokens: torch.Tensor, seq_len: int, threads: int) -> float:
    """Perplexity from llama.cpp's logits on the same non-overlapping windows as ours."""
    import numpy as np

    llm = _llama_cpp().Llama(model_path=str(gguf), n_ctx=seq_len, n_threads=threads, n_threads_batch=threads,
                             n_batch=seq_len, logits_all=True, verbose=False)
    windows = tokens.numel() // seq_len
    nll, count = 0.0, 0
    for w in tokens[: windows * seq_len].view(windows, seq_len).tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: seq_len - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        nll += float((logz - logits[np.arange(seq_len - 1), w[1:]]).sum())
        count += seq_len - 1
    return float(np.exp(nll / count))


# -- our rows --------------------------------------------------------------------------------------
def quantised_copy(model, sparse_group: int = 0, keep: float = 1.0, group_size: int = 64):
    """A copy with every block linear and the head as QuantLinear (RTN int4, asymmetric); block
    linears also group-sparse when ``sparse_group``, keeping the fraction ``keep`` of each row's
    runs of G inputs of largest norm (the head stays dense int4)."""
    from torch import nn

    from sparsecraft.patterns import Group
    from sparsecraft.quant import QuantSpec, rtn_quantize, swap_linear_

    model = copy.deepcopy(model)
    spec = QuantSpec(4, group_size, symmetric=False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            w = module.weight.detach()
            if sparse_group and name != "lm_head":
                mask = Group(sparse_group).keep_mask(w.square(), 1.0 - keep)
                swap_linear_(model, name, rtn_quantize(w, spec, keep=mask, sparse_group=sparse_group))
            else:
                swap_linear_(model, name, rtn_quantize(w, spec))
    return model


def read_bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second that ``torch.sum`` reads from a ``mib`` MiB float32 tensor (median)."""
    t = torch.ones(mib * 2 ** 20 // 4)
    t.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - start)
    return t.numel() * 4 / statistics.median(times)


def run(threads_list: list[int], prompt_len: int, new_tokens: int, repeats: int, eval_tokens_n: int, ppl: bool,
        smoke: bool) -> dict:
    from sparsecraft import data, models
    from sparsecraft.runtime.decode import EagerDecoder, FastDecoder
    from sparsecraft.runtime.extension import quant_extension_status
    from sparsecraft.runtime.qkernels import int8_activations, kernel_isa

    model, tok = models.load("smollm2-135m")
    gguf = models.gguf_file("smollm2-135m")
    stream = data.evaluation_tokens(tok)
    ids = stream[:prompt_len].unsqueeze(0)
    eval_tokens = stream[:eval_tokens_n]
    max_len = prompt_len + new_tokens + 1
    w4, w4gs = quantised_copy(model), quantised_copy(model, sparse_group=16, keep=0.5)
    rows = {"eager-fp32": (model, EagerDecoder(model)),
            "fast-fp32": (model, FastDecoder(model, max_len=max_len, backend="cpp")),
            "fast-w4g64": (w4, FastDecoder(w4, max_len=max_len, backend="cpp")),
            "fast-w4g64-x8": (w4, FastDecoder(w4, max_len=max_len, backend="cpp", activations="int8")),
            "fast-w4g64-gs16": (w4gs, FastDecoder(w4gs, max_len=max_len, backend="cpp")),
            "fast-w4g64-gs16-x8": (w4gs, FastDecoder(w4gs, max_len=max_len, backend="cpp", activations="int8"))}
    have_llama = _llama_cpp() is not None and gguf.is_file()
    res: dict = {"settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
                              "eval_tokens": int(eval_tokens.numel()), "gguf": gguf.name,
                              "gguf_bytes": gguf.stat().st_size if gguf.is_file() else None,
                              "quantiser": "round-to-nearest (sparsecraft.quant.rtn_quantize), asymmetric, group 64",
                              "llama_cpp": None if not have_llama else _llama_cpp().__version__},
                 "env": {"commit": git_commit(), "command": command_line(), "cpu": cpu_info(),
                         "torch": torch.__version__, "quant_extension": quant_extension_status(),
                         "kernel_isa": kernel_isa(), "load_avg_start": load_average()},
                 "threads": {}, "quality": {}}
    if not have_llama:
        log.warning("llama_cpp not importable: the llama.cpp row is left out (--install-llama-cpp builds it)")
    for threads in threads_list:
        torch.set_num_threads(threads)
        bandwidth = read_bandwidth(threads)
        runners = {name: dec for name, (_, dec) in rows.items()}
        if have_llama:
            runners["llama.cpp"] = LlamaCppRow(gguf, threads, max_len + 8)
        samples: dict[str, list] = {name: [] for name in runners}
        order = list(runners)
        rng = random.Random(threads)
        for _ in range(repeats):
            rng.shuffle(order)
            for name in order:
                dec = runners[name]
                if name == "llama.cpp":
                    tokens, pre, dec_s = dec.generate(ids[0].tolist(), new_tokens)
                else:
                    r = dec.generate(ids, new_tokens)
                    tokens, pre, dec_s = r.tokens, r.prefill_seconds, r.decode_seconds
                samples[name].append((pre, dec_s, tokens))
                print(f"threads {threads} {name}: prefill {pre * 1e3:.1f} ms, {(new_tokens - 1) / dec_s:.2f} tok/s",
                      flush=True)
        out = {}
        ref = samples["eager-fp32"][0][2]
        for name, ss in samples.items():
            rates = sorted((new_tokens - 1) / d for _, d, _ in ss)
            row = {"prefill_ms": statistics.median(p for p, _, _ in ss) * 1e3,
                   "decode_tok_s": statistics.median(rates), "decode_tok_s_all": rates, "tokens": ss[0][2],
                   "same_tokens_as_eager": sum(a == b for a, b in zip(ss[0][2], ref))}
            if name in rows:
                dec = rows[name][1]
                if getattr(dec, "fast", False):
                    nbytes = dec.weight_bytes() + dec.cache_bytes(prompt_len + new_tokens // 2)
                    dec.set_profiling(True)
                    dec.generate(ids, new_tokens)
                    row["phases_ms_per_token"] = {k: v * 1e3 / (new_tokens - 1) for k, v in dec.profile().items()}
                    dec.set_profiling(False)
                else:  # eager reads the same fp32 weights as fast-fp32
                    fast = rows["fast-fp32"][1]
                    nbytes = fast.weight_bytes() + fast.cache_bytes(prompt_len + new_tokens // 2)
            else:  # llama.cpp: the file's tensors (SmolLM2's head is tied to the embedding) + fp16 KV cache
                cfg = model.config
                kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
                nbytes = res["settings"]["gguf_bytes"] + kv * 2 * (prompt_len + new_tokens // 2)
            row["bytes_per_token"] = nbytes
            row["bound_ms"] = nbytes / bandwidth * 1e3
            out[name] = row
        res["threads"][str(threads)] = {"rows": out, "read_bandwidth_gb_s": bandwidth / 1e9,
                                        "load_avg_end": load_average()}
    if ppl:
        for name, (m, _) in rows.items():
            if name == "fast-fp32":
                continue  # the same model as eager-fp32
            with int8_activations() if name.endswith("-x8") else contextlib.nullcontext():
                res["quality"][name] = models.perplexity(m, eval_tokens, 512, progress=not smoke)
            print(f"perplexity {name}: {res['quality'][name]:.2f}", flush=True)
        res["quality"]["fast-fp32"] = res["quality"].get("eager-fp32")
        if have_llama:
            res["quality"]["llama.cpp"] = llama_cpp_perplexity(gguf, eval_tokens, 512, max(threads_list))
            print(f"perplexity llama.cpp: {res['quality']['llama.cpp']:.2f}", flush=True)
    return res


# -- table ------------------------------------------------------------------------------------------
def write_table() -> str:
    res = json.loads(OUT.read_text())
    st, env = res["settings"], res["env"]
    cpu = env.get("cpu", {})
    lines = ["# Decode: SmolLM2-135M, batch 1", "",
             f"Produced by `{env['command']}` (commit {env['commit']}, torch {env['torch']}, {cpu.get('cpus')} CPUs "
             f"{cpu.get('model', '')}, quantised kernels: {env['quant_extension']}, loops {env['kernel_isa']}; "
             f"llama-cpp-python {st['llama_cpp'] or 'not installed: row left out'}; 1-min load average "
             f"{env['load_avg_start'][0]} at start). Prompt: {st['prompt_len']} tokens of held-out Lee text, the same "
             f"ids for every row; {st['new_tokens']} greedy tokens; medians of {st['repeats']} interleaved rounds. "
             f"W4 rows: {st['quantiser']} (a speed baseline; `sparsecraft.quant`'s error-compensated quantiser is "
             f"the one to use for quality). *bound* = bytes one step reads (weights + KV cache at the average "
             f"position) / the measured read bandwidth: the fastest a step could be.", ""]
    for threads, block in res["threads"].items():
        rows = block["rows"]
        eager = rows["eager-fp32"]["decode_tok_s"]
        llama = rows.get("llama.cpp", {}).get("decode_tok_s")
        lines += [f"## {threads} thread{'s' if threads != '1' else ''} (read bandwidth "
                  f"{block['read_bandwidth_gb_s']:.1f} GB/s; load average at end {block['load_avg_end'][0]})", "",
                  "| row | prefill ms | decode tok/s (min-max) | ms/token | x eager | x llama.cpp | MB/token | "
                  "bound ms | bound / actual | same tokens as eager | perplexity |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            ms = 1e3 / r["decode_tok_s"]
            ppl = res.get("quality", {}).get(name)
            lines.append(f"| {name} | {r['prefill_ms']:.0f} | {r['decode_tok_s']:.1f} ({min(r['decode_tok_s_all']):.1f}-"
                         f"{max(r['decode_tok_s_all']):.1f}) | {ms:.2f} | {r['decode_tok_s'] / eager:.2f}x | "
                         + (f"{r['decode_tok_s'] / llama:.2f}x" if llama else "-")
                         + f" | {r['bytes_per_token'] / 1e6:.1f} | {r['bound_ms']:.2f} | {r['bound_ms'] / ms:.0%} | "
                         f"{r['same_tokens_as_eager']}/{len(r['tokens'])} | {f'{ppl:.2f}' if ppl else '-'} |")
        phased = {n: r["phases_ms_per_token"] for n, r in rows.items() if "phases_ms_per_token" in r}
        if phased:
            phases = list(next(iter(phased.values())))
            lines += ["", "Per-token time of the fast rows by phase (ms; one extra run with the step's timers on):", "",
                      "| phase | " + " | ".join(phased) + " |", "|---|" + "---|" * len(phased)]
            for p in phases:
                lines.append(f"| {p} | " + " | ".join(f"{v[p]:.3f}" for v in phased.values()) + " |")
            lines.append("| **total** | " + " | ".join(f"{sum(v.values()):.3f}" for v in phased.values()) + " |")
        lines.append("")
    text = "\n".join(lines)
    write_text(RESULTS / "decode.md", text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("run", "table"), default="run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-tokens", type=int, default=32768, help="perplexity: first N held-out tokens")
    parser.add_argument("--no-ppl", action="store_true", help="skip the perplexity column")
    parser.add_argument("--install-llama-cpp", action="store_true", help="build llama-cpp-python from source first")
    parser.add_argument("--smoke", action="store_true", help="32-token prompt, 4 tokens, 1 round, 1 thread, no "
                        "perplexity; prints, writes nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.what == "table":
        sys.stdout.write(write_table())
        return
    if args.install_llama_cpp:
        install_llama_cpp()
    if args.smoke:
        res = run([1], 32, 4, 1, 1024, False, True)
        print(json.dumps({t: {n: {k: v for k, v in r.items() if k != "tokens"} for n, r in b["rows"].items()}
                          for t, b in res["threads"].items()}, indent=1))
        return
    with bench_lock():
        res = run(args.threads, args.prompt_len, args.new_tokens, args.repeats, args.eval_tokens, not args.no_ppl,
                  False)
    write_json(OUT, res)
    sys.stdout.write(write_table())


if __name__ == "__main__":
    main()
