"""convify.collection: finding a run's images, mirroring output stems, the results table, hostile inputs."""
import csv
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from convify import collection as c
from convify.errors import ConvifyError, OutputExistsError

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NAMES = [name for name, _, _ in c.TABLE_COLUMNS]


def touch(*paths):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    return paths


def prediction(i=0, name="cat"):
    return {"index": i, "name": name, "probability": 0.5, "logit": -1.25, "cell": [1, 2],
            "box_in_image": [0.0, 1.0, 32.0, 33.5]}


def summary(**changes):
    s = {"image_size": [640, 480], "map_size": [7, 9], "top": [prediction(3, "cat"), prediction(1, "dog")],
         "classes": [prediction(5, "=cmd")]}
    s.update(changes)
    return s


# ---------------------------------------------------------------------------------------------- find_images

def test_walk_is_recursive_sorted_and_skips_hidden(tmp_path):
    d = tmp_path / "d"
    touch(d / "b.jpg", d / "c" / "z.jpg", d / "a.jpg", d / "B.png", d / "a2" / "y.webp", d / "notes.txt",
          d / ".h.jpg", d / ".git" / "x.jpg", d / "c" / ".cache" / "y.jpg")
    found = c.find_images([d])
    assert found.images == [d / "B.png", d / "a.jpg", d / "b.jpg", d / "a2" / "y.webp", d / "c" / "z.jpg"]
    assert found.roots == [d] and found.searched == [d]


def test_extension_filter_is_case_insensitive(tmp_path):
    touch(tmp_path / "A.JPG", tmp_path / "b.png", tmp_path / "c.Png", tmp_path / "d.gif")
    assert c.find_images([tmp_path]).images == [tmp_path / "A.JPG", tmp_path / "b.png", tmp_path / "c.Png",
                                                tmp_path / "d.gif"]
    for ext in (["png"], [".PNG"], [" png "]):
        found = c.find_images([tmp_path], extensions=ext)
        assert found.images == [tmp_path / "b.png", tmp_path / "c.Png"] and found.extensions == {".png"}
    assert c.find_images([tmp_path], extensions=["JPG", "gif"]).images == [tmp_path / "A.JPG", tmp_path / "d.gif"]


@pytest.mark.parametrize("bad", [[], [""], ["."], ["j/g"], ["*"], ["x" * 20], ["png", "a b"]])
def test_bad_extension_lists_refused(tmp_path, bad):
    with pytest.raises(ConvifyError, match="extensions"):
        c.find_images([tmp_path], extensions=bad)


def test_symlinked_directories_not_followed(tmp_path):
    d, other = tmp_path / "d", tmp_path / "other"
    touch(d / "x.jpg", d / "s" / "y.jpg", other / "o.jpg")
    os.symlink(".", d / "loop")
    os.symlink("..", d / "s" / "up")
    os.symlink(other, d / "ext")
    os.symlink(d / "x.jpg", d / "s" / "link.jpg")  # a link to a file is a file
    assert c.find_images([d]).images == [d / "x.jpg", d / "s" / "link.jpg", d / "s" / "y.jpg"]


def test_output_directory_inside_the_tree_is_skipped(tmp_path):
    d = tmp_path / "d"
    touch(d / "x.jpg", d / "out" / "x.png", d / "out" / "deep" / "y.png", d / "s" / "out" / "z.png")
    expected = [d / "x.jpg", d / "s" / "out" / "z.png"]
    assert c.find_images([d], exclude=d / "out").images == expected
    os.symlink(d / "out", tmp_path / "alias")  # the same directory by another name: still skipped
    assert c.find_images([d], exclude=tmp_path / "alias").images == expected
    assert c.find_images([f"{d}/**/*.png"], exclude=d / "out").images == [d / "s" / "out" / "z.png"]
    # the output directory itself named as the walked root: walked (only strictly-below is skipped)
    assert c.find_images([d / "out"], exclude=d / "out").images == [d / "out" / "x.png", d / "out" / "deep" / "y.png"]


def test_file_arguments_kept_even_missing_or_unlisted(tmp_path):
    touch(tmp_path / "notes.txt")
    args = [tmp_path / "missing.jpg", tmp_path / "notes.txt", tmp_path / "gone" / "x.png"]
    assert c.find_images(args).images == args


