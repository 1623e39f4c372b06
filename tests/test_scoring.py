"""Pipeline metrics: torchmetrics' numbers against scikit-learn, declaration checks, the report."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score

from kdcompress import Pipeline, models
from kdcompress.errors import PipelineError
from kdcompress.fingerprint import fingerprint_constant
from kdcompress.report import Report, StageRow, load_report, table_cells
from kdcompress.scoring import Metric, score
from kdcompress.stages import train


def _logits(n=200, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, c)
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_builtin_metrics_match_sklearn(seed):
    logits, labels = _logits(seed=seed)
    y, p = labels.numpy(), logits.argmax(1).numpy()
    assert score("accuracy", logits, labels) == pytest.approx(accuracy_score(y, p), abs=1e-6)
    assert score("top5", logits, labels) == pytest.approx(
        top_k_accuracy_score(y, logits.numpy(), k=5, labels=np.arange(7)), abs=1e-6)
    assert score("macro_f1", logits, labels) == pytest.approx(
        f1_score(y, p, average="macro"), abs=1e-6)


def test_macro_f1_differs_from_accuracy_on_imbalanced_classes():
    labels = torch.tensor([0] * 18 + [1, 2])
    logits = torch.nn.functional.one_hot(torch.zeros(20).long(), 3).float()  # always class 0
    assert score("accuracy", logits, labels) == pytest.approx(0.9)
    assert score("macro_f1", logits, labels) == pytest.approx(
        f1_score(labels.numpy(), np.zeros(20), average="macro"), abs=1e-6)


def test_bad_metric_names_and_callables_fail_at_declaration(tiny_task):
    with pytest.raises(PipelineError, match="metric 'macro-f1' is not known. Did you mean "
                                            "'macro_f1'"):
        Pipeline("p", data=tiny_task, metric="macro-f1")
    with pytest.raises(PipelineError, match="but got int 5"):
        Pipeline("p", data=tiny_task, metric=5)

    def crashes(logits, labels):
        return logits.argmax(1).eq(labels).mean()  # long tensor: mean() raises

    with pytest.raises(PipelineError, match="metric 'crashes' failed on a tiny input.*"
                                            "RuntimeError"):
        Pipeline("p", data=tiny_task, metric=crashes)
    with pytest.raises(PipelineError, match="metric '<lambda>' returned 100.0"):
        Pipeline("p", data=tiny_task, metric=lambda lg, y: 100.0)  # percent, not fraction


def test_top5_needs_five_classes():
    from kdcompress import data
    x, y = torch.randn(40, 4), torch.arange(40) % 3
    three = data.from_tensors(x, y, x, y, name="three")
    with pytest.raises(PipelineError, match="'top5' needs at least 5 classes, but the data has 3"):
        Pipeline("p", data=three, metric="top5")


def test_metric_fingerprint_names_builtins_and_hashes_callables():
    def balanced(logits, labels):
        return score("macro_f1", logits, labels)

    assert fingerprint_constant(Metric.resolve("top5")) == {"metric": "top5"}
    assert fingerprint_constant(Metric.resolve(balanced))["metric"] == "balanced"
    assert fingerprint_constant(Metric.resolve("top5")) != \
        fingerprint_constant(Metric.resolve("accuracy"))


def test_a_stage_declaring_metric_receives_it_and_is_refingerprinted(tiny_task, tmp_path,
                                                                    fast_measure):
    from kdcompress.options import RunOptions
    from kdcompress.runner import Runner

    seen = []

    def pick(model, *, metric, data):
        seen.append(metric.name)
        return model

    def build(metric):
        p = Pipeline("m", data=tiny_task, metric=metric)
        t = p.stage(train, out="teacher", model=models.mlp(hidden=(8,)), epochs=1)
        p.stage(pick, out="picked", model=t)
        return p

    fps = {}
    for metric in ("accuracy", "macro_f1"):
        runner = Runner(build(metric), RunOptions(out=tmp_path, measure=fast_measure, plot=False))
        runner.run()
        fps[metric] = dict(runner.fingerprints)
    assert seen == ["accuracy", "macro_f1"]
    assert fps["accuracy"]["teacher"] == fps["macro_f1"]["teacher"]  # training ignores it
    assert fps["accuracy"]["picked"] != fps["macro_f1"]["picked"]
    with pytest.raises(PipelineError, match="'metric' is supplied by the pipeline"):
        Pipeline("x", data=tiny_task).stage(pick, out="picked", model=models.mlp(),
                                            metric="top5")


def test_report_shows_the_metric_by_name_and_reads_old_reports(tmp_path):
    def row(name, **kw):
        return StageRow(name=name, function=f"f.{name}", inputs=[], format="torch", params=10,
                        size_bytes=100, macs=None, latency_ms={"batch_1": {"p50": 1, "p90": 1}},
                        engine="torch", **kw)
    rep = Report(pipeline="p", baseline="t", metric="macro_f1")
    rep.add(row("t", accuracy=0.9, val_accuracy=0.91, score=0.6, val_score=0.62))
    header, cells = table_cells(rep)
    assert header[9:12] == ["val macro_f1", "macro_f1", "accuracy"]
    assert cells[0][9:12] == ["62.00%", "60.00%", "90.00%"]
    rep.save(tmp_path, plot_png=False)
    assert "*val macro_f1*" in (tmp_path / "report.md").read_text()
    assert load_report(tmp_path).stages[0].score == 0.6
    # a report.json written before metrics had names: accuracy is its score
    doc = json.loads((tmp_path / "report.json").read_text())
    del doc["metric"]
    for r in doc["stages"]:
        del r["score"], r["val_score"]
    (tmp_path / "report.json").write_text(json.dumps(doc))
    old = load_report(tmp_path)
    assert old.metric == "accuracy" and old.stages[0].val_score == 0.91
