"""The run folder a search uses: one folder per stage fingerprint, so versions of a stage live
side by side; a `kdcompress run` folder is adopted with its cache; the name layout is untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdcompress import Pipeline, models
from kdcompress import search as ks
from kdcompress.fingerprint_store import is_fingerprint_layout
from kdcompress.stages import train

CALLS: list[str] = []


def scale(model: nn.Module, *, factor: float = 1.0, ctx=None) -> nn.Module:
    CALLS.append(f"{ctx.name}:{factor}")
    with torch.no_grad():
        model.classifier.fc2.weight.mul_(factor)
    return model


@pytest.fixture(autouse=True)
def _clean():
    CALLS.clear()
    yield
    CALLS.clear()


def declare(task, factor) -> Pipeline:
    pipeline = Pipeline("versions", data=task, seed=0)
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=16),
                             epochs=1)
    pipeline.stage(scale, out="scaled", model=teacher, factor=factor)
    return pipeline


def versions(run: Path, name: str) -> list[str]:
    return sorted(p.name for p in (run / "stages" / name).iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def test_versions_of_a_stage_stay_side_by_side(tiny_task, fast_measure, tmp_path):
    pipeline = declare(tiny_task, ks.choice([1.0, 2.0, 3.0], default=1.0))
    run = tmp_path / "run"

    def go(factor):
        report = pipeline.concrete({"scaled.factor": factor}).run(
            out=run, by_fingerprint=True, measure=fast_measure, plot=False)
        return {r.name: r.cached for r in report.stages}

    assert go(2.0) == {"teacher": False, "scaled": False}
    assert go(3.0) == {"teacher": True, "scaled": False}
    # rank 2's version was not replaced by rank 3's: it loads, nothing runs
    assert go(2.0) == {"teacher": True, "scaled": True}
    assert CALLS == ["scaled:2.0", "scaled:3.0"]
    assert len(versions(run, "scaled")) == 2 and len(versions(run, "teacher")) == 1
    assert is_fingerprint_layout(run)
    for version in versions(run, "scaled"):
        meta = json.loads((run / "stages" / "scaled" / version / "meta.json").read_text())
        assert meta["fingerprint"] == version


def test_a_run_folder_is_adopted_with_its_cache_and_keeps_the_new_layout(tiny_task, fast_measure,
                                                                         tmp_path):
    run = tmp_path / "run"
    plain = declare(tiny_task, 2.0)
    assert [r.cached for r in plain.run(out=run, measure=fast_measure, plot=False).stages] == \
        [False, False]
    assert (run / "stages" / "scaled" / "meta.json").is_file()  # kdcompress run's layout
    report = plain.run(out=run, by_fingerprint=True, measure=fast_measure, plot=False)
    assert [r.cached for r in report.stages] == [True, True]  # moved, not recomputed
    assert not (run / "stages" / "scaled" / "meta.json").exists()
    # a later run without the option keeps the folder's layout: another factor is a new version
    other = declare(tiny_task, 3.0).run(out=run, measure=fast_measure, plot=False)
    assert [r.cached for r in other.stages] == [True, False]
    assert len(versions(run, "scaled")) == 2
    assert CALLS == ["scaled:2.0", "scaled:3.0"]


def test_a_tampered_version_is_recomputed_with_a_warning_naming_it(tiny_task, fast_measure,
                                                                  tmp_path):
    from kdcompress.progress import Progress

    run = tmp_path / "run"
    pipeline = declare(tiny_task, 2.0)
    pipeline.run(out=run, by_fingerprint=True, measure=fast_measure, plot=False)
    (version,) = versions(run, "scaled")
    weights = next(p for p in (run / "stages" / "scaled" / version).iterdir()
                   if p.name.startswith("weights"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    warnings: list[str] = []

    class Warnings(Progress):
        def warn(self, name: str, message: str) -> None:
            warnings.append(message)

    report = pipeline.run(out=run, by_fingerprint=True, measure=fast_measure, plot=False,
                          progress=Warnings())
    assert [r.cached for r in report.stages] == [True, False]
    assert any(f"stages/scaled/{version}/{weights.name} changed since it was written" in w
               for w in warnings), warnings


def test_kdcompress_run_layout_is_unchanged(tiny_task, fast_measure, tmp_path):
    run = tmp_path / "run"
    declare(tiny_task, 2.0).run(out=run, measure=fast_measure, plot=False)
    declare(tiny_task, 3.0).run(out=run, measure=fast_measure, plot=False)
    assert not is_fingerprint_layout(run)
    assert sorted(p.name for p in (run / "stages").iterdir()) == ["scaled", "teacher"]
    meta = json.loads((run / "stages" / "scaled" / "meta.json").read_text())
    assert meta["name"] == "scaled"  # one folder per name, the latest version
    assert CALLS == ["scaled:2.0", "scaled:3.0"]
