"""The report: report.json's schema, the ratios to the baseline, the files, and the flags."""

from __future__ import annotations

import json

import pytest
from torch import nn

from kdcompress import Pipeline, models
from kdcompress.errors import KDCompressError
from kdcompress.report import Report, StageRow, load_report, render_table
from kdcompress.stages import train

STAGE_KEYS = {"name", "function", "inputs", "format", "params", "size_bytes", "macs",
              "latency_ms", "engine", "accuracy", "val_accuracy", "agreement", "seconds",
              "cached", "smaller_by", "faster_by", "flags", "details", "warnings", "role"}


def narrow(model: nn.Module, data=None) -> nn.Module:
    """A smaller, untrained model for the same data."""
    return models.cnn(width=4, hidden=8).build(data.input_shape, data.num_classes)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_task, fast_measure):
    out = tmp_path_factory.mktemp("report") / "run"
    pipeline = Pipeline("schema", data=digits_task)
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    pipeline.stage(narrow, out="student", model=teacher)
    pipeline.run(out=out, measure=fast_measure)
    return out


@pytest.fixture(scope="module")
def doc(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def test_report_json_schema(doc):
    assert {"pipeline", "device", "world_size", "stages"} <= set(doc)
    assert doc["pipeline"] == "schema" and doc["device"] == "cpu" and doc["world_size"] == 1
    assert [s["name"] for s in doc["stages"]] == ["teacher", "student"]
    for row in doc["stages"]:
        assert STAGE_KEYS <= set(row), STAGE_KEYS - set(row)
        assert row["format"] == "torch" and row["engine"] == "torch"
        assert isinstance(row["params"], int) and row["params"] > 0
        assert isinstance(row["size_bytes"], int) and row["size_bytes"] > 0
        assert isinstance(row["macs"], int) and row["macs"] > 0
        for batch in ("batch_1", "batch_64"):
            lat = row["latency_ms"][batch]
            assert 0 < lat["p50"] <= lat["p90"]
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0
        assert row["seconds"] >= 0 and row["cached"] is False
    teacher, student = doc["stages"]
    assert teacher["function"] == "kdcompress.stages.train.train"
    assert teacher["inputs"] == [] and student["inputs"] == ["teacher"]
    assert teacher["agreement"] is None
    assert 0.0 <= student["agreement"] <= 1.0
    assert teacher["accuracy"] > 0.3  # one epoch of a real CNN beats chance (0.1) on digits
    assert student["params"] < teacher["params"]


def test_ratios_are_computed_from_the_numbers(doc):
    teacher, student = doc["stages"]
    assert teacher["smaller_by"] == 1.0
    assert student["smaller_by"] == pytest.approx(teacher["size_bytes"] / student["size_bytes"],
                                                  abs=1e-3)
    assert student["smaller_by"] > 1
    for batch in ("batch_1", "batch_64"):
        # timed interleaved with the baseline: the ratio of the two timings taken side by side
        paired = student["timing"]["baseline_latency_ms"][batch]["p50"]
        expected = paired / student["latency_ms"][batch]["p50"]
        assert student["faster_by"][batch] == pytest.approx(expected, rel=1e-2, abs=1e-3)


def test_report_files_are_written(run_dir, doc):
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# schema")
    assert "| teacher | train | torch |" in md and "| student | narrow | torch |" in md
    assert load_report(run_dir).to_dict() == doc


def test_table_shows_every_stage(run_dir):
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(render_table(load_report(run_dir)))
    text = console.export_text()
    assert "teacher" in text and "student" in text and "torch" in text


def test_load_report_errors(tmp_path):
    with pytest.raises(KDCompressError, match=r"no report in .*report\.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("not json at all")
    with pytest.raises(KDCompressError, match=r"report\.json is not a kdcompress report"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text('{"stages": []}')
    with pytest.raises(KDCompressError, match="is not a kdcompress report"):
        load_report(tmp_path)


# -- what did it buy: flags on synthetic rows -----------------------------------------------


def row(name, *, inputs=(), function="user.stage", params=1000, size=4000, macs=10_000,
        b64=10.0, b1=1.0, fmt="torch", role="transform", val=0.9, acc=0.9):
    return StageRow(name=name, function=function, inputs=list(inputs), format=fmt,
                    params=params, size_bytes=size, macs=macs,
                    latency_ms={"batch_1": {"p50": b1, "p90": b1},
                                "batch_64": {"p50": b64, "p90": b64}},
                    engine="torch", accuracy=acc, val_accuracy=val, seconds=1.0, role=role)


@pytest.fixture
def report() -> Report:
    rep = Report(pipeline="flags", baseline="teacher")
    rep.add(row("teacher"))
    return rep


def test_fewer_params_without_speedup_is_flagged(report):
    report.add(row("pruned", inputs=["teacher"], params=500, macs=None, size=2000, b64=10.0))
    (flag,) = report.row("pruned").flags
    assert "parameters fell 50%" in flag and "improved only 0.0%" in flag


def test_fewer_macs_without_speedup_is_flagged(report):
    report.add(row("pruned", inputs=["teacher"], params=500, macs=4000, size=2000, b64=9.9))
    (flag,) = report.row("pruned").flags
    assert flag.startswith("MACs fell 60%")


def test_compression_that_paid_off_is_not_flagged(report):
    report.add(row("pruned", inputs=["teacher"], params=500, macs=5000, size=2000, b64=5.0))
    assert report.row("pruned").flags == []
    assert report.row("pruned").smaller_by == 2.0
    assert report.row("pruned").faster_by == {"batch_1": 1.0, "batch_64": 2.0}


def test_smaller_model_not_smaller_on_disk_is_flagged(report):
    report.add(row("tt", inputs=["teacher"], params=800, size=4100, b64=5.0))
    assert any("size on disk did not drop" in f for f in report.row("tt").flags)


def test_quantized_model_not_faster_than_its_parent_is_flagged(report):
    report.add(row("fp32", inputs=["teacher"], fmt="onnx", b64=8.0))
    report.add(row("int8", inputs=["fp32"], function="kdcompress.stages.quantize.quantize_onnx",
                   role="quantize", fmt="onnx", size=1000, b64=12.0))
    flags = report.row("int8").flags
    assert any("int8 is not faster than its fp32 parent" in f and "0.67x" in f for f in flags)
    report.add(row("int8", inputs=["fp32"], function="kdcompress.stages.quantize.quantize_onnx",
                   role="quantize", fmt="onnx", size=1000, b64=4.0))
    assert report.row("int8").flags == []
    assert [r.name for r in report.stages] == ["teacher", "fp32", "int8"]


def test_int8_slower_than_its_parent_on_cuda_is_flagged(report):
    """CUDA latencies are timed apart, so int8 is flagged only when slower by 10% or more at
    every batch size; the CPU figures (int8 faster there) do not hide it."""
    def cuda(b1, b64):
        return {"batch_1": {"p50": b1, "p90": b1}, "batch_64": {"p50": b64, "p90": b64}}

    fp32 = row("fp32", inputs=["teacher"], fmt="onnx", b64=8.0)
    fp32.latency_ms_cuda = cuda(0.2075, 0.2852)
    report.add(fp32)
    int8 = row("int8", inputs=["fp32"], function="kdcompress.stages.quantize.quantize_onnx",
               role="quantize", fmt="onnx", size=1000, b64=4.0)
    int8.latency_ms_cuda = cuda(0.3211, 0.3787)  # the H200 run's figures
    report.add(int8)
    (flag,) = report.row("int8").flags
    assert flag.startswith("on CUDA, int8 is slower than its fp32 parent")
    assert "batch 1 0.321 vs 0.207 ms" in flag and "batch 64 0.379 vs 0.285 ms" in flag
    int8.latency_ms_cuda = cuda(0.3211, 0.30)  # 5% slower at batch 64: within timing noise
    report.add(int8)
    assert report.row("int8").flags == []
    int8.latency_ms_cuda = None  # a CPU run
    report.add(int8)
    assert report.row("int8").flags == []


def test_flags_and_failure_reach_the_markdown(report, tmp_path):
    report.add(row("pruned", inputs=["teacher"], params=500, macs=None, size=2000))
    report.fail("int8", "kdcompress.stages.quantize.quantize_onnx", "ValueError: no calib", 0.5)
    report.save(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## pruned" in md and "parameters fell 50%" in md
    assert "## FAILED: int8" in md and "ValueError: no calib" in md
    assert load_report(tmp_path).failed["name"] == "int8"


def test_accuracy_lost_against_the_input_is_flagged_with_the_knob(report):
    report.add(row("pruned", inputs=["teacher"], params=500, macs=5000, size=2000, b64=5.0,
                   role="prune", val=0.87, acc=0.95))
    (flag,) = report.row("pruned").flags
    assert "validation accuracy fell 3.0 points below 'teacher'" in flag
    assert "recovery_epochs" in flag
    report.add(row("pruned", inputs=["teacher"], params=500, macs=5000, size=2000, b64=5.0,
                   role="prune", val=0.885, acc=0.5))  # test accuracy never decides
    assert report.row("pruned").flags == []


def test_report_json_is_strict_json(tmp_path):
    rep = Report(pipeline="nan", baseline="teacher")
    r = row("teacher")
    r.details = {"final_loss": float("nan"), "inf": float("inf")}
    rep.add(r)
    rep.save(tmp_path, plot_png=False)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    assert doc["stages"][0]["details"] == {"final_loss": None, "inf": None}
