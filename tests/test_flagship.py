"""The README's main job: the flagship pipeline end to end through the CLI, on bundled digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from kdcompress import data

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_flagship_pipeline_meets_its_quality_bar(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "kdcompress", "run", str(ROOT / "pipelines" / "tt_distill_quant.py"),
         "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {s["name"]: s for s in report["stages"]}
    assert list(rows) == ["teacher", "student", "student_kd", "pruned", "fp32", "int8"]
    assert [rows[n]["format"] for n in rows] == ["torch"] * 4 + ["onnx"] * 2
    teacher, int8 = rows["teacher"], rows["int8"]
    # the bar: within 2 points of the teacher, at least 10x smaller on disk
    assert int8["accuracy"] >= teacher["accuracy"] - 0.02
    assert teacher["size_bytes"] / int8["size_bytes"] >= 10
    assert int8["smaller_by"] == pytest.approx(teacher["size_bytes"] / int8["size_bytes"],
                                               rel=1e-3)
    # decompose_tt put TT layers in, prune removed channels, quantize produced int8 nodes
    assert any(layer["method"] == "tt" for layer in rows["student"]["details"]["layers"])
    assert rows["pruned"]["params"] < rows["student_kd"]["params"]
    # every TT MatMul and the wide convs run in int8; the 1-channel first conv stays fp32 when
    # quantize_onnx timed it faster that way
    quantized = rows["int8"]["details"]["quantized_nodes"]
    assert quantized["MatMul"] == 7 and quantized["Conv"] >= 2
    # the shipped file runs with plain onnxruntime and reproduces the reported accuracy
    session = ort.InferenceSession(str(out / "stages" / "int8" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    x, y = data.digits().arrays("test")
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.mean(logits.argmax(1) == y.numpy()) == pytest.approx(int8["accuracy"], abs=1e-6)
    for name in ("report.json", "report.md", "report.png"):
        assert (out / name).stat().st_size > 0
