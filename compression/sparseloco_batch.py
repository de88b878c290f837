"""SparseLoCo's encoder over a whole pseudo-gradient at once: for every tensor, the payload
`SparseLoCo.compress` makes of it, bit for bit, and what that payload decodes to.

Why: a model's pseudo-gradient is many tensors, most of them smaller than one 4096-entry chunk (the
108k-parameter GPT of bench.overlap has 20, ten of them 64-entry LayerNorm vectors). Encoding them one
by one costs some 50 small torch calls per tensor, and on a CPU those calls cost more than the
arithmetic (bench/sparseloco_codec.py). Here the rows that share a shape (every full chunk of every
tensor; tails of equal length) go through one top-k and one quantization, and every tensor's indices and
codes are packed by one call each.

The same bits: top-k and the 2-bit bins are computed row by row, and a row's result does not depend on
the other rows of the call, with one measured exception: torch's row-wise `std` of a (rows, 2) matrix
changes with the number of rows. A tensor whose chunks keep 2..7 values (`ROW_SAFE`) is therefore
encoded by the per-tensor codec, as are non-float32 inputs. tests/unit/test_sparseloco_batch.py checks
payloads and decoded values against the per-tensor codec on random shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from compression.packing import index_bits, pack_bits, packed_nbytes
from compression.payload import Payload
from compression.topk import chunked_header, chunked_meta, topk_indices
from compression.twobit import LEVELS, check_codes, quantize_2bit

if TYPE_CHECKING:  # sparseloco.py imports this module
    from compression.sparseloco import SparseLoCo

# Layouts of models up to this many parameters are cached (every round has the same shapes and headers); a
# layout holds a few int64 per kept value, so a bigger model's is rebuilt each time instead of kept alive.
CACHED_ELEMENTS = 1 << 24

# Values per packed segment: each tensor's indices and codes start at a multiple of 8 values, which is a
# whole byte for any index width and for 2-bit codes, so one packing call serves every tensor.
ALIGN = 8


def row_safe(kept_per_row: int) -> bool:
    """Whether rows keeping this many values may be quantized together with other tensors' rows (see the
    module docstring: 1 value has std 0 whatever the call; 8 and more measured row-independent)."""
    return kept_per_row == 1 or kept_per_row >= 8


def _batchable(numel: int, meta: dict[str, int]) -> bool:
    return row_safe(meta["k"]) and (meta["k_last"] == 0 or row_safe(meta["k_last"])) and numel > 0


def _row_starts(pieces: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """For pieces (base, rows, stride): per row, its piece's base plus its index within the piece times stride."""
    bases = torch.tensor([b for b, _, _ in pieces], dtype=torch.int64, device=device)
    counts = torch.tensor([n for _, n, _ in pieces], dtype=torch.int64, device=device)
    strides = torch.tensor([s for _, _, s in pieces], dtype=torch.int64, device=device)
    firsts = torch.cumsum(counts, 0) - counts
    row = torch.arange(int(counts.sum()), dtype=torch.int64, device=device)
    within = row - torch.repeat_interleave(firsts, counts)
    return torch.repeat_interleave(bases, counts) + within * torch.repeat_interleave(strides, counts)


@dataclass(frozen=True)
class _Group:
    """Rows of one width keeping k values each, from several tensors, and where their results go."""

    width: int
    k: int
    pieces: tuple[tuple[int, int], ...]  # (start in flat, rows) per tensor with rows here
    at: torch.Tensor  # (rows, k): each kept value's place in the index and code buffers
    mean_at: torch.Tensor  # (rows, 4): each bin mean's place in the means buffer
    row_base: torch.Tensor  # (rows, 1): where each row starts in flat


