"""Run folders a user can trust: tampering, hostile recipes, paths leading out, locks, disks.

Each test runs tests/pipelines/trust.py (a model the file builds itself -> a user stage -> a
user stage -> export_onnx), then does to its run folder what a careless or hostile user could.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdcompress.cli import load_pipeline, main
from kdcompress.errors import RunFailed, RunFolderLocked, StoreError
from kdcompress.progress import Progress
from kdcompress.store import file_sha256

ROOT = Path(__file__).resolve().parent.parent
TRUST = Path(__file__).resolve().parent / "pipelines" / "trust.py"


class Recorder(Progress):
    """Keeps the warnings a run emits."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, name: str, message: str) -> None:
        self.warnings.append(f"{name}: {message}")


@pytest.fixture
def go(tmp_path, fast_measure):
    """Run trust.py into tmp_path/run; return (report, warnings)."""

    def run(**kwargs):
        recorder = Recorder()
        kwargs.setdefault("out", tmp_path / "run")
        report = load_pipeline(TRUST).run(measure=fast_measure, plot=False, progress=recorder,
                                          **kwargs)
        return report, recorder.warnings

    return run


def cached(report) -> dict[str, bool]:
    return {r.name: r.cached for r in report.stages}


def stage(tmp_path: Path, name: str) -> Path:
    return tmp_path / "run" / "stages" / name


def rewrite_meta(folder: Path, **changes) -> None:
    """Change meta.json the way a careful attacker would: checksums recomputed to match."""
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    meta["files"] = {f: file_sha256(folder / f) for f in meta["files"] if (folder / f).is_file()}
    from kdcompress.store import _digest

    meta["digest"] = _digest(meta["files"])
    (folder / "meta.json").write_text(json.dumps(meta))


def test_a_user_model_built_in_the_file_is_cached_and_reproducible(go):
    first, _ = go()
    second, warnings = go()
    assert cached(second) == {"base": True, "moved": True, "fp32": True}
    assert [(r.accuracy, r.val_accuracy, r.params, r.size_bytes) for r in first.stages] == \
           [(r.accuracy, r.val_accuracy, r.params, r.size_bytes) for r in second.stages]
    assert warnings == []


def test_edited_weights_are_recomputed_with_everything_downstream(go, tmp_path):
    first, _ = go()
    weights = next(stage(tmp_path, "base").glob("weights.*"))
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes inf: still parses, wrong model
    weights.write_bytes(bytes(data))
    report, warnings = go()
    assert any(f"stages/base/{weights.name} changed since it was written: recomputing base" in w
               for w in warnings), warnings
    assert cached(report) == {"base": False, "moved": False, "fp32": False}
    assert report.row("fp32").accuracy == first.row("fp32").accuracy


def test_a_truncated_weights_file_is_recomputed_not_fatal(go, tmp_path):
    go()
    weights = next(stage(tmp_path, "moved").glob("weights.*"))
    weights.write_bytes(weights.read_bytes()[:100])
    report, warnings = go()
    assert any("stages/moved" in w and "recomputing moved" in w for w in warnings), warnings
    assert cached(report) == {"base": True, "moved": False, "fp32": False}


def test_a_flipped_bit_in_the_onnx_file_is_recomputed(go, tmp_path):
    first, _ = go()
    onnx_file = stage(tmp_path, "fp32") / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x10
    onnx_file.write_bytes(bytes(data))
    report, warnings = go()
    assert any("stages/fp32/model.onnx changed since it was written: recomputing fp32" in w
               for w in warnings), warnings
    assert cached(report) == {"base": True, "moved": True, "fp32": False}
    assert report.row("fp32").accuracy == first.row("fp32").accuracy


def test_a_deleted_file_is_recomputed(go, tmp_path):
    go()
    (stage(tmp_path, "moved") / "module.json").unlink()
    report, warnings = go()
    assert any("stages/moved/module.json is missing" in w for w in warnings), warnings
    assert cached(report)["moved"] is False


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_files_leading_out_of_the_stage_folder_are_refused(go, tmp_path, where):
    first, _ = go()
    folder = stage(tmp_path, "fp32")
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((folder / "model.onnx").read_bytes())
    if where == "absolute":
        rewrite_meta(folder, file=str(outside))
        meta = json.loads((folder / "meta.json").read_text())
        meta["files"][str(outside)] = file_sha256(outside)
        (folder / "meta.json").write_text(json.dumps(meta))
    elif where == "dotdot":
        (folder.parent / "evil.onnx").write_bytes(outside.read_bytes())
        meta = json.loads((folder / "meta.json").read_text())
        meta["file"] = "../evil.onnx"
        meta["files"]["../evil.onnx"] = file_sha256(outside)
        (folder / "meta.json").write_text(json.dumps(meta))
    else:  # same bytes, so the checksum matches: the link itself must be refused
        (folder / "model.onnx").unlink()
        (folder / "model.onnx").symlink_to(outside)
    report, warnings = go()
    assert cached(report)["fp32"] is False, warnings
    assert any("stages/fp32" in w and ("not a plain file name" in w or "leading outside" in w
                                       or "does not match" in w) for w in warnings), warnings
    assert not (folder / "model.onnx").is_symlink()
    assert report.row("fp32").accuracy == first.row("fp32").accuracy


