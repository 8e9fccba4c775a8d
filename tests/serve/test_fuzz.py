"""A bounded, seeded fuzz of the infer route (issue 17): valid JSON and binary requests mutated at random — values
replaced by junk, keys dropped, shapes blown up, bytes flipped, bodies cut — against a real server on 127.0.0.1.
No request may get a 5xx or hang; a valid request succeeds after every 100 bad ones; the server's memory stays
bounded. The seed is fixed, so a failure reproduces: the failing request is printed."""

from __future__ import annotations

import copy
import json
import random
import re
import struct
import time

import httpx
import numpy as np
import pytest

from tests.serve.conftest import ServerProcess
from tests.serve.hardening_models import bert_like, log_model

SEED = 17
REQUESTS = 6000
#: every status a bad request may get (never a 5xx)
EXPECTED = {200, 400, 404, 405, 408, 413}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-models")
    cfg = {
        "models": [
            {"name": "bert", "path": str(bert_like(root / "bert.onnx"))},
            {"name": "log", "path": str(log_model(root / "log.onnx"))},
        ],
        "limits": {"max_body_bytes": 1_000_000},
    }
    s = ServerProcess(tmp_path_factory.mktemp("fuzz"), cfg, args=("--no-access-log",))
    yield s
    assert s.stop() in (0, -15)


def _valid(rng: random.Random) -> tuple[str, dict, bytes]:
    """(model, JSON header, binary tail) of a valid request, JSON or binary."""
    if rng.random() < 0.5:
        n, s = rng.randint(1, 3), rng.randint(1, 8)
        ids = [rng.randrange(1000) for _ in range(n * s)]
        return (
            "bert",
            {
                "id": f"req-{rng.randrange(10**6)}",
                "inputs": [
                    {"name": "input_ids", "shape": [n, s], "datatype": "INT64", "data": ids},
                    {"name": "attention_mask", "shape": [n, s], "datatype": "INT64", "data": [1] * (n * s)},
                ],
            },
            b"",
        )
    n = rng.randint(1, 4)
    x = np.asarray([rng.uniform(0.1, 10) for _ in range(n * 4)], np.float32)
    if rng.random() < 0.5:
        head = {"inputs": [{"name": "x", "shape": [n, 4], "datatype": "FP32", "data": x.tolist()}]}
        return "log", head, b""
    head = {
        "inputs": [
            {"name": "x", "shape": [n, 4], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
        ],
        "parameters": {"binary_data_output": True},
    }
    return "log", head, x.tobytes()


def _junk(rng: random.Random) -> object:
    choices = [
        None,
        {},
        [],
        "",
        "x" * rng.randint(1, 5000),
        "false",
        True,
        -1,
        0,
        2**31,
        2**63,
        2**64 + 1,
        -(2**63) - 1,
        1e308,
        1e15,
        -0.5,
        [None],
        [[[]]],
        [1] * rng.randint(0, 70),
        [4294967296, 4294967296, 8, 8],
        [3037000500, 3037000500],
        [rng.randint(0, 2**40) for _ in range(rng.randint(1, 4))],
        {"binary_data_size": rng.choice([0, -1, 10**9, "8", None, True])},
        {"binary_data_output": rng.choice(["false", 1, None, [], True])},
        rng.choice(["FP32", "INT64", "BYTES", "BOOL", "FP16", "UINT8", "BF16", "fp32"]),
    ]
    return rng.choice(choices)


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list) and len(obj) <= 8:
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: dict, path: tuple, value: object) -> dict:
    if not path:
        return value  # type: ignore[return-value]
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return obj


def _mutate_json(rng: random.Random, head: dict) -> dict:
    head = copy.deepcopy(head)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(head)
        path = rng.choice(paths)
        op = rng.random()
        if op < 0.15 and path:  # drop a key / element
            parent = head
            for k in path[:-1]:
                parent = parent[k]
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, list) and parent:
                parent.pop(path[-1] if path[-1] < len(parent) else -1)
        elif op < 0.25:  # nest deeply
            depth = rng.choice([10, 100, 1000, 5000])
            head = _set(head, path, f"__deep{depth}__") if path else head  # spliced in by _encode
        else:
            head = _set(head, path, _junk(rng)) if path else head
        if not isinstance(head, dict):
            return {"inputs": head}
    return head


