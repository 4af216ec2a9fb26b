"""Test set-up: keep caches in temporary folders and never touch the network."""

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="sparsecraft-tests-")
for var, sub in (("HF_HOME", "hf"), ("MPLCONFIGDIR", "mpl"), ("SCIKIT_LEARN_DATA", "sklearn")):
    os.environ[var] = os.path.join(_TMP, sub)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class SmallCNN(nn.Module):
    """Conv layers of several kinds plus a classifier head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv1d = nn.Conv1d(32, 16, 1)
        self.fc = nn.Linear(16 * 8, 64)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))  # [B, 32, 8, 8]
        x = x.mean(dim=3)  # [B, 32, 8]
        x = torch.relu(self.conv1d(x))  # [B, 16, 8]
        x = torch.relu(self.fc(x.flatten(1)))
        return self.classifier(x)


class TinyLM(nn.Module):
    """Embedding, two MLP blocks with norms, and an output head."""

    def __init__(self, vocab=50, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(dim), "up": nn.Linear(dim, 64), "down": nn.Linear(64, dim)})
            for _ in range(2)
        )
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down"](torch.relu(b["up"](b["norm"](h))))
        return self.lm_head(h)


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return SmallCNN()


@pytest.fixture
def tiny_lm():
    torch.manual_seed(0)
    return TinyLM()


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A small Llama with GQA (4 query heads, 2 key/value heads) saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_tok_dir(tmp_path_factory):
    """A small random Llama saved with the real MiniLM (WordPiece) tokenizer: calibrated
    methods and the CLI's calibration and evaluation run on it in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sparsecraft.models import NAMED_MODELS, _package_dir

    module, sub, dist = NAMED_MODELS["minilm-l6"]
    tok = AutoTokenizer.from_pretrained(_package_dir(module, dist) / sub)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.sep_token_id)
    path = tmp_path_factory.mktemp("m") / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def llama_block():
    """Block 0 of a tiny random Llama with its calibration inputs (6 batches of 2 x 16 tokens)
    and its dense outputs on them: ``(block, batches, targets)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsecraft.blocks import capture_block_inputs, find_blocks

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    calib = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(1))
    _, blocks = find_blocks(model)
    batches = capture_block_inputs(model, blocks, calib, batch_size=2)
    block = blocks[0]
    from sparsecraft.blocks import run_block

    targets = [t.clone() for t in run_block(block, batches)]  # [batch, tokens, hidden] each
    return block, batches, targets


def snapshot(model: nn.Module) -> dict:
    """A deep copy of the state dict, to compare before/after."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"
    assert not getattr(model, "sparsecraft_meta", None), "meta recorded on failure"
