"""The scripts in ``examples/`` run as documented (at one or two epochs) and do what they say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from kdcompress import data
from kdcompress.artifacts import OnnxModel

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_api_runs_the_user_stage_and_caches_every_stage(tmp_path):
    example = load("python_api")
    first = example.build(teacher_epochs=1, student_epochs=1).run(out=tmp_path, plot=False)
    assert [r.name for r in first.stages] == ["teacher", "student", "student_kd", "tuned",
                                               "fp32", "int8"]
    assert not any(r.cached for r in first.stages)
    tuned = first.row("tuned")
    assert tuned.function.endswith("fine_tune_head") and tuned.accuracy is not None
    # "run the script twice and every stage comes from the cache"
    again = example.build(teacher_epochs=1, student_epochs=1).run(out=tmp_path, plot=False)
    assert all(r.cached for r in again.stages)
    assert [r.accuracy for r in again.stages] == [r.accuracy for r in first.stages]

    # deploy_onnxruntime.py serves that int8 graph with ONNX Runtime and numpy alone
    deploy = load("deploy_onnxruntime")
    model = tmp_path / "stages" / "int8" / "model.onnx"
    x, y = data.digits().arrays("test")
    labels, proba = deploy.classify(deploy.open_session(model, threads=1), x.numpy())
    assert np.array_equal(labels, OnnxModel(model).predict(x).argmax(1).numpy())
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (labels == y.numpy()).mean() == pytest.approx(first.row("int8").accuracy, abs=1e-6)
    with pytest.raises(ValueError, match=r"of shape .* but got \(3, 8, 8\)"):
        deploy.classify(deploy.open_session(model), x.numpy()[:3, 0])


def test_own_model_folder_trains_from_pngs_and_serves_what_the_pipeline_measured(tmp_path,
                                                                                  capsys):
    example = load("own_model_folder")
    images = tmp_path / "digits"
    example.write_digits(images)
    assert len(list((images / "test").rglob("*.png"))) == 1797 // 5
    out = tmp_path / "run"
    report = example.main(["--images", str(images), "--out", str(out), "--epochs", "1"])
    assert json.loads((out / "report.json").read_text())["metric"] == "macro_f1"
    assert "int8: test macro-F1" in capsys.readouterr().out
    assert report.row("int8").details["compact"]["bytes_after"] == report.row("int8").size_bytes

    # serving (Pillow + numpy + ONNX Runtime, the example's MEAN/STD) gives, image by image,
    # the predictions of the graph the pipeline scored on its own test split
    model = out / "stages" / "int8" / "model.onnx"
    task = data.from_folder(images, mean=example.MEAN, std=example.STD, val_fraction=0.1)
    files = task.test.files[:12]
    x = torch.stack([task.test[i][0] for i in range(len(files))])
    logits = OnnxModel(model).predict(x)
    for f, row in zip(files, logits, strict=True):
        label, p = example.serve(model, images / f.path)
        assert label == int(row.argmax())
        assert p == pytest.approx(float(torch.softmax(row, 0).max()), rel=1e-5)
        assert example.task_class(images, f.label) == Path(f.path).parent.name


def test_own_model_folder_model_has_nothing_from_kdcompress():
    example = load("own_model_folder")
    model = example.SmallResNet()
    assert all(type(m).__module__.startswith(("torch", example.__name__))
               for m in model.modules())
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert np.isfinite(model(torch.randn(2, 1, 8, 8)).detach().numpy()).all()
