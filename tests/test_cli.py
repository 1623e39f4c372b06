"""The kdcompress command: exit codes, errors before any training, the report and the graph."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdcompress.cli import main

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = Path(__file__).resolve().parent / "pipelines"


def pipeline_file(name: str) -> str:
    return str(PIPELINES / name)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One real `python -m kdcompress run` of tests/pipelines/tiny.py."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "kdcompress", "run", pipeline_file("tiny.py"),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "teacher" in proc.stdout and "student" in proc.stdout
    return out


def load(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_run_writes_every_artifact_and_the_report(tiny_run):
    for name in ("report.json", "report.md", "report.png"):
        assert (tiny_run / name).is_file()
    for stage in ("teacher", "student"):
        folder = tiny_run / "stages" / stage
        files = {p.name for p in folder.iterdir()}
        assert {"meta.json", "module.json", "weights.safetensors"} <= files
    doc = load(tiny_run)
    assert doc["pipeline"] == "tiny"
    assert [r["name"] for r in doc["stages"]] == ["teacher", "student"]
    assert [r["cached"] for r in doc["stages"]] == [False, False]
    assert doc["failed"] is None


@pytest.mark.slow
def test_second_run_is_all_cached(tiny_run, capsys):
    assert main(["run", pipeline_file("tiny.py"), "--out", str(tiny_run)]) == 0
    assert [r["cached"] for r in load(tiny_run)["stages"]] == [True, True]
    assert "(cached)" in capsys.readouterr().out


def test_until_and_fresh(tmp_path):
    out = tmp_path / "until"
    assert main(["run", pipeline_file("tiny.py"), "--out", str(out), "--until", "teacher"]) == 0
    assert [r["name"] for r in load(out)["stages"]] == ["teacher"]
    assert not (out / "stages" / "student").exists()
    assert main(["run", pipeline_file("tiny.py"), "--out", str(out), "--until", "teacher"]) == 0
    assert load(out)["stages"][0]["cached"] is True
    assert main(["run", pipeline_file("tiny.py"), "--out", str(out), "--until", "teacher",
                 "--fresh"]) == 0
    assert load(out)["stages"][0]["cached"] is False


@pytest.mark.slow
def test_report_and_graph_print_the_stages(tiny_run, capsys):
    assert main(["report", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out and "torch" in out
    assert main(["report", str(tiny_run), "--markdown"]) == 0
    assert "| teacher | train | torch |" in capsys.readouterr().out


def test_graph(tmp_path, capsys):
    image = tmp_path / "dag.png"
    assert main(["graph", pipeline_file("built.py"), "--image", str(image)]) == 0
    out = capsys.readouterr().out
    assert "built (3 stages)" in out
    for line in ("teacher = train(", "tuned = train(model=<teacher>", "other = train("):
        assert line in out
    assert out.index("tuned = ") < out.index("other = ")
    assert image.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("args", "message"), [
    (["syntax_error.py"], r"syntax_error\.py:4: syntax error: .return. outside function"),
    (["no_pipeline.py"], r"no_pipeline\.py defines no 'pipeline'"),
    (["bad_kwargs.py"], r"stage 'student' \(train\).*Did you mean 'epochs'\?"),
    (["unknown_input.py"], r"stage 'student' reads 'teachr', which no stage produces\. "
                           r"Did you mean 'teacher'\?"),
    (["onnx_into_torch.py"], r"stage 'tuned' \(train\) takes a torch model as model=, but "
                             r"'fp32' is a onnx model"),
    (["missing.py"], r"pipeline file .*missing\.py does not exist"),
    (["tiny.py", "--data", "cifar"], r"unknown data set 'cifar'"),
    (["tiny.py", "--data", "mnist:/nowhere/at/all"], r"MNIST folder /nowhere/at/all does not "
                                                     r"exist"),
    (["tiny.py", "--until", "studnet"], r"--until 'studnet' is not a stage of 'tiny'\. "
                                        r"Did you mean 'student'\?"),
    (["tiny.py", "--threads", "0"], r"--threads must be >= 1"),
])
def test_bad_usage_exits_2_before_any_training(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", pipeline_file(args[0]), *args[1:], "--out", str(out)])
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert code == 2, err
    assert re.search(message, err), err
    assert not (out / "stages").exists()


def test_only_without_cached_inputs_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", pipeline_file("tiny.py"), "--only", "student", "--out", str(out)]) == 2
    assert "--only student needs 'teacher'" in " ".join(capsys.readouterr().err.split())
    assert not any((out / "stages").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", pipeline_file("tiny.py"), "--device", "cuda", "--out", str(out)]) == 2
    assert "PyTorch sees no CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_argparse_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["run"]) == 2
    assert main(["--help"]) == 0


def test_failing_stage_exits_1_and_the_report_names_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", pipeline_file("failing_stage.py"), "--out", str(out)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "stage 'exploded' (explode) failed: ValueError: ratio 2.0 is too large" in err
    doc = load(out)
    assert [r["name"] for r in doc["stages"]] == ["teacher"]
    assert doc["failed"]["name"] == "exploded"
    assert "ratio 2.0 is too large" in doc["failed"]["error"]
    assert "FAILED: exploded" in (out / "report.md").read_text()
    assert main(["report", str(out)]) == 1
    assert "exploded" in capsys.readouterr().out


def test_report_of_a_missing_run_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no report in" in capsys.readouterr().err


def test_unparsable_file_exits_2_naming_the_line(tmp_path, capsys):
    path = tmp_path / "unparsable.py"
    path.write_text('from kdcompress import Pipeline\n\npipeline = Pipeline("broken"\n')
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "unparsable.py:3: syntax error" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


def test_swapped_data_gets_its_own_default_run_folder():
    from kdcompress.options import default_run_dir

    assert default_run_dir("tt_distill_quant") == Path("runs") / "tt_distill_quant"
    assert default_run_dir("tt_distill_quant", "mnist") == Path("runs") / "tt_distill_quant-mnist"


def test_bad_train_limit_is_a_usage_error(tmp_path):
    code = main(["run", str(PIPELINES / "tiny.py"), "--out", str(tmp_path / "r"),
                 "--train-limit", "0"])
    assert code == 2
    assert not (tmp_path / "r" / "stages").exists()
