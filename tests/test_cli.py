"""The convify command, through click's CliRunner: exit codes, the lines it prints, the files it writes."""
import click
import pytest
import torch
import torchvision
from click.testing import CliRunner

import convify
from convify.cli import cli
import errno
import io
import os
import shutil
from pathlib import Path
import numpy as np
from PIL import Image
from torch import nn
import convify.outputs
from convify import limits
from convify.fcn import FullyConvNet, Rewrite
from hostile import png_declaring


@pytest.fixture
def runner():
    return CliRunner()


def _invoke(runner, *args):
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_every_command_has_help_with_an_example(runner):
    for name, command in cli.commands.items():
        result = _invoke(runner, name, "--help")
        assert result.exit_code == 0, name
        assert "Example:" in result.output, f"{name} --help has no Example"


def test_convert_a_state_dict_with_arch(runner, tmp_path):
    model = torchvision.models.resnet18(num_classes=5).eval()
    source = tmp_path / "weights.pt"
    torch.save(model.state_dict(), source)
    result = _invoke(runner, "convert", source, "--arch", "resnet18")
    assert result.exit_code == 0, result.output
    assert "avgpool  AdaptiveAvgPool2d((1, 1))  ->  AvgPool2d(7x7, stride 1)" in result.output
    assert "fc       Linear(512 -> 5)  ->  Conv2d(512 -> 5, 1x1)" in result.output
    assert "Geometry: stride 32 px, window 224 px, offset 0, receptive field 627 px" in result.output
    assert "Check: equals the original at 224 px: max |difference|" in result.output
    out = tmp_path / "weights.fcn.pt"  # the default: beside MODEL
    assert f"Wrote {out}" in result.output
    fcn = convify.load(out)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x)[..., 0, 0], model(x))
    assert fcn.meta.arch == "torchvision:resnet18"


def test_convert_a_whole_pickled_torchvision_model(runner, tmp_path):
    model = torchvision.models.squeezenet1_1(num_classes=4).eval()
    source = tmp_path / "squeeze.pth"
    torch.save(model, source)
    out = tmp_path / "out" / "sq.fcn.pt"
    result = _invoke(runner, "convert", source, "-o", out)
    assert result.exit_code == 0, result.output
    assert "classifier.3  AdaptiveAvgPool2d((1, 1))  ->  AvgPool2d(13x13, stride 1)" in result.output
    fcn = convify.load(out)
    x = torch.randn(1, 3, 320, 256)
    with torch.no_grad():
        maps = fcn(x)
    assert maps.shape == (1, 4, *fcn.geometry.output_size(320, 256)) == (1, 4, 7, 3)


