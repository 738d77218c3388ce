"""Devices and reduced precisions: refused clearly where the machine lacks them, close to float32 where they run,
never a non-finite map, and the precision said in every output."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import convify
from convify import ConvifyError
from convify.bench import bench, format_rows
from convify.cli import cli
from convify.devices import check_finite, check_precision, on_device, resolve_device, resolve_precision
from convify.engine import heatmap
from convify.large import large_heatmap
from convify.models import default_network

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# Between bfloat16's largest finite value (3.3895e38) plus half its last step and float32's (3.4028e38):
# finite in float32, infinite once rounded to bfloat16.
NEAR_FLOAT32_MAX = 3.3995e38


class Loud(nn.Module):
    """Every feature is exactly 1 (zero weights, bias 1, ReLU); class 0's logit is ``NEAR_FLOAT32_MAX``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(1.0)
            self.fc.weight.zero_()
            self.fc.weight[0, 0] = NEAR_FLOAT32_MAX
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class Tiny(nn.Module):
    """Stride 4, a global-average-pool head: small enough for CLI runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def tiny() -> convify.FullyConvNet:
    torch.manual_seed(0)
    return convify.convert(Tiny().eval(), 32, classes=["a", "b", "c"])


@pytest.fixture(scope="module")
def loud() -> convify.FullyConvNet:
    return convify.convert(Loud().eval(), 16, classes=["loud", "quiet"])


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without CUDA or MPS, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def _picture(side: int = 96) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side + 8, 3), dtype=np.uint8), "RGB")


# ---- names ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, name", [(None, "float32"), ("fp32", "float32"), ("BF16", "bfloat16"),
                                          ("bfloat16", "bfloat16"), ("fp16", "float16"), ("half", "float16")])
def test_precision_names(given, name) -> None:
    assert resolve_precision(given) == name


@pytest.mark.parametrize("given", ["int8", "", "float64", 16, torch.bfloat16])
def test_an_unknown_precision_is_refused(given) -> None:
    with pytest.raises(ConvifyError, match="precision must be one of float32, bfloat16, float16"):
        resolve_precision(given)


def test_float16_is_refused_on_the_cpu_with_what_to_use() -> None:
    with pytest.raises(ConvifyError, match="float16 is for cuda and mps devices, not cpu; on the CPU use bfloat16"):
        check_precision(torch.device("cpu"), "fp16")
    assert check_precision(torch.device("cpu"), "bf16") == "bfloat16"


@pytest.mark.parametrize("device, message", [
    ("cuda", "CUDA is not available here"),
    ("cuda:1", "CUDA is not available here"),
    ("mps", "MPS is not available here"),
    ("banana", "unknown device 'banana'; use cpu, cuda, cuda:N or mps"),
    ("xla", "convify runs on cpu, cuda or mps"),
    ("meta", "convify runs on cpu, cuda or mps"),
])
def test_a_device_this_machine_lacks_is_refused(no_gpu, device: str, message: str) -> None:
    with pytest.raises(ConvifyError, match=message):
        resolve_device(device)


def test_a_cuda_index_past_the_devices_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConvifyError, match=r"there is no cuda:3 \(this machine has 1 CUDA devices\)"):
        resolve_device("cuda:3")


def test_the_default_device_is_where_the_weights_are(tiny) -> None:
    assert resolve_device(None, tiny) == torch.device("cpu") == resolve_device("cpu")
    assert on_device(tiny, "cpu") is tiny and on_device(tiny, None) is tiny


# ---- reduced precision -----------------------------------------------------------------------------------

def test_bfloat16_keeps_the_default_models_answer_on_a_photo() -> None:
    """The real ImageNet weights on a real photo: the same best classes, most cells' top-1 kept."""
    lite0 = default_network()
    exact = heatmap(SAMPLES / "chelsea.jpg", lite0)
    low = heatmap(SAMPLES / "chelsea.jpg", lite0, precision="bf16")
    assert exact.precision == "float32" and low.precision == "bfloat16"
    assert low.logits.dtype == torch.float32 and low.logits.shape == exact.logits.shape
    assert [p.index for p in low.top(3)] == [p.index for p in exact.top(3)]
    kept = float((low.logits.argmax(0) == exact.logits.argmax(0)).float().mean())
    assert kept >= 0.9
    assert 0 < float((low.logits - exact.logits).abs().max()) < 2.0  # changed (not float32), but not by much
    assert json.loads(json.dumps(low.summary(k=1)))["precision"] == "bfloat16"


def test_a_float32_run_is_unchanged_by_the_precision_argument(tiny) -> None:
    picture = _picture()
    torch.testing.assert_close(heatmap(picture, tiny, precision="float32").logits, heatmap(picture, tiny).logits,
                               rtol=0, atol=0)


def test_a_score_that_overflows_bfloat16_is_refused_not_returned(loud) -> None:
    picture = _picture(48)
    exact = heatmap(picture, loud)  # float32 holds it
    assert torch.isfinite(exact.logits).all() and float(exact.logits[0].max()) == pytest.approx(NEAR_FLOAT32_MAX)
    with pytest.raises(ConvifyError, match=r"of \d+ scores are not finite .*bfloat16 overflowed or lost the scores: "
                                           r"run in float32"):
        heatmap(picture, loud, precision="bfloat16")


def test_check_finite_counts_what_is_not_finite() -> None:
    check_finite(torch.zeros(2, 3), "bfloat16")
    scores = torch.zeros(2, 3)
    scores[0, 1], scores[1, 2] = float("nan"), float("-inf")
    with pytest.raises(ConvifyError, match=r"^2 of 6 scores are not finite \(NaN or infinity\); the network's"):
        check_finite(scores, "float32")


