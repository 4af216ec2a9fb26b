"""Where a decode step of SmolLM2-135M spends its time: the eager model against the fast decoder.

    python benchmarks/profile_decode.py                 # 1 and 2 threads -> results/decode_profile.json, .md
    python benchmarks/profile_decode.py --smoke         # 32-token prompt, 3 steps, prints only

Eager (the model's own forward with its cache, today's path): forward hooks on every module time
it, and each module's time minus its timed children's is charged to a category (block linears,
lm_head, RMSNorm, attention outside its linears = rotary + cache update + attention kernel +
reshapes, MLP outside its linears = SiLU and product, decoder layer outside its parts = residual
adds, model outside its layers = embedding, rotary tables, masks, cache bookkeeping, the causal-LM
wrapper = logits slicing and output objects). *outside the model* is the rest of the step (argmax,
Python loop). Hooks cost time themselves: steps are timed without hooks too, and the table gives both.

Fast decoder (:class:`sparsecraft.runtime.FastDecoder`, fp32): the compiled step's own phase timers.
Prompt: the first ``--prompt-len`` held-out Lee tokens; then ``--steps`` greedy one-token steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import torch
from torch import nn

from _common import RESULTS, bench_lock, command_line, cpu_info, git_commit, load_average, write_json, write_text

OUT = RESULTS / "decode_profile.json"


def _category(name: str, module: nn.Module) -> str:
    kind = type(module).__name__
    if isinstance(module, nn.Linear) or hasattr(module, "qweight"):
        return "lm_head" if name == "lm_head" else "block linears"
    if "RMSNorm" in kind:
        return "rmsnorm"
    if "Attention" in kind:
        return "attention outside its linears (rotary, cache, kernel, reshapes)"
    if "MLP" in kind:
        return "MLP outside its linears (SiLU, product)"
    if "DecoderLayer" in kind:
        return "decoder layer outside its parts (residual adds)"
    if kind.endswith("ForCausalLM"):
        return "causal-LM wrapper (logits slicing, outputs)"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if "Rotary" in kind:
        return "rotary tables"
    return "model outside its layers (masks, cache bookkeeping)"


class HookTimer:
    """Exclusive seconds per category, from forward pre/post hooks on every module."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.seconds: dict[str, float] = {}
        self.stack: list[list] = []  # [category, start, children seconds]
        self.handles: list = []

    def attach(self) -> None:
        for name, module in self.model.named_modules():
            cat = _category(name, module)
            self.handles.append(module.register_forward_pre_hook(lambda m, a, cat=cat: self._enter(cat)))
            self.handles.append(module.register_forward_hook(lambda m, a, o: self._exit()))

    def _enter(self, cat: str) -> None:
        self.stack.append([cat, time.perf_counter(), 0.0])

    def _exit(self) -> None:
        cat, start, children = self.stack.pop()
        total = time.perf_counter() - start
        self.seconds[cat] = self.seconds.get(cat, 0.0) + total - children
        if self.stack:
            self.stack[-1][2] += total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.inference_mode()
def eager_steps(model, ids: torch.Tensor, steps: int, timer: HookTimer | None = None) -> list[float]:
    """Seconds of each of ``steps`` one-token steps after a prefill of ``ids`` (hooks off in the prefill)."""
    from sparsecraft.runtime.timing import _forward_kwargs

    kw = _forward_kwargs(model)
    out = model(ids, use_cache=True, **kw)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    if timer is not None:
        timer.attach()  # the steps only, not the prefill
    try:
        for _ in range(steps):
            start = time.perf_counter()
            out = model(nxt, past_key_values=cache, use_cache=True, **kw)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            int(nxt)
            times.append(time.perf_counter() - start)
    finally:
        if timer is not None:
            timer.remove()
    return times


