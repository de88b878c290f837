"""What simulated clients learn: a task gives the model, each client's data and the server-side evaluation.

- `digits`: sklearn's bundled digits, the 64-64-10 MLP, clients by `partition` (iid, Dirichlet alpha,
  pathological classes); the server evaluates loss and accuracy on a stratified 20% split.
- `shakespeare`: the run's GPT (`model:`, `init_from`, `lowrank:`) on the plays. `by_role` is the LEAF split
  (every speaking role a client; long roles cut into pieces when more clients are asked for than there are
  roles), `by_play` a play per client, `iid` equal slices of the text. Only lines outside each play's
  held-out tail train, so the server's eval (worker/data.py's eval text) stays unseen. A client's samples
  are its non-overlapping windows of `block_size` characters; its batches draw windows at random.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protocols.config import ConfigError, RunConfig
from worker.data import load_corpus
from worker.federated.digits import DigitsMLP, load_digits_split
from worker.federated.partition import partition
from worker.federated.roles import Role, role_tokens, roles, split_roles
from worker.models import build_model

Batch = tuple[torch.Tensor, torch.Tensor]
# Role pieces tried, longest first, until there are as many as the clients asked for.
PIECE_CHARS = (1 << 30, 4096, 2048, 1024, 512, 480, 384, 256, 192, 160, 128)


class FederatedTask(Protocol):
    def build_model(self) -> nn.Module: ...
    def num_clients(self) -> int: ...
    def samples(self, client: int) -> int: ...
    def steps(self, client: int, epochs: int, batch_size: int, max_steps: int | None) -> int: ...
    def batches(self, client: int, epochs: int, batch_size: int, max_steps: int | None,
                generator: torch.Generator | None) -> list[Batch]: ...  # fmt: skip
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


def _capped(steps: int, max_steps: int | None) -> int:
    return max(1, steps if max_steps is None else min(steps, max_steps))


class DigitsTask:
    def __init__(self, cfg: RunConfig) -> None:
        sim = cfg.simulation
        assert sim is not None
        self.data = load_digits_split(seed=cfg.seed)
        self.train_x, self.train_y = torch.from_numpy(self.data.train_x), torch.from_numpy(self.data.train_y)
        self.parts = partition(sim.partition, n_clients=sim.clients, seed=cfg.seed, n_samples=len(self.train_y),
                               labels=self.data.train_y, alpha=sim.alpha, classes_per_client=sim.classes_per_client)

    def build_model(self) -> nn.Module:
        return DigitsMLP()

    def num_clients(self) -> int:
        return len(self.parts)

    def samples(self, client: int) -> int:
        return len(self.parts[client])

    def steps(self, client: int, epochs: int, batch_size: int, max_steps: int | None) -> int:
        return _capped(epochs * -(-self.samples(client) // batch_size), max_steps)

    def batches(self, client: int, epochs: int, batch_size: int, max_steps: int | None,
                generator: torch.Generator | None) -> list[Batch]:
        """`epochs` shuffled passes over the client's samples in batches of `batch_size` (the last may be short)."""
        idx = torch.from_numpy(self.parts[client])
        out: list[Batch] = []
        for _ in range(epochs):
            order = idx[torch.randperm(len(idx), generator=generator)]
            out.extend((self.train_x[b], self.train_y[b]) for b in order.split(batch_size))
        return out[: _capped(len(out), max_steps)]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        logits, loss = model(torch.from_numpy(self.data.eval_x), torch.from_numpy(self.data.eval_y))
        accuracy = float((logits.argmax(-1) == torch.from_numpy(self.data.eval_y)).float().mean())
        return {"eval_loss": float(loss), "accuracy": accuracy}


class ShakespeareTask:
    def __init__(self, cfg: RunConfig) -> None:
        sim = cfg.simulation
        assert sim is not None
        self.cfg, self.block = cfg, cfg.model.block_size
        corpus = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).select(cfg.data.plays)
        self.tokenizer, self.corpus = corpus.tokenizer, corpus
        if sim.partition == "by_role":
            self.clients = [role_tokens(r, self.tokenizer) for r in self._role_pieces(sim.clients, cfg.seed)]
        elif sim.partition == "by_play":
            self.clients = list(corpus.train)
        elif sim.partition == "iid":
            self.clients = list(corpus.train_tokens.tensor_split(sim.clients))
        else:
            raise ConfigError(f"simulation.partition {sim.partition!r}: the shakespeare task takes by_role, by_play "
                              "or iid")
        self.clients = [t for t in self.clients if t.numel() > self.block]
        # The eval set is the run's (`data.batch_size` x `train.eval_batches` windows, as `lowband run` evaluates),
        # not shaped by the clients' batch: a simulation at another client batch scores the same text.
        self.eval_batches = corpus.eval_batches(cfg.data.batch_size, self.block, cfg.train.eval_batches)

    def _role_pieces(self, wanted: int, seed: int) -> list[Role]:
        # Per play, the lines of its eval tail (the corpus's own cut): role lines there do not train.
        held = {play: frozenset(self.tokenizer.decode(tail).splitlines())
                for play, tail in zip(self.corpus.plays, self.corpus.eval, strict=True)}
        base = []
        for r in roles(min_chars=0):
            if r.play in held:
                lines = r.text.splitlines(keepends=True)
                kept = "".join(line for line in lines if line.rstrip("\n") not in held[r.play])
                base.append(Role(r.play, r.name, kept))
        for chars in PIECE_CHARS:
            pieces = [p for p in split_roles(base, chars) if len(p.text) > self.block]
            if len(pieces) >= wanted:
                chosen = np.sort(np.random.default_rng([seed, 6]).choice(len(pieces), size=wanted, replace=False))
                return [pieces[i] for i in chosen]
        raise ConfigError(f"simulation.clients {wanted}: the roles of these plays make at most {len(pieces)} clients "
                          f"of more than block_size {self.block} characters")

    def build_model(self) -> nn.Module:
        return build_model(self.cfg, self.tokenizer.vocab_size)

    def num_clients(self) -> int:
        return len(self.clients)

    def samples(self, client: int) -> int:
        return max(1, self.clients[client].numel() // self.block)

    def steps(self, client: int, epochs: int, batch_size: int, max_steps: int | None) -> int:
        return _capped(epochs * -(-self.samples(client) // batch_size), max_steps)

    def batches(self, client: int, epochs: int, batch_size: int, max_steps: int | None,
                generator: torch.Generator | None) -> list[Batch]:
        tokens = self.clients[client]
        n = self.steps(client, epochs, batch_size, max_steps)
        size = min(batch_size, self.samples(client))
        starts = torch.randint(0, tokens.numel() - self.block, (n, size), generator=generator)
        windows = starts[..., None] + torch.arange(self.block + 1)  # (steps, B, T + 1)
        data = tokens[windows]
        return [(w[:, :-1], w[:, 1:]) for w in data]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        losses = [float(F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())) for x, y in self.eval_batches]
        return {"eval_loss": sum(losses) / len(losses)}


def build_task(cfg: RunConfig) -> FederatedTask:
    if cfg.simulation is None:
        raise ConfigError("no simulation: block in this recipe")
    return DigitsTask(cfg) if cfg.simulation.task == "digits" else ShakespeareTask(cfg)