def test_glob_recursive_and_static_prefix(tmp_path):
    p = tmp_path / "p" / "2024"
    touch(p / "y.jpg", p / "a" / "b" / "x.jpg", p / "a" / "w.png", p / ".hid" / "h.jpg", tmp_path / "p" / "top.jpg")
    found = c.find_images([f"{p}/**/*.jpg"])
    assert found.images == [p / "a" / "b" / "x.jpg", p / "y.jpg"]
    assert found.roots == [p] and found.searched == [p]
    assert c.find_images([f"{p}/*/*"]).images == [p / "a" / "w.png"]  # directories are not images


def test_glob_matching_nothing_is_kept_as_a_path(tmp_path):
    pattern = f"{tmp_path}/nowhere/**/*.jpg"
    found = c.find_images([pattern])
    assert found.images == [Path(pattern)] and found.roots == [tmp_path / "nowhere"]
    touch(tmp_path / "x.txt")
    assert c.find_images([f"{tmp_path}/*.txt"]).images == [Path(f"{tmp_path}/*.txt")]  # filtered out: nothing


# Regression (found by an adversarial pass): glob.glob(recursive=True) follows symlinked directories: a loop
# under a `**` glob yields each file ~40 times (and two loops hang)
def test_glob_does_not_follow_symlink_loops(tmp_path):
    d = tmp_path / "d"
    touch(d / "x.jpg", d / "s" / "y.jpg")
    os.symlink(".", d / "loop")
    assert c.find_images([f"{d}/**/*.jpg"]).images == [d / "s" / "y.jpg", d / "x.jpg"]


def test_duplicates_appear_once_in_first_order(tmp_path):
    a = tmp_path / "a"
    touch(a / "x.jpg", a / "y.jpg")
    manifest = tmp_path / "list.txt"
    manifest.write_text("a/y.jpg\na/x.jpg\n")
    found = c.find_images([a / "y.jpg", f"{a}/../a/y.jpg", a, f"{a}/*.jpg"], manifests=[manifest])
    assert found.images == [a / "y.jpg", a / "x.jpg"]


def test_too_many_images_refused(tmp_path, monkeypatch):
    touch(*(tmp_path / f"{i}.jpg" for i in range(4)))
    monkeypatch.setattr(c, "MAX_IMAGES", 3)
    with pytest.raises(ConvifyError, match="holds more than 3 images"):  # the walk stops, not only the count
        c.find_images([tmp_path])
    with pytest.raises(ConvifyError, match="more than 3 images"):
        c.find_images([tmp_path / f"{i}.jpg" for i in range(4)])


# ---------------------------------------------------------------------------------------------- manifests

def test_manifest_paths_from_its_directory(tmp_path):
    m = tmp_path / "m" / "list.txt"
    m.parent.mkdir()
    m.write_bytes(b"\xef\xbb\xbfx.jpg\r\n\n   \n# a comment\n  #indented comment\n sub/y.png \n../z.jpg\n"
                  + str(tmp_path / "abs.jpg").encode() + b"\n")
    paths = c.read_manifest(m)
    assert paths[:2] == [m.parent / "x.jpg", m.parent / "sub" / "y.png"]
    assert os.path.abspath(paths[2]) == str(tmp_path / "z.jpg") and paths[3] == tmp_path / "abs.jpg"
    assert len(paths) == 4


def test_manifest_not_utf8_names_the_byte(tmp_path):
    m = tmp_path / "list.txt"
    m.write_bytes(b"a.jpg\n\xff.jpg\n")
    with pytest.raises(ConvifyError, match=r"not UTF-8 text \(byte 6\)"):
        c.read_manifest(m)


def test_manifest_nul_names_the_line(tmp_path):
    m = tmp_path / "list.txt"
    m.write_bytes(b"a.jpg\n# c\nb\x00.jpg\n")
    with pytest.raises(ConvifyError, match="line 3"):
        c.read_manifest(m)
    m.write_bytes(b"a" * (c.MAX_PATH_CHARS + 1))
    with pytest.raises(ConvifyError, match="line 1"):
        c.read_manifest(m)


