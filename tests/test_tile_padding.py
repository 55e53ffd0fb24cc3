"""Convolutions left to the tiled kernel are widened to whole register tiles, rows and channels, and sliced back."""
from __future__ import annotations

import re
import numpy as np
import onnx
import pytest
from helpers import make_model, ort_run, rand
from onnx import helper
from test_tiled_kernels import _compile_tvm_kernels, _w, scheduled_one

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize(("out_shape", "groups", "weight", "dtype", "expected"), [
    ([1, 16, 43, 192], 1, [192, 3, 3, 48], "float32", (2, 44)),  # only 1 divides 43: four tiles of 11
    ([1, 16, 44, 192], 1, [192, 3, 3, 48], "float32", None),     # 11 divides 44
    ([1, 43, 1, 64], 1, [64, 3, 1, 128], "float32", (1, 44)),    # a 1-D convolution as [N, L, 1, C] tiles along L
    ([1, 8, 85, 24], 1, [24, 3, 3, 24], "float32", None),        # 5 divides 85: enough accumulators, no guard
    # A short reduction keeps a tile of 32 channels on the stack: 7 pixels (tiled_kernels.SHORT_REDUCTION)
    ([1, 16, 43, 32], 32, [32, 3, 3, 1], "float32", (2, 49)),    # depthwise, 9 multiply-adds: seven tiles of 7
    ([1, 43, 1, 64], 1, [64, 3, 1, 64], "float32", (1, 49)),     # 192 multiply-adds
    ([1, 43, 1, 64], 1, [64, 3, 1, 256], "int8", (1, 49)),       # 768 int8 multiply-adds, 192 dot products
    ([1, 43, 1, 64], 1, [64, 3, 1, 512], "int8", (1, 44)),       # 384 dot products: tiles of 11
])
def test_the_row_the_tiled_kernel_would_guard_is_padded_to_whole_tiles(out_shape, groups, weight, dtype, expected):
    from optc.targets.tile_padding import padded_rows

    assert padded_rows(out_shape, groups, weight, 16, 32, dtype) == expected


@pytest.mark.parametrize(("channels", "groups", "depthwise", "expected"), [
    (10, 1, False, 16),     # MTCNN's box regression: no vector width divides 10
    (255, 1, False, 256),   # a YOLO head's 3 x 85
    (6, 1, False, 8),       # fewer than half a vector: a quarter-vector multiple
    (48, 1, False, None),   # 16 divides it
    (24, 1, False, 32),     # tiles of 8 would fill half of each vector: two full ones take fewer instructions than three half ones
    (12, 1, False, 16),     # one vector, not three quarter-vectors
    (56, 1, False, 64),     # four vectors, not seven halves
    (36, 1, False, 48),     # Basic Pitch's 36: three vectors, not nine quarter-vectors
    (48, 2, False, None),   # 2 groups of 24: tiles of 8 kept (a grouped slice costs a pass of its own)
    (96, 1, False, None),   # 32 divides it
    (136, 4, False, 192),   # ShuffleNet: 4 groups of 34, each padded to a whole vector, 48
    (10, 2, False, 16),     # 2 groups of 5, each padded to 8
    (64, 4, False, None),   # 16 divides each group's
    (34, 34, True, None),   # depthwise: its channels are tiled as they are
    (3, 1, False, None),    # under 4 channels the template tiles them as they are
])
def test_channels_are_padded_to_whole_vectors_where_that_takes_fewer_instructions(channels, groups, depthwise, expected):
    from optc.targets.tile_padding import padded_channels

    assert padded_channels(channels, groups, 16, depthwise) == expected


def test_neon_pads_channels_no_vector_of_two_or_more_lanes_divides():
    """NEON's 4 lanes: the template's narrowest tile (a quarter of a vector) is one lane, which divides anything; a
    YOLO head's 255 channels are padded all the same (a 1-channel tile is no vector); 10 become 12 (three vectors,
    not five half ones), 8 stay."""
    from optc.targets.tile_padding import padded_channels

    assert padded_channels(255, 1, 4) == 256 and padded_channels(10, 1, 4) == 12 and padded_channels(102, 2, 4) == 104
    assert padded_channels(8, 1, 4) is None


