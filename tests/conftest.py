"""Shared test set-up: offline Hub, no TF32, tiny checkpoints, the optional real Qwen tokenizer."""

import os

# read at import by huggingface_hub: never wait on the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

REAL_TOKENIZER = os.environ.get("MINROUTE_QWEN_TOKENIZER")


@pytest.fixture(autouse=True)
def _deterministic_mode_stays_in_its_test():
    """train.main on CUDA turns on deterministic algorithms for its process (--deterministic, the
    default); run in this process, it would leave them on for every later test (and e.g. top-p
    sampling's CUDA cumsum refuses).
    """
    mode, fill = (
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    yield
    torch.use_deterministic_algorithms(mode)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture(scope="session")
def real_tokenizer_path():
    """Path to the real Qwen2.5 tokenizer.json, or skip (set MINROUTE_QWEN_TOKENIZER to run these
    tests)."""
    if not REAL_TOKENIZER or not Path(REAL_TOKENIZER).is_file():
        pytest.skip(
            "real Qwen tokenizer not available (set MINROUTE_QWEN_TOKENIZER=path/to/tokenizer.json)"
        )
    return Path(REAL_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Qwen2 checkpoint (4 layers, d=64, GQA 2) with the bundled BPE tokenizer."""
    from minroute.run.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's demo (train.py --demo), shortened to 40 updates (the full demo is 120)."""
    import train

    out = tmp_path_factory.mktemp("demo") / "run"
    assert train.main(["--demo", "--out", str(out), "--steps", "40", "--eval-every", "10"]) == 0
    return out


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """A tiny random Qwen2 checkpoint with 6 layers (routing tests)."""
    from minroute.run.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("deep"), num_hidden_layers=6, seed=2)