def test_manifest_bounds(tmp_path, monkeypatch):
    m = tmp_path / "list.txt"
    m.write_bytes(b"a.jpg\nb.jpg\nc.jpg\n")  # 18 bytes
    monkeypatch.setattr(c, "MAX_MANIFEST_BYTES", 18)
    assert len(c.read_manifest(m)) == 3
    monkeypatch.setattr(c, "MAX_MANIFEST_BYTES", 17)
    with pytest.raises(ConvifyError, match="larger than"):
        c.read_manifest(m)
    monkeypatch.setattr(c, "MAX_MANIFEST_BYTES", 2 ** 20)
    monkeypatch.setattr(c, "MAX_IMAGES", 2)
    with pytest.raises(ConvifyError, match="more than 2 images"):
        c.read_manifest(m)


@pytest.mark.parametrize("name", ["missing.txt", "."])
def test_unreadable_manifest(tmp_path, name):
    with pytest.raises(ConvifyError, match="cannot read manifest"):
        c.read_manifest(tmp_path / name)
    with pytest.raises(ConvifyError):
        c.find_images([], manifests=[tmp_path / name])


PIECES = [b"a.jpg", b"#c", b"\x00", b"\xef\xbb\xbf", b"\n", b"\r\n", b"\r", b"\xff", b" ", b"/abs.png", b"..",
          b"\xe2\x80\xa8", b"\x0c", b"\xc3", b"\xf0\x9f\x98\x80", b"x" * 40]


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.lists(st.sampled_from(PIECES), max_size=30).map(b"".join)))
def test_manifest_fuzz(tmp_path, monkeypatch, data):
    monkeypatch.setattr(c, "MAX_MANIFEST_BYTES", 400)
    monkeypatch.setattr(c, "MAX_PATH_CHARS", 100)
    monkeypatch.setattr(c, "MAX_IMAGES", 8)
    m = tmp_path / "list.txt"
    m.write_bytes(data)
    try:
        paths = c.read_manifest(m)
    except ConvifyError as e:
        assert "\n" not in str(e)
        return
    assert len(paths) <= 8
    for p in paths:
        assert isinstance(p, Path) and "\x00" not in str(p) and len(str(p)) <= len(str(tmp_path)) + 102
        assert p.is_absolute() or str(p).startswith(str(tmp_path))


# ---------------------------------------------------------------------------------------------- output stems

