"""The convify command, through click's CliRunner: exit codes, the lines it prints, the files it writes."""
import click
import pytest
import torch
import torchvision
from click.testing import CliRunner

import convify
from convify.cli import cli


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
    assert lines[0] == f"{SAMPLES / 'coffee.jpg'} (600x400 px, map 8x15):"
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
    again = runner.invoke(cli, args)  # never overwrites without --force
    assert again.exit_code == 1
    assert "already exists; use --force" in again.output
    assert runner.invoke(cli, args + ["--force"]).exit_code == 0


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
    result = runner.invoke(cli, ["heatmap", str(SAMPLES / "chelsea.jpg"), str(broken), str(SAMPLES / "coffee.jpg"),
                                 "-o", str(out)])
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
