"""bench.overlap_loss_sweep builds each variant's config from bench.overlap's (the budget given by --steps) with
the variant's protocol changes merged in, and refuses an --only label it does not know."""

from __future__ import annotations

import pytest

from bench.overlap_loss_sweep import VARIANTS, config, main


def test_a_variant_merges_its_compression_changes_and_takes_the_budget() -> None:
    _, contender, changes = next(v for v in VARIANTS if v[0] == "sparseloco-eager update decay 0.8 density 0.12")
    cfg = config(contender, changes, steps=768)
    compression = cfg.protocol.compression  # type: ignore[union-attr]
    assert (compression.decay, compression.density, compression.codec) == (0.8, 0.12, "sparseloco")
    assert cfg.protocol.overlap.eager and cfg.protocol.overlap.eager_proxy == "update"  # type: ignore[union-attr]
    assert cfg.train.steps == 768 and cfg.rounds == 24 and cfg.cluster.transport == "inproc"
    assert len({v[0] for v in VARIANTS}) == len(VARIANTS), "labels name one variant each"


def test_an_unknown_only_label_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--only", "diloco-sync,no-such-variant"])
    assert stopped.value.code == 2 and "--only: no variant no-such-variant" in capsys.readouterr().err
