"""Computes one golden trajectory with the pre-refactor API (protocol.aggregate over folded updates)."""

from __future__ import annotations

from typing import Any

import torch

from protocols.registry import build_protocol
from tests.golden.trajectories import WORKERS, case_config
from worker.data import load_corpus
from worker.model import GPT
from worker.trainer import InnerTrainer, params_digest


def trajectory(case: str) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    cfg = case_config(case)
    corpus = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars)
    trainers = []
    for index in range(WORKERS):
        torch.manual_seed(cfg.seed)
        model = GPT(cfg.model, corpus.tokenizer.vocab_size)
        shard = corpus.shard(index, WORKERS, cfg.data.split, cfg.seed)
        trainers.append(InnerTrainer(model, shard.sampler(cfg.data.batch_size, cfg.model.block_size), cfg.train,
                                     total_steps=cfg.train.steps))
    eval_batches = corpus.eval_batches(cfg.data.batch_size, cfg.model.block_size, cfg.train.eval_batches)
    protocol = build_protocol(cfg)
    global_ = trainers[0].params()
    server_state = protocol.init_server_state(global_)
    worker_states = [protocol.init_worker_state(global_) for _ in range(WORKERS)]
    h = cfg.protocol.inner_steps  # type: ignore[union-attr]
    out = []
    for round_ in range(cfg.rounds):
        acc = protocol.new_round(global_)
        losses = []
        for index, trainer in enumerate(trainers):
            trainer.load_params(global_)
            losses.append(trainer.train(h))
            update, worker_states[index] = protocol.make_update(trainer.params(), global_, worker_states[index])
            acc.fold(f"w{index}", update)
        global_, server_state = protocol.aggregate(global_, acc, server_state)
        trainers[0].load_params(global_)
        out.append({"round": round_, "train_losses": losses, "eval_loss": trainers[0].evaluate(eval_batches),
                    "params_hash": params_digest(global_)})
    return out
