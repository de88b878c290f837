"""Outer optimizers as pure functions over dicts of tensors with explicit state.

The coordinator treats the averaged pseudo-gradient as a gradient and steps an outer optimizer on the
global parameters (DiLoCo, Douillard et al., arXiv:2311.08105, Algorithm 1: outer SGD with Nesterov
momentum). These kernels never mutate their inputs: they return new parameter and state dicts, so the
coordinator can keep the previous global state (for checkpoints, or when a round is abandoned). The one
exception, `nesterov_sgd(in_place=True)`, is the same step in the given tensors, for a coordinator that holds
them alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Params = dict[str, torch.Tensor]


def _check_hyperparameters(lr: float, momentum: float) -> None:
    if lr < 0.0:
        raise ValueError(f"outer lr must be >= 0, got {lr}")
    if momentum < 0.0:
        raise ValueError(f"outer momentum must be >= 0, got {momentum}")


def _check_grads(params: Params, grads: Mapping[str, torch.Tensor]) -> None:
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise ValueError(f"gradients for tensors that are not parameters: {unknown}")
    for name, g in grads.items():
        if g.shape != params[name].shape:
            raise ValueError(
                f"gradient for {name!r} has shape {tuple(g.shape)}, parameter has {tuple(params[name].shape)}"
            )


def nesterov_sgd(
    params: Params,
    grads: Mapping[str, torch.Tensor],
    momentum_buf: Params,
    lr: float,
    momentum: float,
    nesterov: bool = True,
    in_place: bool = False,
) -> tuple[Params, Params]:
    """One step of SGD with (Nesterov) momentum, exactly as `torch.optim.SGD(lr, momentum, nesterov)`.

    params:       name -> tensor [any shape]; the current parameters.
    grads:        name -> tensor [same shape as params[name]]; a subset of params' names. Parameters
                  without a gradient are left unchanged and keep their momentum buffer, as torch skips
                  parameters whose `.grad` is None.
    momentum_buf: name -> tensor [same shape]; a missing name means this is that tensor's first step.
    Returns (new_params, new_momentum_buf). Every returned parameter is a new tensor in its input dtype;
    momentum buffers are kept in at least float32 so low-precision parameters do not lose the
    momentum's small increments.

    Torch's recurrence (dampening 0, no weight decay):
        buf = g                  on the first step, else   buf = momentum * buf + g
        d   = g + momentum * buf if nesterov,              else   d = buf
        p   = p - lr * d
    With momentum 0 there is no buffer and the step is plain SGD (`nesterov` then changes nothing).

    `in_place`: the same bits, stepped in the given parameter and momentum tensors instead of new ones (returned in
    new dicts; a buffer's first step is a new tensor). The one departure from this module's pure kernels, for the
    coordinator, which would otherwise hold a second copy of the model at each round's close
    (bench/coordinator_memory.py); the caller must be the only holder of those tensors (protocols/round.py lends
    them out, and steps anew while they are lent). Every gradient is read and checked (names, shapes) before any
    tensor changes, so a refusal changes nothing.
    """
    _check_hyperparameters(lr, momentum)
    _check_grads(params, grads)
    new_params: Params = {}
    # Buffers of parameters that got no gradient carry over untouched (never mutated, so sharing is safe).
    new_buf: Params = {name: b for name, b in momentum_buf.items() if name not in grads}
    for name, param in params.items():
        p = param.detach()
        grad = grads.get(name)
        if grad is None:
            new_params[name] = p if in_place else p.clone()
            continue
        work_dtype = torch.promote_types(p.dtype, torch.float32)
        g = grad.detach().to(device=p.device, dtype=work_dtype)
        if momentum != 0.0:
            prev = momentum_buf.get(name)
            # torch's first step sets the buffer to the gradient itself (a clone: no aliasing of grads).
            if prev is None:
                buf = g.clone()
            elif in_place and prev.dtype == g.dtype and prev.device == g.device:
                buf = prev.detach().mul_(momentum).add_(g)  # the same two ops as below, in place
            else:
                buf = prev.detach().to(g).mul(momentum).add(g)
            new_buf[name] = buf
            direction = g.add(buf, alpha=momentum) if nesterov else buf
        else:
            direction = g
        # `torch.add(..., alpha=-lr)` mirrors torch.optim.SGD's `p.add_(d, alpha=-lr)` bit for bit (the same kernel
        # in place: tests/unit/test_in_place_close.py).
        if not in_place:
            new_params[name] = torch.add(p.to(work_dtype), direction, alpha=-lr).to(p.dtype)
        elif p.dtype == work_dtype:
            new_params[name] = p.add_(direction, alpha=-lr)
        else:
            new_params[name] = p.copy_(torch.add(p.to(work_dtype), direction, alpha=-lr).to(p.dtype))
    return new_params, new_buf
