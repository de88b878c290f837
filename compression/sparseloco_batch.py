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

from typing import TYPE_CHECKING

import torch

from compression.packing import index_bits, pack_bits, packed_nbytes, unpack_bits
from compression.payload import Payload
from compression.topk import chunked_header, chunked_meta, topk_indices
from compression.twobit import LEVELS, check_codes, quantize_2bit

if TYPE_CHECKING:  # sparseloco.py imports this module
    from compression.sparseloco import SparseLoCo

# Values per packed segment: each tensor's indices and codes start at a multiple of 8 values, which is a
# whole byte for any index width and for 2-bit codes, so one packing call serves every tensor.
ALIGN = 8


def row_safe(kept_per_row: int) -> bool:
    """Whether rows keeping this many values may be quantized together with other tensors' rows (see the
    module docstring: 1 value has std 0 whatever the call; 8 and more measured row-independent)."""
    return kept_per_row == 1 or kept_per_row >= 8


def _batchable(numel: int, meta: dict[str, int]) -> bool:
    return row_safe(meta["k"]) and (meta["k_last"] == 0 or row_safe(meta["k_last"])) and numel > 0


def _row_starts(pieces: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For pieces (base, rows, stride): per row, its piece's base and its index within the piece times stride."""
    bases = torch.tensor([b for b, _, _ in pieces], dtype=torch.int64, device=device)
    counts = torch.tensor([n for _, n, _ in pieces], dtype=torch.int64, device=device)
    strides = torch.tensor([s for _, _, s in pieces], dtype=torch.int64, device=device)
    firsts = torch.cumsum(counts, 0) - counts
    row = torch.arange(int(counts.sum()), dtype=torch.int64, device=device)
    within = row - torch.repeat_interleave(firsts, counts)
    return torch.repeat_interleave(bases, counts), within * torch.repeat_interleave(strides, counts)


def encode_flat(
    codec: SparseLoCo, flat: torch.Tensor, shapes: list[tuple[int, ...]]
) -> tuple[list[Payload], torch.Tensor]:
    """`flat` is the tensors of `shapes` laid end to end (float32, 1-D); (the payload of each, as
    `codec.compress(tensor)` makes it; the decoded payloads laid out as `flat`)."""
    if flat.dtype != torch.float32 or flat.dim() != 1:
        raise ValueError(f"encode_flat needs a 1-D float32 tensor, got {flat.dtype} of shape {tuple(flat.shape)}")
    chunk, device = codec.chunk, flat.device
    numels = [int(torch.Size(s).numel()) for s in shapes]
    if sum(numels) != flat.numel():
        raise ValueError(f"shapes hold {sum(numels)} elements, flat has {flat.numel()}")
    metas = [chunked_meta(n, chunk, codec.density) for n in numels]
    decoded = torch.zeros_like(flat)
    payloads: list[Payload | None] = [None] * len(shapes)
    # Row groups by (row width, values kept per row): (tensor, first chunk in the tensor, rows view).
    groups: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}
    seg, mseg = [0] * len(shapes), [0] * len(shapes)  # each tensor's first value / first mean in the buffers
    offsets, values_total, means_total, offset = [0] * len(shapes), 0, 0, 0
    for i, (n, m) in enumerate(zip(numels, metas, strict=True)):
        offsets[i], piece = offset, flat[offset : offset + n]
        offset += n
        if not _batchable(n, m):  # the per-tensor codec (exactly what the batch would otherwise imitate)
            alone = payloads[i] = codec.compress(piece.view(shapes[i]))
            decoded[offsets[i] : offsets[i] + n] = codec.decompress(alone).reshape(-1)
            continue
        full = n // chunk
        if full:
            groups.setdefault((chunk, m["k"]), []).append((i, 0, piece[: full * chunk].view(full, chunk)))
        if m["k_last"]:
            groups.setdefault((n - full * chunk, m["k_last"]), []).append((i, full, piece[full * chunk :].view(1, -1)))
        seg[i], mseg[i] = values_total, means_total
        kept = full * m["k"] + m["k_last"]
        values_total += -(-kept // ALIGN) * ALIGN
        means_total += m["chunks"] * LEVELS
    local = torch.zeros(values_total, dtype=torch.int64, device=device)
    codes = torch.zeros(values_total, dtype=torch.int64, device=device)
    means = torch.zeros(means_total, dtype=torch.float16, device=device)
    for (width, k), pieces in groups.items():
        rows = pieces[0][2] if len(pieces) == 1 else torch.cat([p for _, _, p in pieces])
        idx = topk_indices(rows, k)
        vals = rows.gather(1, idx)
        row_codes, row_means = quantize_2bit(vals, codec.range_sigmas)
        # Where each row goes: its tensor's segment (+ first chunk * that tensor's k per chunk), one row per k.
        base, within = _row_starts([(seg[i] + c0 * metas[i]["k"], len(p), k) for i, c0, p in pieces], device)
        at = (base + within).unsqueeze(1) + torch.arange(k, device=device)
        local[at], codes[at] = idx, row_codes
        mbase, mwithin = _row_starts([(mseg[i] + c0 * LEVELS, len(p), LEVELS) for i, c0, p in pieces], device)
        means[(mbase + mwithin).unsqueeze(1) + torch.arange(LEVELS, device=device)] = row_means
        # Decoded: the bin mean of each kept value, at its place in `flat` (tensor offset + chunk start + index).
        fbase, fwithin = _row_starts([(offsets[i] + c0 * chunk, len(p), width) for i, c0, p in pieces], device)
        decoded[(fbase + fwithin).unsqueeze(1) + idx] = row_means.float().gather(1, row_codes)
    bits = index_bits(chunk)
    packed_local, packed_codes = pack_bits(local, bits), pack_bits(codes, 2)
    for i, (n, m) in enumerate(zip(numels, metas, strict=True)):
        if payloads[i] is not None:
            continue
        kept = (n // chunk) * m["k"] + m["k_last"]
        start, mstart = seg[i] * bits // 8, seg[i] // 4
        payloads[i] = Payload(
            codec.codec,
            tuple(shapes[i]),
            flat.dtype,
            tensors={
                "indices": packed_local[start : start + packed_nbytes(kept, bits)].clone(),
                "codes": packed_codes[mstart : mstart + packed_nbytes(kept, 2)].clone(),
                "means": means[mseg[i] : mseg[i] + m["chunks"] * LEVELS].clone(),
            },
            meta={**m},
        )
    return [p for p in payloads if p is not None], decoded


def read_many(payloads: list[Payload]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The (flat indices, values) `SparseLoCo.sparse` reads from each payload, read together; None when they
    cannot be (a header or an index the per-payload reader refuses, another index width or dtype, tensors
    on different devices): the caller then reads them one by one, which names the error.

    Every payload's packed indices, codes and means are concatenated (indices padded to whole 3-byte
    words), unpacked by one call each, and each value finds its stream position, chunk and bin mean
    from its payload's row of a small per-payload table (so the calls do not grow with the tensors).
    """
    if not payloads:
        return []
    device = payloads[0].tensors["means"].device
    table, index_bytes, code_bytes, means = [], [], [], []
    at_index = at_code = at_value = at_mean = 0
    for p in payloads:
        h = chunked_header(p)
        kept = h.kept(p.numel)
        if h.k_last > h.k or h.bits != 12 or p.dtype != torch.float32:
            return None
        check_codes(p, kept, h.chunks)
        parts = (p.tensors["indices"], p.tensors["codes"], p.tensors["means"])
        if any(t.device != device for t in parts):
            return None
        full, rem = divmod(p.numel, h.chunk)
        # Per payload: where its values, index words, codes and means start; k; chunk; full chunks; last chunk.
        table.append((at_value, at_index // 3 * 2, at_code * 4, at_mean, h.k, h.chunk, full, rem))
        pad = -parts[0].numel() % 3
        index_bytes += [parts[0], _zeros(pad, device)] if pad else [parts[0]]
        code_bytes.append(parts[1])
        means.append(parts[2])
        at_index += parts[0].numel() + pad
        at_code += parts[1].numel()
        at_mean += parts[2].numel()
        at_value += kept
    counts = [t[0] for t in table[1:]] + [at_value]
    kept_each = [b - a for a, b in zip([0, *counts[:-1]], counts, strict=True)]
    rows = torch.tensor(table, dtype=torch.int64, device=device).repeat_interleave(
        torch.tensor(kept_each, dtype=torch.int64, device=device), dim=0)
    first, index_at, code_at, mean_at, k_of, chunk_len, full_of, rem_of = rows.unbind(1)
    within = torch.arange(at_value, dtype=torch.int64, device=device) - first
    local = unpack_bits(torch.cat(index_bytes), 12, at_index // 3 * 2)[index_at + within]
    codes = unpack_bits(torch.cat(code_bytes), 2, at_code * 4)[code_at + within]
    chunk_of = within.div_(k_of, rounding_mode="floor")
    # Within its chunk: below chunk, or below the last chunk's length for the tail (as read_chunked_local checks).
    if bool((local >= torch.where(chunk_of < full_of, chunk_len, rem_of)).any()):
        return None
    indices = local + chunk_of * chunk_len
    values = torch.cat(means).float()[mean_at + chunk_of * LEVELS + codes]
    return list(zip(indices.split(kept_each), values.split(kept_each), strict=True))


def _zeros(count: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(count, dtype=torch.uint8, device=device)
