"""Corpus, tokenizer, per-play eval split, shards and batches."""

from __future__ import annotations

import json

import pytest
import torch

from worker.data import BatchSampler, CharTokenizer, clean_markdown, deal_plays, load_corpus, load_plays

SMALL = 60_000  # max_chars for the fast corpus: ~1.5k characters per play


def test_markdown_is_stripped_to_script_text() -> None:
    md = "# Macbeth\n\n## ACT I\n\n_Thunder. Enter \\[three] Witches_\n\n**First Witch**  \nWhen shall we\\--  \n"
    assert clean_markdown(md) == "Macbeth\n\nACT I\n\nThunder. Enter [three] Witches\n\nFirst Witch:\nWhen shall we--\n"


def test_corpus_loads_offline_with_every_play_and_no_markup() -> None:
    plays = dict(load_plays())
    assert len(plays) >= 30 and "tragedies/macbeth" in plays
    macbeth = plays["tragedies/macbeth"]
    assert macbeth.startswith("Macbeth\n") and "\nMACBETH:\n" in macbeth
    vocab = load_corpus().tokenizer.chars
    assert not set("*_#\\") & set(vocab)
    assert "\n" in vocab and "z" in vocab


def test_tokenizer_round_trips_text_and_json() -> None:
    tok = load_corpus(0.05, SMALL).tokenizer
    text = "Fair is foul, and foul is fair:\nHover through the fog!"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    again = CharTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.chars == tok.chars and torch.equal(again.encode(text), ids)
    with pytest.raises(ValueError, match="'@'"):
        tok.encode("ab@c")


def test_vocabulary_does_not_depend_on_max_chars() -> None:
    assert load_corpus(0.05, SMALL).tokenizer.chars == load_corpus(0.1, 0).tokenizer.chars


def test_eval_is_the_tail_of_every_play_and_disjoint_from_train() -> None:
    frac = 0.1
    corpus = load_corpus(frac, SMALL)
    per_play = SMALL // len(corpus.plays)
    for name, (_, text), train, held in zip(corpus.plays, load_plays(), corpus.train, corpus.eval, strict=True):
        whole = corpus.tokenizer.encode(text[:per_play])
        assert held.numel() == int(whole.numel() * frac) > 0, name
        assert torch.equal(torch.cat([train, held]), whole), name  # train then eval: no overlap, no gap
    assert corpus.eval_tokens.numel() == sum(t.numel() for t in corpus.eval)


def test_by_play_shards_are_disjoint_and_cover_every_play() -> None:
    corpus = load_corpus(0.05, SMALL)
    shards = [corpus.shard(w, 5, "by_play") for w in range(5)]
    seen = [p for s in shards for p in s.plays]
    assert sorted(seen) == sorted(corpus.plays) and len(seen) == len(set(seen))
    assert sum(s.tokens.numel() for s in shards) == corpus.train_tokens.numel()


def test_greedy_dealing_is_balanced_within_one_play() -> None:
    sizes = [int(t.numel()) for t in load_corpus().train]
    loads = [sum(sizes[i] for i in owned) for owned in deal_plays(sizes, 4)]
    assert max(loads) - min(loads) <= max(sizes)  # the list-scheduling bound of greedy dealing


def test_iid_shards_differ_by_worker_and_repeat_by_seed() -> None:
    corpus = load_corpus(0.05, SMALL)

    def first(worker: int, seed: int) -> torch.Tensor:
        return next(corpus.shard(worker, 4, "iid", seed).sampler(4, 16))[0]

    assert torch.equal(first(1, 7), first(1, 7))
    assert not torch.equal(first(0, 7), first(1, 7))
    assert not torch.equal(first(1, 7), first(1, 8))
    assert torch.equal(corpus.shard(0, 4).tokens, corpus.shard(3, 4).tokens)  # same text, own streams


def test_batches_are_windows_with_targets_shifted_by_one() -> None:
    tokens = torch.arange(1000)
    x, y = next(BatchSampler(tokens, 6, 10, torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (6, 10) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # on arange, "next token" is exactly +1
    with pytest.raises(ValueError, match="block_size"):
        BatchSampler(torch.arange(10), 2, 10, torch.Generator())


def test_eval_batches_are_fixed_and_span_the_eval_text() -> None:
    corpus = load_corpus(0.05, SMALL)
    a, b = corpus.eval_batches(4, 16, 3), corpus.eval_batches(4, 16, 3)
    assert len(a) == 3 and all(x.shape == (4, 16) for x, _ in a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    ev = corpus.eval_tokens
    assert torch.equal(a[0][0][0], ev[:16]) and torch.equal(a[-1][1][-1], ev[-16:])


def test_bad_shard_arguments_raise() -> None:
    corpus = load_corpus(0.05, SMALL)
    with pytest.raises(ValueError, match="worker_index"):
        corpus.shard(4, 4)
    with pytest.raises(ValueError, match="num_workers"):
        corpus.shard(0, len(corpus.plays) + 1, "by_play")
    with pytest.raises(ValueError, match="max_chars"):
        load_corpus(0.05, 100)


def test_pretrain_and_finetune_plays_split_the_corpus_and_keep_one_vocabulary() -> None:
    from worker.data import FINETUNE_PLAYS

    corpus = load_corpus(0.05, 60_000)
    pre, fine = corpus.select("pretrain"), corpus.select("finetune")
    assert fine.plays == FINETUNE_PLAYS and not set(pre.plays) & set(fine.plays)
    assert sorted(pre.plays + fine.plays) == sorted(corpus.plays)
    assert pre.train_tokens.numel() + fine.train_tokens.numel() == corpus.train_tokens.numel()
    assert pre.tokenizer is fine.tokenizer is corpus.tokenizer and corpus.select("all") is corpus
    # Four romances: by_play gives each of 4 workers one.
    assert {fine.shard(i, 4, "by_play").plays for i in range(4)} == {(p,) for p in FINETUNE_PLAYS}
