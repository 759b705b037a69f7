"""bitsandbytes 4-bit (NF4/FP4) weights as transformers saves them: group, read, dequantize, re-quantize.

A quantized Linear weight ``X.weight`` is stored as several safetensors entries (verified with transformers 5
and bitsandbytes 0.50.2 on CPU)::

    X.weight                                 uint8 [ceil(n/2), 1]   two 4-bit codes per byte, first code in the high nibble
    X.weight.absmax                          float32 [blocks]       one scale per block of ``blocksize`` values
                                             (uint8 [blocks] with double quantization: 8-bit codes of absmax - offset)
    X.weight.quant_map                       float32 [16]           the NF4 or FP4 code book
    X.weight.nested_absmax                   float32 [ceil(blocks/256)]   double quantization only
    X.weight.nested_quant_map                float32 [256]          double quantization only (bnb's dynamic 8-bit map)
    X.weight.quant_state.bitsandbytes__nf4   uint8 [k]              UTF-8 JSON: quant_type, blocksize, dtype, shape
                                             (+ nested_blocksize, nested_dtype, nested_offset)   (or ``__fp4``)

The dense weight is ``quant_map[code] * absmax[block]`` in float32 (then cast to the recorded dtype). With double
quantization ``absmax = nested_quant_map[absmax_code] * nested_absmax[block // 256] + nested_offset``.

Example:
    >>> import torch
    >>> w = torch.randn(8, 64)
    >>> spec = QuantSpec("nf4", 64, False, None, torch.float32, (8, 64), torch.uint8)
    >>> out = quantize(w, spec, "lin.weight")
    >>> sorted(out)[:2]
    ['lin.weight', 'lin.weight.absmax']
    >>> dequantize(out, "lin.weight").shape
    torch.Size([8, 64])
    >>> quantize(dequantize(out, "lin.weight"), read_spec(out, "lin.weight"), "lin.weight")["lin.weight"].equal(out["lin.weight"])
    True
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adaptermerge.cpu import single_threaded
from adaptermerge.dtypes import NAMES, STORAGE_NAMES
from adaptermerge.errors import InvalidCheckpoint, NumericalError, UsageError

QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
STATE_MARKER = ".quant_state.bitsandbytes__"
STAT_SUFFIXES: tuple[str, ...] = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
QUANT_SUFFIXES: tuple[str, ...] = STAT_SUFFIXES + tuple(STATE_MARKER + t for t in QUANT_TYPES)
VALID_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_NESTED_BLOCKSIZE = 256  # bitsandbytes always double-quantizes absmax in blocks of 256
# Candidate scale factors c (scale = c * absmax) tried per block by optimize_scales.
DEFAULT_SCALE_GRID: tuple[float, ...] = tuple(round(0.70 + 0.025 * i, 3) for i in range(15))  # 0.70 .. 1.05
_CHUNK_ELEMENTS = 1 << 21  # the scale search works on chunks of about this many values (bounds memory)
# the plain path, the report and dequantize work on chunks of about this many values: their temporaries stay in
# the cache and are reused by the allocator (fresh full-size temporaries cost more in page faults than the math)
_CACHE_ELEMENTS = 1 << 16
# the report measures a few chunks at a time, while they are still in the (outer) cache: its cost is mostly the
# dispatch of its dozen torch calls per measured span, not arithmetic
_MEASURE_ELEMENTS = 1 << 18
_NEG_ZERO_BITS = -(2**31)  # the float32 -0.0 read as an int32


@dataclass
class QuantSpec:
    """Everything needed to re-quantize a weight the way it was quantized."""

    quant_type: str  # "nf4" | "fp4"
    blocksize: int
    double_quant: bool  # bnb "compress_statistics": absmax itself quantized to 8 bits
    nested_blocksize: int | None
    dtype: torch.dtype  # the dense dtype recorded in the quant state
    shape: tuple[int, ...]  # the dense weight's shape
    quant_storage: torch.dtype = torch.uint8  # dtype of the packed tensor (bnb_4bit_quant_storage)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)


@dataclass
class QuantReport:
    """What :func:`quantize_with_report` measured: squared reconstruction errors (float32 dequantization)."""

    target_sq_norm: float  # ||w||^2
    plain_sq_error: float  # ||dequant(plain bnb quantization) - w||^2
    sq_error: float  # ||dequant(returned tensors) - w||^2
    blocks: int
    blocks_changed: int  # blocks whose scale differs from the plain path
    change_sq_norm: float = 0.0  # ||w - reference||^2, given a reference (the weight before a change)
    change_error_dot: float = 0.0  # <dequant(returned tensors) - w, w - reference>

    @property
    def plain_rel_error(self) -> float:
        return math.sqrt(self.plain_sq_error / self.target_sq_norm) if self.target_sq_norm > 0 else 0.0

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.sq_error / self.target_sq_norm) if self.target_sq_norm > 0 else 0.0

    @property
    def change_kept(self) -> float:
        """The part of the change ``w - reference`` that the stored weights carry: the projection of
        ``dequant - reference`` on the change, ``<dequant - reference, change> / ||change||^2``, which is
        ``1 + <dequant - w, change> / ||change||^2`` (1 = all of it; 1.0 without a reference or change)."""
        return 1.0 + self.change_error_dot / self.change_sq_norm if self.change_sq_norm > 0 else 1.0

    @property
    def sq_error_reduction(self) -> float:
        """Fraction of the plain path's squared error removed (0 = no gain)."""
        return 1.0 - self.sq_error / self.plain_sq_error if self.plain_sq_error > 0 else 0.0