@dataclass(frozen=True)
class _Layout:
    """Everything about encoding tensors of given shapes that does not depend on their values."""

    metas: tuple[dict[str, int], ...]
    offsets: tuple[int, ...]  # each tensor's start in flat
    alone: tuple[bool, ...]  # encoded by the per-tensor codec (see `row_safe`)
    seg: tuple[int, ...]  # each tensor's first value in the index and code buffers (a multiple of ALIGN)
    mseg: tuple[int, ...]  # each tensor's first bin mean in the means buffer
    values_total: int
    means_total: int
    groups: tuple[_Group, ...]


def _layout(shapes: tuple[tuple[int, ...], ...], chunk: int, density: float, device: torch.device) -> _Layout:
    """The layout of `shapes`, cached for models of at most CACHED_ELEMENTS (a worker encodes the same shapes every
    round; a bigger model's layout is rebuilt, its cost then small beside the encoding's)."""
    if sum(int(torch.Size(s).numel()) for s in shapes) <= CACHED_ELEMENTS:
        return _cached_layout(shapes, chunk, density, device)
    return _build_layout(shapes, chunk, density, device)


@functools.lru_cache(maxsize=32)
def _cached_layout(shapes: tuple[tuple[int, ...], ...], chunk: int, density: float, device: torch.device) -> _Layout:
    return _build_layout(shapes, chunk, density, device)