def _encode(head: object) -> bytes:
    """JSON text, with arrays nested ``n`` deep where a mutation left ``"__deepN__"`` (json itself can't nest so deep)."""
    text = json.dumps(head, allow_nan=False)
    return re.sub(r'"__deep(\d+)__"', lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text).encode()


def _mutate_bytes(rng: random.Random, body: bytes) -> bytes:
    b = bytearray(body)
    op = rng.random()
    if op < 0.3 and b:
        return bytes(b[: rng.randrange(len(b))])
    if op < 0.6 and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    pos = rng.randrange(len(b) + 1)
    return bytes(b[:pos]) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + bytes(b[pos:])


def _bad(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    model, head, tail = _valid(rng)
    headers: dict[str, str] = {}
    r = rng.random()
    if r < 0.6:
        head = _mutate_json(rng, head)
        body = _encode(head)
        if tail or rng.random() < 0.3:
            headers["Inference-Header-Content-Length"] = str(len(body))
            body += tail if rng.random() < 0.7 else _mutate_bytes(rng, tail or b"\0" * 16)
    elif r < 0.85:
        text = _encode(head)
        if tail:
            headers["Inference-Header-Content-Length"] = str(len(text))
        body = _mutate_bytes(rng, text + tail)
    else:  # headers lie
        body = _encode(head) + tail
        headers["Inference-Header-Content-Length"] = rng.choice(
            ["-1", "abc", str(len(body) + 10), "0", str(rng.randrange(len(body) + 1)), "9" * 30]
        )
        if rng.random() < 0.3:
            headers["x-request-id"] = "r" * rng.choice([10, 256, 257, 100_000])
    if rng.random() < 0.02:
        model = rng.choice(["nope", "bert/versions/9", "log/versions/1"])
    return model, body, headers


def _post(c: httpx.Client, model: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return c.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def _rss(server) -> int:
    import psutil

    return int(psutil.Process(server.proc.pid).memory_info().rss)


def test_seeded_fuzz_no_5xx_no_hang_and_valid_requests_keep_succeeding(server):
    rng = random.Random(SEED)
    statuses: dict[int, int] = {}
    t0 = time.monotonic()
    with httpx.Client(base_url=f"http://{server.url}", timeout=10) as c:
        for i in range(REQUESTS):
            model, body, headers = _bad(rng)
            try:
                r = _post(c, model, body, headers)
            except httpx.TimeoutException:
                pytest.fail(f"request {i} hung: {model} {headers} {body[:300]!r}")
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code in EXPECTED, (i, r.status_code, r.text[:300], model, headers, body[:300])
            if r.status_code != 200:
                assert "error" in r.json(), r.text[:300]
            if i % 100 == 99:
                vmodel, vhead, vtail = _valid(rng)
                vh = {"Inference-Header-Content-Length": str(len(_encode(vhead)))} if vtail else {}
                ok = _post(c, vmodel, _encode(vhead) + vtail, vh)
                assert ok.status_code == 200, (i, ok.text)
    took = time.monotonic() - t0
    print(f"fuzz: {REQUESTS} requests in {took:.1f} s, statuses {dict(sorted(statuses.items()))}")
    assert took < 60
    assert statuses.get(400, 0) > REQUESTS // 2  # the fuzz mostly reaches the parser's refusals


def test_memory_stays_bounded_under_bad_requests(server):
    """Hostile requests that claim huge tensors or carry long ids leave nothing behind."""
    rng = random.Random(SEED + 1)
    huge_bytes = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [100000000],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 0},
                }
            ]
        }
    ).encode()
    with httpx.Client(base_url=f"http://{server.url}", timeout=10) as c:
        for _ in range(200):  # warm-up: allocator pools, caches
            _post(c, *_bad(rng))
        before = _rss(server)
        for i in range(2000):
            if i % 4 == 0:
                r = _post(c, "log", huge_bytes, {"Inference-Header-Content-Length": str(len(huge_bytes))})
            elif i % 4 == 1:
                body = {"id": "i" * 100_000, "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}
                r = _post(c, "log", _encode(body), {"x-request-id": "h" * 100_000})
            else:
                r = _post(c, *_bad(rng))
            assert r.status_code < 500
        grown = _rss(server) - before
    print(f"memory: RSS {before / 1e6:.1f} MB before 2000 bad requests, grew {grown / 1e6:+.1f} MB")
    assert grown < 30e6


def test_binary_bytes_elements_round_trip_under_the_bound(server):
    """The BYTES bound (4 bytes per element at least) refuses nothing valid: 3 elements in exactly 12+ bytes parse."""
    from slimship.serve.protocol import parse_infer_request

    tail = b"".join(struct.pack("<I", len(s)) + s for s in (b"", b"a", b"bc"))
    head = _encode(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(tail)},
                }
            ]
        }
    )
    req = parse_infer_request(head + tail, str(len(head)))
    assert list(req.inputs["s"]) == [b"", b"a", b"bc"]


