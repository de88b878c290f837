"""The Flower contender of bench/federated_sim.py: FedAvg on sklearn's digits in Flower's Ray simulation engine.

Run by the bench in its own environment (`.bench-envs/flower`: torch, `flwr[simulation]`, scikit-learn, numpy,
psutil), never the project's, with PYTHONPATH at the repository root so that the task is lowband's own:

- the data and the model are imported from `worker.federated.digits` (the stratified 20% eval split, the
  64-64-10 MLP built after `torch.manual_seed(seed)`), the client shards from `worker.federated.partition`
  (`dirichlet`, alpha 0.5, the same seed: the same client indices);
- three one-liners are mirrored here (they live in modules that pull in pydantic and the rest of lowband):
  the round's clients (`worker.federated.timing.sample_clients`), each client's round seed
  (`worker.federated.engine.Engine._job`) and its batches (`worker.federated.tasks.DigitsTask.batches`).
  tests/integration/test_federated_sim_bench.py checks that they give what lowband's do.

So every round samples the same clients as lowband, each trains the same batches in the same order with
plain SGD (lr 0.05, batch 16, `local_epochs`) from the same global model, and the server takes the
sample-weighted mean (Flower's FedAvg) and evaluates on the held-out split. Flower addresses nodes, not
data: node k (of the node ids, sorted) is sent lowband's client id k in its config and trains that shard,
so the sampling is lowband's seeded one rather than Flower's own (unseeded) `sample_nodes`.

This module imports flwr only inside `main` (the bench's smoke test imports the mirrored pieces from the
project's environment, which has no flwr). Every round the server prints one line
`FLWR-BENCH {"round": r, "eval_loss": ..., "accuracy": ..., "t": unix time}` on stdout, flushed.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from worker.federated.digits import DigitsMLP, load_digits_split
from worker.federated.partition import dirichlet

PREFIX = "FLWR-BENCH "
SAMPLING, SEEDS = 1, 4  # the purpose ids of worker/federated/timing.py and engine.py


def sample_clients(clients: int, per_round: int, round_: int, seed: int) -> np.ndarray:
    """As worker.federated.timing.sample_clients: round `round_` (0-based) draws `per_round` distinct ids."""
    draw = np.random.default_rng([seed, SAMPLING, round_])
    return np.sort(draw.choice(clients, size=min(per_round, clients), replace=False))


def client_seed(seed: int, round_: int, client: int) -> int:
    """As worker.federated.engine.Engine._job: the client's round seed (its batch order)."""
    return int(np.random.default_rng([seed, SEEDS, round_]).integers(2**62)) ^ client


