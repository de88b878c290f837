"""Low-rank adapters through peft: PiSSA's and LoRA's identities, what trains, the base digest, export."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from deploy.export import export_run, load_trained_model
from protocols.config import ConfigError, RunConfig, parse_config, to_yaml
from tests.conftest import tiny_config
from worker.data import load_corpus
from worker.lowrank import apply_lowrank, base_digest, frozen_params, merge_lowrank
from worker.models import build_architecture, build_model
from worker.trainer import InnerTrainer

VOCAB = 65


def adapted(method: str, seed: int = 0, **lowrank: object) -> tuple[RunConfig, torch.nn.Module]:
    cfg = tiny_config(lowrank={"method": method, "rank": 4, "alpha": 8, **lowrank})
    torch.manual_seed(seed)
    return cfg, build_model(cfg, VOCAB)


def batch(seed: int = 0, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(VOCAB, (4, block + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def test_pissa_initialization_reproduces_w_as_residual_plus_scaled_product() -> None:
    cfg, model = adapted("pissa")
    torch.manual_seed(0)
    base = build_architecture(cfg, VOCAB)  # the same seed: the weights PiSSA started from
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(layers) == 4  # qkv, attn proj, fc, mlp proj of the one block
    for name, layer in layers:
        w = dict(base.named_modules())[name.removeprefix("base_model.model.")].weight
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        scaling = layer.scaling["default"]
        assert scaling == 8 / 4
        torch.testing.assert_close(layer.base_layer.weight + scaling * b @ a, w, rtol=0, atol=1e-6)
        # The adapter holds W's top-r singular directions, not a random start: B A spans them.
        u = torch.linalg.svd(w.detach(), full_matrices=False)[0][:, :4]
        assert torch.allclose(u @ u.T @ b, b, atol=1e-5)
        assert not torch.equal(layer.base_layer.weight, w)  # the frozen weight is the residual


def test_lora_model_before_training_computes_its_base_outputs() -> None:
    cfg, model = adapted("lora")
    torch.manual_seed(0)
    base = build_architecture(cfg, VOCAB)
    x, y = batch()
    logits, loss = model(x, y)
    base_logits, base_loss = base(x, y)
    assert torch.equal(logits, base_logits) and torch.equal(loss, base_loss)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(bool((p == 0).all()) for p in b)  # B = 0: that is why


def test_only_adapter_factors_train_and_are_exchanged() -> None:
    cfg, model = adapted("lora")
    x, y = batch()
    trainer = InnerTrainer(model, iter([(x, y)] * 10), cfg.train, total_steps=10, lowrank=cfg.lowrank)
    names = set(trainer.params())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    # rank 4 over qkv (32 -> 96), proj (32 -> 32), fc (32 -> 128), proj (128 -> 32): r * (in + out) each
    assert sum(t.numel() for t in trainer.params().values()) == 4 * (128 + 64 + 160 + 160)
    frozen_before = {n: t.clone() for n, t in frozen_params(model).items()}
    digest = base_digest(model)
    losses = trainer.train(10)
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen_before[n], t) for n, t in frozen_params(model).items())
    assert base_digest(model) == digest
    with pytest.raises(ValueError, match="missing"):
        trainer.load_params({})


def test_base_digest_names_the_base_every_worker_builds() -> None:
    assert base_digest(adapted("lora", seed=0)[1]) == base_digest(adapted("lora", seed=0)[1])
    assert base_digest(adapted("lora", seed=0)[1]) != base_digest(adapted("lora", seed=1)[1])
    assert base_digest(adapted("pissa", seed=0)[1]) != base_digest(adapted("lora", seed=0)[1])  # W_res, not W
    # Every weight trains (no lowrank, or GaLore): nothing is frozen, nothing to attest.
    assert base_digest(adapted("galore")[1]) == ""
    torch.manual_seed(0)
    assert base_digest(build_model(tiny_config(), VOCAB)) == ""


def test_a_target_pattern_that_matches_no_layer_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"matched no layer.*end in: \['fc', 'lm_head', 'proj', 'qkv'\]"):
        adapted("lora", target_modules=["q_proj"])


def test_merge_after_training_equals_the_adapted_model() -> None:
    cfg, model = adapted("pissa")
    x, y = batch()
    InnerTrainer(model, iter([(x, y)] * 5), cfg.train, total_steps=5, lowrank=cfg.lowrank).train(5)
    model.eval()
    want = model(x)[0]
    merged = merge_lowrank(copy.deepcopy(model))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x)[0], want, rtol=0, atol=1e-5)


def fake_run(root: Path, cfg: RunConfig, params: dict[str, torch.Tensor], digest: str) -> Path:
    """A finished run's directory as the coordinator leaves it: config and a checkpoint of the trainables."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(to_yaml(cfg))
    torch.save({"round": 3, "run_id": "r", "params": params, "base_digest": digest}, root / "checkpoint.pt")
    return root


