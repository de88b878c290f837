"""GPT: shapes, loss at init, causality, deterministic init, tying, scaled init, generation."""

from __future__ import annotations

import math

import pytest
import torch

from protocols.config import ModelConfig
from worker.data import CharTokenizer
from worker.model import GPT
from worker.sample import sample_text

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)


def make(cfg: ModelConfig = TINY, vocab: int = 11, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg, vocab)


def test_forward_shapes_and_optional_loss() -> None:
    model = make()
    idx = torch.randint(11, (3, 8))
    logits, loss = model(idx)
    assert logits.shape == (3, 8, 11) and loss is None
    logits, loss = model(idx, idx)
    assert loss is not None and loss.shape == ()


def test_loss_at_init_is_about_log_vocab() -> None:
    vocab = 80
    model = make(ModelConfig(), vocab)  # the default config
    idx = torch.randint(vocab, (16, 64), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(vocab, (16, 64), generator=torch.Generator().manual_seed(2))
    _, loss = model(idx, tgt)
    assert loss is not None
    assert abs(loss.item() - math.log(vocab)) < 0.1


def test_changing_a_future_token_leaves_earlier_logits_unchanged() -> None:
    model = make().eval()
    idx = torch.randint(11, (2, 12), generator=torch.Generator().manual_seed(3))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 11
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = make(seed=5).state_dict(), make(seed=5).state_dict(), make(seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], c["wte.weight"])


def test_head_is_tied_to_embedding_and_counted_once() -> None:
    model = make()
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names
    assert model.num_params() == sum(p.numel() for _, p in model.named_parameters())


def test_residual_projections_have_scaled_init() -> None:
    cfg = ModelConfig(n_layer=8, n_head=4, n_embd=128)
    model = make(cfg)
    scaled = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            assert abs(p.std().item() - scaled) < 0.1 * scaled, name
        elif name.endswith("qkv.weight") or name.endswith("fc.weight"):
            assert abs(p.std().item() - 0.02) < 0.002, name


def test_longer_than_block_size_raises() -> None:
    with pytest.raises(ValueError, match="block_size"):
        make()(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))


def test_generate_extends_prompt_and_top1_equals_greedy() -> None:
    model = make().eval()
    prompt = torch.randint(11, (2, 5), generator=torch.Generator().manual_seed(4))
    greedy = model.generate(prompt, 20, temperature=0.0)  # runs past block_size: context is cropped
    assert greedy.shape == (2, 25) and torch.equal(greedy[:, :5], prompt)
    top1 = model.generate(prompt, 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(top1, greedy)


def test_sample_text_is_seeded_and_starts_with_prompt() -> None:
    tok = CharTokenizer.from_text("abcdefgh \n")
    model = make(vocab=tok.vocab_size)
    one = sample_text(model, tok, "abc", 40, temperature=1.0, seed=1)
    assert one == sample_text(model, tok, "abc", 40, temperature=1.0, seed=1)
    assert one != sample_text(model, tok, "abc", 40, temperature=1.0, seed=2)
    assert one.startswith("abc") and len(one) == 43 and set(one) <= set(tok.chars)
    assert model.training  # mode restored
