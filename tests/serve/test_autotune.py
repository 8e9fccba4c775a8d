"""`slimship serve-tune`: a tiny grid measured on real `slimship serve` processes with real httpx load, the chosen
config written as a serving config a real server starts from; the choice rule on known measurements; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from slimship.errors import ConfigError, ServingError
from slimship.serve.autotune import LoadResult, Measured, autotune, choose, write_outputs
from slimship.serve.config import BatchingConfig, TuneGrid, load_serve_config, parse_tune_grid
from tests.serve.conftest import ServerProcess


def tiny_model(path: Path) -> Path:
    """x [N, 8] → y [N, 2]: one MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(8, 2) / 16, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tune") / "tiny.onnx")


def test_tune_writes_a_config_the_server_loads(tiny, tmp_path):
    budget = 10_000.0  # generous: the point is the plumbing and the rule, not this machine's speed
    grid = parse_tune_grid({"max_batch_size": [1], "max_queue_delay_ms": [0], "instances": [1]})
    assert len(grid.configs()) == 2  # the default (batch 32) and batch 1
    result = autotune(
        tiny,
        budget,
        name="tiny",
        grid=grid,
        clients=(1, 2),
        duration_s=0.5,
        warmup_s=0.2,
        finalists=0,
        confirm_rounds=0,
        generator="httpx",
        out_dir=tmp_path / "out",
    )
    data = json.loads((tmp_path / "out" / "serve_tune.json").read_text())
    chosen = data["configs"][data["chosen"]]
    for c in ("1", "2"):  # its own measurements: within the budget, every request answered 200
        cell = chosen["by_clients"][c]
        assert cell["meets_budget"] and cell["p99_ms"] <= budget and cell["failed"] == 0
        assert cell["rps"] > 0 and all(r["statuses"].keys() == {"200"} for r in cell["rounds"])
    md = (tmp_path / "out" / "serve_tune.md").read_text()
    assert data["cpu_class"] in md and "— chosen**" in md
    cfg = load_serve_config(tmp_path / "out" / "serve.yaml", {})
    assert cfg.models[0].batching == result.chosen
    assert BatchingConfig(**chosen["batching"]) == result.chosen
    # a config to commit names the model relative to where it will be served from, not this machine's path
    rel = write_outputs(result, tmp_path / "rel", model_path="models/tiny.onnx")
    text = rel["config"].read_text()
    assert yaml.safe_load(text)["models"][0]["path"] == "models/tiny.onnx" and str(tmp_path) not in text
    assert "relative" in text.splitlines()[2] and str(tmp_path) not in rel["json"].read_text()
    # a real server starts from the written config and answers
    written = yaml.safe_load((tmp_path / "out" / "serve.yaml").read_text())
    srv = ServerProcess(tmp_path, written)
    try:
        body = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1.0] * 8}]}
        r = httpx.post(f"http://{srv.url}/v2/models/tiny/infer", json=body, timeout=30)
        assert r.status_code == 200
        assert np.allclose(r.json()["outputs"][0]["data"], np.ones(8) @ (np.arange(16).reshape(8, 2) / 16))
    finally:
        srv.stop()


def test_impossible_budget_is_a_clear_error(tiny, tmp_path):
    grid = parse_tune_grid(
        {"max_batch_size": 32, "max_queue_delay_ms": 0, "instances": 1}
    )  # the default only
    assert len(grid.configs()) == 1
    with pytest.raises(ServingError, match=r"no serving config kept p99 ≤ 0.001 ms .*Raise --p99-ms"):
        autotune(
            tiny,
            0.001,
            name="tiny",
            grid=grid,
            clients=(1,),
            duration_s=0.3,
            warmup_s=0,
            generator="httpx",
            out_dir=tmp_path,
        )
    data = json.loads((tmp_path / "serve_tune.json").read_text())  # the sweep is kept, no config written
    assert data["chosen"] is None and data["configs"][0]["by_clients"]["1"]["rps"] > 0
    assert not (tmp_path / "serve.yaml").exists()
    with pytest.raises(ConfigError, match="positive number of milliseconds"):
        autotune(tiny, 0, grid=grid)


def test_bad_grid_and_options():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['batch'\].*max_batch_size"):
        parse_tune_grid({"batch": [1, 8]})
    with pytest.raises(ConfigError, match="instances"):
        parse_tune_grid("instances: [0]")
    with pytest.raises(ConfigError, match="mapping"):
        parse_tune_grid("[1, 2]")
    from typer.testing import CliRunner

    from slimship.cli import app

    out = CliRunner().invoke(app, ["serve-tune", "x.onnx", "--p99-ms", "5", "--threads", "two"])
    assert isinstance(out.exception, ConfigError) and "--threads" in str(out.exception)


def _m(cfg: BatchingConfig, default: bool, cells: dict[int, tuple[float, float]]) -> Measured:
    m = Measured(cfg, default)
    for c, (rps, p99) in cells.items():
        m.add(LoadResult(c, 1.0, int(rps), rps, p99 / 2, p99, {200: int(rps)}))
    return m