# --------------------------------------------------------------------------------------------- grouping


def group_quantized(names: Iterable[str], strict: bool = True) -> dict[str, list[str]]:
    """Map each 4-bit weight name to all tensor names that belong to it: the packed weight first, then its stats.

    Pass the names of the whole checkpoint (all shards): transformers may put a weight and its stats in
    different shards. A quantized weight is recognised by its ``.quant_state.bitsandbytes__<type>`` entry
    (any type is grouped; :func:`read_spec` rejects unknown ones).

    Raises:
        InvalidCheckpoint: with ``strict``, a quant state without its packed weight or without ``.absmax`` /
            ``.quant_map``, or stats (e.g. ``X.weight.absmax``) next to a weight that has no quant state.

    Example:
        >>> group_quantized(["a.weight", "a.weight.absmax", "a.weight.quant_map",
        ...                  "a.weight.quant_state.bitsandbytes__nf4", "a.bias"])
        {'a.weight': ['a.weight', 'a.weight.absmax', 'a.weight.quant_map', 'a.weight.quant_state.bitsandbytes__nf4']}
    """
    all_names = list(names)
    present = set(all_names)
    groups: dict[str, list[str]] = {}
    for name in all_names:
        if STATE_MARKER not in name:
            continue
        base, _, qt = name.rpartition(STATE_MARKER)
        if not base or "." in qt or base in groups:
            continue
        members = [base] if base in present else []
        members += [base + s for s in STAT_SUFFIXES if base + s in present]
        members += sorted(n for n in present if n.startswith(base + STATE_MARKER))
        groups[base] = members
        if strict:
            if base not in present:
                raise InvalidCheckpoint(
                    f"{name} has no packed weight {base!r} next to it: the checkpoint is incomplete; re-save it"
                )
            for s in (".absmax", ".quant_map"):
                if base + s not in present:
                    raise InvalidCheckpoint(
                        f"4-bit weight {base} lacks its {base + s} tensor: the checkpoint is incomplete; re-save it"
                    )
    if strict:
        for name in all_names:
            for s in STAT_SUFFIXES:
                base = name[: -len(s)]
                if name.endswith(s) and base in present and base not in groups:
                    raise InvalidCheckpoint(
                        f"{name} looks like bitsandbytes 4-bit statistics but {base} has no "
                        f"'{base}{STATE_MARKER}nf4' (or fp4) entry: the checkpoint is incomplete; re-save it"
                    )
    return groups


# --------------------------------------------------------------------------------------------- reading


def _state_key(tensors: dict[str, torch.Tensor], weight_name: str) -> tuple[str, str]:
    prefix = weight_name + STATE_MARKER
    keys = [k for k in tensors if k.startswith(prefix)]
    if not keys:
        raise InvalidCheckpoint(
            f"{weight_name}: no '{prefix}nf4' (or fp4) tensor given; pass the packed weight with all its stats tensors"
        )
    if len(keys) > 1:
        raise InvalidCheckpoint(f"{weight_name} has several quant states ({', '.join(sorted(keys))}); keep exactly one")
    qt = keys[0][len(prefix) :]
    if qt not in QUANT_TYPES:
        raise InvalidCheckpoint(
            f"{weight_name} uses bitsandbytes 4-bit quant type {qt!r}; only {' and '.join(QUANT_TYPES)} are supported"
        )
    return keys[0], qt


def _require(tensors: dict[str, torch.Tensor], name: str, weight_name: str) -> torch.Tensor:
    if name not in tensors:
        raise InvalidCheckpoint(
            f"4-bit weight {weight_name} lacks its {name} tensor; pass the packed weight with all its stats tensors"
        )
    return tensors[name]


