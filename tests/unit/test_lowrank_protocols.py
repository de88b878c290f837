"""Low-rank training composes with every protocol that trains locally (in process, 2 workers): DiLoCo,
SparseLoCo, EControl, CO2 overlap and gossip with LoRA, GaLore under DiLoCo, and a Hugging Face causal LM
built from a local config, with and without adapters. Each run learns, exchanges only what trains, and ends
with one frozen base on every worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import transformers

from coordinator.rundir import load_checkpoint
from deploy.gossip_inproc import run_inproc_gossip
from deploy.inproc import run_inproc
from tests.conftest import tiny_config

ROUNDS, H = 3, 3
LORA = {"method": "lora", "rank": 4, "alpha": 8}
PROTOCOLS: dict[str, dict[str, Any]] = {
    "diloco": {"kind": "diloco"},
    "sparseloco": {"kind": "sparseloco"},
    "econtrol": {"kind": "econtrol"},
    "co2": {"kind": "diloco", "outer_momentum": 0.0, "overlap": {"enabled": True}},
}


def config(protocol: dict[str, Any], lowrank: dict[str, Any] | None, tmp: Path, **extra: Any) -> Any:
    return tiny_config(
        run_dir=str(tmp), lowrank=lowrank,
        protocol={**protocol, "inner_steps": H},
        train={"steps": ROUNDS * H, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": ROUNDS * H},
        cluster={"workers": 2, "transport": "inproc"}, **extra,
    )


def assert_learned_and_exchanged_only_factors(tmp: Path, results: list[Any], adapters: bool = True) -> None:
    for r in results:
        assert r.final_eval_loss is not None and r.final_eval_loss < r.evals[0]["eval_loss"], r.evals
    names = set(load_checkpoint(tmp / "checkpoint.pt")["params"])
    factors = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    assert (factors == names) if adapters else not factors, sorted(names)[:4]
    hashes = {r.base_hash for r in results}
    assert len(hashes) == 1 and (len(hashes.pop()) == 64) == adapters


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_lora_trains_under_every_coordinated_protocol(name: str, tmp_path: Path) -> None:
    summary, results = run_inproc(config(PROTOCOLS[name], LORA, tmp_path), tmp_path)
    assert summary["rounds"] == ROUNDS and summary["base_digest"] == results[0].base_hash
    assert_learned_and_exchanged_only_factors(tmp_path, results)
    assert len({r.state_hashes[-1] for r in results}) == 1  # one replica of the factors, as always


def test_lora_trains_under_gossip(tmp_path: Path) -> None:
    cfg = config({"kind": "gossip", "topology": "ring"}, LORA, tmp_path)
    _, results = run_inproc_gossip(cfg, tmp_path)
    assert_learned_and_exchanged_only_factors(tmp_path, results)


def test_galore_trains_every_weight_under_diloco(tmp_path: Path) -> None:
    _, results = run_inproc(config(PROTOCOLS["diloco"], {"method": "galore", "rank": 4}, tmp_path), tmp_path)
    assert_learned_and_exchanged_only_factors(tmp_path, results, adapters=False)
    dense = config(PROTOCOLS["diloco"], None, tmp_path / "dense")
    _, plain = run_inproc(dense, tmp_path / "dense")
    assert results[0].trainable_params == plain[0].trainable_params
    assert results[0].optimizer_state_bytes < plain[0].optimizer_state_bytes


def llama_dir(root: Path) -> Path:
    path = root / "llama-tiny"
    transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                             ).save_pretrained(path)
    return path


@pytest.mark.parametrize("lowrank", [None, {**LORA, "target_modules": ["q_proj", "v_proj"]}])
def test_a_local_hf_causal_lm_trains_under_diloco(lowrank: dict[str, Any] | None, tmp_path: Path) -> None:
    model = {"kind": "hf", "path": str(llama_dir(tmp_path)), "block_size": 32}
    _, results = run_inproc(config(PROTOCOLS["diloco"], lowrank, tmp_path / "run", model=model), tmp_path / "run")
    assert_learned_and_exchanged_only_factors(tmp_path / "run", results, adapters=lowrank is not None)
    if lowrank is not None:  # q_proj (32 -> 32) and v_proj (32 -> 16, one KV head): r (in + out) each
        assert results[0].trainable_params == 4 * (64 + 48)