def _conv(width: int, stride: int = 1, groups: int = 1, out: int = 96, channels: int = 48) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[stride, stride], group=groups),
             helper.make_node("Relu", ["c"], ["y"])]
    out = out if groups == 1 else channels
    return make_model(nodes, [("x", [1, channels, 8, width])], [("y", [1, out, 8 // stride, (width - 1) // stride + 1])],
                      [_w("w", out, channels // groups, 3, 3, seed=1), _w("b", out, seed=2)])


@pytest.mark.parametrize(("width", "stride", "groups", "out", "channels", "wide"), [
    (43, 1, 1, 96, 48, "T.int64(44)"), (86, 2, 1, 96, 48, "T.int64(44)"), (43, 1, 48, 48, 48, "T.int64(44)"),
    (44, 1, 1, 10, 48, "T.int64(16)"), (43, 1, 1, 10, 48, "T.int64(44)"),
    (44, 1, 4, 136, 136, "T.int64(192)"), (43, 1, 4, 136, 136, "T.int64(44)"), (44, 1, 1, 24, 48, "T.int64(32)"),
], ids=["43", "stride-2", "depthwise", "10-channels", "43-by-10", "4-groups-of-34", "43-by-4-groups-of-34", "24-channels"])
def test_a_widened_convolution_has_no_guard_in_its_reduction_and_matches_onnxruntime(width, stride, groups, out, channels,
                                                                                    wide, tmp_path):
    """43 output pixels: four tiles of 11 with the last one guarded cost 1.6x (a predicate inside the unrolled
    reduction). Widened to 44, the reduction has no predicate; bias and ReLU run over the 43 real pixels, and the
    outputs are onnxruntime's (a write past a row's end would land in the next row). A grouped convolution whose groups
    no vector width divides (ShuffleNet's 4 x 34) gets zero filters in each group: it was left to TVM's scalar loop.
    A pruned layer's 24 channels are computed as 32: tiles of 8 had filled half of each 16-lane vector."""
    model = _conv(width, stride, groups, out, channels)
    conv, text = scheduled_one(model, "conv2d_nhwc", nhwc=True)
    update = text[text.index('conv2d_nhwc_update")'):].split("T.sblock(")[0]  # grouped: group_conv2d_nhwc_update
    accumulators = re.search(r"T\.writes\((\w+)\[", text[text.index('conv2d_nhwc_init")'):]).group(1)
    tile = next(line for line in text.splitlines() if line.strip().startswith(f"{accumulators} = T.sblock_alloc_buffer("))
    assert "T.where" not in update and wide in tile and "T.vectorized" in text[:text.index("conv2d_nhwc_update")], update
    # TVM inlined the epilogue past the slice into the tile's write-back, writing pixel 44 of each row into the next
    # row (and past the buffer's end): outputs came out right only because the next row's tile was written later.
    output = conv.params[-1].name
    real = {int(d) for d in conv.params[-1].shape}
    for block in text.split("T.sblock(")[1:]:
        if f"T.writes({output}[" in block:
            extents = {int(e) for e in re.findall(r"T\.axis\.spatial\(T\.int64\((\d+)\)", block)}
            assert extents <= real, block
    out, _ = _compile_tvm_kernels(model, tmp_path)
    from optc.targets.artifact import load_artifact

    for seed in (4, 5):
        x = rand(1, channels, 8, width, seed=seed)
        np.testing.assert_allclose(load_artifact(out).run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_a_1d_convolutions_channels_no_vector_divides_are_padded(tmp_path):
    """A 1-D convolution (NWC) to 258 channels, Silero's STFT: no vector width divides 258, and its weight is padded
    with zero filters to 272 and sliced back, where it ran TVM's scalar loop (4x onnxruntime for the whole model). No
    template failure; outputs onnxruntime's."""
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1]), helper.make_node("Relu", ["c"], ["y"])],
                       [("x", [1, 16, 20])], [("y", [1, 258, 20])], [_w("w", 258, 16, 3, seed=1), _w("b", 258, seed=2)])
    out, _ = _compile_tvm_kernels(model, tmp_path)
    import json

    from optc.targets.artifact import load_artifact

    assert json.loads((out / "report.json").read_text())["target"]["tuning"]["template_failures"] == []
    x = rand(1, 16, 20, seed=3)
    np.testing.assert_allclose(load_artifact(out).run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)
