"""Error feedback identities: EF14 conserves mass; EF21 / EControl workers and the receiver agree on h."""

from __future__ import annotations

import pytest
import torch

from compression import registry
from compression.error_feedback import ErrorFeedback, Mirror
from compression.lowrank import LowRank

CODECS = ["topk", "topk_global", "sign", "sparseloco", "int2", "lowrank", "randomk"]


def gradients(steps: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("codec", CODECS)
def test_ef14_conserves_sent_plus_error(codec: str) -> None:
    compressor = registry.build(codec, density=0.05, chunk=64, rank=2)
    ef = ErrorFeedback(compressor, "ef14")
    old = torch.zeros(30, 20)
    for g in gradients(6, (30, 20), seed=1):
        sent = compressor.decompress(ef.step("w", g))
        new = ef.residual("w")
        assert new is not None
        # sent + new error == input + old error (decay = 1): nothing is lost, only delayed.
        torch.testing.assert_close(sent + new, g + old, rtol=1e-5, atol=1e-5)
        assert float(new.norm()) > 0  # the codec is lossy, so the identity is not trivial
        old = new


def test_ef14_decay_scales_the_carried_error() -> None:
    compressor = registry.build("topk", density=0.1, chunk=32)
    ef = ErrorFeedback(compressor, "ef14", decay=0.95)
    old = torch.zeros(100)
    for g in gradients(5, (100,), seed=2):
        sent = compressor.decompress(ef.step("b", g))
        new = ef.residual("b")
        assert new is not None
        torch.testing.assert_close(sent + new, g + 0.95 * old)
        old = new


@pytest.mark.parametrize("kind", ["ef21", "econtrol"])
@pytest.mark.parametrize("codec", ["topk_global", "sparseloco", "sign"])
def test_mirror_tracks_the_mean_of_the_workers_shifts(kind: str, codec: str) -> None:
    workers = [ErrorFeedback(registry.build(codec, density=0.1, chunk=16), kind, eta=0.2) for _ in range(4)]
    mirror = Mirror(kind)
    streams = [gradients(8, (50,), seed=10 + i) for i in range(4)]
    for t in range(8):
        decoded = [registry.decode(w.step("w", s[t])) for w, s in zip(workers, streams, strict=True)]
        update = mirror.update("w", torch.stack(decoded).mean(dim=0))
        shifts = [w.shift("w") for w in workers]
        assert all(h is not None for h in shifts)
        mean_h = torch.stack([h for h in shifts if h is not None]).mean(dim=0)
        torch.testing.assert_close(update, mean_h)
        torch.testing.assert_close(mirror.shift("w"), mean_h)


def test_econtrol_moves_exactly_the_fed_back_error_into_the_shift() -> None:
    # e' = e + g - h - D(d) and h' = h + D(d), so e' + h' == e + g whatever the compressor did.
    ef = ErrorFeedback(registry.build("topk", density=0.1, chunk=16), "econtrol", eta=0.3)
    old_e = torch.zeros(40)
    for g in gradients(7, (40,), seed=3):
        ef.step("w", g)
        e, h = ef.residual("w"), ef.shift("w")
        assert e is not None and h is not None
        torch.testing.assert_close(e + h, old_e + g, rtol=1e-5, atol=1e-5)
        old_e = e


def test_ef21_with_an_exact_codec_sends_the_gradient_change() -> None:
    ef = ErrorFeedback(registry.build("dense"), "ef21")
    g1, g2 = gradients(2, (5,), seed=4)
    torch.testing.assert_close(registry.decode(ef.step("w", g1)), g1)
    torch.testing.assert_close(registry.decode(ef.step("w", g2)), g2 - g1)
    torch.testing.assert_close(ef.shift("w"), g2)


def test_no_feedback_sends_the_compressed_input_and_keeps_no_state() -> None:
    compressor = registry.build("topk", density=0.2, chunk=8)
    ef = ErrorFeedback(compressor, "none")
    (g,) = gradients(1, (24,), seed=5)
    assert torch.equal(registry.decode(ef.step("w", g)), registry.decode(compressor.compress(g)))
    assert ef.residual("w") is None and ef.shift("w") is None
    mean = torch.ones(3)
    assert torch.equal(Mirror("none").update("w", mean), mean)
    assert torch.equal(Mirror("ef14").update("w", mean), mean)


def test_state_is_per_name_and_round_trips_through_state_dict() -> None:
    ef = ErrorFeedback(registry.build("sign", chunk=4), "econtrol", eta=0.5)
    a, b = gradients(2, (8,), seed=6)
    ef.step("a", a)
    ef.step("b", b[:6])
    state = ef.state_dict()
    assert set(state["error"]) == {"a", "b"} and state["error"]["b"].shape == (6,)
    clone = ErrorFeedback(registry.build("sign", chunk=4), "econtrol", eta=0.5)
    clone.load_state_dict(state)
    torch.testing.assert_close(registry.decode(clone.step("a", b)), registry.decode(ef.step("a", b)))


def test_lowrank_warm_start_is_kept_per_name() -> None:
    compressor = LowRank(rank=2)
    ef = ErrorFeedback(compressor, "ef14")
    ef.step("w1", torch.randn(10, 12))
    assert compressor.warm_start("w1") is not None and compressor.warm_start("w2") is None


def test_bad_arguments_are_named() -> None:
    compressor = registry.build("topk")
    with pytest.raises(ValueError, match="unknown error feedback kind 'ef22'; known: none, ef14, ef21, econtrol"):
        ErrorFeedback(compressor, "ef22")
    with pytest.raises(ValueError, match="decay must be in"):
        ErrorFeedback(compressor, "ef14", decay=1.5)
    with pytest.raises(ValueError, match="unknown error feedback kind"):
        Mirror("ef22")
    ef = ErrorFeedback(compressor, "ef14")
    ef.step("w", torch.randn(10))
    with pytest.raises(ValueError, match=r"tensor 'w' changed shape from \(10,\) to \(11,\)"):
        ef.step("w", torch.randn(11))


def test_low_precision_inputs_keep_float32_state() -> None:
    ef = ErrorFeedback(registry.build("topk", density=0.1, chunk=16), "ef14")
    g = torch.randn(64).to(torch.bfloat16)
    payload = ef.step("w", g)
    residual = ef.residual("w")
    assert payload.dtype == torch.float32 and residual is not None and residual.dtype == torch.float32
    torch.testing.assert_close(registry.decode(payload) + residual, g.float())


@pytest.mark.parametrize("kind", ["ef14", "ef21", "econtrol"])
def test_a_message_taken_back_is_delayed_not_lost(kind: str) -> None:
    """A refused message (its round closed without it) goes back into the state: the worker's books again
    match what the receiver got. ef14: delivered + e == inputs; ef21 / econtrol: h == what was delivered
    (the receiver's copy of this worker's shift), and econtrol's error holds the withdrawn message."""
    g1, g2 = gradients(2, (64,), seed=3)
    ef = ErrorFeedback(registry.build("topk", density=0.25), kind, eta=0.5)
    refused = ef.step("w", g1)
    delivered = ef.step("w", g2)  # made before the refusal of the first was known (overlapped rounds)
    before = ef.residual("w")
    ef.unsend("w", refused)
    got, withdrawn = registry.decode(delivered), registry.decode(refused)
    error, shift = ef.residual("w"), ef.shift("w")
    assert float(withdrawn.norm()) > 0
    if kind == "ef14":
        assert error is not None and torch.allclose(got + error, g1 + g2, atol=1e-6)
    else:
        assert shift is not None and torch.allclose(shift, got, atol=1e-6)
    if kind == "econtrol":
        assert error is not None and before is not None and torch.allclose(error, before + withdrawn, atol=1e-6)


def test_without_feedback_a_taken_back_message_is_lost_and_nothing_changes() -> None:
    ef = ErrorFeedback(registry.build("topk", density=0.25), "none")
    ef.unsend("w", ef.step("w", torch.ones(8)))
    assert ef.residual("w") is None and ef.shift("w") is None
