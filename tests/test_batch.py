"""convify.batch: many images, batched passes, worker processes; every claim checked against heatmap() one by one."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings, strategies as st
from PIL import Image

import convify
import convify.batch
from convify.batch import Failure, heatmaps, plan_groups
from convify.errors import ConvifyError, LimitError


@pytest.fixture(scope="module")
def net() -> convify.FullyConvNet:
    """A small ResNet (padding, batch norm folded in eval, a global-pool head): 7 classes at 64 px."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()
    for m in model.modules():  # non-trivial running statistics, so batch norm matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return convify.convert(model, 64, classes=[f"c{i}" for i in range(7)])


def photos(directory: Path, sizes) -> list[Path]:
    rng = np.random.default_rng(3)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = directory / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


SIZES = [(96, 64), (64, 96), (96, 64), (80, 80), (96, 64), (96, 64), (64, 96), (80, 80), (96, 64)]


class Passes:
    """Records the batch size of every pass run_network makes (wrapping the real one)."""

    def __init__(self, monkeypatch) -> None:
        self.sizes: list[int] = []
        real = convify.batch.run_network

        def recording(fcn, x, *args, **kwargs):
            self.sizes.append(x.shape[0])
            return real(fcn, x, *args, **kwargs)

        monkeypatch.setattr(convify.batch, "run_network", recording)


def test_batched_results_equal_heatmap_one_image_at_a_time(net, tmp_path, monkeypatch):
    paths = photos(tmp_path, SIZES)
    passes = Passes(monkeypatch)
    results = list(heatmaps(paths, net, batch_size=4, workers=2))
    # same-size images of a window (4 batches = 16 images: all 9 here) share passes, at most 4 to a pass
    assert sorted(passes.sizes) == [1, 2, 2, 4]
    assert [r.source for r in results] == [str(p) for p in paths]
    for path, result in zip(paths, results):
        alone = convify.heatmap(path, net)
        torch.testing.assert_close(result.logits, alone.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(result.boxes, alone.boxes) and result.input_size == alone.input_size
        assert result.pad == alone.pad and result.image.size == alone.image.size
        assert [p.index for p in result.top(3)] == [p.index for p in alone.top(3)]


def test_one_image_a_pass_is_bit_identical_to_heatmap(net, tmp_path):
    paths = photos(tmp_path, SIZES[:4])
    for path, result in zip(paths, heatmaps(paths, net, batch_size=1, workers=0)):
        assert torch.equal(result.logits, convify.heatmap(path, net).logits)


def test_the_same_windows_give_the_same_bits_whatever_the_workers(net, tmp_path):
    """Batches are fixed by the window, not by timing: worker processes or none, the same bits."""
    paths = photos(tmp_path, SIZES)
    here = list(heatmaps(paths, net, batch_size=4, workers=0))
    forked = list(heatmaps(paths, net, batch_size=4, workers=2))
    again = list(heatmaps([str(p) for p in paths], net, batch_size=4, workers=1))
    for a, b, c in zip(here, forked, again):
        assert torch.equal(a.logits, b.logits) and torch.equal(a.logits, c.logits)


def test_a_failing_image_is_a_failure_in_its_place_and_the_others_are_done(net, tmp_path):
    good = photos(tmp_path, SIZES[:3])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 10)).save(small)
    images = [good[0], tmp_path / "missing.png", good[1], broken, small, good[2]]
    results = list(heatmaps(images, net, batch_size=4, workers=2, size=None))
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["HeatmapResult", "Failure", "HeatmapResult", "Failure", "Failure", "HeatmapResult"]
    assert results[1] == Failure(1, str(tmp_path / "missing.png"), f"no such image: {tmp_path / 'missing.png'}")
    assert results[3].message.startswith(f"cannot read {broken} as an image")
    assert "needs at least" in results[4].message and "\n" not in results[4].message
    for path, result in zip(good, (results[0], results[2], results[5])):
        torch.testing.assert_close(result.logits, convify.heatmap(path, net, size=None).logits, rtol=1e-5, atol=1e-5)


def test_a_pass_that_fails_is_run_again_image_by_image(net, tmp_path, monkeypatch):
    """Out of memory for a batch: each image alone; only an image that fails alone is a failure."""
    paths = photos(tmp_path, [(96, 64)] * 3)
    real = convify.batch.run_network

    def no_batches(fcn, x, *args, **kwargs):
        if x.shape[0] > 1:
            raise LimitError("out of memory running the network on 96x64 px (a batch of 3)")
        return real(fcn, x, *args, **kwargs)

    monkeypatch.setattr(convify.batch, "run_network", no_batches)
    results = list(heatmaps(paths, net, batch_size=4, workers=0))
    for path, result in zip(paths, results):
        assert torch.equal(result.logits, convify.heatmap(path, net).logits)


def test_the_memory_budget_bounds_the_batch(net, tmp_path, monkeypatch):
    paths = photos(tmp_path, [(96, 64)] * 5)
    passes = Passes(monkeypatch)
    list(heatmaps(paths, net, batch_size=8, workers=0))
    assert passes.sizes == [5]
    passes.sizes.clear()
    per_image = convify.tiling._cost(net)[1] * 128 * 192  # one 192x128 input (padded) in bytes, as measured
    list(heatmaps(paths, net, batch_size=8, workers=0, max_memory=int(2.5 * max(per_image, convify.tiling._cost(net)[0]))))
    assert passes.sizes == [2, 2, 1]


def test_fused_runs_and_in_memory_images_go_through_too(net, tmp_path):
    path = photos(tmp_path, [(96, 64)])[0]
    picture = Image.open(path).convert("RGB")
    fused, plain = heatmaps([path, picture], net, scales=(1, 1.5), flip=True, workers=0)
    reference = convify.heatmap(path, net, scales=(1, 1.5), flip=True)
    assert torch.equal(fused.logits, reference.logits) and fused.fusion == reference.fusion
    assert plain.source is None and plain.fusion == reference.fusion


@pytest.mark.parametrize("arguments", [{"batch_size": 0}, {"batch_size": True}, {"workers": -1},
                                       {"window": "4"}, {"pad": "mirror"}, {"batch_size": 10 ** 9}])
def test_bad_arguments_are_refused_before_any_image(net, arguments):
    with pytest.raises(ConvifyError):
        next(heatmaps(["never-read.png"], net, **arguments))


@settings(max_examples=80, deadline=None)
@given(shapes=st.lists(st.one_of(st.none(), st.sampled_from([(64, 96), (96, 64), (80, 80)])), max_size=30),
       batch_size=st.integers(1, 6), cap=st.integers(1, 6))
def test_plan_groups_runs_each_image_once_in_same_size_groups_in_order(shapes, batch_size, cap):
    groups = plan_groups(shapes, batch_size, lambda shape: cap)
    flat = [p for g in groups for p in g]
    assert sorted(flat) == [i for i, s in enumerate(shapes) if s is not None]
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    for group in groups:
        assert group == sorted(group) and len({shapes[p] for p in group}) == 1
        assert 1 <= len(group) <= min(batch_size, cap)
    # as few passes as the caps allow: each shape's images fill groups greedily, in order
    for shape in {s for s in shapes if s is not None}:
        count = sum(s == shape for s in shapes)
        assert sum(shapes[g[0]] == shape for g in groups) == -(-count // min(batch_size, cap))