def _read_state_json(tensors: dict[str, torch.Tensor], key: str, weight_name: str) -> dict:
    t = tensors[key]
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise InvalidCheckpoint(f"{key} must be a 1-D uint8 tensor holding JSON, got {t.dtype} {tuple(t.shape)}")
    try:
        state = json.loads(bytes(t.cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidCheckpoint(f"{key} does not hold valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(state, dict):
        raise InvalidCheckpoint(f"{key} holds JSON that is not an object; the checkpoint is corrupt")
    return state


def read_spec(tensors: dict[str, torch.Tensor], weight_name: str) -> QuantSpec:
    """Read and check how ``weight_name`` was quantized, from its packed weight and stats tensors.

    ``tensors`` maps full checkpoint names (``model.layers.0.mlp.up_proj.weight.absmax``, ...) to tensors;
    other entries are ignored.

    Raises:
        InvalidCheckpoint: unknown quant type, missing stats tensors, or stats inconsistent with the JSON state.
    """
    key, qt = _state_key(tensors, weight_name)
    state = _read_state_json(tensors, key, weight_name)
    packed = _require(tensors, weight_name, weight_name)
    absmax = _require(tensors, weight_name + ".absmax", weight_name)
    qmap = _require(tensors, weight_name + ".quant_map", weight_name)
    try:
        if state["quant_type"] != qt:
            raise InvalidCheckpoint(f"{key} says quant_type {state['quant_type']!r}; the checkpoint is corrupt")
        blocksize = int(state["blocksize"])
        dtype_name = str(state["dtype"])
        shape = tuple(int(s) for s in state["shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidCheckpoint(f"{key} lacks or mangles a field ({e}); the checkpoint is corrupt") from None
    if blocksize not in VALID_BLOCKSIZES:
        raise InvalidCheckpoint(f"{key}: block size {blocksize} is not one bitsandbytes supports {VALID_BLOCKSIZES}")
    if dtype_name not in STORAGE_NAMES:
        raise InvalidCheckpoint(f"{key}: dtype {dtype_name!r} is not one of {sorted(STORAGE_NAMES)}")
    nested = "nested_blocksize" in state or "nested_offset" in state
    nested_bs: int | None = None
    if nested:
        try:
            nested_bs = int(state["nested_blocksize"])
            float(state["nested_offset"])
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidCheckpoint(f"{key}: bad double-quantization fields ({e}); the checkpoint is corrupt") from None
        _require(tensors, weight_name + ".nested_absmax", weight_name)
        if _require(tensors, weight_name + ".nested_quant_map", weight_name).numel() != 256:
            raise InvalidCheckpoint(f"{weight_name}.nested_quant_map must hold 256 values; the checkpoint is corrupt")
    elif weight_name + ".nested_absmax" in tensors:
        raise InvalidCheckpoint(f"{weight_name} has nested_absmax but its quant state is not nested; it is corrupt")
    spec = QuantSpec(qt, blocksize, nested, nested_bs, NAMES[dtype_name], shape, packed.dtype)
    if packed.numel() * packed.element_size() != -(-spec.numel // 2):
        raise InvalidCheckpoint(
            f"{weight_name} holds {packed.numel() * packed.element_size()} packed bytes but shape {shape} "
            f"needs {-(-spec.numel // 2)}; the checkpoint is corrupt"
        )
    want = torch.uint8 if nested else torch.float32
    if absmax.numel() != spec.num_blocks or absmax.dtype != want:
        raise InvalidCheckpoint(
            f"{weight_name}.absmax is {absmax.dtype} [{absmax.numel()}], expected {want} [{spec.num_blocks}]; "
            "the checkpoint is corrupt"
        )
    if qmap.numel() != 16:
        raise InvalidCheckpoint(f"{weight_name}.quant_map must hold 16 values; the checkpoint is corrupt")
    return spec


def dequantize(
    tensors: dict[str, torch.Tensor],
    weight_name: str,
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense weight (shape ``spec.shape``) of a 4-bit weight: ``quant_map[code] * absmax[block]``.

    Computed here from the format's definition (blocks run over the flattened weight; double-quantized
    scales are ``nested_quant_map[code] * nested_absmax[block // nested_blocksize] + nested_offset``) in
    float32, then cast to ``dtype``. We do not call ``bitsandbytes.functional.dequantize_4bit``: on CPUs with
    AVX512, bitsandbytes 0.50 runs a kernel that takes blocks per row, so it returns wrong values when the last
    dimension is not a multiple of the block size (a 96-wide MLP input: 28% relative error), and it reads FP4
    code 8 (-0) as +0.0. The GPU kernels and bnb's generic CPU code follow the definition, and so does this.
    The float32 result re-quantizes to the same codes (see :func:`quantize`).

    ``out``: a contiguous float32 buffer of at least ``2 * ceil(numel / 2)`` values on the weight's device to
    decode into (a reused workspace spares the page faults of a fresh allocation); the float32 result is then
    a view of it.

    Raises:
        InvalidCheckpoint: see :func:`read_spec`.
    """
    spec = read_spec(tensors, weight_name)
    n, bs = spec.numel, spec.blocksize
    codes = tensors[weight_name].reshape(-1).view(torch.uint8)  # float quant_storage: the bytes are the codes
    pairs = _byte_values(tensors[weight_name + ".quant_map"], spec.quant_type).to(codes.device)
    absmax = decoded_absmax(tensors, weight_name, spec)
    size = 2 * codes.numel()  # whole bytes: an odd weight decodes one padding value more
    if out is None:
        flat = torch.empty(size, dtype=torch.float32, device=codes.device)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < size or out.device != codes.device:
        raise UsageError(f"dequantize: `out` must be a contiguous float32 tensor of >= {size} values on {codes.device}")
    else:
        flat = out.view(-1)[:size]
    full = n - n % bs  # values in whole blocks
    step = max(bs, _CACHE_ELEMENTS // bs * bs)
    with single_threaded():
        for lo in range(0, n, step):  # lo is a whole number of blocks, so of bytes
            hi = min(n, lo + step)
            torch.index_select(pairs, 0, codes[lo // 2 : (hi + 1) // 2].to(torch.int32),
                               out=flat.view(torch.int64)[lo // 2 : (hi + 1) // 2])  # fmt: skip
            if min(hi, full) > lo:
                flat[lo : min(hi, full)].view(-1, bs).mul_(absmax[lo // bs : min(hi, full) // bs].unsqueeze(1))
        if full < n:
            flat[full:n].mul_(absmax[-1])
    return flat[:n].view(spec.shape).to(dtype)


def decoded_absmax(tensors: dict[str, torch.Tensor], weight_name: str, spec: QuantSpec | None = None) -> torch.Tensor:
    """The float32 scale of every block, with double quantization decoded."""
    spec = spec or read_spec(tensors, weight_name)
    absmax = tensors[weight_name + ".absmax"]
    if not spec.double_quant:
        return absmax.to(torch.float32)
    key, _ = _state_key(tensors, weight_name)
    offset = float(_read_state_json(tensors, key, weight_name)["nested_offset"])
    nested = tensors[weight_name + ".nested_absmax"].to(torch.float32)
    code8 = tensors[weight_name + ".nested_quant_map"].to(torch.float32)
    nbs = spec.nested_blocksize or DEFAULT_NESTED_BLOCKSIZE
    if nested.numel() != -(-absmax.numel() // nbs):
        raise InvalidCheckpoint(
            f"{weight_name}.nested_absmax holds {nested.numel()} values but {absmax.numel()} scales in blocks of "
            f"{nbs} need {-(-absmax.numel() // nbs)}; the checkpoint is corrupt"
        )
    per_block = nested.repeat_interleave(nbs)[: absmax.numel()]
    return code8.index_select(0, absmax.to(torch.int32)) * per_block + offset


# --------------------------------------------------------------------------------------------- code books


@dataclass(frozen=True)
class _Codebook:
    """A 4-bit code book, with the tables that find the nearest code of any float32 in a few vector operations.

    ``torch.bucketize`` against the 15 midpoints of the sorted code book (what bitsandbytes' CPU
    ``quantize_4bit`` runs) is a binary search per value and took most of the time of a 4-bit merge. A lookup
    gives the same answer about ten times faster: the top 16 bits of a float32 (sign, exponent and 7 mantissa
    bits) name a "cell" of consecutive floats, narrow enough (relative width 2^-7) to hold at most one midpoint
    (checked when the tables are built). The sorted position of ``x`` is then ``cell_pos[cell] + (x >
    cell_bound[cell])``, with ``cell_pos`` the position of the cell's lowest float and ``cell_bound`` the
    midpoint inside the cell (``+inf`` if none). Exact for every float32: a value equal to a midpoint is not
    above it, so it takes the lower code, as with bucketize (bitsandbytes' ties rule).
    """

    code: torch.Tensor  # float32 [16], by 4-bit code
    bounds: torch.Tensor  # float32 [15], the midpoints between consecutive sorted code values
    order: torch.Tensor  # uint8 [16], sorted position -> code
    sorted_code: torch.Tensor  # float32 [16], code values by sorted position
    cell_pos: torch.Tensor  # uint8 [65536], see above
    cell_bound: torch.Tensor  # float32 [65536], see above
    sorted_is_code: bool  # a sorted position is already the code (NF4's code book is sorted; FP4's is not)


@functools.cache
def _codebook(quant_type: str, device: torch.device) -> _Codebook:
    import bitsandbytes.functional as bnbf

    code = bnbf.get_4bit_type(quant_type, device="cpu").float()
    order = torch.argsort(code, stable=True)  # FP4 holds +0 (index 0) and -0 (index 8): 0 sorts first
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    # each cell's lowest and highest float (bit patterns from 0x80000000 up are negative floats, whose value
    # falls as the pattern rises)
    first = torch.arange(65536, dtype=torch.int64) << 16
    first = torch.where(first >= 2**31, first - 2**32, first).to(torch.int32)
    a, b = first.view(torch.float32), (first | 0xFFFF).view(torch.float32)
    a, b = torch.where(a.isnan(), b, a), torch.where(b.isnan(), a, b)  # the cells of +-inf also hold NaNs
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    number = ~torch.isnan(lo)  # cells of NaNs only: their position does not matter (weights are checked first)
    pos_lo, pos_hi = torch.bucketize(lo, bounds), torch.bucketize(hi, bounds)
    if int((pos_hi - pos_lo)[number].max()) > 1:  # a safeguard: NF4 and FP4 midpoints are far apart
        raise AssertionError(f"two {quant_type} midpoints fall in one float32 cell")
    inside = number & (pos_hi > pos_lo)
    cell_bound = torch.full((65536,), math.inf)
    cell_bound[inside] = bounds[pos_lo[inside]]
    cell_pos = torch.where(number, pos_lo, 0).to(torch.uint8)
    tables = (code, bounds, order.to(torch.uint8), code[order], cell_pos, cell_bound)
    return _Codebook(*(t.to(device) for t in tables), bool(torch.equal(order, torch.arange(16))))


def _positions(x: torch.Tensor, book: _Codebook) -> torch.Tensor:
    """The sorted code-book position (uint8) of every value of ``x`` (float32): the number of midpoints below
    it, exactly what ``torch.bucketize(x, book.bounds)`` returns (see :class:`_Codebook`)."""
    x = x.contiguous()
    cell = (x.view(torch.int32) >> 16).view(-1)
    cell &= 0xFFFF
    pos = book.cell_pos.index_select(0, cell)
    pos += x.view(-1) > book.cell_bound.index_select(0, cell)
    return pos.view(x.shape)


def _encode(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Nearest code index (uint8) for values in [-1, 1], ties to the lower value, as bitsandbytes does.

    One deliberate difference: for FP4 an exact ``-0.0`` gets code 8 (-0) instead of 0, so that dequantized
    weights (where code 8 reads back as -0.0) re-quantize to the same bits; bitsandbytes itself sends tiny
    positive values to code 8 and tiny negative ones to code 0, and exact zeros of either sign to 0.
    """
    book = _codebook(quant_type, scaled.device)
    scaled = scaled.contiguous()
    q = _positions(scaled, book)
    if book.sorted_is_code:
        return q
    q = book.order.index_select(0, q.view(-1).to(torch.int32)).view(q.shape)
    if quant_type == "fp4":
        q.masked_fill_(scaled.view(torch.int32) == _NEG_ZERO_BITS, 8)
    return q


def _byte_values(qmap: torch.Tensor, quant_type: str) -> torch.Tensor:
    """For each of the 256 packed bytes, the float32 values of its two codes (high nibble first) side by side,
    as one int64: a single gather decodes a byte into two floats."""
    qmap = qmap.to(torch.float32).clone()
    if quant_type == "fp4":
        qmap[8] = -0.0  # FP4 code 8 is negative zero: keep the sign so the value re-quantizes to code 8
    pairs = torch.stack([qmap.repeat_interleave(16), qmap.repeat(16)], dim=1).contiguous()
    return pairs.view(torch.int64).view(-1)


# --------------------------------------------------------------------------------------------- quantizing


def _normalize(wb: torch.Tensor, scale: torch.Tensor, rem: int) -> torch.Tensor:
    """wb / scale per block, clamped to [-1, 1], with bitsandbytes' exact float operations.

    ``rem`` is the length of the last, partial block of the whole weight (0 if none) when ``wb`` ends with it.
    """
    s = scale.clamp(min=1e-38)
    out = wb * (1.0 / s).unsqueeze(1)
    if rem:
        out[-1] = wb[-1] / s[-1]  # bnb divides the tail block instead of multiplying by the reciprocal
    return out.clamp_(-1, 1)


def _as_blocks(t: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """``t`` flattened to float32 ``[blocks, blocksize]`` (a view when the blocks divide it evenly, else a zero
    padded copy), and the length of the partial last block (0 if none)."""
    w = t.detach().reshape(-1).float()
    rem = w.numel() % blocksize
    if rem:
        w = torch.nn.functional.pad(w, (0, blocksize - rem))
    return w.view(-1, blocksize), rem


def _chunks(blocks: int, blocksize: int) -> Iterator[tuple[int, int]]:
    """Row ranges of a ``[blocks, blocksize]`` tensor holding about :data:`_CACHE_ELEMENTS` values each."""
    rows = max(1, _CACHE_ELEMENTS // blocksize)
    for lo in range(0, blocks, rows):
        yield lo, min(blocks, lo + rows)


def _block_absmax(wb: torch.Tensor, rem: int) -> torch.Tensor:
    """bitsandbytes' scale of every block, ``max |w|`` (the tail block's clamped to >= 1e-38 as bnb stores it),
    a cache-sized chunk at a time (no full-size ``|w|``)."""
    absmax = torch.empty(wb.shape[0], dtype=torch.float32, device=wb.device)
    for lo, hi in _chunks(*wb.shape):
        torch.amax(wb[lo:hi].abs(), dim=1, out=absmax[lo:hi])
    if rem:
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    return absmax


def _encode_blocks(
    wb: torch.Tensor,
    absmax: torch.Tensor,
    rem: int,
    quant_type: str,
    measure: _Residuals | None = None,
    keep_codes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """bitsandbytes' ``quantize_4bit`` of the blocks ``wb`` with scales ``absmax``: the packed codes (uint8, two per
    byte, ``wb.numel() / 2`` bytes) and, with ``keep_codes``, the codes themselves (uint8, ``wb``'s shape).

    Normalized, encoded and packed a cache-sized chunk at a time, so the scaled values never leave the cache;
    each chunk is measured into ``measure`` while it is there. Padding values (zeros) get the code of 0, as
    bitsandbytes pads an odd weight."""
    packed = torch.empty(wb.numel() // 2, dtype=torch.uint8, device=wb.device)
    q = torch.empty(wb.shape, dtype=torch.uint8, device=wb.device) if keep_codes else None
    half = wb.shape[1] // 2  # bytes per block (block sizes are even)
    start = 0  # first block not yet measured
    for lo, hi in _chunks(*wb.shape):
        qc = _encode(_normalize(wb[lo:hi], absmax[lo:hi], rem if hi == wb.shape[0] else 0), quant_type)
        _pack_into(qc, packed[lo * half : hi * half])
        if q is not None:
            q[lo:hi] = qc
        if measure is not None and ((hi - start) * wb.shape[1] >= _MEASURE_ELEMENTS or hi == wb.shape[0]):
            measure.add(start, hi, wb[start:hi], packed[start * half : hi * half])
            start = hi
    return packed, q


def _store_scales(
    absmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Any | None]:
    """(stored absmax, the scale dequantization sees, nested offset, nested state): with double quantization
    ``absmax - offset`` becomes 8-bit codes by bitsandbytes' own ``quantize_blockwise``, as ``quantize_4bit``
    does."""
    if not spec.double_quant:
        return absmax, absmax, None, None
    import bitsandbytes.functional as bnbf

    offset = absmax.mean()
    stored, state2 = bnbf.quantize_blockwise(
        absmax - offset, blocksize=spec.nested_blocksize or DEFAULT_NESTED_BLOCKSIZE
    )
    return stored, bnbf.dequantize_blockwise(stored, state2) + offset, offset, state2


def _pack_into(q: torch.Tensor, out: torch.Tensor) -> None:
    """Pack an even number of codes (uint8) two per byte, high nibble first, into ``out`` (uint8)."""
    pairs = q.reshape(-1, 2)
    torch.bitwise_or(pairs[:, 0] << 4, pairs[:, 1], out=out)


def _as_stored(packed: torch.Tensor, n: int, storage: torch.dtype) -> torch.Tensor:
    """Packed bytes (of a zero-padded weight) as bitsandbytes stores ``n`` codes: ``ceil(n/2)`` bytes (an odd
    weight's last byte ends with the code of 0), viewed as ``storage``, shaped ``[elements, 1]``."""
    packed = packed[: -(-n // 2)]
    if storage != torch.uint8:
        packed = packed.view(storage)
    return packed.unsqueeze(1).contiguous()


def _check_spec(weight: torch.Tensor, spec: QuantSpec, weight_name: str) -> None:
    if spec.quant_type not in QUANT_TYPES:
        raise InvalidCheckpoint(f"{weight_name}: quant type {spec.quant_type!r} is not one of {QUANT_TYPES}")
    if spec.blocksize not in VALID_BLOCKSIZES:
        raise InvalidCheckpoint(f"{weight_name}: block size {spec.blocksize} is not one of {VALID_BLOCKSIZES}")
    if tuple(weight.shape) != tuple(spec.shape):
        raise InvalidCheckpoint(
            f"{weight_name}: new weight has shape {tuple(weight.shape)} but its quant state records {tuple(spec.shape)}"
        )
    if not weight.is_floating_point():
        raise InvalidCheckpoint(f"{weight_name}: cannot 4-bit quantize a {weight.dtype} tensor; pass the dense weight")


def _serialize(
    weight_name: str,
    spec: QuantSpec,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The safetensors entries, built by bnb's own ``QuantState.as_dict(packed=True)``."""
    import bitsandbytes.functional as bnbf

    code = _codebook(spec.quant_type, packed.device).code
    state2 = None
    if spec.double_quant:
        assert nested_absmax is not None and nested_code is not None and offset is not None
        state2 = bnbf.QuantState(
            absmax=nested_absmax,
            code=nested_code,
            blocksize=spec.nested_blocksize or DEFAULT_NESTED_BLOCKSIZE,
            dtype=torch.float32,
        )
    state = bnbf.QuantState(
        absmax=absmax,
        shape=torch.Size(spec.shape),
        code=code.clone(),
        blocksize=spec.blocksize,
        quant_type=spec.quant_type,
        dtype=spec.dtype,
        offset=offset,
        state2=state2,
    )
    out = {weight_name: packed}
    for k, v in state.as_dict(packed=True).items():
        out[f"{weight_name}.{k}"] = v.detach().clone().contiguous()
    return out


# --------------------------------------------------------------------------------------------- measuring


@dataclass
class _Residuals:
    """Sums over the residual ``r = dequant - w`` of a quantization of the blocks ``w``, added chunk by chunk
    (float32 within a chunk, float64 across chunks). Dequantization is recomputed exactly from the packed bytes
    (``code[q] * scale``, one gather per byte as :func:`dequantize` does), so ``sq_error`` is what dequantizing
    the written tensors gives."""

    byte_values: torch.Tensor  # int64 [256], see _byte_values
    scale: torch.Tensor  # [blocks] the scale dequantization sees
    ref: torch.Tensor | None = None  # [blocks, blocksize] the weight before a change, to measure the change
    block_sq_errors: torch.Tensor | None = None  # [blocks] ||r||^2 per block, when wanted
    target_sq: float = 0.0  # ||w||^2
    sq_error: float = 0.0  # ||r||^2
    change_sq: float = 0.0  # ||w - ref||^2
    change_dot: float = 0.0  # <r, w - ref>

    def add(self, lo: int, hi: int, w: torch.Tensor, packed: torch.Tensor) -> None:
        """Measure the blocks ``lo:hi``, whose values are ``w`` and whose packed codes are ``packed``."""
        r = self.byte_values.index_select(0, packed.to(torch.int32)).view(torch.float32).view(w.shape)
        r.mul_(self.scale[lo:hi].unsqueeze(1)).sub_(w)
        rf, wf = r.view(-1), w.reshape(-1)
        self.target_sq += float(torch.dot(wf, wf))
        if self.block_sq_errors is not None:  # the same float operations as the scale search's
            e = self.block_sq_errors[lo:hi]
            torch.sum(r.square(), dim=1, out=e)
            self.sq_error += float(e.sum(dtype=torch.float64))
        else:
            self.sq_error += float(torch.dot(rf, rf))
        if self.ref is not None:
            d = (w - self.ref[lo:hi]).view(-1)
            self.change_sq += float(torch.dot(d, d))
            self.change_dot += float(torch.dot(rf, d))


def _nearest_8bit(x: torch.Tensor, code8: torch.Tensor) -> torch.Tensor:
    """Nearest entry (uint8 index) of a sorted 256-value map for values in [-1, 1]."""
    bounds = (code8[:-1] + code8[1:]) / 2
    return torch.bucketize(x.clamp(-1, 1), bounds, out_int32=True).to(torch.uint8)


def double_quant_offset(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The ``nested_offset`` that :func:`quantize` records for ``weight`` with double quantization (the mean
    of the block absmax, float32, as bitsandbytes computes it)."""
    with single_threaded():
        return _block_absmax(*_as_blocks(weight, blocksize)).mean()


def state_length(spec: QuantSpec, offset: torch.Tensor | None = None) -> int:
    """Byte length of the quant-state JSON that :func:`quantize` writes for ``spec`` (with double quantization,
    for this ``nested_offset``, see :func:`double_quant_offset`): a safetensors header can be planned to the
    byte before the weight is quantized. Built by the same ``QuantState.as_dict`` call as the real state."""
    dummy = torch.zeros(1)
    nested = (dummy, dummy) if spec.double_quant else (None, None)
    out = _serialize("w", spec, dummy, dummy, offset if spec.double_quant else None, *nested)
    return int(out[f"w{STATE_MARKER}{spec.quant_type}"].numel())


def quantize(
    weight: torch.Tensor,
    spec: QuantSpec,
    weight_name: str,
    optimize_scales: bool = False,
    *,
    scale_grid: Sequence[float] | None = None,
    refine_steps: int = 2,
) -> dict[str, torch.Tensor]:
    """Quantize a dense weight the way ``spec`` says; returns the safetensors entries transformers writes.

    The plain path is bitsandbytes' ``quantize_4bit`` (bit for bit; on the CPU backend), except that an exact
    ``-0.0`` becomes FP4 code 8, so ``quantize(dequantize(t))`` reproduces ``t``'s packed codes. The weight is
    quantized from its float32 values whatever ``spec.dtype`` says; ``spec.dtype`` is only recorded. Outputs
    are on ``weight.device``.

    With ``optimize_scales`` each block's stored scale is chosen to minimise that block's squared
    reconstruction error, measured after every rounding the format applies (see :func:`quantize_with_report`).
    The result is never worse than the plain path, block by block.

    Raises:
        InvalidCheckpoint: the weight's shape differs from ``spec.shape``, or the spec is invalid.
    """
    out, _ = quantize_with_report(
        weight, spec, weight_name, optimize_scales, scale_grid=scale_grid, refine_steps=refine_steps, measure=False
    )
    return out


def quantize_with_report(
    weight: torch.Tensor,
    spec: QuantSpec,
    weight_name: str,
    optimize_scales: bool = True,
    *,
    scale_grid: Sequence[float] | None = None,
    refine_steps: int = 2,
    measure: bool = True,
    reference: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], QuantReport | None]:
    """:func:`quantize`, also returning the measured errors of the plain and the returned quantization.

    With ``reference`` (the weight before a change, ``weight``'s shape), the report also measures how much of
    the change ``weight - reference`` the quantized weight carries (:attr:`QuantReport.change_kept`).

    Scale search (``optimize_scales``), per block of ``blocksize`` values ``w`` with plain scale ``a = max|w|``:

    1. candidates: the plain result itself, ``s = c * a`` for ``c`` in ``scale_grid`` (default 0.700, 0.725,
       ..., 1.050), then ``refine_steps`` least-squares rescalings ``s = <w, q> / <q, q>`` of the best codes ``q``;
    2. each candidate scale goes through the storage rounding: with double quantization it is encoded as the
       nearest 8-bit code of ``(s - offset) / nested_absmax`` (``offset`` and ``nested_absmax`` fixed to the
       plain path's, so every block can choose independently) and decoded again;
    3. codes are the nearest code book entries of ``w / s_stored``, the error is ``||w - code * s_stored||^2``;
    4. the best candidate per block is kept (the plain result is a candidate, so no block gets worse).

    The work runs on one CPU thread, in cache-sized chunks (see :mod:`adaptermerge.cpu`); the report's sums are
    float32 per chunk and float64 across chunks.

    Returns:
        (tensors, report); report is None when neither ``optimize_scales`` nor ``measure`` is asked.

    Raises:
        InvalidCheckpoint: see :func:`quantize`; ``reference`` of another shape.
        NumericalError: the weight holds NaN or Inf.
    """
    _check_spec(weight, spec, weight_name)
    if reference is not None and tuple(reference.shape) != tuple(spec.shape):
        raise InvalidCheckpoint(
            f"{weight_name}: the reference weight has shape {tuple(reference.shape)}, the weight {tuple(spec.shape)}"
        )
    wb, rem = _as_blocks(weight, spec.blocksize)
    ref = None if reference is None else _as_blocks(reference, spec.blocksize)[0]
    with single_threaded():
        absmax = _block_absmax(wb, rem)
        if not bool(torch.isfinite(absmax).all()):
            raise NumericalError(f"{weight_name}: the weight to quantize holds NaN or Inf; check the merge inputs")
        stored, scale, offset, state2 = _store_scales(absmax, spec)
        plain = None
        if optimize_scales or measure:
            values = _byte_values(_codebook(spec.quant_type, weight.device).code, spec.quant_type)
            per_block = torch.empty(wb.shape[0], device=wb.device) if optimize_scales else None
            plain = _Residuals(values, scale, ref, per_block)
        packed, q = _encode_blocks(wb, absmax, rem, spec.quant_type, plain, keep_codes=optimize_scales)
        report = None
        if plain is not None:
            report = QuantReport(
                plain.target_sq, plain.sq_error, plain.sq_error, wb.shape[0], 0, plain.change_sq, plain.change_dot
            )
        if optimize_scales:
            assert report is not None and plain is not None and plain.block_sq_errors is not None and q is not None
            packed, stored, report = _optimized(wb, absmax, q, stored, scale, plain, spec, offset, state2, report,
                                                scale_grid, refine_steps)  # fmt: skip
    nested_absmax, nested_code = (state2.absmax, state2.code) if state2 is not None else (None, None)
    out = _as_stored(packed, spec.numel, spec.quant_storage)
    return _serialize(weight_name, spec, out, stored, offset, nested_absmax, nested_code), report


def _optimized(
    wb: torch.Tensor,
    absmax: torch.Tensor,
    q: torch.Tensor,
    stored: torch.Tensor,
    scale: torch.Tensor,
    plain: _Residuals,
    spec: QuantSpec,
    offset: torch.Tensor | None,
    state2: Any | None,
    report: QuantReport,
    scale_grid: Sequence[float] | None,
    refine_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, QuantReport]:
    """The scale search from the plain result: (packed codes, stored scales, the report updated)."""
    assert plain.block_sq_errors is not None
    nested = None
    if state2 is not None:
        nbs = spec.nested_blocksize or DEFAULT_NESTED_BLOCKSIZE
        nested = (offset, state2.absmax.repeat_interleave(nbs)[: wb.shape[0]], state2.code)
    grid = tuple(DEFAULT_SCALE_GRID if scale_grid is None else scale_grid)
    q, new_stored, new_scale, err = _search_scales(
        wb, absmax, q, stored, scale, plain.block_sq_errors, spec, nested, grid, refine_steps
    )
    report.sq_error = float(err.sum(dtype=torch.float64))
    report.blocks_changed = int((new_stored != stored).sum())
    packed = torch.empty(wb.numel() // 2, dtype=torch.uint8, device=wb.device)
    _pack_into(q, packed)
    if plain.ref is not None:  # the change that the new codes and scales carry
        final = _Residuals(plain.byte_values, new_scale, plain.ref)
        half = wb.shape[1] // 2
        for lo, hi in _chunks(*wb.shape):
            final.add(lo, hi, wb[lo:hi], packed[lo * half : hi * half])
        report.change_error_dot = final.change_dot
    return packed, new_stored, report


@dataclass
class _ChunkSearch:
    """Best-so-far state of the scale search on a chunk of blocks; codes as positions in the sorted code book."""

    w: torch.Tensor  # [blocks, blocksize] float32
    book: _Codebook
    nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (offset, nested absmax per block, 8-bit map)
    err: torch.Tensor  # [blocks] squared error of the best candidate
    pos: torch.Tensor  # [blocks, blocksize] uint8 sorted-code positions of the best candidate
    stored: torch.Tensor  # [blocks] stored scale (float32, or uint8 code with double quantization)
    scale: torch.Tensor  # [blocks] the scale dequantization sees

    def storage_round(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate scales -> (what is stored, the scale dequantization will see)."""
        if self.nested is None:
            return s, s
        offset, na, code8 = self.nested
        q8 = _nearest_8bit((s - offset) * (1.0 / na.clamp(min=1e-38)), code8)
        return q8, code8[q8.long()] * na + offset

    def consider(self, s: torch.Tensor) -> None:
        """Evaluate one candidate scale per block (after storage rounding) and keep it where it is better."""
        st, s_eff = self.storage_round(s)
        pos = _positions(self.w * (1.0 / s_eff.clamp(min=1e-38)).unsqueeze(1), self.book)
        r = self.book.sorted_code[pos.long()].mul_(s_eff.unsqueeze(1)).sub_(self.w)
        err = r.square_().sum(dim=1)
        better = err < self.err
        self.err[better] = err[better]
        self.pos[better] = pos[better]
        self.stored[better] = st[better]
        self.scale[better] = s_eff[better]

    def least_squares_scales(self) -> torch.Tensor:
        """The scale minimising each block's error for its current best codes."""
        cq = self.book.sorted_code[self.pos.long()]
        den = (cq * cq).sum(dim=1)
        ls = (self.w * cq).sum(dim=1) / den.clamp(min=1e-30)
        return torch.where(den > 0, ls.abs(), self.scale)


def _search_scales(
    wb: torch.Tensor,
    absmax: torch.Tensor,
    q: torch.Tensor,
    stored: torch.Tensor,
    scale: torch.Tensor,
    plain_err: torch.Tensor,
    spec: QuantSpec,
    nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    grid: tuple[float, ...],
    refine_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block, the candidate scale with the least squared error after storage rounding (see quantize_with_report).

    Starts from the plain result (codes ``q``, stored scales ``stored`` decoding to ``scale``, errors ``plain_err``)
    and returns improved (codes, stored scales, the scales they decode to, errors). ``nested`` is (offset, nested
    absmax per block, 8-bit map) with double quantization. Works on chunks of blocks to bound memory; codes are
    tracked as positions in the sorted code book during the search and mapped back at the end.
    """
    book = _codebook(spec.quant_type, wb.device)
    order_l = book.order.long()
    inv_order = torch.argsort(order_l).to(torch.uint8)
    q_out, stored_out, scale_out, err_out = q.clone(), stored.clone(), scale.clone(), plain_err.clone()
    chunk = max(1, _CHUNK_ELEMENTS // spec.blocksize)
    for lo in range(0, wb.shape[0], chunk):
        hi = min(wb.shape[0], lo + chunk)
        nested_c = None if nested is None else (nested[0], nested[1][lo:hi], nested[2])
        # views into the outputs: the search updates them in place
        search = _ChunkSearch(
            wb[lo:hi], book, nested_c, err_out[lo:hi], inv_order[q[lo:hi].long()], stored_out[lo:hi], scale_out[lo:hi]
        )
        for c in grid:
            search.consider(absmax[lo:hi] * c)
        for _ in range(refine_steps):
            search.consider(search.least_squares_scales())
        qc = book.order[search.pos.long()]
        if spec.quant_type == "fp4":  # keep the sign of exact zeros as _encode does
            w_c = wb[lo:hi]
            qc = torch.where((w_c == 0) & torch.signbit(w_c), torch.tensor(8, dtype=torch.uint8), qc)
        q_out[lo:hi] = qc
    return q_out, stored_out, scale_out, err_out


def quant_error(w_target: torch.Tensor, tensors_out: dict[str, torch.Tensor], weight_name: str) -> float:
    """Relative Frobenius error ``||dequantize(out) - w|| / ||w||`` (absolute error if ``w`` is zero)."""
    w = w_target.detach().float().reshape(-1)
    d = dequantize(tensors_out, weight_name, torch.float32).reshape(-1).to(w.device)
    err = float((d.double() - w.double()).norm())
    ref = float(w.double().norm())
    return err / ref if ref > 0 else err
