"""Per-layer budgets in a search: ``budget=ks.float(...)`` and ``allocation=ks.choice(...)``
are checked when declared and searched like any other stage constant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcompress import Pipeline, models
from kdcompress import search as ks
from kdcompress.cli import load_pipeline
from kdcompress.errors import PipelineError
from kdcompress.options import RunOptions
from kdcompress.search.study import Search, SearchConfig
from kdcompress.stages import decompose_tt, prune, train

PIPELINES = Path(__file__).resolve().parent / "pipelines"


def test_budget_and_allocation_candidates_are_checked_when_declared(digits_task):
    pipeline = Pipeline("checks", data=digits_task)
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    with pytest.raises(PipelineError, match=r"budget=ks.float\(0.5, 2.5.* can take 2.5, but "
                                            r"budget is a fraction of the model"):
        pipeline.stage(decompose_tt, out="student", model=teacher,
                       budget=ks.float(0.5, 2.5, step=1.0))
    with pytest.raises(PipelineError, match="can take 'sensitive', but allocation must be one "
                                            "of .* Did you mean 'sensitivity'"):
        pipeline.stage(prune, out="pruned", model=teacher,
                       allocation=ks.choice(["uniform", "sensitive"]))
    student = pipeline.stage(decompose_tt, out="student", model=teacher,
                             budget=ks.float(0.2, 0.6, default=0.4),
                             budget_by=ks.choice(["params", "macs"], default="params"))
    pipeline.stage(prune, out="pruned", model=student,
                   allocation=ks.choice(["uniform", "sensitivity"], default="uniform"))
    assert list(pipeline.params) == ["student.budget", "student.budget_by", "pruned.allocation"]


@pytest.mark.slow
def test_a_search_over_budget_and_allocation_runs_each_value(tmp_path, fast_measure):
    run = tmp_path / "run"
    search = Search(load_pipeline(PIPELINES / "budget_search.py"),
                    SearchConfig(objectives=("size",), max_drop=100.0, startup_trials=4),
                    RunOptions(out=run, measure=fast_measure))
    result = search.run(trials=4)
    done = [t for t in result.trials if t.state == "complete" and not t.note.startswith("same")]
    seen = {(t.values["student.budget"], t.values["pruned.allocation"]) for t in done}
    assert len(seen) >= 3 and {a for _, a in seen} == {"uniform", "sensitivity"}
    budgets = []  # every decomposed student met its budget, and says so in its details
    for meta in (run / "stages" / "student").glob("*/meta.json"):
        budget = json.loads(meta.read_text())["details"]["budget"]
        assert budget["met"] and budget["total_after"] <= budget["target"]
        budgets.append(budget["budget"])
    assert sorted(budgets) == sorted({b for b, _ in seen})
    allocations = []
    for report in (run / "search" / "trials").glob("*/report.json"):
        rows = {r["name"]: r for r in json.loads(report.read_text())["stages"]}
        allocations.append(rows["pruned"]["details"].get("allocation", {}).get("method"))
    assert {"sensitivity", None} <= set(allocations)
