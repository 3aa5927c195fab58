"""Shared fixtures: tiny random models (fast tier) and helpers to capture them."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from graphpress.capture import capture
from graphpress.program import Program

# tests never write the user's cache (graphpress.cache): one folder per run, shared by its xdist workers (entries
# are built atomically), removed when the run ends
# (the controller loads this file before it starts the workers, which inherit its environment)
_RUN = os.environ.setdefault("GRAPHPRESS_TEST_RUN", uuid.uuid4().hex)
os.environ["GRAPHPRESS_CACHE"] = str(Path(tempfile.gettempdir()) / f"graphpress-test-cache-{_RUN}")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all-architectures", action="store_true",
                     help="tests/test_recipes_architectures.py: every named recipe on all ten architectures")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller, after every worker is done
        shutil.rmtree(os.environ["GRAPHPRESS_CACHE"], ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_llama(seed: int = 0, tie: bool = True) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).eval()
    # random norm scales, so folding them is visible in the numbers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


class ConvNet(nn.Module):
    """Conv -> BN -> ReLU twice, dropout, then Linear -> BN1d: the shapes BatchNorm folding must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8 * 6 * 6, 16)
        self.bn3 = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.drop(x).flatten(1)
        return self.head(torch.relu(self.bn3(self.fc(x))))


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = ConvNet()
    # non-trivial running statistics and affine parameters
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


def capture_tiny(name: str) -> Program:
    """Capture one of the tiny models with a fixed random batch."""
    g = torch.Generator().manual_seed(1)
    if name == "llama":
        return capture(tiny_llama(), {"input_ids": torch.randint(0, 128, (2, 12), generator=g)}, name="tiny-llama")
    if name == "bert":
        ids = torch.randint(0, 128, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        return capture(tiny_bert(), {"input_ids": ids, "attention_mask": mask}, name="tiny-bert")
    if name == "convnet":
        return capture(convnet(), (torch.randn(2, 3, 8, 8, generator=g),), name="convnet")
    raise KeyError(name)


@pytest.fixture(params=["llama", "bert", "convnet"])
def tiny_program(request: pytest.FixtureRequest) -> Program:
    return capture_tiny(request.param)


@pytest.fixture(scope="module")
def llama() -> Program:
    """The tiny llama (tied embedding and head), captured once per test module."""
    return capture_tiny("llama")


@pytest.fixture(scope="module")
def llama_untied() -> Program:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    return capture(tiny_llama(tie=False), {"input_ids": ids}, name="tiny-llama-untied")
