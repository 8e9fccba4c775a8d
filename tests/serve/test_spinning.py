"""Thread spinning is a serving setting: the endpoint's sessions carry what its BatchingConfig resolves to, and its
runtime settings (what /v2/models/{m} and the admin state report) say so."""

from __future__ import annotations

import pytest

from slimship.serve.config import BatchingConfig, TuneGrid, parse_tune_grid, spins
from slimship.serve.endpoint import Endpoint


@pytest.mark.parametrize(
    ("config", "spinning"),
    [
        (BatchingConfig(), True),  # auto, one instance
        (BatchingConfig(instances=2), False),  # auto, pools side by side
        (BatchingConfig(spinning="off"), False),
        (BatchingConfig(instances=2, spinning="on"), True),
    ],
)
def test_sessions_spin_as_the_batching_config_says(digits_chain, config, spinning):
    ep = Endpoint("digits", 1, digits_chain[1].artifact_path, config)
    assert spins(config) is spinning
    assert ep.runtime_settings()["spinning"] is spinning
    for sess in ep.sessions:
        options = sess.get_session_options()
        # ONNX Runtime spins unless the entry says "0"; slimship sets it only to turn spinning off
        try:
            entry = options.get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # "does not have configuration with key": never set
            entry = "1"
        assert entry == ("1" if spinning else "0")


def test_the_tune_grid_can_vary_spinning_and_drops_configs_that_run_the_same():
    default = TuneGrid(max_batch_size=[8], max_queue_delay_ms=[0.0], instances=[1, 2])
    assert [c.spinning for c in default.configs(2)] == ["auto", "auto", "auto"]
    grid = parse_tune_grid(
        {
            "max_batch_size": [8],
            "max_queue_delay_ms": [0],
            "instances": [1],
            "spinning": ["auto", "on", "off"],
        }
    )
    configs = grid.configs(2)
    # "on" with one instance runs as "auto" does: measured once
    assert [(c.max_batch_size, c.spinning) for c in configs] == [(32, "auto"), (8, "auto"), (8, "off")]
    with pytest.raises(Exception, match="spinning"):
        parse_tune_grid({"spinning": ["sometimes"]})
