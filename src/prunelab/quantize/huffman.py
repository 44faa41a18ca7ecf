"""Canonical Huffman coding of small integer alphabets, with real encoded bytes.

Used by :mod:`prunelab.quantize.deep_compression` for the last stage of Deep Compression
(Han, Mao & Dally 2016, "Deep Compression: Compressing deep neural networks with pruning,
trained quantization and Huffman coding", ICLR, section 4): the quantized weight indices and
the relative sparse indices of each layer are Huffman coded with a code built from that
layer's own symbol counts.

The code is *canonical* (Schwartz & Kallick 1964; the form DEFLATE uses, RFC 1951 section
3.2.2): the code words follow from the code lengths alone, so a stored table is just one
length per symbol of the alphabet (4 bits each when every length is at most 15, else one
byte each). The code lengths come from the textbook heap construction (``heapq``), ties
broken by the smallest symbol, so the same counts always give the same table.

Written here rather than taken from a package: ``dahuffman`` (PyPI, pure Python, maintained)
does give real encoded bytes, but it persists its code table only by pickling a
symbol-to-code dict, always adds an end-of-file symbol to the tree, and decodes bit by bit;
a canonical code needs only the lengths, which keeps the stored table small and the file
format our own.

Bits are written most significant first; the last byte is padded with zero bits, and the
decoder is told how many symbols to read.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

#: Longest code for which decoding uses a ``2**L`` lookup table; longer codes (which need
#: strongly skewed counts over big alphabets) are decoded length by length.
LUT_MAX_BITS = 16

_NIBBLES, _BYTES = 0, 1


def code_lengths(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Huffman code length of each symbol ``0..len(counts)-1`` (0 for a symbol never seen).

    A lone symbol gets length 1 (one bit per occurrence), as a prefix code needs at least
    one bit to say anything.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("counts must be a 1-d sequence of non-negative integers")
    lengths = np.zeros(len(counts), dtype=np.int64)
    present = np.flatnonzero(counts)
    if len(present) == 1:
        lengths[present[0]] = 1
    if len(present) <= 1:
        return lengths
    # (count, smallest symbol in the subtree, symbols): the smallest symbol breaks ties.
    heap = [(int(counts[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        for s in s1:
            lengths[s] += 1
        for s in s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    return lengths


def canonical_codes(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """The canonical code word of each symbol (0 where its length is 0).

    Symbols are ranked by (length, symbol); each code is the previous one plus one, shifted
    left when the length grows. Raises ValueError when the lengths are no prefix code
    (the Kraft sum exceeds 1).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths < 0).any():
        raise ValueError("code lengths must be non-negative")
    used = lengths[lengths > 0]
    if len(used) and sum(2.0 ** -int(n) for n in used) > 1.0 + 1e-12:
        raise ValueError("code lengths violate the Kraft inequality: not a prefix code")
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        code += 1
        previous = int(lengths[symbol])
    return codes