def test_output_stems_mirror_the_tree(tmp_path):
    assert c.output_stems([tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"]) == [Path("a/x"), Path("b/x")]
    assert c.output_stems([tmp_path / "p" / "photo.jpg"]) == [Path("photo")]
    assert c.output_stems([Path("photo.jpg")]) == [Path("photo")]
    assert c.output_stems([]) == []
    d = tmp_path / "d"
    touch(d / "x.jpg", d / "s" / "x.jpg", d / "s" / "t" / "y.tif")
    found = c.find_images([d])
    assert c.output_stems(found.images, found.roots) == [Path("x"), Path("s/x"), Path("s/t/y")]
    assert c.output_stems([d / "s" / "x.jpg"], [d]) == [Path("s/x")]


SEGMENT = st.text(alphabet="aB.-_ ~", min_size=1, max_size=5).filter(lambda s: s not in (".", ".."))


@FUZZ
@given(paths=st.lists(st.lists(SEGMENT, min_size=1, max_size=4), min_size=1, max_size=6),
       absolute=st.booleans(), root_depth=st.integers(0, 2))
def test_output_stems_never_escape(tmp_path, paths, absolute, root_depth):
    base = tmp_path if absolute else Path("rel")
    images = [base.joinpath(*parts[:-1], parts[-1] + ".jpg") for parts in paths]
    roots = [base.joinpath(*paths[0][:min(root_depth, len(paths[0]) - 1)])]
    stems = c.output_stems(images, roots)
    for image, stem in zip(images, stems):
        assert not stem.is_absolute() and ".." not in stem.parts and stem.name == image.stem
        if stem.parent != Path("."):
            assert os.path.abspath(image.parent).endswith(os.sep + str(stem.parent))
    keys = {(os.path.abspath(i.parent), i.stem) for i in images}
    assert len(set(stems)) == len(keys)  # distinct images' outputs never share a stem


# Regression (found by an adversarial pass): output_stems(['m/sub/..']) gives Path('..'): a '..' part, against
# its docstring; a manifest line 'sub/..' or an argument 'missing/..' reaches it
def test_output_stem_of_a_dotdot_path(tmp_path):
    stems = c.output_stems([tmp_path / "m" / "a.jpg", tmp_path / "m" / "sub" / ".."])
    assert all(".." not in s.parts for s in stems)


def test_colliding_stems(tmp_path):
    images = [tmp_path / "x.jpg", tmp_path / "X.png", tmp_path / "a" / "x.jpg", tmp_path / "y.jpg",
              tmp_path / "A" / "X.tif", tmp_path / "x.JPG"]
    assert c.colliding(c.output_stems(images)) == {1: 0, 4: 2, 5: 0}
    assert c.colliding([Path("a/x"), Path("a/y"), Path("b/x")]) == {}


def test_output_state(tmp_path):
    a, b = touch(tmp_path / "a.png", tmp_path / "b.json")
    assert c.output_state([a, b]) == "complete"
    assert c.output_state([a, tmp_path / "c.npy"]) == "partial"
    assert c.output_state([tmp_path / "c.npy"]) == "missing"


# Regression (found by an adversarial pass): output_state raises a raw OSError (ENAMETOOLONG) when an output
# name is over 255 bytes; runner.sort_out calls it unguarded, so the run crashes
def test_output_state_with_an_over_long_name(tmp_path):
    assert c.output_state([tmp_path / ("x" * 251 + ".json")]) == "missing"


# ---------------------------------------------------------------------------------------------- would_find

def test_would_find_agrees_with_a_walk(tmp_path):
    d = tmp_path / "d"
    found = c.find_images([d.mkdir() or d], exclude=d / "out")
    candidates = [d / "new.png", d / "s" / "new.PNG", d / "out" / "x.png", d / "out" / "s" / "x.jpg",
                  d / "x.json", d / "s" / "x.zarr", tmp_path / "elsewhere.png"]
    assert [found.would_find(p) for p in candidates] == [True, True, False, False, False, False, False]
    touch(*candidates)
    again = c.find_images([d], exclude=d / "out").images
    assert [p in again for p in candidates] == [found.would_find(p) for p in candidates]
    assert c.find_images([d], exclude=d).would_find(d / "x.png")  # the searched directory itself: walked
    assert not c.find_images([d], extensions=["jpg"]).would_find(d / "x.png")


# ---------------------------------------------------------------------------------------------- the table

def rows(tmp_path):
    return [c.summary_row(tmp_path / "a.jpg", Path("a"), "done", summary(), 3),
            c.failure_row("b.jpg", Path("b"), "cannot read it"),
            c.skipped_row("c.jpg", Path("c"), None, 3),
            c.summary_row("d.jpg", "d", "done", summary(image_size=[-5, 3], classes=[]), 1)]


def test_parquet_round_trip(tmp_path):
    r = rows(tmp_path)
    path = c.write_table(r, tmp_path / "t.parquet")
    table = pq.read_table(path)
    assert table.schema.names == NAMES
    assert table.schema.field("top_cell").type == pa.list_(pa.list_(pa.int64()))
    assert b"convify.results" in table.schema.metadata
    assert table.to_pylist() == [{**row, "path": os.fspath(row["path"])} for row in r]
    assert r[0]["top_class"] == ["cat", "dog"] and r[0]["asked_class"] == ["=cmd"] and r[3]["top_index"] == [3]


def test_csv_round_trip_and_formula_injection(tmp_path):
    r = rows(tmp_path) + [c.failure_row("=HYPERLINK(1)", "+x", "@SUM(A1)"), c.failure_row("-2", "\tt", "-r")]
    c.write_table(r, tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == NAMES and len(back) == len(r)
    assert back[0]["top_box"] == json.dumps(r[0]["top_box"]) and json.loads(back[0]["top_cell"]) == [[1, 2]] * 2
    assert back[0]["image_width"] == "640" and back[0]["error"] == "" and back[0]["asked_class"] == '["=cmd"]'
    assert back[3]["image_width"] == "-5" and back[3]["asked_index"] == ""  # numbers are not escaped
    assert (back[4]["path"], back[4]["outputs"], back[4]["error"]) == ("'=HYPERLINK(1)", "'+x", "'@SUM(A1)")
    assert (back[5]["path"], back[5]["outputs"], back[5]["error"]) == ("'-2", "'\tt", "'-r")
    assert back[1]["path"] == "b.jpg" and back[1]["status"] == "failed"


# Regression (found by an adversarial pass): csv.writer with lineterminator='\\n' quotes only '\\n': a CR in a
# cell is written bare, so readers split the row there and the rest starts a new, unescaped row (a file named
# 'x\\r=1+1.jpg' smuggles a formula)
def test_csv_cell_with_a_carriage_return(tmp_path):
    c.write_table([c.failure_row("x\r=1+1.jpg", None, "\rr")], tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert len(back) == 1 and back[0]["path"] == "x\r=1+1.jpg" and back[0]["error"] == "'\rr"


@pytest.mark.parametrize("name", ["t.csv", "t.parquet"])
def test_table_refuses_a_foreign_file(tmp_path, name):
    path = tmp_path / name
    foreign = [b"hello,world\n", b"PAR1 not really"]
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    foreign.append((tmp_path / "other.parquet").read_bytes())
    for content in foreign:
        path.write_bytes(content)
        with pytest.raises(OutputExistsError):
            c.write_table(rows(tmp_path), path)
        assert path.read_bytes() == content
    c.write_table(rows(tmp_path), path, force=True)
    assert path.read_bytes() != content


@pytest.mark.parametrize("name", ["t.csv", "t.parquet", "T.CSV"])
def test_table_replaces_its_own(tmp_path, name):
    path = tmp_path / name
    c.write_table(rows(tmp_path), path)
    c.write_table([c.failure_row("z.jpg", None, "x")], path)
    if name.endswith("parquet"):
        assert pq.read_table(path).column("path").to_pylist() == ["z.jpg"]
    else:
        assert path.read_text().splitlines()[1].startswith("z.jpg,failed,x,")


@pytest.mark.parametrize("name", ["t.xlsx", "t", "t.csv.gz", "t.json"])
def test_table_extension(tmp_path, name):
    with pytest.raises(ConvifyError, match=r"\.parquet or \.csv"):
        c.write_table(rows(tmp_path), tmp_path / name)
    assert not (tmp_path / name).exists()


# Regression (found by an adversarial pass): write_table raises UnicodeEncodeError for a str with a lone
# surrogate: a non-UTF-8 file name found by a walk, or a '\\udcff' class name in a JSON
@pytest.mark.parametrize("name", ["t.csv", "t.parquet"])
def test_table_with_undecodable_names(tmp_path, name):
    d = os.fsencode(tmp_path / "d")
    os.mkdir(d)
    open(os.path.join(d, b"\xff.jpg"), "wb").close()
    image = c.find_images([tmp_path / "d"]).images[0]
    (tmp_path / "s.json").write_text('{"image_size": [1, 1], "map_size": [1, 1], "top": [{"index": 0, "name": '
                                     '"\\udcff", "probability": 1, "logit": 1, "cell": [0, 0], "box_in_image": [0]}]}')
    r = [c.failure_row(image, None, "m"), c.skipped_row("x.jpg", None, tmp_path / "s.json", 3)]
    try:
        c.write_table(r, tmp_path / name)
    except ConvifyError:
        pass


# ---------------------------------------------------------------------------------------------- rows from JSON

def test_skipped_row_from_a_good_summary(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(summary()))
    row = c.skipped_row("a.jpg", Path("a"), tmp_path / "s.json", 1)
    assert row["status"] == "skipped" and row["error"] is None and row["image_width"] == 640
    assert row["top_index"] == [3] and row["asked_class"] == ["=cmd"]
    assert c.skipped_row("a.jpg", Path("a"), tmp_path / "none.json", 1)["error"] is None


TAMPERED = {
    "not json": b"not json",
    "empty": b"",
    "binary": b"\xff\xfe\xff\x00",
    "list": b"[1, 2]",
    "strings for sizes": json.dumps(summary(image_size=["640", "480"])).encode(),
    "bools for ints": json.dumps(summary(map_size=[True, 9])).encode(),
    "bool index": json.dumps(summary(top=[{**prediction(), "index": False}])).encode(),
    "huge int": json.dumps(summary(image_size=[2 ** 63, 1])).encode(),
    "string probability": json.dumps(summary(top=[{**prediction(), "probability": "1"}])).encode(),
    "three sizes": json.dumps(summary(image_size=[1, 2, 3])).encode(),
    "top a dict": json.dumps(summary(top={"a": 1})).encode(),
    "cell a string": json.dumps(summary(top=[{**prediction(), "cell": "12"}])).encode(),
    "missing top": json.dumps({"image_size": [1, 1], "map_size": [1, 1]}).encode(),
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep dict": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
}


@pytest.mark.parametrize("content", TAMPERED.values(), ids=TAMPERED.keys())
def test_skipped_row_from_a_tampered_summary(tmp_path, content):
    (tmp_path / "s.json").write_bytes(content)
    row = c.skipped_row("a.jpg", Path("a"), tmp_path / "s.json", 3)
    assert row["status"] == "skipped" and row["path"] == "a.jpg" and row["outputs"] == "a"
    assert isinstance(row["error"], str) and "s.json" in row["error"] and "\n" not in row["error"]
    assert row["image_width"] is None and row["top_index"] is None


def test_skipped_row_reads_a_summary_within_its_bound(tmp_path, monkeypatch):
    good = json.dumps(summary()).encode()
    (tmp_path / "s.json").write_bytes(good + b" " * (20 * 2 ** 20))  # valid JSON, 20 MB
    monkeypatch.setattr(c, "MAX_SUMMARY_BYTES", len(good) + 100)
    row = c.skipped_row("a.jpg", None, tmp_path / "s.json", 3)
    assert row["status"] == "skipped" and "larger than" in row["error"] and row["image_width"] is None


# Regression (found by an adversarial pass): an integer too large for a float (e.g. 10**400) in a float field
# raises OverflowError out of summary_row and skipped_row (not caught)
def test_skipped_row_with_an_overflowing_float(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(summary(top=[{**prediction(), "probability": 10 ** 400}])))
    row = c.skipped_row("a.jpg", None, tmp_path / "s.json", 3)
    assert row["status"] == "skipped" and row["error"]


def test_summary_row_lists_are_bounded():
    many = [prediction()] * 10 ** 6
    row = c.summary_row("a.jpg", None, "done", summary(top=many, classes=many), 10 ** 6)
    assert len(row["top_index"]) == len(row["top_box"]) == c.MAX_TABLE_CLASSES
    assert len(row["asked_logit"]) == len(row["asked_cell"]) == c.MAX_TABLE_CLASSES
    assert len(c.summary_row("a.jpg", None, "done", summary(top=many), 2)["top_class"]) == 2
    long = c.summary_row("a.jpg", None, "done", summary(top=[{**prediction(), "name": "n" * 5000,
                                                              "cell": [1, 2, 3], "box_in_image": [0] * 9}]), 3)
    assert len(long["top_class"][0]) == 1000 and long["top_cell"] == [[1, 2]] and long["top_box"] == [[0.0] * 4]


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
                    max_leaves=12)
PAIR = st.lists(st.integers(-2 ** 63, 2 ** 63), min_size=2, max_size=2)
PREDICTION = st.fixed_dictionaries({key: JSON | valid for key, valid in [
    ("index", st.integers(0, 9)), ("name", st.text(max_size=5)), ("probability", st.floats()),
    ("logit", st.floats()), ("cell", PAIR), ("box_in_image", st.lists(st.floats(), max_size=5))]})
SUMMARY = st.fixed_dictionaries({"image_size": PAIR | JSON, "map_size": PAIR | JSON,
                                 "top": st.lists(PREDICTION | JSON, max_size=3) | JSON},
                                optional={"classes": st.lists(PREDICTION, max_size=2) | JSON})


@FUZZ
@given(value=SUMMARY | JSON, k=st.integers(-2, 4))
def test_summary_row_fuzz(value, k):
    try:
        row = c.summary_row("a.jpg", "a", "done", value, k)
    except ConvifyError as e:
        assert "\n" not in str(e)
        return
    assert list(row) == NAMES and row["status"] == "done"
    pa.Table.from_pylist([row], schema=c._arrow_schema())  # every row a summary gives fits the table