@pytest.mark.slow
def test_a_hostile_recipe_never_imports_its_module(tmp_path):
    """module.json names a class in a .py file planted in the working directory, and the
    attacker fixes the checksums: the recipe is refused, the payload never runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "kdcompress", "run", str(TRUST), "--out", "run"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    marker = tmp_path / "PAYLOAD_RAN"
    (tmp_path / "evil_payload.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('pwned')\n"
        "import torch\n"
        "class Evil(torch.nn.Linear):\n    pass\n")
    folder = tmp_path / "run" / "stages" / "base"
    recipe = json.loads((folder / "module.json").read_text())
    recipe["children"]["fc"]["class"] = "evil_payload:Evil"
    (folder / "module.json").write_text(json.dumps(recipe))
    rewrite_meta(folder)
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    out = " ".join((second.stdout + second.stderr).split())
    assert second.returncode == 0, out
    assert not marker.exists(), "the payload module was imported"
    assert "evil_payload:Evil" in out and "module.json" in out and "recomputing base" in out
    assert json.loads((folder / "module.json").read_text())["children"]["fc"]["class"] \
        == "torch.nn.modules.linear:Linear"


@pytest.mark.slow
def test_a_second_run_waits_for_the_lock_or_exits_2(tmp_path):
    """Run A is frozen (SIGSTOP) inside a stage; run B must not touch its temporary folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "KDC_TEST_PAUSE": "2",
           "KDC_TEST_INSIDE": str(tmp_path / "inside")}
    cmd = [sys.executable, "-m", "kdcompress", "run", str(TRUST), "--out", str(tmp_path / "run")]
    a = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "inside").exists():
            assert a.poll() is None and time.time() < deadline, a.communicate()
            time.sleep(0.05)
        os.kill(a.pid, signal.SIGSTOP)
        tmp = list((tmp_path / "run" / "stages").glob(".tmp-moved-*"))
        assert tmp, "run A is not inside its stage"
        b = subprocess.run(cmd + ["--no-wait"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        assert b.returncode == 2, b.stdout + b.stderr
        assert f"in use by PID {a.pid}" in " ".join(b.stderr.split())
        waiting = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert waiting.poll() is None  # still waiting for A
        assert all(t.exists() for t in tmp)  # nobody cleaned up A's stage in progress
        os.kill(a.pid, signal.SIGCONT)
        out_a, err_a = a.communicate(timeout=120)
        assert a.returncode == 0, out_a + err_a
        out_w, err_w = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, out_w + err_w
        assert f"in use by PID {a.pid}" in " ".join((out_w + err_w).split())
        assert "(cached)" in out_w
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()


def test_stale_temporary_folders_of_dead_runs_are_removed(go, tmp_path):
    stages = tmp_path / "run" / "stages"
    stages.mkdir(parents=True)
    dead = stages / ".tmp-base-999999999"
    dead.mkdir()
    alive = stages / f".tmp-base-{os.getppid()}"  # a live process that is not this run
    alive.mkdir()
    go()
    assert not dead.exists() and alive.exists()


def test_a_locked_folder_with_no_wait_raises_before_anything_runs(go, tmp_path):
    import filelock

    (tmp_path / "run").mkdir()
    with filelock.FileLock(str(tmp_path / "run" / ".lock")):
        with pytest.raises(RunFolderLocked, match=r"run folder .* is in use by"):
            go(wait=False)
    assert not (tmp_path / "run" / "stages" / "base").exists()


def test_out_pointing_at_a_file_is_one_line_exit_1(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert main(["run", str(TRUST), "--out", str(target)]) == 1
    err = capsys.readouterr().err
    assert "afile is a file, not a folder" in " ".join(err.split())
    assert "Traceback" not in err


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'})")


@pytest.fixture
def mounted(tmp_path):
    mounts: list[Path] = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, options)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_read_only_folder_is_one_line_exit_1(mounted, capsys):
    folder = mounted("ro", "ro,size=1m")
    assert main(["run", str(TRUST), "--out", str(folder / "run")]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{folder}/run" in err and "Read-only file system" in err
    assert "Traceback" not in err


def test_a_full_disk_fails_the_stage_in_one_line_and_leaves_no_temporary_files(mounted, go):
    folder = mounted("full", "size=12k")
    with pytest.raises((RunFailed, StoreError), match="No space left on device") as info:
        go(out=folder / "run")
    assert "\n" not in str(info.value)
    leftovers = [p for p in (folder / "run").rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_report_reads_while_a_run_holds_the_lock(go, tmp_path, capsys):
    import filelock

    go()
    with filelock.FileLock(str(tmp_path / "run" / ".lock")):
        assert main(["report", str(tmp_path / "run")]) == 0
    assert "moved" in capsys.readouterr().out


def test_a_diverging_teacher_stops_is_named_and_is_not_cached(tiny_task, fast_measure, tmp_path):
    from kdcompress import Pipeline, models
    from kdcompress.errors import DivergedError
    from kdcompress.stages import train

    pipeline = Pipeline("diverge", data=tiny_task)
    pipeline.stage(train, out="teacher", model=models.cnn(width=4, hidden=8), epochs=3, lr=1e6)
    with pytest.raises(RunFailed, match=r"stage 'teacher' \(train\) failed: DivergedError: "
                                        r".*diverged at epoch \d/3, step \d+") as info:
        pipeline.run(out=tmp_path / "run", measure=fast_measure, plot=False)
    assert isinstance(info.value.__cause__, DivergedError)
    assert "lr" in str(info.value)
    assert not (tmp_path / "run" / "stages" / "teacher").exists()
    assert list((tmp_path / "run" / "stages").glob(".tmp-*")) == []
    text = (tmp_path / "run" / "report.json").read_text()
    assert "NaN" not in text and json.loads(text)["failed"]["name"] == "teacher"
