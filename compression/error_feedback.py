"""Error feedback for biased compressors: the worker side (`ErrorFeedback`) and the receiver (`Mirror`).

With C a compressor and D its decoder, per worker and per tensor name, on input g:

- "none": send C(g).
- "ef14" (Seide et al. 2014, "1-bit SGD"; analysed by Stich et al. 2018 and Karimireddy et al.
  2019): p = decay * e + g; d = C(p); e <- p - D(d). With decay = 1 nothing is lost, only delayed:
  D(d) + e_new == g + e_old exactly (sent + new error == input + old error).
- "ef21" (Richtarik, Sokolov, Fatkhullin 2021, arXiv:2106.05203): d = C(g - h); h <- h + D(d).
  Every worker's h tracks its own g; the receiver keeps the mean of the h's and uses it as the update.
- "econtrol" (Gao, Islamov, Stich, ICLR 2024, arXiv:2311.05645): d = C(eta * e + g - h);
  e <- e + g - h - D(d); h <- h + D(d). The update the receiver uses is the new (mean) h. eta scales
  how much of the accumulated error is fed back; the paper's analysis takes eta of the order of the
  compressor's delta. Measured on heterogeneous least squares with top-10% (delta = 0.1, step
  1 / (2 L_max), tests/unit/test_error_feedback_paper.py): eta in 0.05..0.15 reaches machine
  precision in 300 steps, eta >= 0.3 diverges (the config default eta = 1.0 is far too large there).
  Identity: e_new + h_new == e_old + g.

State is kept per tensor name in the precision max(float32, input dtype), so payloads produced
under feedback carry that dtype (a bf16 gradient is sent as a compressed float32 one).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from compression.base import Compressor
from compression.payload import Payload

Kind = Literal["none", "ef14", "ef21", "econtrol"]
KINDS: tuple[str, ...] = get_args(Kind)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown error feedback kind {kind!r}; known: {', '.join(KINDS)}")


class ErrorFeedback:
    """Worker-side error feedback around a compressor; `step(name, g)` returns what to send."""

    def __init__(self, compressor: Compressor, kind: str = "none", eta: float = 1.0, decay: float = 1.0) -> None:
        _check_kind(kind)
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.compressor, self.kind, self.eta, self.decay = compressor, kind, eta, decay
        self._error: dict[str, torch.Tensor] = {}  # e: what compression has not delivered yet
        self._shift: dict[str, torch.Tensor] = {}  # h: the worker's running estimate of its input

    def residual(self, name: str) -> torch.Tensor | None:
        """The error buffer e for `name` (ef14, econtrol), or None before the first step."""
        return self._error.get(name)

    def shift(self, name: str) -> torch.Tensor | None:
        """The shift h for `name` (ef21, econtrol), or None before the first step."""
        return self._shift.get(name)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"error": dict(self._error), "shift": dict(self._shift)}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self._error, self._shift = dict(state["error"]), dict(state["shift"])

    def _buffer(self, store: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
        buf = store.get(name)
        if buf is None:
            return torch.zeros_like(like)
        if buf.shape != like.shape:
            raise ValueError(f"tensor {name!r} changed shape from {tuple(buf.shape)} to {tuple(like.shape)}")
        return buf

    def step(self, name: str, g: torch.Tensor) -> Payload:
        """Compress `g` (the gradient or pseudo-gradient named `name`) with feedback; update the state."""
        if self.kind == "none":
            return self.compressor.compress(g, key=name)
        g = g.detach().to(torch.promote_types(g.dtype, torch.float32))
        c, decode = self.compressor.compress, self.compressor.decompress
        if self.kind == "ef14":
            p = self.decay * self._buffer(self._error, name, g) + g
            d = c(p, key=name)
            self._error[name] = p - decode(d)
        elif self.kind == "ef21":
            h = self._buffer(self._shift, name, g)
            d = c(g - h, key=name)
            self._shift[name] = h + decode(d)
        else:  # econtrol
            e, h = self._buffer(self._error, name, g), self._buffer(self._shift, name, g)
            d = c(self.eta * e + g - h, key=name)
            sent = decode(d)
            self._error[name] = e + g - h - sent
            self._shift[name] = h + sent
        return d

    def step_all(self, named: dict[str, torch.Tensor]) -> dict[str, Payload]:
        """`step` for every (name, tensor), in order. For "none" and "ef14" on float32 tensors the
        compressor encodes them all at once (`Compressor.compress_flat`) and the buffers are updated with
        one vector operation each; the payloads and buffers are exactly those of `step` name by name
        (every operation is element-wise, and `compress_flat` returns what `compress` would)."""
        if self.kind not in ("none", "ef14") or not named or any(g.dtype != torch.float32 for g in named.values()):
            return {name: self.step(name, g) for name, g in named.items()}
        names = list(named)
        gs = [named[n].detach() for n in names]
        p = torch.cat([g.reshape(-1) for g in gs])
        if self.kind == "ef14":
            errors = [self._buffer(self._error, n, g).reshape(-1) for n, g in zip(names, gs, strict=True)]
            p = self.decay * torch.cat(errors) + p
        payloads, decoded = self.compressor.compress_flat(p, [tuple(g.shape) for g in gs])
        if self.kind == "ef14":
            error, offset = p - decoded, 0
            for name, g in zip(names, gs, strict=True):
                self._error[name] = error[offset : offset + g.numel()].view(g.shape)
                offset += g.numel()
        return dict(zip(names, payloads, strict=True))

    def unsend(self, name: str, d: Payload) -> None:
        """Take back message `d` (from `step`) that the receiver never folded (its round closed without
        it): the state becomes what it would be had nothing of it been delivered, so nothing is lost, only
        delayed. ef14 / econtrol: e += D(d); ef21 / econtrol: h -= D(d). The identities of `step` hold
        again: for ef14, sent + e == inputs + e_old over the messages that did arrive. "none" keeps no
        state: the message is lost."""
        if self.kind == "none":
            return
        sent = self.compressor.decompress(d)
        if self.kind in ("ef14", "econtrol"):
            self._error[name] = self._buffer(self._error, name, sent) + sent
        if self.kind in ("ef21", "econtrol"):
            self._shift[name] = self._buffer(self._shift, name, sent) - sent


class Mirror:
    """The receiver's side: turns the mean of the workers' decoded messages into the update to use.

    For ef21 / econtrol it keeps h (the mean of the workers' shifts, when every worker sends every
    round): update = h + mean d, then h <- that. For none / ef14 the update is the mean itself.
    """

    def __init__(self, kind: str = "none") -> None:
        _check_kind(kind)
        self.kind = kind
        self._shift: dict[str, torch.Tensor] = {}

    @property
    def keeps_shift(self) -> bool:
        return self.kind in ("ef21", "econtrol")

    def shift(self, name: str) -> torch.Tensor | None:
        return self._shift.get(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._shift)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._shift = dict(state)

    def update(self, name: str, mean_decoded: torch.Tensor) -> torch.Tensor:
        """The update to apply for `name`, given the mean over workers of their decoded messages."""
        if not self.keeps_shift:
            return mean_decoded
        h = self._shift.get(name)
        new = mean_decoded.clone() if h is None else h + mean_decoded
        self._shift[name] = new
        return new.clone()
