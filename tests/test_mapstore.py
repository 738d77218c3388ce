"""convify.mapstore: a map written block by block equals the map computed whole; atomic stores; bounded memory;
strangers' stores refused with one line."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("zarr", minversion="3")

from convify import limits  # noqa: E402
from convify.errors import LimitError, MapStoreError, OutputError, OutputExistsError  # noqa: E402
from convify.mapstore import FORMAT, MapWriter, open_map  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def blocks(rows: int, cols: int, bh: int, bw: int, shuffle: bool = True) -> list[tuple[int, int, int, int]]:
    """``(r0, c0, h, w)`` blocks covering a ``rows x cols`` map, in random order."""
    out = [(r, c, min(bh, rows - r), min(bw, cols - c)) for r in range(0, rows, bh) for c in range(0, cols, bw)]
    if shuffle:
        random.Random(0).shuffle(out)
    return out


def write_map(path: Path, full: torch.Tensor, bh: int = 23, bw: int = 31, **options) -> Path:
    c, rows, cols = full.shape
    with MapWriter(path, map_size=(rows, cols), num_classes=c, **options) as writer:
        for r, col, h, w in blocks(rows, cols, bh, bw):
            writer.write(r, col, full[:, r:r + h, col:col + w])
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


# --------------------------------------------------------------------------------------------------
# What is stored equals the map computed whole


def test_blocks_in_any_order_and_off_chunk_give_the_whole_map(tmp_path):
    full = torch.randn(12, 70, 90) * 5  # (C, H', W'), 23x31 blocks across 16-cell chunks
    store = open_map(write_map(tmp_path / "m.zarr", full, keep=[3, 7], top_k=4, chunk=16,
                               attrs={"image_size": [2900, 2300], "geometry": {"stride": 32}}))
    assert store.map_size == (70, 90) and store.k == 4 and store.kept == (3, 7)
    assert store.attrs["image_size"] == [2900, 2300] and store.attrs["geometry"] == {"stride": 32}
    assert store.classes == [f"class {i}" for i in range(12)]
    log_probs = torch.log_softmax(full.double(), dim=0)  # what HeatmapResult computes
    for c in (3, 7):
        np.testing.assert_array_equal(store.logits(c), full[c].numpy())  # raw scores, bit for bit
        np.testing.assert_allclose(store.probs(c), log_probs[c].exp().float().numpy(), rtol=1e-6, atol=1e-7)
    indices, probs = store.top_k()
    assert indices.shape == probs.shape == (70, 90, 4) and indices.dtype == np.int32 and probs.dtype == np.float32
    want = torch.topk(log_probs, 4, dim=0)
    np.testing.assert_array_equal(indices, want.indices.permute(1, 2, 0).numpy())
    np.testing.assert_allclose(probs, want.values.exp().float().permute(1, 2, 0).numpy(), rtol=1e-6)
    best = store.class_max()
    flat = log_probs.flatten(1)
    np.testing.assert_allclose(best.log_prob, flat.max(dim=1).values.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(best.prob, flat.max(dim=1).values.exp().float().numpy(), rtol=1e-6)
    np.testing.assert_array_equal(best.logit, full.flatten(1).max(dim=1).values.numpy())
    cells = flat.argmax(dim=1)
    np.testing.assert_array_equal(best.cell, np.stack([cells // 90, cells % 90], axis=1))
    # a region reads the same as the slice of the whole
    np.testing.assert_array_equal(store.logits(7, rows=slice(10, 33), cols=slice(50, None)), full[7, 10:33, 50:].numpy())
    np.testing.assert_array_equal(store.top_k(slice(5, 6), slice(0, 2))[0], indices[5:6, 0:2])


def test_all_classes_and_classes_not_kept(tmp_path):
    full = torch.randn(5, 20, 17)
    store = open_map(write_map(tmp_path / "all.zarr", full, bh=7, bw=5, keep=[1], all_classes=True, chunk=16,
                               classes=list("abcde")))
    assert store.classes == list("abcde") and store.all_classes
    for c in range(5):
        np.testing.assert_array_equal(store.logits(c), full[c].numpy())
    some = open_map(write_map(tmp_path / "some.zarr", full, keep=[1], chunk=16))
    with pytest.raises(MapStoreError, match=r"class 2 \(class 2\) was not kept"):
        some.logits(2)
    with pytest.raises(MapStoreError, match="outside"):
        some.logits(5)


def test_probabilities_near_one_keep_their_order(tmp_path):
    # Every class but 0 and 1 far below: p(0) and p(1) at their best cells are 1 - 1e-12 and 1 - 1e-10, equal
    # in float32 but not in float64; the store ranks them as HeatmapResult does.
    full = torch.full((4, 8, 8), -40.0)
    full[0, 2, 3], full[1, 5, 5] = 0.0, 0.0
    full[0] += torch.where(full[0] == 0, 0.0, -100.0)
    full[2:, 2, 3] = torch.tensor([-27.6, -60.0])  # e^-27.6 ~ 1e-12
    full[2:, 5, 5] = torch.tensor([-23.0, -60.0])  # e^-23 ~ 1e-10
    best = open_map(write_map(tmp_path / "t.zarr", full, bh=3, bw=3, chunk=16)).class_max()
    assert best.prob[0] == best.prob[1] == np.float32(1.0)
    assert best.log_prob[0] > best.log_prob[1]
    assert [tuple(c) for c in best.cell[:2]] == [(2, 3), (5, 5)]


def test_ties_go_to_the_first_cell_whatever_the_block_order(tmp_path):
    full = torch.zeros(3, 10, 10)
    full[0, 7, 8] = full[0, 1, 9] = full[0, 4, 0] = 5.0
    best = open_map(write_map(tmp_path / "t.zarr", full, bh=3, bw=2, chunk=16)).class_max()
    assert tuple(best.cell[0]) == (1, 9)


def test_top_k_larger_than_the_classes_is_all_classes(tmp_path):
    store = open_map(write_map(tmp_path / "k.zarr", torch.randn(3, 4, 4), top_k=10, chunk=16))
    assert store.k == 3 and store.top_k()[0].shape == (4, 4, 3)


# --------------------------------------------------------------------------------------------------
# Refusals while writing


@pytest.fixture
def writer(tmp_path):
    w = MapWriter(tmp_path / "w.zarr", map_size=(40, 50), num_classes=6, chunk=16)
    yield w
    w.abort()


@pytest.mark.parametrize("args, message", [
    ((0, 0, torch.randn(5, 4, 4)), r"must be \(C=6, h, w\)"),
    ((0, 0, torch.randn(6, 4)), r"must be \(C=6, h, w\)"),
    ((0, 0, torch.zeros(6, 4, 4, dtype=torch.int64)), "floating point"),
    ((38, 0, torch.randn(6, 4, 4)), "leaves the 40x50 map"),
    ((-1, 0, torch.randn(6, 4, 4)), r"row0 must be in \[0, 39\]"),
    ((0, 1.5, torch.randn(6, 4, 4)), "col0 must be an integer"),
    ((0, 0, [[1.0]]), "must be a tensor"),
])
def test_bad_blocks_are_refused_and_the_writer_goes_on(writer, args, message):
    with pytest.raises(MapStoreError, match=message):
        writer.write(*args)
    writer.write(0, 0, torch.randn(6, 40, 50))
    assert writer.close().is_dir()


def test_overlapping_blocks_are_refused(writer):
    writer.write(0, 0, torch.randn(6, 10, 10))
    for r, c in ((5, 5), (9, 0), (0, 9)):
        with pytest.raises(MapStoreError, match="overlaps"):
            writer.write(r, c, torch.randn(6, 3, 3))
    writer.write(10, 0, torch.randn(6, 6, 16))  # completes chunk (0, 0)...
    writer.write(0, 10, torch.randn(6, 10, 6))
    with pytest.raises(MapStoreError, match="overlaps"):
        writer.write(15, 15, torch.randn(6, 2, 2))  # ... which is then checked by its count


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_infinite_scores_abort_the_store(tmp_path, bad):
    w = MapWriter(tmp_path / "w.zarr", map_size=(4, 4), num_classes=3)
    block = torch.randn(3, 4, 4)
    block[1, 2, 2] = bad
    with pytest.raises(MapStoreError, match="NaN or infinite"):
        w.write(0, 0, block)
    assert os.listdir(tmp_path) == []


def test_minus_infinity_for_some_classes_is_fine(tmp_path):
    full = torch.randn(3, 4, 4)
    full[2] = -float("inf")
    store = open_map(write_map(tmp_path / "m.zarr", full, bh=2, bw=2))
    assert store.class_max().prob[2] == 0.0


def test_an_incomplete_map_is_not_kept(tmp_path):
    w = MapWriter(tmp_path / "m.zarr", map_size=(10, 10), num_classes=3)
    w.write(0, 0, torch.randn(3, 10, 9))
    with pytest.raises(MapStoreError, match="incomplete: 90 of 100 cells"):
        w.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(MapStoreError, match="already closed"):
        w.write(0, 9, torch.randn(3, 10, 1))


@pytest.mark.parametrize("options, error, message", [
    (dict(map_size=(0, 5)), MapStoreError, "map rows must be in"),
    (dict(map_size=(5,)), MapStoreError, "map_size must be"),
    (dict(num_classes=0), MapStoreError, "num_classes must be in"),
    (dict(classes=["a"]), MapStoreError, "classes must be 3 names"),
    (dict(keep=[3]), MapStoreError, r"a kept class must be in \[0, 2\]"),
    (dict(top_k=0), MapStoreError, "top_k must be in"),
    (dict(chunk=4), MapStoreError, "chunk must be in"),
    (dict(attrs={"x": object()}), MapStoreError, "JSON-able"),
    (dict(attrs={"x": float("nan")}), MapStoreError, "JSON-able"),
    (dict(attrs={"top_k": 3}), MapStoreError, "may not set top_k"),
])
def test_bad_options(tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        MapWriter(tmp_path / "m.zarr", **{"map_size": (4, 4), "num_classes": 3, **options})
    assert os.listdir(tmp_path) == []


def test_all_classes_of_a_huge_map_is_refused_unless_asked(tmp_path):
    options = dict(map_size=(3000, 3000), num_classes=1000, all_classes=True)
    with pytest.raises(LimitError, match=r"36\.4 GB before compression, more than the 17\.2 GB allowed"):
        MapWriter(tmp_path / "m.zarr", **options)
    # the default arrays of the same map are fine, and so are all classes under a raised limit
    MapWriter(tmp_path / "m.zarr", **{**options, "all_classes": False}).abort()
    MapWriter(tmp_path / "m.zarr", **options, max_bytes=40 * 1024**3).abort()
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Atomic stores


def test_existing_store_needs_force_and_only_a_store_is_replaced(tmp_path):
    path = write_map(tmp_path / "m.zarr", torch.randn(3, 5, 5))
    with pytest.raises(OutputExistsError, match="already exists; use --force"):
        MapWriter(path, map_size=(5, 5), num_classes=3)
    new = torch.randn(4, 6, 6)
    write_map(path, new, force=True, keep=[0])
    np.testing.assert_array_equal(open_map(path).logits(0), new[0].numpy())
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"x")
    with pytest.raises(OutputError, match="not a convify map store; refusing to replace it even with --force"):
        MapWriter(photos, map_size=(5, 5), num_classes=3, force=True)
    assert (photos / "cat.jpg").exists()
    a_file = tmp_path / "old.txt"
    a_file.write_text("old")
    write_map(a_file, new, force=True)  # a file is replaced like outputs.write_atomic replaces one
    assert open_map(a_file).map_size == (6, 6)
    assert leftovers(tmp_path) == []


def test_an_input_is_never_overwritten(tmp_path):
    image = tmp_path / "slide.tif"
    image.write_bytes(b"pixels")
    with pytest.raises(OutputError, match="is an input of this run"):
        MapWriter(image, map_size=(5, 5), num_classes=3, force=True, inputs=[image])
    assert image.read_bytes() == b"pixels"


def test_exception_inside_with_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="tiler failed"):
        with MapWriter(tmp_path / "m.zarr", map_size=(8, 8), num_classes=3) as w:
            w.write(0, 0, torch.randn(3, 4, 8))
            assert len(leftovers(tmp_path)) == 1  # the store is built beside its target...
            raise RuntimeError("tiler failed")
    assert os.listdir(tmp_path) == []  # ... and gone


def test_store_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_map(tmp_path / "m.zarr", torch.randn(3, 5, 5))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o750
    assert (path / "zarr.json").stat().st_mode & 0o777 == 0o640


_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from convify.mapstore import MapWriter
    with MapWriter(sys.argv[1], map_size=(8, 8), num_classes=3) as w:
        w.write(0, 0, torch.randn(3, 4, 8))
        print("ready", flush=True)
        time.sleep(60)
""")


