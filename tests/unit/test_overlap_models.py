"""bench.overlap's `--model`: every run of an invocation trains the model it names (the warm-up too), the result
says which, and a name it does not know is refused before anything runs."""

from __future__ import annotations

import pytest

from bench.overlap import Grid, main, parameters
from bench.overlap_runs import MODELS, run_config


def test_each_contender_trains_the_model_named_and_small_is_the_default() -> None:
    for contender in ("compute-only", "diloco-sync", "sparseloco-co2", "ddp"):
        wide = run_config(contender, 32, inner_steps=32, model="wide").model
        assert (wide.n_layer, wide.n_embd) == (MODELS["wide"]["n_layer"], MODELS["wide"]["n_embd"]) == (4, 128)
        small = run_config(contender, 32, inner_steps=32).model
        assert (small.n_layer, small.n_embd) == (2, 64)
    assert Grid().model == "small"


def test_the_wide_model_is_about_eight_times_the_small_one() -> None:
    small, wide = parameters("small"), parameters("wide")
    assert small == 108_160  # the figure the grid's docs and BENCHMARKS.md quote
    assert 7 < wide / small < 8


def test_an_unknown_model_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown model 'huge'; choose from small, wide"):
        run_config("diloco-sync", 32, inner_steps=32, model="huge")


def test_the_flag_refuses_an_unknown_model_before_any_run(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--model", "huge"])
    assert stopped.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err