def test_the_parser_raises_only_protocol_errors_on_mutated_bodies():
    """In-process, many more bodies: parsing either succeeds or raises a ProtocolError (a 4xx), nothing else."""
    from slimship.serve.protocol import ProtocolError, parse_infer_request

    rng = random.Random(SEED + 2)
    refused = 0
    for i in range(20_000):
        _, body, headers = _bad(rng)
        try:
            parse_infer_request(body, headers.get("Inference-Header-Content-Length"))
        except ProtocolError as err:
            assert 400 <= err.status < 500
            refused += 1
        except Exception as err:  # the point of the test
            pytest.fail(f"body {i} raised {type(err).__name__}: {err}\n{body[:300]!r} {headers}")
    assert refused > 10_000


@pytest.mark.parametrize(
    "text",
    [
        b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.1, -2.5e-3, 3]}]}',
        b'{"inputs": [{"name": "x", "shape": [%d], "datatype": "INT64", "data": [1]}]}'
        % 2**70,  # beyond 64 bits
        b"[%d, %d, -%d]" % (2**63 - 1, 2**64, 2**63 + 1),  # orjson alone reads the last two as floats
        b"[1e400, -1e400, 0.30000000000000004, 1E5, -0]",  # infinities: a stdlib-only reading
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',  # a stdlib-only literal
        b'{"id": "\\ud800", "inputs": []}',  # a lone surrogate
        b"[" * 1100 + b"]" * 1100,  # deeper than orjson's 1,024 levels
        b'{"inputs": [1, 2,]}',  # invalid JSON
        b"\xff\xfe",  # not UTF-8
    ],
)
def test_the_fast_json_parser_decides_exactly_as_the_standard_library(text):
    """orjson parses valid bodies; everything it refuses is decided by the standard library's parser, so values and
    errors are the same as with `json.loads` alone."""
    from slimship.serve.protocol import _loads

    try:
        want: object = json.loads(text)
    except (ValueError, RecursionError) as err:
        with pytest.raises(type(err)):
            _loads(text)
        return
    got = _loads(text)
    assert json.dumps(got) == json.dumps(want)  # NaN == NaN as text
    if isinstance(want, list):  # an integer stays an integer
        assert [type(v) for v in got] == [type(v) for v in want]


def test_a_request_id_orjson_cannot_write_is_echoed_escaped_not_a_500(server):
    """A lone surrogate in the body's `id` is valid JSON the standard library reads; the answer carries it back (as
    the escape it came in), instead of failing in the fast encoder."""
    body = (
        b'{"id": "req-\\ud800", "inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]},'
        b' {"name": "attention_mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1]}]}'
    )
    with httpx.Client(base_url=f"http://{server.url}", timeout=10) as c:
        r = _post(c, "bert", body, {})
    assert r.status_code == 200, r.text[:300]
    assert b'"id":"req-\\ud800"' in r.content


def test_a_long_digit_run_is_found_anywhere_even_across_scan_chunks(monkeypatch):
    """The 19-digit scan (which sends a body to the standard library's parser) translates the body a chunk at a time;
    a run split by a chunk boundary is still found, and 18 digits are not a run."""
    from slimship.serve import protocol

    monkeypatch.setattr(protocol, "_SCAN_CHUNK", 8)
    for pad in range(0, 12):
        text = b" " * pad + b"[12345678901234567890]"
        assert protocol._has_long_digit_run(text), pad
        assert protocol._loads(text) == [12345678901234567890]  # exact, not orjson's float
        assert not protocol._has_long_digit_run(b" " * pad + b"[123456789012345678, 1]"), pad
