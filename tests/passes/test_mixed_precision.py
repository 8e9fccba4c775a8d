"""The float_until_top1 search of quantize-static: steps, stopping, and what it keeps."""

from __future__ import annotations

from slimship.passes._mixed_precision import search_float_nodes


def _search(tmp_path, scores, floor, max_nodes=4):
    ranking = [{"node": f"n{i}", "op_type": "Conv", "sqnr_db": float(i)} for i in range(6)]
    seen = []

    def quantize(excluded, path):
        seen.append(excluded)
        path.write_text(",".join(excluded))

    def score(path):
        k = len([e for e in path.read_text().split(",") if e.startswith("n")])
        return {"top1_agreement": scores[k], "cosine_min": 0.5}

    return search_float_nodes(ranking, ["first"], floor, 2, max_nodes, quantize, score, tmp_path), seen


def test_search_stops_at_the_first_step_that_meets_the_floor(tmp_path):
    (record, path), seen = _search(tmp_path, {0: 0.8, 2: 0.9, 4: 0.97}, floor=0.95)
    assert record.met and record.float_nodes == ["n0", "n1", "n2", "n3"]
    assert seen == [["first"], ["first", "n0", "n1"], ["first", "n0", "n1", "n2", "n3"]]
    assert path.read_text() == "first,n0,n1,n2,n3" and sorted(tmp_path.iterdir()) == [path]


def test_search_that_misses_keeps_the_best_step_and_says_so(tmp_path):
    (record, path), _ = _search(tmp_path, {0: 0.8, 2: 0.9, 4: 0.85}, floor=0.99)
    assert not record.met and [s["float_nodes"] for s in record.steps] == [0, 2, 4]
    assert record.float_nodes == ["n0", "n1"] and path.read_text() == "first,n0,n1"
    assert sorted(tmp_path.iterdir()) == [path]