def run(threads_list: list[int], prompt_len: int, steps: int) -> dict:
    from sparsecraft import data, models
    from sparsecraft.runtime.decode import FastDecoder

    model, tok = models.load("smollm2-135m")
    ids = data.evaluation_tokens(tok)[:prompt_len].unsqueeze(0)
    fast = FastDecoder(model, max_len=prompt_len + steps + 2, backend="cpp")
    res: dict = {"settings": {"prompt_len": prompt_len, "steps": steps},
                 "env": {"commit": git_commit(), "command": command_line(), "cpu": cpu_info(), "torch": torch.__version__,
                         "load_avg_start": load_average()}, "threads": {}}
    for threads in threads_list:
        torch.set_num_threads(threads)
        plain = eager_steps(model, ids, steps)
        timer = HookTimer(model)
        hooked = eager_steps(model, ids, steps, timer)
        fast.prefill(ids)
        fast.set_profiling(True)
        tok_id, fast_times = int(ids[0, -1]), []
        for _ in range(steps):
            start = time.perf_counter()
            tok_id = int(fast.step(tok_id).argmax())
            fast_times.append(time.perf_counter() - start)
        phases = fast.profile()
        fast.set_profiling(False)
        hooked_ms = statistics.median(hooked) * 1e3
        eager = {k: v * 1e3 / steps for k, v in sorted(timer.seconds.items(), key=lambda kv: -kv[1])}
        eager["outside the model (argmax, loop)"] = hooked_ms - sum(eager.values())
        res["threads"][str(threads)] = {
            "eager_ms": statistics.median(plain) * 1e3, "eager_hooked_ms": hooked_ms, "eager_ms_per_token": eager,
            "fast_ms": statistics.median(fast_times) * 1e3,
            "fast_ms_per_token": {k: v * 1e3 / steps for k, v in phases.items()}}
        print(json.dumps(res["threads"][str(threads)], indent=1), flush=True)
    res["env"]["load_avg_end"] = load_average()
    return res


def write_table() -> str:
    res = json.loads(OUT.read_text())
    env, st = res["env"], res["settings"]
    lines = ["# Decode profile: SmolLM2-135M fp32, batch 1", "",
             f"Produced by `{env['command']}` (commit {env['commit']}, torch {env['torch']}, "
             f"{env['cpu'].get('cpus')} CPUs {env['cpu'].get('model', '')}; load average {env['load_avg_start'][0]} at "
             f"start, {env.get('load_avg_end', ['?'])[0]} at end). {st['steps']} one-token steps after a "
             f"{st['prompt_len']}-token prompt; ms per token (means over the steps). Eager: forward hooks charge each "
             "module's time minus its children's; the hooks' own cost shows as the difference between the hooked "
             "and the plain step. Fast: the compiled step's phase timers.", ""]
    for threads, b in res["threads"].items():
        lines += [f"## {threads} thread{'s' if threads != '1' else ''}", "",
                  f"Eager step {b['eager_ms']:.2f} ms (median; {b['eager_hooked_ms']:.2f} ms with the hooks); fast "
                  f"step {b['fast_ms']:.2f} ms.", "", "| eager: where the time goes | ms/token | share |", "|---|---|---|"]
        total = sum(b["eager_ms_per_token"].values())
        for k, v in b["eager_ms_per_token"].items():
            lines.append(f"| {k} | {v:.3f} | {v / total:.0%} |")
        lines += ["", "| fast: phase | ms/token | share |", "|---|---|---|"]
        total = sum(b["fast_ms_per_token"].values())
        for k, v in sorted(b["fast_ms_per_token"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {k} | {v:.3f} | {v / total:.0%} |")
        lines.append("")
    text = "\n".join(lines)
    write_text(RESULTS / "decode_profile.md", text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("run", "table"), default="run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.what == "table":
        sys.stdout.write(write_table())
        return
    if args.smoke:
        run([1], 32, 3)
        return
    with bench_lock():
        res = run(args.threads, args.prompt_len, args.steps)
    write_json(OUT, res)
    sys.stdout.write(write_table())


if __name__ == "__main__":
    main()
