"""FedAvg: clients train locally from the global model; the server takes the sample-weighted mean.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, arXiv:1602.05629 (Algorithm 1, FederatedAveraging). Each round every
sampled client k starts from the global model theta, trains locally (E epochs of minibatch SGD in the paper)
and returns its model theta_k; the server sets theta <- sum_k (n_k / n) theta_k, n_k being client k's
number of training examples.

Here a client sends the pseudo-gradient `theta - theta_k` (the same information, and the form every codec
and error feedback of `protocols/compressed.py` composes with); the aggregator takes the mean weighted by
`Update.weight`, which the caller sets to the client's sample count n_k; every replica steps
`theta - server_lr * mean`. With `server_lr` 1 (the default) that is exactly the paper's weighted mean of
the client models; other values are the server learning rate of Reddi et al.'s FedOpt view (2003.00295).

The round loop (`lowband run`) trains `inner_steps` local steps per round; `lowband simulate` trains each
client for `local_epochs` passes over its own shard (the paper's E). The downlink defaults to dense: the
paper broadcasts the model as it is.

`FederatedSettings` is the base of every federated `protocol:` section here (fedavg, fedavg-lora,
ffa-lora, fedsvd): they differ in which tensors clients train and send, not in these fields.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import PositiveFloat, PositiveInt

from protocols.compressed import NO_COMPRESSION, AveragingProtocol, Compression
from protocols.settings import CompressionConfig, DownlinkConfig, ProtocolSettings


class FederatedSettings(ProtocolSettings):
    """Fields of every federated section (no `kind` of its own: it registers nothing).

    - `inner_steps`: local steps per round in the round loop (`lowband run`).
    - `local_epochs`: local passes over a client's own shard per round in `lowband simulate` (the paper's E).
    - `server_lr`: replicas step `theta - server_lr * mean`; 1.0 = the weighted mean of the client models.
    - `compression` / `downlink`: the uplink codec and error feedback, and the downlink, as for every protocol
      (dense both ways by default, as in the paper).
    """

    inner_steps: PositiveInt = 50
    local_epochs: PositiveInt = 1
    server_lr: PositiveFloat = 1.0
    compression: CompressionConfig = CompressionConfig()
    downlink: DownlinkConfig = DownlinkConfig()


class FedAvgConfig(FederatedSettings):
    """FedAvg (McMahan et al., AISTATS 2017, arXiv:1602.05629): the sample-weighted mean of client models."""

    kind: Literal["fedavg"] = "fedavg"


class FedAvg(AveragingProtocol):
    """FedAvg (McMahan et al., arXiv:1602.05629): clients send `replica - local`, the aggregator takes the
    `Update.weight`-weighted mean (weights = sample counts), replicas step `theta - server_lr * mean` (outer
    SGD without momentum)."""

    settings: ClassVar[type[ProtocolSettings]] = FedAvgConfig  # subclasses name their own section

    def __init__(self, server_lr: float = 1.0, compression: Compression = NO_COMPRESSION) -> None:
        super().__init__(outer_lr=server_lr, outer_momentum=0.0, nesterov=False, compression=compression)
        self.server_lr = server_lr

    @classmethod
    def from_settings(cls, settings: FederatedSettings) -> FedAvg:
        return cls(
            server_lr=settings.server_lr,
            compression=Compression.from_config(settings.compression, "protocol.compression"),
        )