def test_export_writes_a_plain_run_that_computes_the_adapted_outputs(tmp_path: Path) -> None:
    cfg = tiny_config(lowrank={"method": "lora", "rank": 4, "alpha": 8})
    vocab = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).tokenizer.vocab_size
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocab)
    x, y = (t.remainder(vocab) for t in batch())
    trainer = InnerTrainer(model, iter([(x, y)] * 5), cfg.train, total_steps=5, lowrank=cfg.lowrank)
    trainer.train(5)
    run = fake_run(tmp_path / "run", cfg, trainer.params(), base_digest(model))
    out = export_run(run)
    assert out == run / "export"
    plain_cfg, exported = load_trained_model(out)
    assert plain_cfg.lowrank is None and plain_cfg.init_from is None
    assert all(p.requires_grad for p in exported.parameters())  # a plain model: nothing frozen, no factors
    model.eval()
    exported.eval()
    torch.testing.assert_close(exported(x)[0], model(x)[0], rtol=0, atol=1e-5)
    # A base that is not the one the workers attested is refused, not silently merged.
    fake_run(tmp_path / "other", cfg, trainer.params(), "0" * 64)
    with pytest.raises(ConfigError, match="base digest differs"):
        export_run(tmp_path / "other")


def test_init_from_loads_a_checkpoint_and_refuses_adapters_and_misfits(tmp_path: Path) -> None:
    cfg = tiny_config()
    torch.manual_seed(5)
    source = build_architecture(cfg, VOCAB)
    params = {n: p.detach().clone() for n, p in source.named_parameters()}
    fake_run(tmp_path / "pre", cfg, params, "")
    started = build_model(cfg.model_copy(update={"init_from": str(tmp_path / "pre")}), VOCAB)
    assert all(torch.equal(p, params[n]) for n, p in started.named_parameters())
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(cfg.model_copy(update={"init_from": str(tmp_path / "nowhere")}), VOCAB)
    fake_run(tmp_path / "lora", cfg, {"base_model.model.blocks.0.attn.qkv.lora_A.default.weight": torch.zeros(1)}, "")
    with pytest.raises(ConfigError, match="lowband export"):
        build_model(cfg.model_copy(update={"init_from": str(tmp_path / "lora")}), VOCAB)
    wide = parse_config({**cfg.model_dump(), "model": {**cfg.model.model_dump(), "n_embd": 64}})
    with pytest.raises(ConfigError, match="shapes differ"):
        build_model(wide.model_copy(update={"init_from": str(tmp_path / "pre")}), VOCAB)


def test_config_refuses_adapters_over_independently_seeded_models() -> None:
    with pytest.raises(ConfigError, match="independent_init"):
        parse_config({"protocol": {"kind": "gossip", "independent_init": True}, "lowrank": {"method": "pissa"}})
    with pytest.raises(ConfigError, match=r"lowrank\.method"):
        parse_config({"lowrank": {"method": "dora"}})
    with pytest.raises(ConfigError, match=r"model\.path"):
        parse_config({"model": {"kind": "hf"}})


def test_apply_lowrank_leaves_dense_and_galore_models_alone() -> None:
    cfg = tiny_config(lowrank={"method": "galore"})
    torch.manual_seed(0)
    model = build_architecture(cfg, VOCAB)
    assert apply_lowrank(model, None) is model and apply_lowrank(model, cfg.lowrank) is model


def test_the_lora_finetune_recipe_fine_tunes_the_default_run_on_the_held_out_plays(
        capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.cli import main, recipe_path
    from protocols.config import load_config

    cfg = load_config(recipe_path("lora-finetune"))
    base = load_config(recipe_path("diloco"))
    assert cfg.init_from == "runs/diloco" and cfg.model == base.model
    assert (base.data.plays, cfg.data.plays, cfg.data.split) == ("pretrain", "finetune", "by_play")
    assert cfg.lowrank is not None and (cfg.lowrank.method, cfg.lowrank.rank) == ("lora", 8)
    assert (cfg.protocol.kind, cfg.inner_steps, cfg.cluster.workers) == ("diloco", 30, 4)
    # Without the base run's checkpoint it stops before anything starts, saying what is missing.
    assert main(["run", "lora-finetune", "--init-from", "/nonexistent/run"]) == 2
    assert "/nonexistent/run" in capsys.readouterr().err  # CLI errors go to stderr


def test_sample_reads_an_export_and_a_run_with_adapters_alike(tmp_path: Path) -> None:
    from deploy.sampling import sample_run

    cfg = tiny_config(lowrank={"method": "pissa", "rank": 4, "alpha": 8})
    vocab = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).tokenizer.vocab_size
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocab)
    params = {n: p.detach() + 0.01 for n, p in model.named_parameters() if p.requires_grad}
    run = fake_run(tmp_path / "run", cfg, params, base_digest(model))
    text = sample_run(run, "ROMEO:", 30, 0.8, 20, 0)
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30
    assert sample_run(export_run(run), "ROMEO:", 30, 0.8, 20, 0) == text