@pytest.mark.skipif(os.name != "posix", reason="signals and pids")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_killed_writer_leaves_no_store_and_its_temp_is_cleaned(tmp_path, signum):
    target = tmp_path / "m.zarr"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(target)], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"ready"
    child.send_signal(signum)
    assert child.wait(timeout=30) == -signum  # died of the signal, as it would have
    assert not target.exists()
    if signum == signal.SIGTERM:
        assert leftovers(tmp_path) == []  # removed on the way out
    else:
        assert len(leftovers(tmp_path)) == 1  # nobody could clean up...
        write_map(target, torch.randn(3, 8, 8))  # ... so the next writer of the same path does
        assert leftovers(tmp_path) == []


def test_a_live_writers_temp_is_kept(tmp_path):
    a = MapWriter(tmp_path / "m.zarr", map_size=(4, 4), num_classes=3)
    b = MapWriter(tmp_path / "m.zarr", map_size=(4, 4), num_classes=3)  # same pid, started after import
    assert len(leftovers(tmp_path)) == 2
    a.abort()
    b.abort()


def test_a_dropped_writer_removes_its_temp(tmp_path):
    w = MapWriter(tmp_path / "m.zarr", map_size=(4, 4), num_classes=3)
    del w
    assert os.listdir(tmp_path) == []


