"""benchmarks/zoo_sweep.py: each architecture's outcome, and a resumable log (the full sweep is the benchmark)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SWEEP = Path(__file__).resolve().parent.parent / "benchmarks" / "zoo_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("zoo_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # one() runs single-threaded, as each of its processes does


@pytest.mark.parametrize("source, name, outcome, why", [
    ("timm", "tf_mobilenetv3_small_minimal_100", "pass", None),  # TF "SAME" padding
    ("timm", "botnet26t_256", "attention", "is attention"),
    ("timm", "ghostnetv2_100", "refused", "target size"),  # its gate is resized to another map's size
    ("timm", "no_such_model", "error", "build"),
])
def test_outcomes(sweep, source, name, outcome, why) -> None:
    result = sweep.one(source, name)
    assert result["outcome"] == outcome, result
    if why:
        assert why in result["why"]
    if outcome == "pass":
        assert result["stride"] == 32 and result["max_abs_diff"] < 1e-3


def test_a_log_resumes_and_retry_runs_failures_again(tmp_path) -> None:
    log = tmp_path / "sweep.jsonl"
    log.write_text(json.dumps({"source": "timm", "name": "resnet18", "outcome": "error", "why": "killed"}) + "\n"
                   + json.dumps({"source": "timm", "name": "botnet26t_256", "outcome": "attention", "why": "x"}) + "\n")
    command = [sys.executable, str(SWEEP), "--models", "timm:resnet18", "timm:botnet26t_256", "--log", str(log)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "0 architectures" in done.stdout  # both in the log: nothing to run
    done = subprocess.run(command + ["--retry"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 architectures" in done.stdout, done.stdout + done.stderr
    last = json.loads(log.read_text().splitlines()[-1])
    assert (last["name"], last["outcome"]) == ("resnet18", "pass")
    assert "1 of 1 non-attention architectures convert" in done.stdout


def test_report_prints_the_rates_of_a_log_and_runs_nothing(tmp_path) -> None:
    log = tmp_path / "sweep.jsonl"
    lines = [{"source": "timm", "name": "resnet18", "outcome": "error", "why": "killed"},
             {"source": "timm", "name": "resnet18", "outcome": "pass"},  # the last line of an architecture decides
             {"source": "timm", "name": "botnet26t_256", "outcome": "attention", "why": "x is attention"},
             {"source": "timm", "name": "ghostnetv2_100", "outcome": "refused", "why": "resizes to a target size"}]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = subprocess.run([sys.executable, str(SWEEP), "--source", "timm", "--log", str(log), "--report"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "0 architectures" in done.stdout
    assert "timm: 1 of 2 non-attention architectures convert (50.0%); 1 refused as attention, 1 refused" in done.stdout
    assert log.read_text().count("\n") == 4  # nothing ran, nothing appended