def test_choice_rule():
    d = BatchingConfig()
    a = BatchingConfig(max_batch_size=1)
    b = BatchingConfig(max_batch_size=8)
    # b is fastest but misses the budget at 4 clients; a beats the default by 20 % everywhere → a
    ms = [
        _m(d, True, {1: (100, 5), 4: (200, 9)}),
        _m(a, False, {1: (120, 4), 4: (240, 8)}),
        _m(b, False, {1: (150, 4), 4: (300, 12)}),
    ]
    ch = choose(ms, 10, [1, 4], 0.03)
    assert ch.index == 1 and ch.achievable == [1, 4] and not ch.notes
    # only the finalists compete (a config measured once can't win on one lucky round)
    assert choose(ms, 10, [1, 4], 0.03, among=[0, 2]).index == 0
    # within min_gain of the default: the default is kept, and the note says so
    ms[1] = _m(a, False, {1: (101, 4), 4: (201, 8)})
    ch = choose(ms, 10, [1, 4], 0.03)
    assert ch.index == 0 and "kept the default" in ch.notes[0]
    # at 16 clients nobody meets the budget: reported, and decided by the other counts
    ms = [
        _m(d, True, {1: (100, 5), 16: (200, 50)}),
        _m(a, False, {1: (130, 4), 16: (180, 40)}),
    ]
    ch = choose(ms, 10, [1, 16], 0.03)
    assert ch.achievable == [1] and "at 16 clients no config" in ch.notes[0]
    # a has the better max-min score (0.9 vs 0.77) but is slower than the default at 16 clients: the default stays
    assert ch.index == 0 and "kept the default" in ch.notes[1] and "0.90x at 16 clients" in ch.notes[1]
    ms[1] = _m(a, False, {1: (130, 4), 16: (205, 40)})
    assert choose(ms, 10, [1, 16], 0.03).index == 1  # faster at both: it wins
    assert len(TuneGrid(max_batch_size=[32], max_queue_delay_ms=[0], instances=[1]).configs()) == 1


def _rounds(cfg: BatchingConfig, default: bool, cells: dict[int, list[tuple[float, float]]]) -> Measured:
    m = Measured(cfg, default)
    for c, rounds in cells.items():
        for rps, p99 in rounds:
            m.add(LoadResult(c, 1.0, int(rps), rps, p99 / 2, p99, {200: int(rps)}))
    return m


def test_choice_is_never_slower_than_the_default():
    d, a, b = BatchingConfig(), BatchingConfig(instances=2), BatchingConfig(max_batch_size=8)
    # The committed loaded-machine sweep (benchmarks/results/serve_autotune-avx2, mnist, budget 100 ms): the 2-instance
    # config kept p99 at 1 client (98.3 ms) where the default did not (136.7 ms), so it won on budget count — while
    # slower than the default at every client count. It must not replace the default.
    ms = [
        _rounds(d, True, {1: [(22.7, 136.7)] * 3, 4: [(48.4, 181.6)] * 3, 16: [(44.5, 668.2)] * 3}),
        _rounds(a, False, {1: [(19.6, 98.3)] * 3, 4: [(39.2, 231.7)] * 3, 16: [(37.5, 978.0)] * 3}),
    ]
    ch = choose(ms, 100, [1, 4, 16], 0.03, among=[0, 1])
    assert ch.index == 0 and ch.achievable == [1]
    assert any("kept the default" in n and "slower than the default" in n for n in ch.notes)
    # Medians alone would call `a` faster (70 vs 60 req/s at 4 clients), but it lost two of the three rounds it was
    # measured beside the default (load drifting across the rounds): not faster by the tuner's reading.
    ms = [
        _rounds(d, True, {1: [(100, 5)] * 3, 4: [(100, 5), (60, 5), (40, 5)]}),
        _rounds(a, False, {1: [(110, 5)] * 3, 4: [(90, 5), (70, 5), (38, 5)]}),
    ]
    ch = choose(ms, 10, [1, 4], 0.03, among=[0, 1])
    assert ch.index == 0 and "0.95x at 4 clients" in ch.notes[0]
    # The best-scored config is slower at one client count; the next one is faster everywhere: the next one wins.
    ms = [
        _rounds(d, True, {1: [(100, 5)] * 3, 4: [(200, 5)] * 3}),
        _rounds(a, False, {1: [(98, 5)] * 3, 4: [(300, 5)] * 3}),
        _rounds(b, False, {1: [(101, 5)] * 3, 4: [(240, 5)] * 3}),
    ]
    ch = choose(ms, 10, [1, 4], 0.03, among=[0, 1, 2])
    assert ch.index == 2 and "not batch 32, delay 0 ms, 2 instances" in ch.notes[0]
    # Keeping a budget the default misses counts as a gain, if it is no slower anywhere.
    ms = [
        _rounds(d, True, {1: [(100, 12)] * 3}),
        _rounds(a, False, {1: [(100.5, 8)] * 3}),
    ]
    assert choose(ms, 10, [1], 0.03).index == 1
