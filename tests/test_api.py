"""The public API (minroute/__init__.py) a user's own script imports, used as the README does."""

import torch

import minroute
from minroute import LayerRoute, add_lora, load_model, load_tokenizer, write_tiny_checkpoint


def test_every_public_name_imports():
    missing = [n for n in minroute.__all__ if not hasattr(minroute, n)]
    assert not missing, missing


def test_readme_api_example_runs(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "tiny", num_hidden_layers=6, seed=0)
    tok = load_tokenizer(d)
    route = LayerRoute(add_lora(load_model(d)))
    ids = torch.tensor([tok.tokenizer.encode("hello world, how are you").ids])
    mask = torch.ones_like(ids)
    h, soft, hard = route.gated_hidden(ids, mask)
    assert h.shape == (1, ids.shape[1], route.config.hidden_size) and soft.shape == hard.shape == (
        1,
        6,
    )
    assert hard[0].tolist() == [
        True,
        True,
        False,
        False,
        True,
        True,
    ], "band 2..3 of 6 starts closed"
    with torch.no_grad():
        logits = route(ids, mask)
    assert logits.shape == (1, ids.shape[1], route.config.vocab_size)
    assert route.last.rows_run == [1, 1, 0, 0, 1, 1], "closed blocks are not computed at inference"
