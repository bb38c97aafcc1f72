"""The CI workflows say what the README promises: the CPU suite through .ci/run on Ubuntu, and
gpu_check.sh on a self-hosted `gpu` runner that uploads benchmarks/results/ even when it fails,
never triggered by pull requests."""
from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
WORKFLOWS = Path(__file__).resolve().parents[1] / ".github" / "workflows"


def _load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def test_cpu_workflow_runs_the_ci_script_on_ubuntu():
    (job,) = _load("ci.yml")["jobs"].values()
    assert job["runs-on"].startswith("ubuntu")
    assert any(step.get("run") == "bash .ci/run" for step in job["steps"])


def test_gpu_workflow_runs_gpu_check_on_the_gpu_runner_and_keeps_the_results():
    doc = _load("gpu.yml")
    assert "pull_request" not in doc["on"] and "pull_request_target" not in doc["on"]
    (job,) = doc["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "gpu"]
    runs = [step.get("run") for step in job["steps"]]
    assert "bash benchmarks/gpu_check.sh" in runs
    (upload,) = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert upload["if"] == "always()" and upload["with"]["path"].rstrip("/") == "benchmarks/results"