def test_convert_a_state_dict_without_arch_fails_cleanly(runner, tmp_path):
    source = tmp_path / "weights.pt"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), source)
    result = runner.invoke(cli, ["convert", str(source)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {source} holds a state_dict; say which architecture with --arch, e.g. --arch resnet50")
    assert "Traceback" not in result.output
    assert not (tmp_path / "weights.fcn.pt").exists()


def test_convert_refuses_to_overwrite_without_force(runner, tmp_path):
    source = tmp_path / "m.pt"
    torch.save(torchvision.models.squeezenet1_1(num_classes=3).state_dict(), source)
    out = tmp_path / "m.fcn.pt"
    out.write_bytes(b"precious")
    result = runner.invoke(cli, ["convert", str(source), "--arch", "squeezenet1_1"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {out} already exists; use --force to overwrite it"
    assert out.read_bytes() == b"precious"
    result = runner.invoke(cli, ["convert", str(source), "--arch", "squeezenet1_1", "--force"])
    assert result.exit_code == 0, result.output
    assert convify.load(out).meta.arch == "torchvision:squeezenet1_1"


def test_convert_an_architecture_name_warns_about_random_weights(runner, tmp_path):
    out = tmp_path / "r.fcn.pt"
    result = runner.invoke(cli, ["convert", "squeezenet1_1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "Warning: 'squeezenet1_1' is not a file: built torchvision:squeezenet1_1 with random weights" in result.output
    assert out.exists()


def test_convert_refuses_a_vit_with_the_reason(runner, tmp_path):
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=3)
    source = tmp_path / "vit.pt"
    torch.save(vit, source)
    result = runner.invoke(cli, ["convert", str(source), "--input-size", "32"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "attention" in last
    assert not (tmp_path / "vit.fcn.pt").exists()


def test_convert_bad_inputs_give_one_line_errors(runner, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    for args in (["convert", str(tmp_path / "missing.pt")], ["convert", str(garbage)], ["convert", "resnet5O"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, args
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert runner.invoke(cli, ["convert", "resnet18", "--input-size", "0"]).exit_code == 2  # usage error


def test_info_shows_what_a_file_holds(runner, tmp_path):
    fcn = convify.convert(torchvision.models.resnet18(num_classes=3), arch="torchvision:resnet18",
                          classes=["cat", "dog", "bird"])
    path = fcn.save(tmp_path / "r.fcn.pt")
    result = _invoke(runner, "info", path)
    assert result.exit_code == 0
    assert "Architecture: torchvision:resnet18" in result.output
    assert "Input: native 224 px, RGB mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in result.output
    assert "Classes: 3 (cat, dog, bird, ...)" in result.output
    assert "Geometry: stride 32 px, window 224 px, offset 0, receptive field 627 px (cell (0,0) from -217 px)" \
        in result.output
    assert "map size: 448x448 px in -> 8x8 cells out; smallest input 193 px" in result.output
    assert "fc       Linear(512 -> 3)  ->  Conv2d(512 -> 3, 1x1)" in result.output


def test_info_on_a_file_that_is_not_converted(runner, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(2)}, path)
    result = runner.invoke(cli, ["info", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {path} is not a convify file; convert a model first with `convify convert`"


def test_importing_convify_does_not_import_click():
    import subprocess
    import sys

    code = "import sys, convify; print('click' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_is_a_click_group():
    assert isinstance(cli, click.Group) and {"convert", "info"} <= set(cli.commands)


# --------------------------------------------------------------------------------------------------
# convify heatmap

SAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "samples"


def test_heatmap_with_the_default_model_prints_top_classes_and_writes_files(runner, tmp_path):
    result = runner.invoke(cli, ["heatmap", str(SAMPLES / "coffee.jpg"), "-o", str(tmp_path), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{SAMPLES / 'coffee.jpg'} (600x400 px, map 14x21):"  # padded: cells reach the edges
    assert lines[1].split()[0] == "espresso"
    assert "peak cell (" in lines[1] and "box (" in lines[1]
    assert (tmp_path / "coffee.heatmap.png").is_file() and (tmp_path / "coffee.json").is_file()
    assert not (tmp_path / "coffee.logits.npy").exists()  # npy only when asked


def test_heatmap_classes_by_name_and_index_with_all_formats(runner, tmp_path):
    args = ["heatmap", str(SAMPLES / "cat_and_coffee.jpg"), "--class", "ESPRESSO", "--class", "281",
            "--format", "png,json,npy", "-o", str(tmp_path)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.output.splitlines()[1:3]] == ["espresso", "tabby"]
    for name in ("cat_and_coffee.espresso.png", "cat_and_coffee.tabby.png", "cat_and_coffee.json",
                 "cat_and_coffee.logits.npy", "cat_and_coffee.boxes.npy"):
        assert (tmp_path / name).is_file(), name
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = runner.invoke(cli, args)  # done already: skipped, nothing overwritten without --force
    assert again.exit_code == 0
    assert again.output.strip() == f"{SAMPLES / 'cat_and_coffee.jpg'}: skipped, its outputs exist (--force redoes it)"
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    (tmp_path / "cat_and_coffee.boxes.npy").unlink()  # a set in part (other options, or an interrupted run)
    again = runner.invoke(cli, args)
    assert again.exit_code == 1
    assert f"{tmp_path / 'cat_and_coffee.espresso.png'} exists but {tmp_path / 'cat_and_coffee.boxes.npy'} does " \
           "not (an interrupted run, or other options); use --force to redo it" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == {k: v for k, v in stamps.items()
                                                                         if k != "cat_and_coffee.boxes.npy"}
    assert runner.invoke(cli, args + ["--force"]).exit_code == 0
    assert (tmp_path / "cat_and_coffee.boxes.npy").is_file()


def test_heatmap_unknown_class_lists_near_matches(runner, tmp_path):
    result = runner.invoke(cli, ["heatmap", str(SAMPLES / "coffee.jpg"), "--class", "espreso", "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: unknown class 'espreso'; did you mean 'espresso', 'espresso maker', "
                                     "'prison', 'sturgeon', 'speedboat'?")
    assert list(tmp_path.iterdir()) == []


def test_heatmap_skips_a_broken_image_and_fails_at_the_end(runner, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    out = tmp_path / "out"
    chelsea, coffee = (shutil.copy(SAMPLES / name, tmp_path / name) for name in ("chelsea.jpg", "coffee.jpg"))
    result = runner.invoke(cli, ["heatmap", str(chelsea), str(broken), str(coffee), "-o", str(out),
                                 "--table", "none"])
    assert result.exit_code == 1
    assert f"Error: {broken}: cannot read {broken} as an image" in result.output
    assert result.output.strip().splitlines()[-1] == "Error: 1 of 3 images failed"
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["chelsea.heatmap.png", "chelsea.json", "coffee.heatmap.png",
                                                     "coffee.json"]


def test_heatmap_with_an_explicit_converted_file_and_a_state_dict(runner, tmp_path):
    model = torchvision.models.squeezenet1_1(num_classes=3).eval()
    fcn = convify.convert(model, classes=["a", "b", "c"])
    converted = fcn.save(tmp_path / "sq.fcn.pt")
    result = runner.invoke(cli, ["heatmap", str(SAMPLES / "chelsea.jpg"), "--model", str(converted), "--format", "json",
                                 "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    names = {line.split()[0] for line in result.output.splitlines()[1:4]}
    assert names == {"a", "b", "c"}
    weights = tmp_path / "sq_weights.pt"
    torch.save(model.state_dict(), weights)
    result = runner.invoke(cli, ["heatmap", str(SAMPLES / "chelsea.jpg"), "--model", "squeezenet1_1", "--weights",
                                 str(weights), "--format", "json", "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    a = __import__("json").loads((tmp_path / "a" / "chelsea.json").read_text())
    b = __import__("json").loads((tmp_path / "b" / "chelsea.json").read_text())
    assert [t["logit"] for t in a["top"]] == pytest.approx([t["logit"] for t in b["top"]], rel=1e-5)


def test_heatmap_pretrained_architecture_offline(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = runner.invoke(cli, ["heatmap", str(SAMPLES / "chelsea.jpg"), "--model", "resnet18", "-o", str(tmp_path)])
    assert result.exit_code == 1
    # one Error line (torch.hub itself may also say that it tried to download)
    (message,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert message.startswith("Error: cannot get pretrained weights for torchvision:resnet18")
    assert message.endswith("pass a weights file with --weights") and "Traceback" not in result.output
    # with the file in torch.hub's cache, the same command works offline
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)  # torch.hub made it when it tried to download
    torch.save(torchvision.models.resnet18().state_dict(), cache / url.rsplit("/", 1)[1])
    result = runner.invoke(cli, ["heatmap", str(SAMPLES / "chelsea.jpg"), "--model", "resnet18", "--format", "json",
                                 "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert __import__("json").loads((tmp_path / "chelsea.json").read_text())["model"] == "torchvision:resnet18"


# --------------------------------------------------------------------------------------------------
# Hostile inputs: every bad image, output and option is one Error: line; batches go on




IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
FORGED = "\n\x1b[31mCheck: forged"


class Tiny(nn.Module):
    """conv stride 2 -> relu -> global pool -> linear: 5 classes at 32 px (named layers: the loader refuses a
    top-level nn.Sequential's numeric names)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def tiny_network() -> convify.FullyConvNet:
    return convify.convert(Tiny(), 32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A converted 5-class network in a file, for --model (fast: no default model)."""
    return tiny_network().save(tmp_path_factory.mktemp("tiny") / "tiny.fcn.pt")


def photo(path: Path, size=(64, 48), fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path, format=fmt)
    return path


def errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error: ")]


def test_heatmap_batch_reports_each_bad_image_on_one_line_and_does_the_rest(runner, tmp_path, tiny):
    missing = tmp_path / "missing.png"
    directory = tmp_path / "folder.png"
    directory.mkdir()
    broken = tmp_path / "broken.png"
    good_png = photo(tmp_path / "good.png").read_bytes()
    broken.write_bytes(good_png[:40] + b"\x00\x00\x00" + good_png[43:])
    truncated = tmp_path / "truncated.jpg"
    jpeg = photo(tmp_path / "whole.jpg", fmt="JPEG").read_bytes()
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(40000, 40000))
    assert bomb.stat().st_size < 100
    wide = tmp_path / "wide.png"
    Image.new("RGB", (40000, 4), (200, 10, 10)).save(wide)
    assert wide.stat().st_size < 1000
    good = [tmp_path / "good.png", photo(tmp_path / "also_good.png", (50, 70))]
    out = tmp_path / "out"
    bad = [missing, directory, broken, truncated, bomb, wide]  # a directory is searched (folder.png: empty)
    result = runner.invoke(cli, ["heatmap", *map(str, bad + good), "--model", str(tiny), "-o", str(out),
                                 "--table", "none"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    formats = "not a PNG, JPEG, WebP, TIFF, BMP, GIF, PPM or ICO file, or a damaged one"
    truncated_line = [line for line in errors(result) if line.startswith(f"Error: {truncated}")][0]
    cut = truncated_line.rsplit("(", 1)[1].split()[0]
    assert cut.isdigit()
    minimum = convify.load(tiny).geometry.min_input_size()
    assert errors(result) == [
        f"Error: {missing}: no such image: {missing}",
        f"Error: {broken}: cannot read {broken} as an image ({formats})",
        f"Error: {truncated}: cannot read {truncated} as an image "
        f"(image file is truncated ({cut} bytes not processed))",
        f"Error: {bomb}: {bomb} declares 1,600,000,000 pixels, more than the {limits.MAX_IMAGE_PIXELS:,} allowed; "
        "not decoding it (a decompression bomb?)",
        f"Error: {wide}: the image is 40000x4 px: scaled to fit the bounds on the network's input it is 16384x1 px, "
        f"and the network needs at least {minimum} px a side (its aspect ratio is too extreme: crop it)",
        "Error: 5 of 7 images failed",
    ]
    assert sorted(os.listdir(out)) == ["also_good.heatmap.png", "also_good.json", "good.heatmap.png", "good.json"]
    assert Image.MAX_IMAGE_PIXELS != limits.MAX_IMAGE_PIXELS  # the command's own Pillow limit was undone


def test_heatmap_unreadable_image_simulated(runner, tmp_path, tiny, monkeypatch):
    secret = photo(tmp_path / "secret.png")
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda name, *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied")) if Path(name) == secret else real_open(name, *a, **k))
    result = runner.invoke(cli, ["heatmap", str(secret), "--model", str(tiny), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {secret}: cannot open {secret}: permission denied",
                              "Error: 1 of 1 images failed"]


@pytest.mark.skipif(IS_ROOT, reason="root reads a 0000 file and writes into a 0555 directory anyway")
def test_heatmap_unreadable_image_and_unwritable_directory_for_real(runner, tmp_path, tiny):
    secret = photo(tmp_path / "secret.png")
    secret.chmod(0)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = runner.invoke(cli, ["heatmap", str(secret), str(photo(tmp_path / "ok.png")), "--model", str(tiny),
                                     "-o", str(locked)])
        assert result.exit_code == 1
        assert errors(result)[0] == f"Error: {secret}: cannot open {secret}: permission denied"
        assert errors(result)[1] == f"Error: {tmp_path / 'ok.png'}: cannot write {locked / 'ok.heatmap.png'}: " \
                                    "Permission denied"
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_heatmap_unwritable_output_directory_simulated(runner, tmp_path, tiny, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(convify.outputs.tempfile, "mkstemp", refuse)
    image = photo(tmp_path / "pic.png")
    out = tmp_path / "out"
    result = runner.invoke(cli, ["heatmap", str(image), "--model", str(tiny), "-o", str(out)])
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {image}: cannot write {out / 'pic.heatmap.png'}: Permission denied",
                              "Error: 1 of 1 images failed"]
    assert os.listdir(out) == []
    (tmp_path / "file").write_text("in the way")
    result = runner.invoke(cli, ["heatmap", str(image), "--model", str(tiny), "-o", str(tmp_path / "file" / "sub")])
    assert errors(result)[0] == (f"Error: {image}: cannot create the output directory {tmp_path / 'file' / 'sub'}: "
                                 "Not a directory")


class FullDisk(io.FileIO):
    def write(self, data):  # type: ignore[override]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk(monkeypatch) -> None:
    """Every file opened for writing through os.fdopen (what the atomic writer uses) is on a full disk."""
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: FullDisk(fd, "wb") if "w" in mode
                        else real(fd, mode, *a, **k))


def test_full_disk_is_one_error_line_and_leaves_nothing(runner, tmp_path, tiny, monkeypatch):
    full_disk(monkeypatch)
    image = photo(tmp_path / "pic.png")
    out = tmp_path / "out"
    result = runner.invoke(cli, ["heatmap", str(image), "--model", str(tiny), "-o", str(out)])
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {image}: cannot write {out / 'pic.heatmap.png'}: no space left on the device",
                              "Error: 1 of 1 images failed"]
    assert os.listdir(out) == []
    source = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)), source)
    converted = tmp_path / "conv" / "model.fcn.pt"
    result = runner.invoke(cli, ["convert", str(source), "--input-size", "16", "-o", str(converted)])
    assert result.exit_code == 1, result.output
    assert errors(result) == [f"Error: cannot write {converted}: no space left on the device"]
    assert os.listdir(tmp_path / "conv") == []


def test_an_output_that_is_an_input_is_refused_even_with_force(runner, tmp_path, tiny):
    image = photo(tmp_path / "pic.json")  # a PNG named .json: its summary would be written over it
    before = image.read_bytes()
    result = runner.invoke(cli, ["heatmap", str(image), "--model", str(tiny), "-o", str(tmp_path), "--force"])
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {image}: {image} is an input of this run ({image}); refusing to overwrite it "
                              "even with --force: choose another output", "Error: 1 of 1 images failed"]
    assert image.read_bytes() == before
    link = tmp_path / "link"
    link.symlink_to(tmp_path)  # the same directory under another name
    result = runner.invoke(cli, ["heatmap", str(image), "--model", str(tiny), "-o", str(link), "--force"])
    assert errors(result)[0].startswith(f"Error: {image}: {link / 'pic.json'} is an input of this run")
    assert image.read_bytes() == before
    # one image's outputs over another input of the batch: a.png would write a.heatmap.png
    a, a_heatmap = photo(tmp_path / "a.png"), photo(tmp_path / "a.heatmap.png")
    kept = a_heatmap.read_bytes()
    result = runner.invoke(cli, ["heatmap", str(a), str(a_heatmap), "--model", str(tiny), "-o", str(tmp_path),
                                 "--force", "--format", "png"])
    assert errors(result)[0].startswith(f"Error: {a}: {a_heatmap} is an input of this run")
    assert a_heatmap.read_bytes() == kept
    # convert -o onto its own model file
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    result = runner.invoke(cli, ["convert", str(model), "-o", str(model), "--force"])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {model} is an input of this run ({model}); refusing to overwrite it "
                                     "even with --force: choose another output")
    assert model.read_bytes() == b"weights"


def test_huge_top_k_is_capped_at_the_classes(runner, tmp_path, tiny):
    image = photo(tmp_path / "pic.png")
    result = runner.invoke(cli, ["heatmap", str(image), "--model", str(tiny), "-o", str(tmp_path / "out"),
                                 "--top-k", str(10**20)])
    assert result.exit_code == 0, result.output
    shown = [line for line in result.output.splitlines() if "peak cell" in line]
    assert sorted(line.split()[1] for line in shown) == ["0", "1", "2", "3", "4"]  # "class 0" .. "class 4"


def test_sizes_out_of_bounds(runner, tmp_path, tiny):
    image = photo(tmp_path / "pic.png")
    result = runner.invoke(cli, ["heatmap", str(image), "--model", str(tiny), "--size", "100000"])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (f"Error: Invalid value for '--size': 100000 px is more than the longest "
                                              f"side convify allows ({limits.MAX_SIDE} px)")
    for bad in ("0", "-3", "1e9", "9" * 5000):
        assert runner.invoke(cli, ["heatmap", str(image), "--model", str(tiny), "--size", bad]).exit_code == 2, bad
    assert runner.invoke(cli, ["heatmap", str(image), "--max-pixels", "0"]).exit_code == 2
    result = runner.invoke(cli, ["heatmap", str(image), "--model", str(tiny), "--size", "2000", "--max-pixels",
                                 "1000000", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert errors(result)[0] == (f"Error: {image}: at size 2000 the image would be 2667x2000 = 5,334,000 pixels, "
                                 "more than the 1,000,000 allowed (--max-pixels, max_pixels=); lower --size or raise "
                                 "--max-pixels")


def test_out_of_memory_is_one_line_with_the_way_out(runner, tmp_path, tiny, monkeypatch):
    def explode(self, x):
        raise MemoryError

    monkeypatch.setattr(FullyConvNet, "forward", explode)
    image = photo(tmp_path / "pic.png")
    result = runner.invoke(cli, ["heatmap", str(image), "--model", str(tiny), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert errors(result)[0].startswith(f"Error: {image}: out of memory running the network on ")
    assert errors(result)[0].endswith(" px (lower --size or --max-pixels)")


def test_unexpected_errors_are_named_and_debug_shows_the_traceback(runner, tmp_path, tiny, monkeypatch):
    import convify.batch
    import convify.models

    real = convify.batch.make_result

    def flaky(picture, logits, fcn, prepared, source, *args, **kwargs):
        if str(source).endswith("first.png"):
            raise ValueError("boom\nsecond line")
        return real(picture, logits, fcn, prepared, source, *args, **kwargs)

    monkeypatch.setattr(convify.batch, "make_result", flaky)
    images = [str(photo(tmp_path / "first.png")), str(photo(tmp_path / "second.png"))]
    result = runner.invoke(cli, ["heatmap", *images, "--model", str(tiny), "-o", str(tmp_path / "out"), "--workers", "0"])
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {images[0]}: unexpected ValueError: boom (run with --debug for the traceback)",
                              "Error: 1 of 2 images failed"]
    assert (tmp_path / "out" / "second.json").is_file()
    result = runner.invoke(cli, ["--debug", "heatmap", *images, "--model", str(tiny), "-o", str(tmp_path / "out2"),
                                 "--workers", "0"])
    assert "Traceback (most recent call last)" in result.output and "ValueError: boom" in result.output
    assert result.exit_code == 1

    def broken_loader(*args, **kwargs):
        raise RuntimeError("the loader broke")

    monkeypatch.setattr(convify.models, "load_model", broken_loader)
    result = runner.invoke(cli, ["convert", "resnet18", "-o", str(tmp_path / "r.fcn.pt")])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: unexpected RuntimeError: the loader broke "
                                     "(run with --debug for the traceback)")
    result = runner.invoke(cli, ["--debug", "convert", "resnet18", "-o", str(tmp_path / "r.fcn.pt")])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)  # raised: Python shows the traceback
    monkeypatch.setattr(convify.models, "load_model", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    result = runner.invoke(cli, ["convert", "resnet18", "-o", str(tmp_path / "r.fcn.pt")])
    assert result.output.strip() == "Error: out of memory (the model is too large for this machine)"


def test_strings_from_files_are_printed_escaped(runner, tmp_path, monkeypatch):
    fcn = tiny_network()
    fcn.meta.arch = FORGED
    fcn.meta.classes = [f"cat{FORGED}", "dog\u202eevil", "bird", "fish", "cow"]
    fcn.rewrites = [Rewrite(f"layer{FORGED}", f"Linear{FORGED}", "Conv2d\x07")]
    forged = fcn.save(tmp_path / "forged.fcn.pt")
    result = runner.invoke(cli, ["info", str(forged)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "Architecture: \\n\\x1b[31mCheck: forged" in lines
    assert "Classes: 5 (cat\\n\\x1b[31mCheck: forged, dog\\u202eevil, bird, ...)" in lines
    assert "  layer\\n\\x1b[31mCheck: forged  Linear\\n\\x1b[31mCheck: forged  ->  Conv2d\\x07" in lines
    assert not any(line.startswith("Check: forged") for line in lines)
    assert "\x1b" not in result.output and "\u202e" not in result.output and "\x07" not in result.output
    # heatmap: class names and an image name with a newline in it
    image = photo(tmp_path / "evil\nError: forged.png")
    result = runner.invoke(cli, ["heatmap", str(image), "--model", str(forged), "-o", str(tmp_path / "out"),
                                 "--top-k", "5"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert not any(line.startswith(("Error: forged", "Check: forged")) for line in result.output.splitlines())
    assert result.output.splitlines()[0].startswith(f"{tmp_path}/evil\\nError: forged.png (64x48 px")
    missing = tmp_path / "gone\x1b[2J.png"
    result = runner.invoke(cli, ["heatmap", str(missing), "--model", str(forged)])
    assert errors(result)[0] == f"Error: {tmp_path}/gone\\x1b[2J.png: no such image: {tmp_path}/gone\\x1b[2J.png"


def test_text_printable():
    from convify.text import printable

    assert printable("plain name") == "plain name"
    assert printable("a\nb\r\tc\x00\x7f\x85") == "a\\nb\\r\\tc\\x00\\x7f\\x85"
    assert printable("\u202eabc\u2028\ud800") == "\\u202eabc\\u2028\\ud800"
    assert printable("é漢字🐈") == "é漢字🐈"
    assert printable("x" * 500, limit=10) == "xxxxxxx..."