def _pack(codes: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate the code words ``codes[i]`` of ``lengths[i]`` bits, padded to whole bytes."""
    if len(codes) == 0:
        return b""
    width = int(lengths.max())
    shifts = lengths[:, None] - 1 - np.arange(width)[None, :]
    bits = (codes[:, None] >> np.clip(shifts, 0, None)) & 1
    return np.packbits(bits[shifts >= 0].astype(np.uint8)).tobytes()


def encode(symbols: Sequence[int] | np.ndarray, lengths: Sequence[int] | np.ndarray) -> bytes:
    """Huffman-encode ``symbols`` with the canonical code of ``lengths``."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(symbols) == 0:
        return b""
    if symbols.min() < 0 or symbols.max() >= len(lengths) or (lengths[symbols] == 0).any():
        raise ValueError("a symbol to encode has no code word (count it when building the code)")
    return _pack(canonical_codes(lengths)[symbols], lengths[symbols])


def encoded_bits(symbols: Sequence[int] | np.ndarray, lengths: Sequence[int] | np.ndarray) -> int:
    """Number of bits :func:`encode` writes before padding."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    return int(np.asarray(lengths, dtype=np.int64)[symbols].sum()) if len(symbols) else 0


def decode(data: bytes, lengths: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """Read ``count`` symbols Huffman-coded with the canonical code of ``lengths``.

    Raises ValueError on a stream that ends early or holds a bit pattern with no code word.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.zeros(count, dtype=np.int64)
    if count == 0:
        return out
    if not (lengths > 0).any():
        raise ValueError("cannot decode symbols with an empty code table")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    width = int(lengths.max())
    if width <= LUT_MAX_BITS:
        _decode_lut(bits, lengths, width, out)
    else:
        _decode_by_length(bits, lengths, out)
    return out


def _decode_lut(bits: np.ndarray, lengths: np.ndarray, width: int, out: np.ndarray) -> None:
    """Decode with a table indexed by the next ``width`` bits (short codes)."""
    n_bits = len(bits)
    codes = canonical_codes(lengths)
    lut_symbol = np.zeros(1 << width, dtype=np.int64)
    lut_length = np.zeros(1 << width, dtype=np.int64)
    for symbol in np.flatnonzero(lengths):
        shift = width - int(lengths[symbol])
        start = int(codes[symbol]) << shift
        lut_symbol[start : start + (1 << shift)] = symbol
        lut_length[start : start + (1 << shift)] = lengths[symbol]
    padded = np.concatenate([bits, np.zeros(width, dtype=np.uint8)]).astype(np.int64)
    window = np.zeros(n_bits, dtype=np.int64)
    for j in range(width):  # window[p] = the `width` bits starting at bit p
        window = (window << 1) | padded[j : j + n_bits]
    window_list, symbols, sizes = window.tolist(), lut_symbol.tolist(), lut_length.tolist()
    position = 0
    result = [0] * len(out)
    for i in range(len(out)):
        if position >= n_bits:
            raise ValueError("Huffman stream ended before all symbols were read")
        value = window_list[position]
        size = sizes[value]
        if size == 0:
            raise ValueError(f"invalid Huffman code at bit {position}")
        result[i] = symbols[value]
        position += size
    if position > n_bits:
        raise ValueError("Huffman stream ended before all symbols were read")
    out[:] = result


def _decode_by_length(bits: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> None:
    """Canonical decoding one bit at a time (any code length)."""
    width = int(lengths.max())
    order = sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s))
    per_length = np.bincount(lengths[lengths > 0], minlength=width + 1).tolist()
    first_code, first_rank = [0] * (width + 1), [0] * (width + 1)
    code = rank = 0
    for n in range(1, width + 1):
        code <<= 1
        first_code[n], first_rank[n] = code, rank
        code += per_length[n]
        rank += per_length[n]
    bit_list = bits.tolist()
    position = 0
    for i in range(len(out)):
        code = 0
        for n in range(1, width + 1):
            if position >= len(bit_list):
                raise ValueError("Huffman stream ended before all symbols were read")
            code = (code << 1) | bit_list[position]
            position += 1
            if code - first_code[n] < per_length[n]:
                out[i] = order[first_rank[n] + code - first_code[n]]
                break
        else:
            raise ValueError(f"invalid Huffman code ending at bit {position}")


def pack_fixed(values: Sequence[int] | np.ndarray, width: int) -> bytes:
    """Write each value in ``width`` bits (no entropy coding), padded to whole bytes."""
    values = np.asarray(values, dtype=np.int64).ravel()
    if len(values) and (values.min() < 0 or values.max() >= 1 << width):
        raise ValueError(f"a value does not fit in {width} bits")
    return _pack(values, np.full(len(values), width, dtype=np.int64))


def unpack_fixed(data: bytes, width: int, count: int) -> np.ndarray:
    """Read ``count`` values of ``width`` bits written by :func:`pack_fixed`."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if len(bits) < count * width:
        raise ValueError("fixed-width stream ended before all values were read")
    matrix = bits[: count * width].reshape(count, width).astype(np.int64)
    return matrix @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))


def table_to_bytes(lengths: Sequence[int] | np.ndarray) -> bytes:
    """Store a code table (one length per symbol; the alphabet size is known to the reader).

    One format byte, then 4 bits per length (two per byte) when all are at most 15,
    else one byte per length.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > 255:
        raise ValueError("a code length over 255 bits cannot be stored")
    if not len(lengths) or lengths.max() <= 15:
        padded = np.concatenate([lengths, np.zeros(len(lengths) % 2, dtype=np.int64)])
        nibbles = (padded[0::2] << 4) | padded[1::2]
        return bytes([_NIBBLES]) + nibbles.astype(np.uint8).tobytes()
    return bytes([_BYTES]) + lengths.astype(np.uint8).tobytes()


def table_from_bytes(data: bytes, offset: int, n_symbols: int) -> tuple[np.ndarray, int]:
    """Read a table written by :func:`table_to_bytes`; returns ``(lengths, next offset)``."""
    kind = data[offset]
    offset += 1
    if kind == _NIBBLES:
        size = (n_symbols + 1) // 2
        raw = np.frombuffer(data, dtype=np.uint8, count=size, offset=offset).astype(np.int64)
        lengths = np.stack([raw >> 4, raw & 15], axis=1).ravel()[:n_symbols]
    elif kind == _BYTES:
        size = n_symbols
        lengths = np.frombuffer(data, dtype=np.uint8, count=size, offset=offset).astype(np.int64)
    else:
        raise ValueError(f"unknown Huffman table format {kind}")
    return lengths, offset + size
