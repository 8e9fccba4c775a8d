from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from slimship.errors import CandidateError, CompressionError, ConfigError
from slimship.passes._codec import (
    MAGIC,
    _code_lengths,
    _huffman_decode,
    _huffman_encode,
    decode,
    encode,
    kmeans_1d,
    size_report,
)


def _pruned_shared(rng, shape, k=32, zero_fraction=0.8):
    """A Deep-Compression layer: codebook entry 0 is exactly 0.0 (pruned), the rest are k-means centroids."""
    codebook = np.concatenate(([0.0], np.sort(rng.normal(0, 0.1, k - 1)))).astype(np.float32)
    idx = np.where(rng.random(shape) < zero_fraction, 0, rng.integers(1, k, shape))
    return codebook, idx


# ---- kmeans_1d ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["linear", "density"])
def test_kmeans_recovers_three_separated_clusters(init):
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], [300, 500, 200])
    values = np.array([-3.0, 0.5, 4.0])[truth] + rng.normal(0, 0.01, truth.size)
    order = rng.permutation(truth.size)
    truth, values = truth[order], values[order]
    centroids, labels = kmeans_1d(values, 3, init=init)
    assert centroids.dtype == np.float32 and centroids.shape == (3,)
    assert labels.shape == values.shape and np.issubdtype(labels.dtype, np.integer)
    np.testing.assert_array_equal(labels, truth)
    np.testing.assert_allclose(centroids, [values[truth == j].mean() for j in range(3)], rtol=1e-6)


def test_kmeans_is_deterministic():
    values = np.random.default_rng(1).standard_t(3, 50_000)
    a, b = kmeans_1d(values, 16), kmeans_1d(values.copy(), 16)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_kmeans_drops_empty_clusters_and_renumbers():
    centroids, labels = kmeans_1d(np.array([1.0, 7.0, 2.0, 1.0, 2.0, 2.0]), 10)
    np.testing.assert_array_equal(centroids, np.float32([1.0, 2.0, 7.0]))
    np.testing.assert_array_equal(labels, [0, 2, 1, 0, 1, 1])
    centroids, labels = kmeans_1d(np.full(5, 0.25), 4)
    assert centroids.tolist() == [0.25] and labels.tolist() == [0] * 5


def test_kmeans_on_a_million_values_beats_the_linear_grid():
    values = np.random.default_rng(2).normal(0, 0.05, 1_000_000)
    centroids, labels = kmeans_1d(values, 32)
    assert centroids.shape == (32,) and labels.shape == values.shape
    assert labels.min() == 0 and labels.max() == 31 and np.all(np.diff(centroids) > 0)
    # Lloyd never increases the error of its initial (linear-grid) assignment, and here it lowers it clearly
    grid = np.linspace(values.min(), values.max(), 32)
    grid_err = np.mean((values - grid[np.abs(values[:, None] - grid[None, :]).argmin(1)]) ** 2)
    assert np.mean((values - centroids[labels]) ** 2) < 0.8 * grid_err


def test_kmeans_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="k >= 1"):
        kmeans_1d(np.ones(3), 0)
    with pytest.raises(ConfigError, match="'linear' or 'density'"):
        kmeans_1d(np.ones(3), 2, init="kmeans++")
    with pytest.raises(CompressionError, match="finite"):
        kmeans_1d(np.array([1.0, np.nan]), 2)


# ---- round trip and compression ----------------------------------------------------------------------------


def test_round_trip_is_exact():
    rng = np.random.default_rng(3)
    codebook, idx = _pruned_shared(rng, (64, 100))
    tensors = {
        "fc.bias": rng.normal(size=100).astype(np.float32),
        "bn.num_batches_tracked": np.array(12345678901, dtype=np.int64),
        "bn.running_mean": np.zeros(64, dtype=np.float16),
        "mask": rng.random((3, 4)) < 0.5,
        "empty": np.zeros((0, 7), dtype=np.float32),
    }
    meta = {"arch": "mlp", "layers": [784, 64, 10], "dropout": 0.1, "nested": {"ok": True}}
    state, meta_back = decode(
        encode(tensors, {"fc.weight": (codebook, idx), "one": (np.zeros(1), np.zeros(5, int))}, meta=meta)
    )
    assert meta_back == meta
    assert set(state) == {*tensors, "fc.weight", "one"}
    for name, value in tensors.items():
        assert state[name].dtype == value.dtype and state[name].shape == value.shape
        assert state[name].tobytes() == value.tobytes()
    w = state["fc.weight"]
    assert w.dtype == np.float32 and w.shape == (64, 100)
    np.testing.assert_array_equal(w, codebook[idx])
    assert (
        np.count_nonzero(w == 0.0) == np.count_nonzero(idx == 0) > 0.7 * idx.size
    )  # pruned weights stay exact zeros
    np.testing.assert_array_equal(state["one"], np.zeros(5, np.float32))