@functools.lru_cache(maxsize=2)
def shards(clients: int, alpha: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Train X, train y and every client's sample indices, as lowband's DigitsTask makes them."""
    data = load_digits_split(seed=seed)
    return data.train_x, data.train_y, dirichlet(data.train_y, clients, alpha, seed)


def batches(x: torch.Tensor, y: torch.Tensor, part: np.ndarray, epochs: int, batch_size: int,
            generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """As worker.federated.tasks.DigitsTask.batches (no step cap): shuffled passes in batches of batch_size."""
    idx = torch.from_numpy(part)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for _ in range(epochs):
        order = idx[torch.randperm(len(idx), generator=generator)]
        out.extend((x[b], y[b]) for b in order.split(batch_size))
    return out


def train_client(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int, float]:
    """One client's round: plain SGD from the global `state` over its batches; its state, samples and mean loss."""
    torch.set_num_threads(1)
    train_x, train_y, parts = shards(int(cfg["clients"]), float(cfg["alpha"]), int(cfg["seed"]))
    part = parts[int(cfg["client"])]
    generator = torch.Generator().manual_seed(int(cfg["client-seed"]))
    data = batches(torch.from_numpy(train_x), torch.from_numpy(train_y), part, int(cfg["epochs"]),
                   int(cfg["batch-size"]), generator)
    model = DigitsMLP()
    model.load_state_dict(state)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    losses = []
    for xb, yb in data:
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(xb, yb)
        assert loss is not None
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return model.state_dict(), len(part), sum(losses) / max(len(losses), 1)


def record_bytes(record: Any) -> int:
    """Bytes of an ArrayRecord's arrays as Flower serializes them (each array's `data`)."""
    return sum(len(array.data) for array in record.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per client actor")
    args = parser.parse_args(argv)

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    torch.set_num_threads(1)  # as `lowband simulate`: one intra-op thread in the server process
    per_round = max(1, round(args.fraction * args.clients))
    task = {"clients": args.clients, "alpha": args.alpha, "seed": args.seed, "lr": args.lr,
            "batch-size": args.batch_size, "epochs": args.local_epochs}

    class SeededFedAvg(FedAvg):
        """Flower's FedAvg, sending round r's lowband clients (and their seeds) to as many nodes."""

        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
            nodes = sorted(grid.get_node_ids())
            round_ = server_round - 1
            messages = []
            size = record_bytes(arrays)
            for c in sample_clients(args.clients, per_round, round_, args.seed).tolist():
                cfg = ConfigRecord({**config, **task, "server-round": server_round, "client": c,
                                    "client-seed": client_seed(args.seed, round_, c)})
                messages.append(Message(content=RecordDict({"arrays": arrays, "config": cfg}),
                                        message_type="train", dst_node_id=nodes[c]))
            wire["to_clients"] += size * len(messages)
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> Any:
            replies = list(replies)
            answered[server_round] = sum(not m.has_error() for m in replies)
            wire["from_clients"] += sum(record_bytes(m.content["arrays"]) for m in replies if not m.has_error())
            return super().aggregate_train(server_round, replies)

    answered: dict[int, int] = {}  # per round, the replies without an error
    # Bytes of the model arrays as Flower serializes them, server to clients and back, over the run so far.
    wire = {"to_clients": 0, "from_clients": 0}
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Any, context: Any) -> Any:
        cfg = dict(msg.content["config"])
        state, samples, loss = train_client(msg.content["arrays"].to_torch_state_dict(), cfg)
        reply = RecordDict({"arrays": ArrayRecord(state),
                            "metrics": MetricRecord({"num-examples": samples, "train_loss": loss})})
        return Message(content=reply, reply_to=msg)

    data = load_digits_split(seed=args.seed)
    eval_x, eval_y = torch.from_numpy(data.eval_x), torch.from_numpy(data.eval_y)
    eval_model = DigitsMLP()

    @torch.no_grad()
    def evaluate(server_round: int, arrays: Any) -> Any:
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        eval_model.eval()
        logits, loss = eval_model(eval_x, eval_y)
        accuracy = float((logits.argmax(-1) == eval_y).float().mean())
        if server_round > 0:
            row = {"round": server_round, "eval_loss": float(loss), "accuracy": accuracy,
                   "aggregated": answered.get(server_round, 0), "bytes_to_clients": wire["to_clients"],
                   "bytes_from_clients": wire["from_clients"], "t": time.time()}
            print(PREFIX + json.dumps(row), flush=True)
        return MetricRecord({"eval_loss": float(loss), "accuracy": accuracy})

    server_app = ServerApp()

    @server_app.main()
    def server(grid: Grid, context: Context) -> None:
        torch.manual_seed(args.seed)
        initial = ArrayRecord(DigitsMLP().state_dict())
        strategy = SeededFedAvg(fraction_train=args.fraction, fraction_evaluate=0.0, min_available_nodes=args.clients)
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=args.rounds, evaluate_fn=evaluate)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0}})


if __name__ == "__main__":
    # Through the module's own name: Ray's actors then unpickle its functions by reference (PYTHONPATH).
    from bench.flower_digits import main as run

    run()
