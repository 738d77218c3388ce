"""Runs over collections (convify.runner through `convify heatmap`): folders, mirrored outputs, resuming, the table."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from convify.cli import cli
from test_cli import tiny_network


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_network().save(tmp_path_factory.mktemp("tiny") / "tiny.fcn.pt")


def photo(path: Path, size=(64, 48), seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path)
    return path


def tree(root: Path) -> list[Path]:
    images = [photo(root / "a" / "x.png", seed=1), photo(root / "b" / "x.png", seed=2),
              photo(root / "b" / "deeper" / "y.jpg", (70, 50), seed=3), photo(root / "top.png", seed=4)]
    photo(root / ".hidden" / "h.png")  # hidden: never read
    photo(root / ".dot.png")
    (root / "notes.txt").write_text("not an image")
    return images


def run(*args: str):
    return CliRunner().invoke(cli, ["heatmap", *map(str, args)])


def files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_folder_run_mirrors_the_tree_and_writes_the_table(tiny, tmp_path):
    tree(tmp_path / "in")
    result = run(tmp_path / "in", "--model", tiny, "-o", tmp_path / "out", "--table", tmp_path / "t.parquet",
                 "--table", tmp_path / "t.csv", "--top-k", "2")
    assert result.exit_code == 0, result.output
    assert sorted(files(tmp_path / "out")) == [
        "a/x.heatmap.png", "a/x.json", "b/deeper/y.heatmap.png", "b/deeper/y.json", "b/x.heatmap.png", "b/x.json",
        "top.heatmap.png", "top.json"]
    table = pq.read_table(tmp_path / "t.parquet").to_pylist()
    # in the order found: a directory's files (sorted), then its subdirectories' (sorted)
    assert [row["path"] for row in table] == [str(tmp_path / "in" / p) for p in ("top.png", "a/x.png", "b/x.png",
                                                                               "b/deeper/y.jpg")]
    assert [row["outputs"] for row in table] == ["top", "a/x", "b/x", "b/deeper/y"]
    assert {row["status"] for row in table} == {"done"}
    import json

    for row in table:  # each row says what the image's own JSON says
        summary = json.loads((tmp_path / "out" / f"{row['outputs']}.json").read_text())
        assert [row["image_width"], row["image_height"]] == summary["image_size"]
        assert [row["map_rows"], row["map_cols"]] == summary["map_size"]
        assert row["top_class"] == [p["name"] for p in summary["top"][:2]]
        assert row["top_probability"] == [p["probability"] for p in summary["top"][:2]]
        assert row["top_cell"] == [p["cell"] for p in summary["top"][:2]]
        assert row["top_box"] == [p["box_in_image"] for p in summary["top"][:2]]
    csv_lines = (tmp_path / "t.csv").read_text().splitlines()
    assert csv_lines[0].startswith("path,status,error,outputs,") and len(csv_lines) == 5
    assert "Wrote " + str(tmp_path / "t.parquet") + " (4 rows: 4 done, 0 skipped, 0 failed)" in result.output


def test_a_resumed_run_does_only_what_is_left_and_its_table_is_whole(tiny, tmp_path):
    images = tree(tmp_path / "in")
    out = tmp_path / "out"
    assert run(tmp_path / "in", "--model", tiny, "-o", out).exit_code == 0
    first = pq.read_table(out / "results.parquet").to_pylist()
    before = files(out)
    for name in ("b/x.heatmap.png", "b/x.json"):  # as if the run had stopped before b/x.png
        (out / name).unlink()
    photo(tmp_path / "in" / "a" / "new.png", seed=9)
    time.sleep(0.01)
    again = run(tmp_path / "in", "--model", tiny, "-o", out)
    assert again.exit_code == 0, again.output
    skipped = [line for line in again.output.splitlines() if line.endswith("skipped, its outputs exist (--force redoes it)")]
    assert len(skipped) == 3
    after = files(out)
    redone = {name for name in after if before.get(name) != after[name]}
    assert redone == {"a/new.heatmap.png", "a/new.json", "b/x.heatmap.png", "b/x.json", "results.parquet"}
    table = {row["path"]: row for row in pq.read_table(out / "results.parquet").to_pylist()}
    assert len(table) == 5 and table[str(images[1])]["status"] == "done"
    for row in first:  # the skipped images' rows, read from their JSON, say what the first run said
        if row["path"] != str(images[1]):
            assert table[row["path"]]["status"] == "skipped"
            assert {k: v for k, v in table[row["path"]].items() if k != "status"} == \
                   {k: v for k, v in row.items() if k != "status"}
    forced = run(tmp_path / "in", "--model", tiny, "-o", out, "--force")
    assert forced.exit_code == 0 and "(5 rows: 5 done, 0 skipped, 0 failed)" in forced.output


def test_a_killed_run_started_again_does_only_what_is_left(tiny, tmp_path):
    """kill -9 in the middle: no image is left with part of its files, and the next run does the rest."""
    for i in range(16):
        photo(tmp_path / "in" / f"p{i:02d}.png", (400, 300), seed=i)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "convify", "heatmap", str(tmp_path / "in"), "--model", str(tiny), "-o",
               str(out), "--size", "450", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while len(list(out.glob("*.json"))) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = {p.stem for p in out.glob("*.json")}
    assert 3 <= len(done) < 16, "the run was not killed in the middle"
    drawn = {p.name.removesuffix(".heatmap.png") for p in out.glob("*.heatmap.png")}
    partial = drawn ^ done  # killed between one image's renames: microseconds, said and left alone below
    assert len(partial) <= 1
    before = files(out)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    refused = [line for line in again.stderr.splitlines() if "use --force to redo it" in line]
    assert len(refused) == len(partial) and again.returncode == (1 if partial else 0), again.stderr
    skipped = [line for line in again.stdout.splitlines() if line.endswith("skipped, its outputs exist (--force redoes it)")]
    assert len(skipped) == len(done - partial)
    after = files(out)
    assert all(after[name] == stamp for name, stamp in before.items() if name.split(".")[0] in done - partial)
    assert {p.stem for p in out.glob("*.json")} | partial == {f"p{i:02d}" for i in range(16)}


def test_outputs_never_land_where_the_run_looks_for_images(tiny, tmp_path):
    tree(tmp_path / "in")
    refused = run(tmp_path / "in", "--model", tiny, "-o", tmp_path / "in")
    assert refused.exit_code == 1 and "is searched for images by this run" in refused.output
    assert not list((tmp_path / "in").rglob("*.json"))
    inside = tmp_path / "in" / "maps"  # a subdirectory: not searched
    assert run(tmp_path / "in", "--model", tiny, "-o", inside).exit_code == 0
    again = run(tmp_path / "in", "--model", tiny, "-o", inside)
    assert again.exit_code == 0 and "(4 rows: 0 done, 4 skipped, 0 failed)" in again.output  # overlays are not images
    json_only = run(tmp_path / "in", "--model", tiny, "-o", tmp_path / "in", "--format", "json")
    assert json_only.exit_code == 0, json_only.output  # a .json is never taken for an image


def test_two_images_with_one_stem_the_second_fails_the_rest_are_done(tiny, tmp_path):
    photo(tmp_path / "in" / "x.png")
    photo(tmp_path / "in" / "x.jpg")
    photo(tmp_path / "in" / "y.png")
    result = run(tmp_path / "in", "--model", tiny, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert f"Error: {tmp_path / 'in' / 'x.png'}: its outputs (x.*) would overwrite those of " \
           f"{tmp_path / 'in' / 'x.jpg'}; rename one, or run them separately" in result.output
    assert sorted(files(tmp_path / "out")) == ["results.parquet", "x.heatmap.png", "x.json", "y.heatmap.png", "y.json"]
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert [(Path(r["path"]).name, r["status"]) for r in rows] == [("x.jpg", "done"), ("x.png", "failed"),
                                                                  ("y.png", "done")]


def test_globs_manifests_and_extensions(tiny, tmp_path):
    images = tree(tmp_path / "in")
    result = run(str(tmp_path / "in" / "**" / "*.png"), "--model", tiny, "-o", tmp_path / "g", "--table", "none")
    assert result.exit_code == 0, result.output
    assert sorted(files(tmp_path / "g")) == ["a/x.heatmap.png", "a/x.json", "b/x.heatmap.png", "b/x.json",
                                             "top.heatmap.png", "top.json"]
    manifest = tmp_path / "in" / "list.txt"
    manifest.write_text("# two of them\nb/deeper/y.jpg\n\ntop.png\n")
    result = run("--manifest", manifest, "--model", tiny, "-o", tmp_path / "m", "--format", "json")
    assert result.exit_code == 0, result.output
    assert sorted(files(tmp_path / "m")) == ["b/deeper/y.json", "results.parquet", "top.json"]
    result = run(tmp_path / "in", "--ext", "jpg", "--model", tiny, "-o", tmp_path / "e", "--format", "json")
    assert sorted(files(tmp_path / "e")) == ["b/deeper/y.json"]  # mirrored below the directory given
    assert images[2].name == "y.jpg"
    assert run(tmp_path / "in", "--model", tiny, "--table", "t.txt").exit_code == 2
    assert run("--model", tiny).exit_code == 2  # nothing to run
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok.png\n\xff\xfe\n")
    result = run("--manifest", bad, "--model", tiny, "-o", tmp_path / "x")
    assert result.exit_code == 1 and result.output.strip() == f"Error: manifest {bad} is not UTF-8 text (byte 7); " \
                                                              "write one path a line"


def test_the_table_is_never_written_over_an_input_and_an_empty_folder_is_one_line(tiny, tmp_path):
    photo(tmp_path / "in" / "x.png")
    manifest = tmp_path / "list.csv"  # a manifest that happens to end in .csv
    manifest.write_text("in/x.png\n")
    before = manifest.read_bytes()
    result = run("--manifest", manifest, "--model", tiny, "-o", tmp_path / "out", "--table", manifest, "--force")
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {manifest} is an input of this run ({manifest}); refusing to overwrite "
                                     "it even with --force: choose another output")
    assert manifest.read_bytes() == before and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    result = run(tmp_path / "empty", "--model", tiny)
    assert result.exit_code == 1 and result.output.strip() == f"Error: no images found in {tmp_path / 'empty'} (see --ext)"


def test_a_failure_message_keeps_a_name_with_a_newline_whole_and_escaped(tiny, tmp_path):
    """A stranger's file name with a newline in it: the reason is not cut at the newline, and nothing is forged."""
    missing = tmp_path / "gone\nError: forged.png"
    photo(tmp_path / "real.png")
    result = run(missing, tmp_path / "real.png", "--model", tiny, "-o", tmp_path / "out", "--table",
                 tmp_path / "t.parquet")
    shown = str(missing).replace("\n", "\\n")
    assert f"Error: {shown}: no such image: {shown}" in result.output.splitlines()
    assert not any(line.startswith("Error: forged") for line in result.output.splitlines())
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert rows[0]["error"] == f"no such image: {missing}"  # the data keeps the name as it is