def test_unwritable_directory_is_one_output_error(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="cannot write .*permission denied|Permission denied"):
        MapWriter(locked / "m.zarr", map_size=(4, 4), num_classes=3)


# --------------------------------------------------------------------------------------------------
# Memory: one block, whatever the map size

_MEASURE = textwrap.dedent("""
    import resource, sys, torch
    from convify.mapstore import MapWriter
    torch.set_num_threads(1)
    C, B = int(sys.argv[2]), 128
    block = torch.randn(C, B, B) * 4
    def run(n, path):
        with MapWriter(path, map_size=(n, n), num_classes=C, keep=[1, 2], top_k=5, force=True) as w:
            for r in range(0, n, B):
                for c in range(0, n, B):
                    w.write(r, c, block[:, : min(B, n - r), : min(B, n - c)])
    run(256, sys.argv[1] + "/warm.zarr")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(int(sys.argv[3]), sys.argv[1] + "/big.zarr")
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB")
def test_memory_does_not_grow_with_the_map(tmp_path):
    # 200 classes, 128x128 blocks: a 1536x1536 map (144 blocks, 36x the warm-up's 4) must not raise the peak
    # resident memory by more than a few MB over what a 256x256 map took.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), "200", "1536"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 24, f"peak RSS grew by {float(out.stdout):.0f} MB"


# --------------------------------------------------------------------------------------------------
# Strangers' stores


@pytest.fixture
def good(tmp_path) -> Path:
    return write_map(tmp_path / "good.zarr", torch.randn(4, 40, 40), keep=[1], chunk=16, bh=16, bw=16)


def edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def chunk_file(store: Path, array: str) -> Path:
    return next(Path(d) / f for d, _, fs in os.walk(store / array) for f in fs if f != "zarr.json")


@pytest.mark.parametrize("damage, message", [
    (lambda p: shutil.rmtree(p), "not a directory"),
    (lambda p: (p / "zarr.json").unlink(), "no zarr.json"),
    (lambda p: (p / "zarr.json").write_text("{nope"), "zarr.json is not JSON"),
    (lambda p: (p / "zarr.json").write_text("[1, 2]"), "not a JSON object"),
    (lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(format="other")), "not a convify map"),
    (lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(format_version=99)), "version 99"),
    (lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(top_k=9)), r"top_k must be in \[1, 4\]"),
    (lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(kept=[7])), "kept class must be in"),
    (lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(kept=[1, 1])), "kept lists a class twice"),
    (lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(classes=["a"])), "classes must be 4"),
    (lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(map_size=[40, "x"])), "map cols must be"),
    (lambda p: edit_json(p / "zarr.json", lambda m: m["attributes"].update(num_classes=10**9)), "num_classes"),
    (lambda p: edit_json(p / "top_k_probs" / "zarr.json", lambda m: m.update(shape=[40, 40, 9])), "has shape"),
    (lambda p: edit_json(p / "top_k_indices" / "zarr.json", lambda m: m.update(data_type="float64")),
     "has data type float64, expected int32"),
    (lambda p: edit_json(p / "logits_1" / "zarr.json",
                         lambda m: m["codecs"].append({"name": "numcodecs.pickle", "configuration": {}})),
     "uses codecs outside"),
    (lambda p: edit_json(p / "logits_1" / "zarr.json",
                         lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[2**20, 2**20])),
     "has chunks of"),
    (lambda p: shutil.rmtree(p / "log_sum_exp"), "no log_sum_exp/zarr.json"),
    (lambda p: (p / "extra").mkdir(), "unexpected entry 'extra'"),
    (lambda p: (lambda f: (f.unlink(), f.symlink_to("/dev/zero")))(chunk_file(p, "logits_1")),
     "is a link or special file"),
    (lambda p: chunk_file(p, "logits_1").write_bytes(b"\0" * 20000), "more than its chunk can encode to"),
    (lambda p: [(p / "logits_1" / "c" / f"x{i}").write_bytes(b"") for i in range(3000)], "more files than chunks"),
])
def test_damaged_stores_are_one_line_errors(good, damage, message):
    damage(good)
    with pytest.raises(MapStoreError, match=message) as info:
        open_map(good)
    assert "\n" not in str(info.value)


def test_a_store_declaring_a_huge_map_is_a_limit_error(good):
    def huge(meta):
        meta["attributes"].update(map_size=[10**6, 10**6])
    edit_json(good / "zarr.json", huge)
    with pytest.raises(LimitError, match="declares .* GB of maps"):
        open_map(good)


def test_damaged_chunk_bytes_fail_on_read_with_one_line(good):
    victim = chunk_file(good, "logits_1")
    victim.write_bytes(os.urandom(victim.stat().st_size))
    store = open_map(good)
    with pytest.raises(MapStoreError, match="cannot read logits_1 from .*damaged store") as info:
        store.logits(1)
    assert "\n" not in str(info.value)


def test_class_indices_out_of_range_are_refused_on_read(good):
    import zarr

    zarr.open_array(store=str(good / "top_k_indices"), mode="r+")[0, 0, 0] = 99
    with pytest.raises(MapStoreError, match=r"class indices outside \[0, 4\)"):
        open_map(good).top_k()


def test_the_format_name_is_in_the_group_attributes(good):
    assert json.loads((good / "zarr.json").read_text())["attributes"]["format"] == FORMAT
    assert limits.MAX_STORE_BYTES >= 2**30
