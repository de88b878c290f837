"""The LEAF Shakespeare split (Caldas et al. 2018, arXiv:1812.01097): every speaking role of every play is a client.

A role is (play, speaker name); its text is every line it speaks in that play, in order, each line ending in
"\\n". The lines are those of `worker.data.load_plays()` (the cleaned script text the language model reads),
but they are classified on the play's markdown, because cleaning drops the italics that tell a stage direction
(`_Exit PHILOSTRATE_`, `*Exeunt.*`, `_[Aside]_`, at times several lines long) from speech. A speech runs from
a `**NAME**` line to the next speaker or heading (act, scene); directions inside it, and lines that are all
in brackets (`[Aside]` left unitalicised), are skipped and the speech goes on after them, as the speaker
does. Text before a play's first speaker (title, opening directions) belongs to no role. Roles come in play
order (sorted, as in load_plays), then in order of first line spoken; a name in two plays is two roles, as
in LEAF. Joint speakers (`ROSENCRANTZ & GUILDENSTERN`, `All`) are roles of their own.

LEAF keeps only roles with enough text to make a sample; `roles(min_chars)` keeps those with at least
`min_chars` characters. The 38 plays hold 1,426 roles (min_chars 0), 1,234 with >= 64 characters and 1,017
with >= 256: far fewer than the 10,000 clients a simulation may ask for. `split_roles(roles, max_chars)` cuts
every role into consecutive pieces of at most `max_chars` characters (at line ends where a line fits), each
piece one client that still holds one speaker's lines: the 1,234 roles of >= 64 characters give 10,207
clients at max_chars 480 (9,591 at 512, 19,295 at 256). A role's last piece may be short; filter the pieces
by length if a client needs a minimum.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

import torch

from worker.data import CharTokenizer, clean_markdown, play_markdown

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


@dataclass(frozen=True)
class Role:
    """One client of the split: `name`'s lines in `play` (`part` numbers the pieces of a split role)."""

    play: str  # "genre/play", as in worker.data.load_plays
    name: str  # the speaker, as on its `NAME:` line
    text: str  # its lines, each ending in "\n"
    part: int = 0


def _clean(line: str) -> str:
    return clean_markdown(line).strip("\n")


def parse_roles(play: str, md: str) -> list[Role]:
    """Every role of one play's markdown, in order of first line spoken (see the module docstring)."""
    lines: dict[str, list[str]] = {}
    speaker: str | None = None
    closer = ""  # the mark that closes the stage direction being read, if any
    for raw in md.splitlines():
        line = raw.strip()
        if not line:
            closer = ""  # a direction never spans a blank line: don't let a stray `_` eat a speech
            continue
        if line.startswith("#"):
            speaker, closer = None, ""
            continue
        match = _SPEAKER.match(line)
        if match:
            speaker, closer = _clean(match.group(1)).strip(), ""
            lines.setdefault(speaker, [])
            continue
        if not closer and line[0] in "_*":
            closer = line[0]  # italics open a direction (`_Exit_`, `*Exeunt.*`), closed by the same mark
            line = line[1:]
        if closer:
            closer = "" if line.endswith(closer) else closer
            continue
        text = _clean(line)
        if speaker is not None and text and not (text.startswith("[") and text.endswith("]")):
            lines[speaker].append(text)  # a line all in brackets (`[Aside]`, unitalicised) is a direction too
    return [Role(play, name, "".join(t + "\n" for t in said)) for name, said in lines.items() if said]


@functools.lru_cache(maxsize=1)
def _all_roles() -> tuple[Role, ...]:
    return tuple(role for name, md in play_markdown() for role in parse_roles(name, md))


def roles(min_chars: int = 64) -> list[Role]:
    """Every speaking role of every play with at least `min_chars` characters of text, in a fixed order."""
    if min_chars < 0:
        raise ValueError(f"min_chars must be >= 0, got {min_chars}")
    return [r for r in _all_roles() if len(r.text) >= min_chars]


def split_roles(roles: list[Role], max_chars: int) -> list[Role]:
    """Each role cut into consecutive pieces of at most `max_chars` characters, `part` 0, 1, ...: a piece
    ends at a line end when at least one whole line fits, else a line longer than max_chars is cut inside.
    The pieces of a role concatenate back to its text; a role that fits stays whole (part 0)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    out: list[Role] = []
    for role in roles:
        pieces: list[str] = []
        current = ""
        for line in role.text.splitlines(keepends=True):
            if current and len(current) + len(line) > max_chars:
                pieces.append(current)
                current = ""
            while len(line) > max_chars:
                pieces.append(line[:max_chars])
                line = line[max_chars:]
            current += line
        if current:
            pieces.append(current)
        out.extend(replace(role, text=piece, part=i) for i, piece in enumerate(pieces))
    return out


def role_tokens(role: Role, tokenizer: CharTokenizer) -> torch.Tensor:
    """The role's text as token ids (int64, 1-D) under the corpus tokenizer."""
    return tokenizer.encode(role.text)
