"""Every code sample and command of the README runs, as written, on a tiny model.

The named model ``smollm2-135m`` is swapped for a two-layer Llama with SmolLM2's real
tokenizer (GQA, tied embeddings, 49,152 tokens), so the samples run in seconds; everything
else (the text corpora, MNIST, the example recipes, the commands and their flags) is real.
Python samples that use names they do not define (an optimizer, a data loader, a problem
``A, y``) get a short prelude that defines them; the sample itself is executed verbatim.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsecraft.models as models_module
from sparsecraft import cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", README, re.S)]
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
COMMANDS = [code for lang, code in BLOCKS if lang == "" and "sparsecraft " in code]


@pytest.fixture(scope="module")
def tiny_smollm(tmp_path_factory):
    """A tiny Llama folder with SmolLM2's tokenizer, standing in for the named model."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    module, gguf, dist = models_module.NAMED_MODELS["smollm2-135m"]
    tok = transformers.AutoTokenizer.from_pretrained(models_module._package_dir(module, dist), gguf_file=gguf)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("models") / "tiny-smollm2"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def named_model_is_tiny(monkeypatch, tiny_smollm, tmp_path):
    original = models_module.load

    def load(name_or_path, *args, **kwargs):
        return original(str(tiny_smollm) if name_or_path == "smollm2-135m" else name_or_path, *args, **kwargs)

    monkeypatch.setattr(models_module, "load", load)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_smollm, tmp_path / "llama-7b")  # the Hugging Face folder the streaming samples prune
    return tmp_path


def _recovery_problem() -> dict:
    g = np.random.default_rng(0)
    A = g.standard_normal((40, 100)) / np.sqrt(40)
    x = np.zeros(100)
    x[g.choice(100, 5, replace=False)] = g.standard_normal(5) + 2
    A1, A2, A3 = (g.standard_normal((6, 8)) / np.sqrt(6) for _ in range(3))
    xk = np.zeros(512)
    xk[g.choice(512, 4, replace=False)] = 1.0
    yk = np.kron(np.kron(A1, A2), A3) @ xk
    return {"A": A, "y": A @ x, "nv": 1e-4, "A1": A1, "A2": A2, "A3": A3, "factors": [A1, A2, A3],
            "yk": yk, "y_next": yk}


# Names a sample uses without defining; each prelude defines them on small real objects.
PRELUDES = {
    "sc.train.RigL": """
import torch
from torch import nn
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
loss_fn = nn.functional.cross_entropy
g = torch.Generator().manual_seed(0)
loader = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
""",
    "ShrinkConfig": """
model, tok = sc.models.load("smollm2-135m")
""",
    "rt.compile_": """
import torch
model, tok = sc.models.load("smollm2-135m")
state = sc.prune_(model, sc.Magnitude(sparsity=0.5))
prompt_ids = sc.data.calibration(tok, samples=1, seq_len=32)
""",
    "sparsify_activations_": """
ids = prompt_ids[:, :8]
""",
    "import sparsecraft.recovery as R": """
globals().update(_recovery_problem())
""",
}


def _prelude(code: str) -> str:
    return "".join(p for key, p in PRELUDES.items() if key in code)


def test_every_python_sample_runs(named_model_is_tiny):
    assert len(PYTHON) >= 7, "the README's Python samples were not found"
    namespace = {"_recovery_problem": _recovery_problem}
    for i, code in enumerate(PYTHON):
        source = _prelude(code) + code
        if "R.krosbl([A1, A2, A3], y," in code:  # the Kronecker lines take the Kronecker measurement
            source = source.replace("R.krosbl([A1, A2, A3], y,", "R.krosbl([A1, A2, A3], yk,")
            source = source.replace("R.krosbl(factors, y,", "R.krosbl(factors, yk,")
            source = source.replace(".fit([A1, A2, A3], y)", ".fit([A1, A2, A3], yk)")
        try:
            exec(compile(source, f"README python sample {i + 1}", "exec"), namespace)
        except Exception as exc:  # name the sample, then fail with the original error
            raise AssertionError(f"README python sample {i + 1} failed:\n{code}") from exc


def _command_lines(block: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines()
            if line.strip().startswith("sparsecraft ")]


def _recovery_files(folder: Path) -> None:
    p = _recovery_problem()
    x = np.zeros(100)
    x[np.random.default_rng(1).choice(100, 6, replace=False)] = 1.5
    np.save(folder / "A.npy", p["A"])
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", p["A"] @ x)
    np.save(folder / "yk.npy", p["yk"])
    for name, f in zip(("F1", "F2", "F3"), p["factors"]):
        np.save(folder / f"{name}.npy", f)
    from sparsecraft.recovery import lorenz63

    t, X, _ = lorenz63()
    np.savetxt(folder / "lorenz.csv", np.column_stack([t, X])[:2000], delimiter=",", header="t,x,y,z", comments="")


def test_every_command_runs(named_model_is_tiny, capsys):
    folder = named_model_is_tiny
    shutil.copytree(ROOT / "examples", folder / "examples")
    _recovery_files(folder)
    lines = [argv for block in COMMANDS for argv in _command_lines(block)]
    assert len(lines) >= 15, "the README's commands were not found"
    for argv in lines:
        if argv[:2] == ["sparsecraft", "recover"] and "--factors" in argv:
            argv = [("yk.npy" if a == "y.npy" else a) for a in argv]  # the Kronecker measurement
        code = cli.main(argv[1:])
        err = capsys.readouterr().err
        assert code == 0, f"`{shlex.join(argv)}` exited {code}: {err.strip()[-500:]}"
    assert (folder / "pruned").is_dir() and (folder / "fast").is_dir() and (folder / "eqs").is_dir()


def test_make_targets_named_by_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    for block in (code for lang, code in BLOCKS if lang == "" and "make " in code):
        for target in re.findall(r"^make (\w[\w-]*)", block, re.M):
            assert re.search(rf"^{target}:", makefile, re.M), f"README names `make {target}`; no such target"
    assert os.path.exists(ROOT / ".ci" / "run")