def test_a_large_image_records_its_precision_and_keeps_nothing_when_it_overflows(tmp_path: Path, tiny, loud
                                                                                 ) -> None:
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, np.asarray(_picture(120)), photometric="rgb")
    done = large_heatmap(path, tmp_path / "out", tiny, precision="bf16", formats=("json",))
    [summary] = [json.loads(Path(f).read_text()) for f in done.files if str(f).endswith(".json")]
    assert summary["precision"] == "bfloat16"
    assert convify.mapstore.open_map(done.store).attrs["precision"] == "bfloat16"
    with pytest.raises(ConvifyError, match="not finite"):
        large_heatmap(path, tmp_path / "loud", loud, precision="bf16", formats=("json",))
    assert not (tmp_path / "loud").exists() or not any((tmp_path / "loud").iterdir())  # no half-written store


# ---- the command line ----------------------------------------------------------------------------------

def test_the_cli_refuses_what_the_machine_lacks_in_one_line(tmp_path: Path, tiny, no_gpu) -> None:
    model = tiny.save(tmp_path / "tiny.fcn.pt")
    image = tmp_path / "in.png"
    _picture().save(image)
    runner = CliRunner()
    for extra, message in [(["--precision", "fp16"], "float16 is for cuda and mps devices, not cpu; on the CPU use "
                                                       "bfloat16"),
                           (["--device", "cuda"], "CUDA is not available here"),
                           (["--device", "cuda:0", "--precision", "bf16"], "CUDA is not available here"),
                           (["--device", "banana"], "unknown device 'banana'")]:
        out = tmp_path / "out"
        done = runner.invoke(cli, ["heatmap", str(image), "--model", str(model), "-o", str(out), *extra])
        assert done.exit_code == 1, (extra, done.output)
        assert message in done.output and "Traceback" not in done.output
        assert len(done.output.strip().splitlines()) == 1, done.output
        assert not out.exists() or not any(out.iterdir())  # nothing written
    bad = runner.invoke(cli, ["heatmap", str(image), "--model", str(model), "--precision", "int8"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_the_cli_runs_in_bfloat16_and_says_so(tmp_path: Path, tiny) -> None:
    model = tiny.save(tmp_path / "tiny.fcn.pt")
    image = tmp_path / "in.png"
    _picture().save(image)
    done = CliRunner().invoke(cli, ["heatmap", str(image), "--model", str(model), "-o", str(tmp_path),
                                    "--precision", "bf16", "--device", "cpu", "--format", "json"])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "in.json").read_text())["precision"] == "bfloat16"


# ---- convify bench -------------------------------------------------------------------------------------

def test_bench_times_a_precision_against_float32_with_its_agreement(tiny) -> None:
    rows = bench("tiny", tiny, None, sizes=[64], repeat=1, precisions=["bf16", "float32", "bfloat16"])
    assert [r.what for r in rows] == ["dense", "heatmap", "bfloat16"]  # float32 is the reference, not a row
    low = rows[2]
    assert low.reference == "float32 dense" and low.reference_seconds == rows[0].seconds
    assert 0.5 <= low.agreement <= 1.0 and 0 < low.max_diff < 1.0
    lines = format_rows(rows)
    assert "top-1 same" in lines[0] and f"{100 * low.agreement:.1f}%" in lines[3]
    with pytest.raises(ConvifyError, match="on the CPU use bfloat16"):
        bench("tiny", tiny, None, sizes=[64], repeat=1, precisions=["fp16"])


def test_bench_refuses_an_overflowing_precision(loud) -> None:
    with pytest.raises(ConvifyError, match="not finite"):
        bench("loud", loud, None, sizes=[32], repeat=1, precisions=["bf16"])


def test_bench_times_torch_compile_against_eager_and_it_is_exact(tiny) -> None:
    rows = bench("tiny", tiny, None, sizes=[64], repeat=1, compiled=True)
    compiled = rows[-1]
    assert compiled.what == "compiled" and compiled.reference.startswith("eager (compile ")
    assert compiled.agreement == 1.0 and compiled.max_diff < 1e-4
    assert compiled.seconds > 0 and compiled.reference_seconds == rows[0].seconds


def test_the_bench_command_with_precision(tmp_path: Path, tiny) -> None:
    model = tiny.save(tmp_path / "tiny.fcn.pt")
    done = CliRunner().invoke(cli, ["bench", str(model), "--size", "64", "--repeat", "1", "--threads", "1",
                                    "--precision", "bf16"])
    assert done.exit_code == 0, done.output
    assert sum(" bfloat16 " in line for line in done.output.splitlines()) == 1
    refused = CliRunner().invoke(cli, ["bench", str(model), "--size", "64", "--precision", "fp16"])
    assert refused.exit_code == 1 and "on the CPU use bfloat16" in refused.output
    assert "Traceback" not in refused.output


# ---- a GPU, where there is one ---------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_gives_the_cpu_map_and_leaves_the_callers_network_where_it_was(tiny) -> None:
    picture = _picture()
    on_cpu = heatmap(picture, tiny)
    on_gpu = heatmap(picture, tiny, device="cuda")
    assert next(tiny.parameters()).device.type == "cpu"
    torch.testing.assert_close(on_gpu.logits, on_cpu.logits, rtol=1e-4, atol=1e-4)
    half = heatmap(picture, tiny, device="cuda", precision="fp16")
    assert half.precision == "float16" and torch.isfinite(half.logits).all()
