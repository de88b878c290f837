"""build_optimizer: AdamW as the trainer always built it, GaLore's AdamW and its smaller state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from protocols.config import LowRankConfig, ModelConfig, TrainConfig
from worker.model import GPT
from worker.optimizers import build_optimizer, galore_state_elements, matches, optimizer_state_bytes, state_bytes
from worker.trainer import InnerTrainer, lr_at

MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=128, block_size=32)
VOCAB = 65
RANK = 8
TARGETS = ("qkv", "proj", "fc")


def make_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(MODEL, VOCAB)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (4, MODEL.block_size + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def galore_cfg(**kw: object) -> LowRankConfig:
    return LowRankConfig(**{"method": "galore", "rank": RANK, **kw})  # type: ignore[arg-type]


def one_step(model: GPT, opt: torch.optim.Optimizer) -> None:
    x, y = batch()
    opt.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    assert loss is not None
    loss.backward()
    opt.step()


def hyper(group: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in group.items() if k != "params"}


@pytest.mark.parametrize("lowrank", [None, "lora", "pissa"])
def test_without_galore_it_is_the_trainers_adamw(lowrank: str | None) -> None:
    model = make_gpt()
    model.ln_f.bias.requires_grad_(False)  # frozen parameters are left out
    cfg = TrainConfig(weight_decay=0.05, beta1=0.8, beta2=0.95)
    trainer = InnerTrainer(model, iter([]), cfg, total_steps=100)
    lr_cfg = None if lowrank is None else LowRankConfig(method=lowrank)  # type: ignore[arg-type]
    opt = build_optimizer(model, cfg, lr_cfg, lr=lr_at(0, cfg, 100))
    assert type(opt) is torch.optim.AdamW
    ref = trainer.optimizer.param_groups
    assert len(opt.param_groups) == len(ref) == 2
    for got, want in zip(opt.param_groups, ref, strict=True):
        assert [id(p) for p in got["params"]] == [id(p) for p in want["params"]]
        assert hyper(got) == hyper(want)
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)
    assert id(model.ln_f.bias) not in {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(p.dim() >= 2 for p in opt.param_groups[0]["params"])
    assert all(p.dim() < 2 for p in opt.param_groups[1]["params"])


def test_matches_is_peft_suffix_rule() -> None:
    pats = ["qkv", "proj", "fc"]
    assert matches("blocks.0.attn.qkv", pats)
    assert matches("blocks.0.mlp.proj", pats)
    assert matches("blocks.1.mlp.fc", pats)
    assert matches("proj", pats)
    assert not matches("lm_head", pats)
    assert not matches("blocks.0.attn.qkv_extra", pats)
    assert not matches("blocks.0.attn.c_proj", pats)  # a suffix, but not after a dot
    assert not matches("blocks.0.mlp", pats)
    assert not matches("", pats)


def test_galore_state_elements_formula() -> None:
    assert galore_state_elements((384, 128), 8) == 2 * 384 * 8 + 8 * 128
    assert galore_state_elements((128, 512), 8) == 8 * 128 + 2 * 8 * 512
    assert galore_state_elements((6, 4), 8) == 2 * 6 * 4 + 4 * 4  # thin SVD: rank capped at min side
    assert galore_state_elements((128, 128), 100) > 2 * 128 * 128  # the projector outweighs the saving


@pytest.mark.parametrize(("shape", "rank"), [((6, 4), 2), ((4, 6), 2), ((6, 4), 8), ((4, 6), 8), ((5, 5), 3)])
def test_galore_state_layout_matches_the_formula(shape: tuple[int, int], rank: int) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    wrapper = nn.Sequential()
    wrapper.add_module("fc", lin)
    opt = build_optimizer(wrapper, TrainConfig(), galore_cfg(rank=rank), lr=1e-3)
    lin(torch.randn(3, shape[1])).square().sum().backward()
    opt.step()
    st = opt.state[lin.weight]
    m, n = shape
    r = min(rank, m, n)
    ortho = st["projector"].ortho_matrix
    if m >= n:  # right projector, moments m x r
        assert tuple(ortho.shape) == (r, n) and tuple(st["exp_avg"].shape) == (m, r)
    else:  # left projector, moments r x n
        assert tuple(ortho.shape) == (m, r) and tuple(st["exp_avg"].shape) == (r, n)
    assert st["exp_avg_sq"].shape == st["exp_avg"].shape
    assert state_bytes(st) == 4 * galore_state_elements(shape, rank)


def test_galore_groups() -> None:
    model = make_gpt()
    cfg = TrainConfig(weight_decay=0.07, beta1=0.85, beta2=0.97)
    opt = build_optimizer(model, cfg, galore_cfg(update_proj_gap=50, galore_scale=0.5), lr=2e-3)
    projected, other, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in projected["params"]) == sorted(
        n for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in TARGETS
    )
    assert sorted(names[id(p)] for p in other["params"]) == ["wpe.weight", "wte.weight"]
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 2 * 2 * 2 + 2
    assert {k: projected[k] for k in ("rank", "update_proj_gap", "scale", "proj_type")} == {
        "rank": RANK,
        "update_proj_gap": 50,
        "scale": 0.5,
        "proj_type": "std",
    }
    assert "rank" not in other and "rank" not in no_decay
    assert [g["weight_decay"] for g in opt.param_groups] == [0.07, 0.07, 0.0]
    assert all(g["betas"] == (0.85, 0.97) and g["lr"] == 2e-3 for g in opt.param_groups)
    order = [id(p) for p in model.parameters()]
    for g in opt.param_groups:  # each group keeps module.parameters() order
        idx = [order.index(id(p)) for p in g["params"]]
        assert idx == sorted(idx)


def test_galore_needs_a_matching_target() -> None:
    with pytest.raises(ValueError, match="match no trainable"):
        build_optimizer(make_gpt(), TrainConfig(), galore_cfg(target_modules=["q_proj"]), lr=1e-3)


def test_galore_state_is_smaller_by_the_exact_amount() -> None:
    cfg = TrainConfig()
    adam_model, galore_model = make_gpt(), make_gpt()
    adam = build_optimizer(adam_model, cfg, None, lr=1e-3)
    galore = build_optimizer(galore_model, cfg, galore_cfg(), lr=1e-3)
    one_step(adam_model, adam)
    one_step(galore_model, galore)

    projected = {id(p) for p in galore.param_groups[0]["params"]}
    assert len(projected) == 4 * MODEL.n_layer
    want_galore = 0
    for p in galore_model.parameters():
        st = galore.state[p]
        if id(p) in projected:
            assert min(p.shape) > RANK
            elems = galore_state_elements(tuple(p.shape), RANK)
            assert "projector" in st
        else:  # embeddings and LayerNorm gains/biases: plain AdamW moments, int step
            elems = 2 * p.numel()
            assert "projector" not in st and st["exp_avg"].shape == p.shape
        assert state_bytes(st) == 4 * elems
        want_galore += 4 * elems
    n_params = sum(1 for _ in adam_model.parameters())
    want_adam = 4 * (2 * sum(p.numel() for p in adam_model.parameters()) + n_params)  # + fp32 step scalars
    assert optimizer_state_bytes(adam) == want_adam
    assert optimizer_state_bytes(galore) == want_galore
    assert want_galore < want_adam
    saved = 4 * sum(
        2 * p.numel() - galore_state_elements(tuple(p.shape), RANK) for p in galore.param_groups[0]["params"]
    )
    assert want_adam - want_galore == saved + 4 * n_params


def test_galore_trains() -> None:
    model = make_gpt()
    opt = build_optimizer(model, TrainConfig(), galore_cfg(update_proj_gap=4), lr=3e-3)
    x, y = batch()
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        assert loss is not None
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses
    qkv = model.get_parameter("blocks.0.attn.qkv.weight")
    assert opt.state[qkv]["step"] == 8


def test_state_bytes_counts_nested_tensors_once() -> None:
    t = torch.zeros(3, 5)

    class Holder:
        def __init__(self) -> None:
            self.ortho_matrix = torch.zeros(2, 2, dtype=torch.float64)
            self.other = t

    assert state_bytes({"a": t, "b": [t, torch.zeros(4)], "c": Holder(), "d": 7}) == 60 + 16 + 32
