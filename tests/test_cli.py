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
