"""HFCausalLM: GPT's interface over tiny local transformers configs; unshifted loss, seeding, loading, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from protocols.config import ConfigError, ModelConfig
from worker.hf_model import HFCausalLM, build_hf_model
from worker.model import GPT, generate_tokens

V = 40  # the HF models' vocabulary
TOKENIZER_VOCAB = 37  # a character tokenizer's, smaller: its ids fit
BLOCK = 16


def gpt2_dir(root: Path, vocab: int = V, n_positions: int = 64) -> Path:
    d = root / "gpt2-tiny"
    transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=vocab, n_positions=n_positions, bos_token_id=0, eos_token_id=0
    ).save_pretrained(d)
    return d


def llama_dir(root: Path) -> Path:
    d = root / "llama-tiny"
    transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=V,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    ).save_pretrained(d)
    return d


def cfg_for(path: Path, block_size: int = BLOCK) -> ModelConfig:
    return ModelConfig(kind="hf", path=str(path), block_size=block_size)


def build(path: Path, seed: int = 0, block_size: int = BLOCK) -> HFCausalLM:
    torch.manual_seed(seed)
    return build_hf_model(cfg_for(path, block_size), TOKENIZER_VOCAB)


@pytest.fixture(params=["gpt2", "llama"])
def model_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return gpt2_dir(tmp_path) if request.param == "gpt2" else llama_dir(tmp_path)


def test_importing_the_module_does_not_import_transformers() -> None:
    code = "import sys, worker.hf_model; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_forward_shapes_and_unshifted_loss(model_dir: Path) -> None:
    model = build(model_dir)
    # The logits are cut to the tokenizer's vocabulary: the HF model's extra rows are ids it never produces.
    assert model.vocab_size == TOKENIZER_VOCAB and model.block_size == BLOCK and model.cfg.block_size == BLOCK
    assert model.hf.config.vocab_size == V
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(TOKENIZER_VOCAB, (3, BLOCK), generator=g)
    tgt = torch.randint(TOKENIZER_VOCAB, (3, BLOCK), generator=g)
    model.eval()  # no dropout: the two forwards below must see the same network
    logits, loss = model(idx)
    assert logits.shape == (3, BLOCK, TOKENIZER_VOCAB) and loss is None
    full = model.hf(input_ids=idx, use_cache=False).logits
    assert full.shape[-1] == V and torch.equal(logits, full[..., :TOKENIZER_VOCAB])
    logits, loss = model(idx, tgt)
    assert loss is not None and loss.shape == ()
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, TOKENIZER_VOCAB), tgt.reshape(-1)),
                               rtol=0, atol=0)
    # Shifted (what labels= would do) it differs: the targets are used position by position.
    shifted = F.cross_entropy(logits[:, :-1].reshape(-1, TOKENIZER_VOCAB), tgt[:, 1:].reshape(-1))
    assert not torch.allclose(loss, shifted)


def test_forward_refuses_more_than_block_size(model_dir: Path) -> None:
    model = build(model_dir)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))


def test_same_seed_same_weights_other_seed_other_weights(model_dir: Path) -> None:
    a, b, c = (build(model_dir, seed=s).state_dict() for s in (5, 5, 6))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_gpt2_head_is_tied_and_listed_once(tmp_path: Path) -> None:
    model = build(gpt2_dir(tmp_path))
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names)
    assert model.hf.lm_head.weight is model.hf.transformer.wte.weight
    assert model.num_params() == sum(p.numel() for _, p in model.named_parameters())


def test_a_directory_with_weights_loads_exactly_them(model_dir: Path) -> None:
    saved = build(model_dir, seed=3)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(0.5)  # weights no fresh initialisation would give
    saved.hf.save_pretrained(model_dir)
    loaded = build(model_dir, seed=99)  # a different seed: had it initialised, the weights would differ
    want, got = saved.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert loaded.training  # returned in train mode, like a fresh GPT


def test_a_few_adamw_steps_lower_the_loss(model_dir: Path) -> None:
    model = build(model_dir)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(TOKENIZER_VOCAB, (4, BLOCK), generator=g)
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        _, loss = model(x, y)
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_generate_shape_greedy_determinism_and_crop(model_dir: Path) -> None:
    model = build(model_dir).eval()
    prompt = torch.randint(TOKENIZER_VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    n = BLOCK + 4  # runs past block_size: the context is cropped
    greedy = model.generate(prompt, n, temperature=0.0)
    assert greedy.shape == (1, 5 + n)
    assert torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, model.generate(prompt, n, temperature=0.0))
    top1 = model.generate(prompt, n, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(top1, greedy)
    s1 = model.generate(prompt, n, temperature=1.0, generator=torch.Generator().manual_seed(7))
    s2 = model.generate(prompt, n, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2) and int(s1.max()) < TOKENIZER_VOCAB  # only ids the tokenizer can decode


def test_gpt_generate_is_the_shared_loop() -> None:
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8), 11).eval()
    prompt = torch.randint(11, (2, 3), generator=torch.Generator().manual_seed(1))
    greedy = gpt.generate(prompt, 12, temperature=0.0)
    assert torch.equal(greedy, generate_tokens(gpt, 8, prompt, 12, temperature=0.0))
    sampled = gpt.generate(prompt, 12, 0.8, 5, torch.Generator().manual_seed(3))
    assert torch.equal(sampled, generate_tokens(gpt, 8, prompt, 12, 0.8, 5, torch.Generator().manual_seed(3)))
    assert sampled.shape == (2, 15)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_hf_model(cfg_for(tmp_path / "nowhere"), TOKENIZER_VOCAB)


def test_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(ConfigError, match="not a directory"):
        build_hf_model(cfg_for(f), TOKENIZER_VOCAB)


def test_directory_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        build_hf_model(cfg_for(tmp_path), TOKENIZER_VOCAB)


def test_vocab_smaller_than_the_tokenizers(tmp_path: Path) -> None:
    d = gpt2_dir(tmp_path, vocab=20)
    with pytest.raises(ConfigError, match=r"vocab_size 20 is smaller than the tokenizer's vocab_size 37"):
        build_hf_model(cfg_for(d), TOKENIZER_VOCAB)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_block_size_beyond_the_models_positions(tmp_path: Path, which: str) -> None:
    d = gpt2_dir(tmp_path) if which == "gpt2" else llama_dir(tmp_path)
    assert json.loads((d / "config.json").read_text())  # a real config, so only the length is wrong
    with pytest.raises(ConfigError, match=r"block_size 65 is larger than the model's max positions 64"):
        build_hf_model(cfg_for(d, block_size=65), TOKENIZER_VOCAB)


def test_transformers_missing_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = gpt2_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(ConfigError, match=r"pip install 'lowband\[hf\]'"):
        build_hf_model(cfg_for(d), TOKENIZER_VOCAB)
