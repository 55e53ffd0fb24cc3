"""The in-turns latency comparison keeps to its budget on a slow model: RivaGAN's decoder on 16 frames of 256x256
(7.6 s a round of both models) took 270 s of its 4 s budget in 10 blocks of at least 3 runs and 5 warm-ups."""
from __future__ import annotations

import onnxruntime as ort
from helpers import make_model, rand
from onnx import helper

from optc.evaluation.latency import interleaved_latency_ms


class _Counted:
    """A real onnxruntime session whose runs are counted."""

    def __init__(self, proto):
        self.session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        self.runs = 0

    def run(self, names, feeds):
        self.runs += 1
        return self.session.run(names, feeds)


def _sessions():
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [("x", [8, 64])], [("y", [8, 64])], [("W", rand(64, 64))])
    return [_Counted(proto), _Counted(proto)], {"x": rand(8, 64)}


def test_a_model_slower_than_the_budget_gets_two_blocks_of_one_run():
    sessions, feeds = _sessions()
    times = interleaved_latency_ms(sessions, feeds, blocks=10, runs=20, budget_s=1e-9)  # every model is slow for this budget
    assert [s.runs for s in sessions] == [4, 4]  # 2 warm-ups (the second sizes the rest), then 2 blocks of 1 run
    assert all(t > 0 for t in times)


def test_a_fast_model_keeps_every_block_and_warm_up():
    sessions, feeds = _sessions()
    interleaved_latency_ms(sessions, feeds, blocks=4, runs=6, budget_s=60)
    assert [s.runs for s in sessions] == [5 + 4 * 6] * 2
    sessions, feeds = _sessions()
    interleaved_latency_ms(sessions, feeds, blocks=4, runs=6)  # no budget: as asked
    assert [s.runs for s in sessions] == [5 + 4 * 6] * 2
