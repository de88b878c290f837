"""Federated tasks' data: the digits split and MLP, the LEAF split of Shakespeare into speaking roles."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from worker.data import load_corpus, load_plays
from worker.federated.digits import DigitsMLP, accuracy, load_digits_split
from worker.federated.roles import Role, parse_roles, role_tokens, roles, split_roles


def test_digits_are_scaled_and_split_stratified() -> None:
    d = load_digits_split()
    assert len(d.train_y) + len(d.eval_y) == 1797
    assert d.train_x.shape == (len(d.train_y), 64) and d.eval_x.shape == (len(d.eval_y), 64)
    assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int64
    assert 0.0 <= d.train_x.min() and d.train_x.max() == 1.0 and d.eval_x.max() <= 1.0
    assert abs(len(d.eval_y) - 0.2 * 1797) <= 1
    total = np.bincount(np.concatenate([d.train_y, d.eval_y]), minlength=10)
    held = np.bincount(d.eval_y, minlength=10)
    assert np.all(np.abs(held - 0.2 * total) <= 1), (held, total)
    again = load_digits_split()
    assert np.array_equal(again.eval_x, d.eval_x) and np.array_equal(again.train_y, d.train_y)


def test_digits_mlp_has_4810_parameters_and_the_trainer_interface() -> None:
    model = DigitsMLP()
    assert sum(p.numel() for p in model.parameters()) == 4810
    x, y = torch.rand(5, 64), torch.tensor([0, 1, 2, 3, 9])
    logits, loss = model(x, y)
    assert logits.shape == (5, 10) and loss is not None and loss.dim() == 0
    assert model(x)[1] is None
    with pytest.raises(ValueError, match="64"):
        model(torch.rand(5, 63))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Batches of 32 x 64 are far too small to share out: intra-op threads only spin on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_a_few_sgd_epochs_reach_80_percent_eval_accuracy() -> None:
    d = load_digits_split()
    torch.manual_seed(0)
    model = DigitsMLP()
    before = accuracy(model, d.eval_x, d.eval_y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.from_numpy(d.train_x), torch.from_numpy(d.train_y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for batch in torch.randperm(len(x), generator=gen).split(32):
            _, loss = model(x[batch], y[batch])
            assert loss is not None
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = accuracy(model, d.eval_x, d.eval_y)
    assert before < 0.3 and after > 0.8, (before, after)
    assert model.training  # accuracy() restores the mode it found


@pytest.fixture(scope="module")
def all_roles() -> list[Role]:
    return roles(min_chars=0)


def test_every_role_is_non_empty_text_of_its_own_play(all_roles: list[Role]) -> None:
    plays = dict(load_plays())
    lines = {name: set(text.splitlines()) for name, text in plays.items()}
    assert {r.play for r in all_roles} == set(plays)
    assert len({(r.play, r.name) for r in all_roles}) == len(all_roles)  # one role per speaker per play
    for r in all_roles:
        assert r.text and r.text.endswith("\n"), r
        assert set(r.text.splitlines()) <= lines[r.play], r.name
        assert f"\n{r.name}:\n" in plays[r.play], r.name  # it speaks under that name in that play


def test_role_names_look_like_speaker_names(all_roles: list[Role]) -> None:
    assert all(re.fullmatch(r"[A-Za-z][\w' .,&:-]*", r.name) and len(r.name) <= 60 for r in all_roles)
    names = {(r.play, r.name) for r in all_roles}
    assert {("tragedies/hamlet", "HAMLET"), ("tragedies/macbeth", "LADY MACBETH")} <= names
    assert ("tragedies/macbeth", "First Witch") in names


def test_stage_directions_and_headings_are_not_speech() -> None:
    md = ("# P\n\n## ACT I\n\n_Enter A and B_\n\n**A**  \nOne line,  \nand two.\n\n_Exit B, who goes_ \n_slowly_\n\n"
          "Still A.\n\n**B**  \nBee.\n*Exeunt.*\n\n### SCENE II\n\nNobody's.\n\n**A**  \n\\[Aside]\nAgain.\n")
    got = {r.name: r.text for r in parse_roles("x/p", md)}
    assert got == {"A": "One line,\nand two.\nStill A.\nAgain.\n", "B": "Bee.\n"}


def test_role_counts_filter_and_order_are_deterministic(all_roles: list[Role]) -> None:
    kept = roles(min_chars=256)
    assert 1000 < len(kept) < len(roles(min_chars=64)) < len(all_roles)
    assert all(len(r.text) >= 256 for r in kept)
    assert roles(min_chars=256) == kept
    hamlet = [r.name for r in all_roles if r.play == "tragedies/hamlet"]
    assert hamlet[:3] == ["BERNARDO", "FRANCISCO", "HORATIO"]  # order of first line spoken


def test_split_roles_pieces_concatenate_back_and_reach_10k_clients(all_roles: list[Role]) -> None:
    base = roles(min_chars=64)
    pieces = split_roles(base, 480)
    assert len(pieces) >= 10_000
    assert all(0 < len(p.text) <= 480 for p in pieces)
    joined: dict[tuple[str, str], str] = {}
    parts: dict[tuple[str, str], int] = {}
    for p in pieces:
        key = (p.play, p.name)
        assert p.part == parts.get(key, -1) + 1  # a role's pieces come in order, numbered from 0
        parts[key] = p.part
        joined[key] = joined.get(key, "") + p.text
    assert joined == {(r.play, r.name): r.text for r in base}
    tiny = split_roles([Role("x/p", "A", "abcdefgh\nij\n")], 4)
    assert [p.text for p in tiny] == ["abcd", "efgh", "\nij\n"]
    assert [p.part for p in tiny] == [0, 1, 2]
    with pytest.raises(ValueError, match="max_chars"):
        split_roles(base, 0)


def test_role_tokens_round_trip_through_the_corpus_tokenizer(all_roles: list[Role]) -> None:
    tok = load_corpus(0.05, 60_000).tokenizer  # the vocabulary is always the full one
    role = next(r for r in all_roles if r.name == "HAMLET")
    ids = role_tokens(role, tok)
    assert ids.dtype == torch.int64 and ids.shape == (len(role.text),)
    assert tok.decode(ids) == role.text
