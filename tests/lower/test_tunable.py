"""Tunable Q/DQ (`tunable_qdq`): fed any groups' parameters, the outputs are bit for bit those of the model
`insert_qdq` writes with them (INT32 biases left float)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import models
import onnxq
from onnxq.io import from_graph
from onnxq.lower.tunable import tunable_qdq
from onnxq.runtime.session import open_session


@pytest.mark.parametrize("target", [onnxq.TRT, onnxq.ORT_CPU], ids=str)
@pytest.mark.parametrize("name", ["residual_cnn", "yolo_neck_head", "transformer_encoder"])
def test_fed_parameters_reproduce_the_written_model(name: str, target: onnxq.QuantTarget) -> None:
    model = models.BUILDERS[name]()
    graph = onnxq.prepare(model, target)
    plan = target.plan(graph, onnxq.Selection())
    calib = onnxq.CalibConfig(method=onnxq.CalibMethod.MSE)
    feeds = onnxq.FeedsSource([models.random_feeds(model, batch=4, seed=s) for s in range(2)])
    stats = onnxq.calibrate(graph, plan.activation_names, feeds, calib).stats
    tunable = tunable_qdq(graph, plan, onnxq.activation_params(plan, stats, calib, target.scheme))
    feed = models.random_feeds(model, batch=3, seed=9)
    wider = {group: 1.5 * amax for group, amax in onnxq.group_amax(plan, stats, calib, target.scheme).items()}
    with open_session(from_graph(tunable.graph, model)) as session:
        for amax in (None, wider):
            params = onnxq.activation_params(plan, stats, calib, target.scheme, amax)
            unbiased = dataclasses.replace(plan, biases=())
            with open_session(from_graph(onnxq.insert_qdq(graph, unbiased, params), model)) as written:
                want = written.run(feed)
            got = session.run({**feed, **tunable.feed(params)}, list(want))
            for output, values in want.items():
                assert np.array_equal(got[output], values), (output, amax is None)
    assert len(tunable.inputs) == len({a.group for a in plan.activations})
