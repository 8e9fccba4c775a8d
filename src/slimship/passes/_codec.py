"""Deep-Compression-style weight codec (Han et al., 2016): k-means weight sharing, then bit-packed
indices entropy-coded per tensor (canonical Huffman or lzma, whichever is smaller). Pure numpy.

File layout::

    b"SLIMSHIP-WS" | version u16 LE | header length u32 LE | sha256(header) | JSON header | payload

The header lists every tensor (name, shape, dtype, coding, byte segments in the payload), the
caller's ``meta`` and the payload's sha256. Lossless tensors keep their dtype; shared tensors decode
to ``codebook[indices]`` as float32, so a codebook entry of exactly 0.0 keeps pruned weights exact.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import lzma
import struct
from typing import Any

import numpy as np

from slimship.errors import CandidateError, CompressionError, ConfigError

MAGIC = b"SLIMSHIP-WS"
VERSION = 1
_PREFIX = struct.Struct("<HI")  # version, header length; followed by the header's sha256 (32 bytes)
_PREFIX_LEN = len(MAGIC) + _PREFIX.size + 32
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
_MAX_K = 1 << 16
_MAX_CODE_BITS = 16  # Huffman codes are length-limited so decoding can use a 2**16-entry lookup table
_CHUNK = 4096  # symbols per independently-addressed Huffman chunk; chunks decode in lockstep
_BLOCK = 1 << 20  # symbols per block when (un)packing, bounds temporary memory


def kmeans_1d(
    values: np.ndarray, k: int, *, iters: int = 30, init: str = "linear"
) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means (Lloyd) on a flat float array. init="linear": centroids evenly spaced between min and
    max (Han et al. found linear init best); "density": quantiles. Deterministic.

    Returns (centroids float32 (k',), labels int64 like ``values``), k' <= k: empty clusters are dropped
    and labels renumbered. Values are sorted once; each cluster is then an interval between centroid
    midpoints (np.searchsorted), summed from one prefix sum: O(k log n) per iteration, no n*k matrix."""
    if k < 1 or iters < 0:
        raise ConfigError(
            f"kmeans_1d needs k >= 1 and iters >= 0, got k={k}, iters={iters}; e.g. k=32, iters=30"
        )
    if init not in ("linear", "density"):
        raise ConfigError(f"kmeans_1d init must be 'linear' or 'density', got {init!r}")
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all():
        raise CompressionError("kmeans_1d needs a non-empty array of finite values (no NaN/inf) to cluster")
    xs = np.sort(x)
    prefix = np.concatenate(([0.0], np.cumsum(xs)))
    cents = np.linspace(xs[0], xs[-1], k) if init == "linear" else np.quantile(xs, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        cents = np.sort(cents)
        bounds = np.searchsorted(xs, (cents[1:] + cents[:-1]) / 2, side="right")
        starts, ends = np.concatenate(([0], bounds)), np.concatenate((bounds, [xs.size]))
        counts = ends - starts
        new = np.where(counts > 0, (prefix[ends] - prefix[starts]) / np.maximum(counts, 1), cents)
        if np.array_equal(new, cents):
            break
        cents = new
    cents = np.sort(cents)
    labels = np.searchsorted((cents[1:] + cents[:-1]) / 2, x, side="left")
    counts = np.bincount(labels, minlength=k)
    keep = counts > 0
    means = np.bincount(labels, weights=x, minlength=k)[keep] / counts[keep]
    renumber = np.cumsum(keep) - 1
    return means.astype(np.float32), renumber[labels].astype(np.int64)


# ---- bit packing and canonical Huffman ---------------------------------------------------------------


def _pack(idx: np.ndarray, bits: int) -> bytes:
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    parts = [
        np.packbits(((idx[i : i + _BLOCK, None].astype(np.uint32) >> shifts) & 1).astype(np.uint8).ravel())
        for i in range(0, idx.size, _BLOCK)  # _BLOCK * bits is a multiple of 8: blocks stay byte-aligned
    ]
    return b"".join(p.tobytes() for p in parts)


def _unpack(buf: bytes, bits: int, n: int) -> np.ndarray:
    raw = np.frombuffer(buf, dtype=np.uint8)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    out = np.empty(n, dtype=np.int64)
    step = _BLOCK * bits // 8
    for j, i in enumerate(range(0, n, _BLOCK)):
        m = min(_BLOCK, n - i)
        block = np.unpackbits(raw[j * step : j * step + (m * bits + 7) // 8], count=m * bits)
        out[i : i + m] = block.reshape(m, bits).astype(np.int64) @ weights
    return out


def _huffman_depths(weights: list[int]) -> list[int]:
    heap = [(w, i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = [0] * (2 * len(weights) - 1)
    node = len(weights)
    while len(heap) > 1:
        (w1, a), (w2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = [0] * node
    for i in range(node - 2, -1, -1):  # a parent always has a larger id than its children
        depth[i] = depth[parent[i]] + 1
    return depth[: len(weights)]


def _code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths per symbol (0 = absent), limited to _MAX_CODE_BITS by flattening counts."""
    lengths = np.zeros(counts.size, dtype=np.uint8)
    present = np.flatnonzero(counts)
    if present.size == 1:
        lengths[present] = 1
        return lengths
    w = counts[present].astype(np.int64)
    while True:
        depths = _huffman_depths(w.tolist())
        if max(depths) <= _MAX_CODE_BITS:
            lengths[present] = depths
            return lengths
        w = np.maximum(w >> 1, 1)  # all-ones ends at depth ceil(log2 k) <= 16, so this terminates


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, prev = 0, 0
    for s in np.lexsort((np.arange(lengths.size), lengths)):
        n = int(lengths[s])
        if n == 0:
            continue
        code <<= n - prev
        codes[s], code, prev = code, code + 1, n
    return codes


def _huffman_encode(idx: np.ndarray, k: int) -> tuple[bytes, bytes, bytes]:
    """Returns (code lengths u8 per symbol, bit length u32 per chunk, bitstream)."""
    lengths = _code_lengths(np.bincount(idx, minlength=k))
    codes, lens64 = _canonical_codes(lengths), lengths.astype(np.int64)
    cols = np.arange(_MAX_CODE_BITS)
    stream = []
    for i in range(0, idx.size, _BLOCK):
        s = idx[i : i + _BLOCK]
        ln = lens64[s][:, None]
        left = (codes[s][:, None] << (_MAX_CODE_BITS - ln)) >> (_MAX_CODE_BITS - 1 - cols)
        stream.append((left & 1).astype(np.uint8)[cols < ln])
    if not stream:
        return lengths.tobytes(), b"", b""
    sym_bits = lens64[idx]
    chunk_bits = np.add.reduceat(sym_bits, np.arange(0, idx.size, _CHUNK))
    return (
        lengths.tobytes(),
        chunk_bits.astype("<u4").tobytes(),
        np.packbits(np.concatenate(stream)).tobytes(),
    )


def _huffman_decode(lengths_b: bytes, chunks_b: bytes, data: bytes, n: int) -> np.ndarray:
    lengths = np.frombuffer(lengths_b, dtype=np.uint8)
    codes, big = _canonical_codes(lengths), _MAX_CODE_BITS
    sym_tab = np.zeros(1 << big, dtype=np.int64)
    len_tab = np.ones(1 << big, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        lo, span = int(codes[s]) << (big - int(lengths[s])), 1 << (big - int(lengths[s]))
        sym_tab[lo : lo + span], len_tab[lo : lo + span] = s, lengths[s]
    chunk_bits = np.frombuffer(chunks_b, dtype="<u4").astype(np.int64)
    nbits = int(chunk_bits.sum())
    bits = np.zeros(nbits + big + 1, dtype=np.uint8)
    bits[:nbits] = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=nbits)
    window: np.ndarray = np.zeros(nbits + 1, dtype=np.int32)  # the next 16 bits at every bit position
    for i in range(big):
        window = (window << 1) | bits[i : i + nbits + 1]
    sym_at = sym_tab[window]
    next_at = np.minimum(np.arange(nbits + 1) + len_tab[window], nbits)
    pos = np.concatenate(([0], np.cumsum(chunk_bits)[:-1]))
    steps = min(_CHUNK, n)
    out = np.empty((steps, pos.size), dtype=np.int64)
    for t in range(steps):  # every chunk advances one symbol per step
        out[t] = sym_at[pos]
        pos = next_at[pos]
    return out.T.ravel()[:n]


# ---- file format ----------------------------------------------------------------------------------------


def _lzma(buf: bytes) -> bytes:
    return lzma.compress(buf, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


def _unlzma(buf: bytes) -> bytes:
    return lzma.decompress(buf, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


def encode(
    tensors: dict[str, np.ndarray],
    shared: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    meta: dict | None = None,
) -> bytes:
    """Serialise a model's state: ``tensors`` losslessly (dtype kept, lzma if it helps), ``shared`` as
    name -> (codebook float32 (k,), indices with the tensor's shape), indices bit-packed at ceil(log2 k)
    bits and coded with canonical Huffman or lzma, whichever is smaller. ``meta`` (JSON-able) goes into
    the header as is (JSON turns tuples into lists)."""
    both = sorted(set(tensors) & set(shared))
    if both:
        raise CompressionError(f"tensors {both} are both lossless and weight-shared; pass each name once")
    payload: list[bytes] = []
    entries: list[dict[str, Any]] = []
    offset = 0

    def put(buf: bytes) -> list[int]:
        nonlocal offset
        payload.append(buf)
        offset += len(buf)
        return [offset - len(buf), len(buf)]

    for name, value in tensors.items():
        arr = np.asarray(value)  # not ascontiguousarray: it turns 0-d into 1-d; tobytes() is C-order anyway
        if arr.dtype.hasobject:
            raise CompressionError(
                f"tensor {name!r} has dtype object; only numeric/bool arrays can be stored"
            )
        raw = arr.tobytes()
        packed = _lzma(raw)
        coding, buf = ("lzma", packed) if len(packed) < len(raw) else ("raw", raw)
        entries.append(
            {
                "name": name,
                "kind": "dense",
                "shape": list(arr.shape),
                "dtype": arr.dtype.str,
                "coding": coding,
                "segments": {"data": put(buf)},
            }
        )
    for name, (codebook, indices) in shared.items():
        cb, idx = np.asarray(codebook, dtype=np.float32), np.asarray(indices)
        if cb.ndim != 1 or not 1 <= cb.size <= _MAX_K or not np.isfinite(cb).all():
            raise CompressionError(
                f"codebook of {name!r} must be 1-D, finite, with 1..{_MAX_K} entries; got shape {cb.shape}"
            )
        if idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= cb.size)):
            raise CompressionError(
                f"indices of {name!r} must be integers in [0, {cb.size}) for a {cb.size}-entry codebook"
            )
        flat, k = idx.ravel().astype(np.int64), cb.size
        bits = max(1, (k - 1).bit_length())
        by_lzma = _lzma(_pack(flat, bits))
        lengths_b, chunks_b, stream = _huffman_encode(flat, k)
        segs: dict[str, list[int]] = {"codebook": put(cb.astype("<f4").tobytes())}
        if len(lengths_b) + len(chunks_b) + len(stream) <= len(by_lzma):
            coding = "huffman"
            segs.update(code_lengths=put(lengths_b), chunk_bits=put(chunks_b), data=put(stream))
        else:
            coding, segs["data"] = "lzma", put(by_lzma)
        entries.append(
            {
                "name": name,
                "kind": "shared",
                "shape": list(idx.shape),
                "dtype": "<f4",
                "k": k,
                "bits": bits,
                "coding": coding,
                "chunk": _CHUNK,
                "segments": segs,
            }
        )
    body = b"".join(payload)
    try:
        header = json.dumps(
            {
                "meta": meta or {},
                "tensors": entries,
                "payload_bytes": len(body),
                "payload_sha256": hashlib.sha256(body).hexdigest(),
            },
            allow_nan=False,
        ).encode()
    except (TypeError, ValueError) as err:
        raise CompressionError(
            f"meta must be JSON-serialisable (dicts, lists, str, finite numbers): {err}"
        ) from err
    prefix = MAGIC + _PREFIX.pack(VERSION, len(header)) + hashlib.sha256(header).digest()
    return prefix + header + body


def _damaged(what: str) -> CandidateError:
    return CandidateError(
        f"{what}: this is not a slimship weight-shared model file (magic {MAGIC!r}, "
        f"format v{VERSION}) or it is damaged; regenerate it with the weight-sharing pass"
    )


def _read(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """Checks magic, version, both checksums and lengths; returns (header, payload)."""
    if data[: len(MAGIC)] != MAGIC:
        raise _damaged(f"bad magic {bytes(data[: len(MAGIC)])!r}, expected {MAGIC!r}")
    if len(data) < _PREFIX_LEN:
        raise _damaged(f"file is truncated ({len(data)} bytes, the fixed prefix alone is {_PREFIX_LEN})")
    version, header_len = _PREFIX.unpack_from(data, len(MAGIC))
    if version != VERSION:
        raise _damaged(f"unknown format version {version} (this slimship reads version {VERSION})")
    raw_header = data[_PREFIX_LEN : _PREFIX_LEN + header_len]
    if len(raw_header) < header_len:
        raise _damaged(f"file is truncated inside the header ({len(data)} bytes)")
    if hashlib.sha256(raw_header).digest() != data[_PREFIX_LEN - 32 : _PREFIX_LEN]:
        raise _damaged("header checksum mismatch (sha256)")
    try:
        header = json.loads(raw_header)
        expected, digest = int(header["payload_bytes"]), str(header["payload_sha256"])
    except (ValueError, KeyError, TypeError) as err:
        raise _damaged(f"header is not valid ({err})") from err
    payload = memoryview(data)[_PREFIX_LEN + header_len :]
    if len(payload) != expected:
        state = "truncated" if len(payload) < expected else "longer than recorded"
        raise _damaged(f"payload is {state}: {len(payload)} bytes, header says {expected}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise _damaged("payload checksum mismatch (sha256): the weights are corrupted")
    return header, payload


def decode(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """Inverse of :func:`encode`: (state dict of dense arrays with original names/shapes/dtypes, shared
    tensors as float32 ``codebook[indices]``; meta). Raises CandidateError on anything malformed."""
    header, payload = _read(data)
    out: dict[str, np.ndarray] = {}
    for e in header["tensors"]:
        try:
            seg = {key: bytes(payload[o : o + n]) for key, (o, n) in e["segments"].items()}
            shape, count = tuple(e["shape"]), int(np.prod(e["shape"], dtype=np.int64))
            if e["kind"] == "dense":
                raw = _unlzma(seg["data"]) if e["coding"] == "lzma" else seg["data"]
                out[e["name"]] = np.frombuffer(raw, dtype=np.dtype(e["dtype"])).reshape(shape).copy()
                continue
            codebook = np.frombuffer(seg["codebook"], dtype="<f4").astype(np.float32)
            if e["coding"] == "huffman":
                idx = _huffman_decode(seg["code_lengths"], seg["chunk_bits"], seg["data"], count)
            else:
                idx = _unpack(_unlzma(seg["data"]), e["bits"], count)
            out[e["name"]] = codebook[idx].reshape(shape)
        except (KeyError, TypeError, ValueError, IndexError, lzma.LZMAError) as err:
            raise _damaged(f"tensor {e.get('name')!r} cannot be decoded ({err})") from err
    return out, header["meta"]


def size_report(data: bytes) -> dict:
    """Bytes per tensor after coding, header and total bytes, and how many tensors use each coding."""
    header, _ = _read(data)
    tensors: dict[str, dict[str, Any]] = {}
    codings: dict[str, int] = {}
    for e in header["tensors"]:
        nbytes = sum(n for _, n in e["segments"].values())
        tensors[e["name"]] = {"kind": e["kind"], "shape": e["shape"], "coding": e["coding"], "bytes": nbytes}
        if e["kind"] == "shared":
            tensors[e["name"]].update(k=e["k"], bits=e["bits"])
        codings[e["coding"]] = codings.get(e["coding"], 0) + 1
    return {
        "total_bytes": len(data),
        "header_bytes": len(data) - header["payload_bytes"],
        "payload_bytes": header["payload_bytes"],
        "tensors": tensors,
        "codings": codings,
    }
