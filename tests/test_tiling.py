"""Window sizing (per axis, auto-sized to about one pass) and the stitching oracle for a local operator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from revgan_med.cli.infer import _edges
from revgan_med.networks import build_generator
from revgan_med.tiling import auto_windows, pad_volume, sliding_window_predict, window_sizes


def _odd_padded(x: torch.Tensor, pad: list[tuple[int, int]]) -> torch.Tensor:
    """NumPy's odd reflection of a (B, C, X, Y, Z) tensor, clipped to each image and channel's range."""
    v = x.numpy()
    out = np.pad(v, [(0, 0), (0, 0), *pad], mode="reflect", reflect_type="odd")
    lo, hi = v.min(axis=(2, 3, 4), keepdims=True), v.max(axis=(2, 3, 4), keepdims=True)
    return torch.from_numpy(np.clip(out, lo, hi))


def test_auto_windows_is_one_window_with_margins_when_it_fits():
    assert auto_windows((256, 256, 128), margin=9) == ((256, 256, 128), (274, 274, 146))


def test_auto_windows_splits_the_largest_context_until_the_budget_holds():
    # by hand: (44,34,24) → x2 (24,34,24) → y2 (24,19,24) → x3 (18,19,24) → z2 (18,19,14) → y3 (18,14,14)
    target, context = auto_windows((40, 30, 20), margin=2, max_voxels=4000)
    assert (target, context) == ((14, 10, 10), (18, 14, 14))
    assert math.prod(context) <= 4000


def test_window_sizes_per_axis_and_the_thesis_setting():
    patch, margin = (128, 128, 128), 9
    assert window_sizes((300, 300, 300), patch_size=patch, margin=margin, target_size=64) == (
        (64, 64, 64), (128, 128, 128))  # fmt: skip
    assert window_sizes((99, 99, 9), patch_size=(64, 64, 8), margin=2, target_size=[64, 80, 8]) == (
        (64, 80, 8), (64, 84, 8))  # fmt: skip
    assert window_sizes((99, 99, 9), patch_size=patch, margin=4, context_size=[40, 40, 12]) == (
        (32, 32, 4), (40, 40, 12))  # fmt: skip


def test_auto_windows_stitch_a_local_operator_exactly():
    """A 5³ convolution (radius 2) tiled with margin 2 equals the whole-volume convolution."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 23, 17, 11)
    weight = torch.randn(1, 1, 5, 5, 5)

    def conv(v: torch.Tensor) -> torch.Tensor:
        return F.conv3d(v, weight, padding=2)

    reference = F.conv3d(F.pad(x, [2] * 6, mode="replicate"), weight)
    target, context = auto_windows(x.shape[2:], margin=2, max_voxels=1500)
    calls = []
    out = sliding_window_predict(conv, x, target_size=target, context_size=context, batch_size=3,
                                 progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    windows = calls[-1][1]
    assert windows > 2 and calls[-1] == (windows, windows)  # several windows, progress to the end
    assert [done for done, _ in calls] == list(range(3, windows, 3)) + [windows]


@pytest.mark.parametrize(
    ("shape", "pad"),
    [((2, 3, 9, 7, 5), [(3, 2), (1, 4), (0, 2)]),  # shorter than the axes
     ((1, 1, 3, 4, 2), [(5, 7), (9, 2), (4, 4)]),  # longer: reflected again
     ((1, 2, 1, 4, 2), [(2, 3), (1, 1), (0, 0)])],  # a one-voxel axis: repeated
)  # fmt: skip
def test_odd_reflect_padding_is_numpys_clipped_to_the_range(shape, pad):
    x = torch.from_numpy(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    torch.testing.assert_close(pad_volume(x, pad), _odd_padded(x, pad), atol=1e-6, rtol=0)
    flat = [p for before_after in reversed(pad) for p in before_after]
    torch.testing.assert_close(pad_volume(x, pad, mode="replicate"), F.pad(x, flat, mode="replicate"))


def test_a_sharpening_filter_leaves_a_ramp_at_the_image_border_as_it_is():
    """x + 2·(x − 3³ mean) of a ramp is the ramp (its second derivative is 0), at the border too: odd
    reflection continues the ramp. Replicate padding flattens it there and the filter answers that
    edge. Two marker voxels in the middle widen the range so the clamp does not bite at the faces."""
    x = (0.01 * torch.arange(12.0)).view(1, 1, 12, 1, 1).expand(1, 1, 12, 10, 8).clone()
    x[0, 0, 6, 5, 4], x[0, 0, 6, 5, 5] = -5.0, 5.0

    def sharpen(v: torch.Tensor) -> torch.Tensor:
        return v + 2 * (v - F.avg_pool3d(F.pad(v, [1] * 6, mode="replicate"), 3, stride=1))

    def predict(mode: str) -> torch.Tensor:
        return sliding_window_predict(
            sharpen, x, target_size=(6, 5, 4), context_size=(8, 7, 6), padding_mode=mode
        )

    faces = (slice(None), slice(None), [0, -1], slice(0, 3))  # x = 0 and 11, away from the markers
    torch.testing.assert_close(predict("odd-reflect")[faces], x[faces], atol=1e-6, rtol=0)
    replicated = predict("replicate")[0, 0, 0, :3]  # by hand: a + 2·(a − mean(a, a, a + 0.01)), a = 0
    torch.testing.assert_close(replicated, torch.full_like(replicated, -0.02 / 3), atol=1e-6, rtol=0)


def test_receptive_radius_counts_the_generators_convolutions_by_hand():
    srcnn = build_generator("srcnn3d", in_channels=1, out_channels=1, width=4, depth=2)
    assert srcnn.receptive_radius() == 1 + 2 * 2  # encoder 3³, two residual blocks of two 3³ convs
    # 5³ (2) + 3³ stride 2 (1); at half resolution two coupling blocks of four 3³ convs (2·8);
    # transposed 3³ (1) and 5³ (2) at full resolution; + 1 for the padding to a multiple of 2
    resnet = build_generator("rev_resnet3d", in_channels=1, out_channels=1, width=4, depth=2)
    assert resnet.receptive_radius() == 2 + 1 + 16 + 1 + 2 + 1


@pytest.mark.parametrize(("text", "value"), [("64", 64), ("64,64,8", [64, 64, 8])])
def test_window_edges_parse_one_or_three(text, value):
    assert _edges(text) == value


@pytest.mark.parametrize("text", ["64,8", "0", "a,b,c"])
def test_window_edges_refuse_other_forms(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="X,Y,Z"):
        _edges(text)


@pytest.mark.parametrize(("task", "border"), [("ct-kernel", "odd-reflect"), ("ct-sr", "replicate")])
def test_infer_defaults_to_auto_windows_and_stays_seamless(monkeypatch, task, border):
    """Through `infer_volume` with no window settings: a 3³ filter (radius 1) split into several auto
    windows (small budget) equals the filter over the whole volume extended as its task says: kernel
    conversion continues the border's gradient (NumPy's odd reflection), super-resolution repeats it."""
    from revgan_med import tiling
    from revgan_med.checkpoints import Model
    from revgan_med.data.transforms import CTWindow
    from revgan_med.inference import infer_volume

    class Smooth(torch.nn.Module):
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return F.avg_pool3d(F.pad(v, [1] * 6, mode="replicate"), 3, stride=1)

        inverse = forward

    monkeypatch.setitem(tiling.predict_volume.__kwdefaults__, "max_voxels", 12**3)
    window = CTWindow(-1000.0, 1000.0)
    hu = np.random.default_rng(0).uniform(-900, 900, (21, 17, 13)).astype(np.float32)
    model = Model(Smooth(), task, window.to_dict(), (16, 16, 16), margin=1)
    totals = set()
    out = infer_volume(model, hu, np.eye(4), progress=lambda done, total: totals.add(total)).array
    assert totals == {2 * 2 * 2}  # auto windows: (11, 9, 7) targets in (13, 11, 9) contexts
    x = torch.from_numpy(window.normalize(hu))[None, None]
    padded = _odd_padded(x, [(1, 1)] * 3) if border == "odd-reflect" else F.pad(x, [1] * 6, mode="replicate")
    expected = window.denormalize(F.avg_pool3d(padded, 3, stride=1)[0, 0].numpy())
    np.testing.assert_allclose(out, expected, atol=1e-3)


class _SmallGPU:
    """A 3³ box filter (radius 1) on a pretend accelerator that runs out of memory above `limit` voxels
    per batch, as CUDA raises it (`torch.OutOfMemoryError`); records the window sizes it was given."""

    def __init__(self, limit: int) -> None:
        self.limit, self.shapes = limit, []

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(v.shape[2:]))
        if v.shape[0] * math.prod(v.shape[2:]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return F.avg_pool3d(F.pad(v, [1] * 6, mode="replicate"), 3, stride=1)


def test_automatic_windows_shrink_where_the_accelerator_runs_out_of_memory():
    """One 22×20×16 context (7040 voxels) fails on a 1000-voxel device: the budget drops to a quarter
    of the failed context until it fits, with a warning each time, and the stitched result is still
    the filter over the whole replicate-padded volume (every voxel from a centred context)."""
    from revgan_med.tiling import predict_volume

    x = torch.randn(1, 1, 20, 18, 14)
    device = _SmallGPU(limit=1000)
    with pytest.warns(UserWarning, match="out of accelerator memory") as caught:
        out, (target, context) = predict_volume(device, x, patch_size=(6, 6, 6), margin=1)
    assert device.shapes[0] == (22, 20, 16) and len(caught) == 2  # 7040 → ≤ 1760 (fails) → ≤ 440
    assert math.prod(context) <= 7040 // 4 // 4
    assert all(c == t + 2 for t, c in zip(target, context, strict=True))
    expected = F.avg_pool3d(F.pad(x, [1] * 6, mode="replicate"), 3, stride=1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_chosen_windows_and_other_errors_are_not_retried():
    """Windows the user chose stay as chosen (the out-of-memory error stands, after one try); other
    errors are not taken for memory; and the shrinking stops at the training patch's size."""
    from revgan_med.tiling import predict_volume

    x = torch.randn(1, 1, 20, 18, 14)
    device = _SmallGPU(limit=1000)
    with pytest.raises(torch.OutOfMemoryError):
        predict_volume(device, x, patch_size=(6, 6, 6), margin=1, target_size=16)
    assert device.shapes == [(18, 18, 18)]  # target 16 > patch 6: context = target + 2·margin

    def broken(v: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")

    with pytest.raises(RuntimeError, match="CUDNN"):
        predict_volume(broken, x, patch_size=(6, 6, 6), margin=1)

    tiny = _SmallGPU(limit=50)  # less than one patch-sized (6³ = 216) context
    with pytest.warns(UserWarning), pytest.raises(torch.OutOfMemoryError):
        predict_volume(tiny, x, patch_size=(6, 6, 6), margin=1)
    assert math.prod(tiny.shapes[-1]) <= 216 < math.prod(tiny.shapes[-2])