def test_entropy_coding_beats_bit_packing_on_a_pruned_layer():
    rng = np.random.default_rng(4)
    codebook, idx = _pruned_shared(rng, (400, 500))  # 200k weights, 5 bits, 80% exact zeros
    blob = encode({}, {"w": (codebook, idx)})
    report = size_report(blob)
    assert report["tensors"]["w"]["bits"] == 5 and report["total_bytes"] == len(blob)
    assert len(blob) < 0.5 * 200_000 * 5 / 8  # ~2 bits/weight vs 5 packed (entropy is ~1.7)
    assert len(blob) < 800_000 / 10
    np.testing.assert_array_equal(decode(blob)[0]["w"], codebook[idx])


def test_huffman_is_kept_when_smaller():
    rng = np.random.default_rng(5)
    codebook, idx = _pruned_shared(rng, (200_000,))  # i.i.d. symbols: nothing for lzma's matcher to find
    blob = encode({}, {"w": (codebook, idx)})
    assert size_report(blob)["tensors"]["w"]["coding"] == "huffman"
    np.testing.assert_array_equal(decode(blob)[0]["w"], codebook[idx])


def test_lzma_is_kept_when_smaller():
    rng = np.random.default_rng(6)
    codebook, _ = _pruned_shared(rng, (1,))
    idx = np.tile(np.arange(32), 6250).reshape(250, 800)  # uniform histogram (Huffman: 5 bits) but periodic
    blob = encode({}, {"w": (codebook, idx)})
    report = size_report(blob)["tensors"]["w"]
    assert report["coding"] == "lzma" and report["bytes"] < 2_000
    np.testing.assert_array_equal(decode(blob)[0]["w"], codebook[idx])


def test_lossless_tensors_are_compressed_when_it_helps():
    blob = encode(
        {
            "zeros": np.zeros(10_000, np.int64),
            "noise": np.random.default_rng(7).integers(0, 256, 100, dtype=np.uint8),
        },
        {},
    )
    report = size_report(blob)
    assert report["tensors"]["zeros"]["coding"] == "lzma" and report["tensors"]["zeros"]["bytes"] < 1_000
    assert report["tensors"]["noise"]["coding"] == "raw" and report["codings"] == {"lzma": 1, "raw": 1}


def test_huffman_code_lengths_are_limited_and_still_decode():
    fib = [1, 1]
    while len(fib) < 24:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib + [0] * 8)  # Fibonacci counts make a 23-deep Huffman tree
    lengths = _code_lengths(counts)
    assert lengths.max() <= 16 and np.all((lengths > 0) == (counts > 0))
    assert np.sum(0.5 ** lengths[lengths > 0].astype(float)) == 1.0  # still a complete prefix code
    idx = np.random.default_rng(8).permutation(np.repeat(np.arange(32), counts))
    np.testing.assert_array_equal(_huffman_decode(*_huffman_encode(idx, 32), idx.size), idx)


def test_encode_rejects_bad_inputs():
    cb = np.float32([0.0, 1.0])
    with pytest.raises(CompressionError, match=r"\[0, 2\)"):
        encode({}, {"w": (cb, np.array([0, 2]))})
    with pytest.raises(CompressionError, match="both lossless and weight-shared"):
        encode({"w": np.ones(2)}, {"w": (cb, np.array([0, 1]))})
    with pytest.raises(CompressionError, match="JSON"):
        encode({}, {}, meta={"f": np.ones(2)})


# ---- damaged files --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob():
    rng = np.random.default_rng(9)
    return encode({"b": np.ones(10, np.float32)}, {"w": _pruned_shared(rng, (50, 50))}, meta={"n": 1})


def _damage_message(data):
    with pytest.raises(CandidateError) as info:
        decode(data)
    msg = str(info.value)
    assert "not a slimship weight-shared model file" in msg and "damaged" in msg
    return msg


def test_flipped_payload_byte_is_detected(blob):
    data = bytearray(blob)
    data[-100] ^= 0x40
    assert "payload checksum mismatch" in _damage_message(bytes(data))


def test_flipped_header_byte_is_detected(blob):
    data = bytearray(blob)
    data[len(MAGIC) + 6 + 32 + 5] ^= 0x01
    assert "header checksum mismatch" in _damage_message(bytes(data))


@pytest.mark.parametrize("cut", [1, 500])
def test_truncated_file_is_detected(blob, cut):
    assert "truncated" in _damage_message(blob[:-cut])
    assert "truncated" in _damage_message(blob[:20])


def test_wrong_magic_and_version_are_detected(blob):
    assert "bad magic" in _damage_message(b"PK\x03\x04" + blob[4:])
    assert "bad magic" in _damage_message(b"")
    future = blob[: len(MAGIC)] + struct.pack("<H", 99) + blob[len(MAGIC) + 2 :]
    assert "unknown format version 99" in _damage_message(future)
    with pytest.raises(CandidateError, match="checksum"):
        size_report(blob[:-10] + bytes(10))


def test_header_describes_the_file(blob):
    header_len = struct.unpack_from("<I", blob, len(MAGIC) + 2)[0]
    header = json.loads(blob[len(MAGIC) + 6 + 32 : len(MAGIC) + 6 + 32 + header_len])
    assert [t["name"] for t in header["tensors"]] == ["b", "w"] and header["meta"] == {"n": 1}
    assert header["payload_bytes"] == len(blob) - len(MAGIC) - 6 - 32 - header_len