def _build_layout(shapes: tuple[tuple[int, ...], ...], chunk: int, density: float, device: torch.device) -> _Layout:
    numels = [int(torch.Size(s).numel()) for s in shapes]
    metas = [chunked_meta(n, chunk, density) for n in numels]
    # Row groups by (row width, values kept per row): (tensor, first chunk in the tensor, start in flat, rows).
    members: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    offsets, alone, seg, mseg = [], [], [], []
    values_total = means_total = offset = 0
    for i, (n, m) in enumerate(zip(numels, metas, strict=True)):
        offsets.append(offset)
        alone.append(not _batchable(n, m))
        seg.append(values_total)
        mseg.append(means_total)
        if not alone[-1]:
            full = n // chunk
            if full:
                members.setdefault((chunk, m["k"]), []).append((i, 0, offset, full))
            if m["k_last"]:
                members.setdefault((n - full * chunk, m["k_last"]), []).append((i, full, offset + full * chunk, 1))
            values_total += -(-(full * m["k"] + m["k_last"]) // ALIGN) * ALIGN
            means_total += m["chunks"] * LEVELS
        offset += n
    groups = []
    for (width, k), rows in members.items():
        # A row goes to its tensor's segment (+ first chunk * that tensor's k per chunk), one row per k values.
        at = _row_starts([(seg[i] + c0 * metas[i]["k"], n, k) for i, c0, _, n in rows], device)
        mean_at = _row_starts([(mseg[i] + c0 * LEVELS, n, LEVELS) for i, c0, _, n in rows], device)
        row_base = _row_starts([(start, n, width) for _, _, start, n in rows], device)
        groups.append(_Group(
            width, k, tuple((start, n) for _, _, start, n in rows),
            at.unsqueeze(1) + torch.arange(k, device=device),
            mean_at.unsqueeze(1) + torch.arange(LEVELS, device=device),
            row_base.unsqueeze(1),
        ))
    return _Layout(tuple(metas), tuple(offsets), tuple(alone), tuple(seg), tuple(mseg), values_total, means_total,
                   tuple(groups))


def encode_flat(
    codec: SparseLoCo, flat: torch.Tensor, shapes: list[tuple[int, ...]]
) -> tuple[list[Payload], torch.Tensor]:
    """`flat` is the tensors of `shapes` laid end to end (float32, 1-D); (the payload of each, as
    `codec.compress(tensor)` makes it; the decoded payloads laid out as `flat`)."""
    if flat.dtype != torch.float32 or flat.dim() != 1:
        raise ValueError(f"encode_flat needs a 1-D float32 tensor, got {flat.dtype} of shape {tuple(flat.shape)}")
    numels = [int(torch.Size(s).numel()) for s in shapes]
    if sum(numels) != flat.numel():
        raise ValueError(f"shapes hold {sum(numels)} elements, flat has {flat.numel()}")
    device, chunk = flat.device, codec.chunk
    lay = _layout(tuple(tuple(s) for s in shapes), chunk, codec.density, device)
    decoded = torch.zeros_like(flat)
    local = torch.zeros(lay.values_total, dtype=torch.int64, device=device)
    codes = torch.zeros(lay.values_total, dtype=torch.int64, device=device)
    means = torch.zeros(lay.means_total, dtype=torch.float16, device=device)
    for g in lay.groups:
        views = [flat[start : start + n * g.width].view(n, g.width) for start, n in g.pieces]
        rows = views[0] if len(views) == 1 else torch.cat(views)
        idx = topk_indices(rows, g.k)
        row_codes, row_means = quantize_2bit(rows.gather(1, idx), codec.range_sigmas)
        local[g.at], codes[g.at], means[g.mean_at] = idx, row_codes, row_means
        # Decoded: the bin mean of each kept value, at its place in `flat` (its row's start + its index).
        decoded[g.row_base + idx] = row_means.float().gather(1, row_codes)
    bits = index_bits(chunk)
    packed_local, packed_codes = pack_bits(local, bits), pack_bits(codes, 2)
    payloads = []
    for i, (n, m) in enumerate(zip(numels, lay.metas, strict=True)):
        at = lay.offsets[i]
        if lay.alone[i]:  # the per-tensor codec (exactly what the batch would otherwise imitate)
            payloads.append(codec.compress(flat[at : at + n].view(shapes[i])))
            decoded[at : at + n] = codec.decompress(payloads[-1]).reshape(-1)
            continue
        kept = (n // chunk) * m["k"] + m["k_last"]
        start, mstart = lay.seg[i] * bits // 8, lay.seg[i] // 4
        payloads.append(Payload(
            codec.codec,
            tuple(shapes[i]),
            flat.dtype,
            tensors={
                "indices": packed_local[start : start + packed_nbytes(kept, bits)].clone(),
                "codes": packed_codes[mstart : mstart + packed_nbytes(kept, 2)].clone(),
                "means": means[lay.mseg[i] : lay.mseg[i] + m["chunks"] * LEVELS].clone(),
            },
            meta={**m},
        ))
    return payloads, decoded


def read_many(payloads: list[Payload]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The (flat indices, values) `SparseLoCo.sparse` reads from each payload, read together; None when they
    cannot be (a header or an index the per-payload reader refuses, another index width or dtype, tensors
    on different devices): the caller then reads them one by one, which names the error.

    Every payload's packed indices, codes and means are concatenated (indices padded to whole 3-byte
    words) and unpacked by one call each; where each value sits in those streams, its chunk and its
    bound come from a table that depends only on the headers (`_read_layout`, cached for small models).
    """
    if not payloads:
        return []
    device = payloads[0].tensors["means"].device
    headers, index_bytes, code_bytes, means = [], [], [], []
    for p in payloads:
        h = chunked_header(p)
        kept = h.kept(p.numel)
        if h.k_last > h.k or h.bits != 12 or p.dtype != torch.float32:
            return None
        check_codes(p, kept, h.chunks)
        parts = (p.tensors["indices"], p.tensors["codes"], p.tensors["means"])
        if any(t.device != device for t in parts):
            return None
        headers.append((p.numel, h.chunk, h.k, kept, parts[0].numel(), parts[1].numel(), parts[2].numel()))
        pad = -parts[0].numel() % 3
        index_bytes += [parts[0], torch.zeros(pad, dtype=torch.uint8, device=device)] if pad else [parts[0]]
        code_bytes.append(parts[1])
        means.append(parts[2])
    key = tuple(headers)
    lay = _cached_read_layout(key, device) if sum(h[0] for h in key) <= CACHED_ELEMENTS else _read_layout(key, device)
    # Unpacked as `unpack_bits` does (compression/packing.py's layout), in int32 and uint8 instead of its int64:
    # the coordinator reads an update per push, and its malloc maps every block of 1 MiB or more afresh
    # (coordinator/malloc.py), so each int64 temporary of an update's ~170k values cost its page faults again.
    words = torch.cat(index_bytes).view(-1, 3).to(torch.int32)  # 3 bytes: two 12-bit values, low one first
    pairs = torch.stack((words[:, 0] | (words[:, 1] & 0xF) << 8, words[:, 1] >> 4 | words[:, 2] << 4), dim=1)
    local = pairs.view(-1)[lay.index_at]
    if bool((local >= lay.bound).any()):  # outside its chunk (or the shorter last chunk), as read_chunked_local checks
        return None
    packed = torch.cat(code_bytes)
    codes = ((packed.unsqueeze(1) >> _constant((0, 2, 4, 6), torch.uint8, device)) & 3).view(-1)[lay.code_at]
    indices = local + lay.chunk_start
    values = torch.cat(means).float()[lay.mean_at + codes]
    return list(zip(indices.split(lay.kept), values.split(lay.kept), strict=True))


@functools.lru_cache(maxsize=16)
def _constant(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant, built once per device. Never written to."""
    return torch.tensor(values, dtype=dtype, device=device)


@dataclass(frozen=True)
class _ReadLayout:
    """Per value of a batch of payloads: where it sits in the unpacked streams, where its chunk starts in its
    tensor, where its chunk's 4 means start, and the bound its index must stay below."""

    kept: list[int]
    index_count: int
    code_count: int
    index_at: torch.Tensor
    code_at: torch.Tensor
    chunk_start: torch.Tensor
    mean_at: torch.Tensor
    bound: torch.Tensor


@functools.lru_cache(maxsize=64)
def _cached_read_layout(headers: tuple[tuple[int, int, int, int, int, int, int], ...],
                        device: torch.device) -> _ReadLayout:
    return _read_layout(headers, device)


def _read_layout(headers: tuple[tuple[int, int, int, int, int, int, int], ...], device: torch.device) -> _ReadLayout:
    """From each payload's (numel, chunk, k, kept, index bytes, code bytes, means)."""
    table, kept_each = [], []
    at_value = at_index = at_code = at_mean = 0
    for numel, chunk, k, kept, n_index, n_code, n_means in headers:
        full, rem = divmod(numel, chunk)
        table.append((at_value, at_index // 3 * 2, at_code * 4, at_mean, k, chunk, full, rem))
        kept_each.append(kept)
        at_value += kept
        at_index += n_index + (-n_index % 3)
        at_code += n_code
        at_mean += n_means
    rows = torch.tensor(table, dtype=torch.int64, device=device).repeat_interleave(
        torch.tensor(kept_each, dtype=torch.int64, device=device), dim=0)
    first, index_at, code_at, mean_at, k_of, chunk_len, full_of, rem_of = rows.unbind(1)
    within = torch.arange(at_value, dtype=torch.int64, device=device) - first
    chunk_of = torch.div(within, k_of, rounding_mode="floor")
    # Positions in the streams in int32 where they fit (they index per push; see `read_many`); the chunk starts stay
    # int64, as the indices read are.
    small = torch.int32 if max(at_index, at_code * 4, at_mean, at_value) < 1 << 31 else torch.int64
    return _ReadLayout(
        kept=kept_each,
        index_count=at_index // 3 * 2,
        code_count=at_code * 4,
        index_at=(index_at + within).to(small),
        code_at=(code_at + within).to(small),
        chunk_start=chunk_of * chunk_len,
        mean_at=(mean_at + chunk_of * LEVELS).to(small),
        bound=torch.where(chunk_of < full_of, chunk_len, rem_of).to(small),
    )
