"""A search end to end on digits: trials share the cache, the test split stays unread until the
front is measured, the best pipeline files run from the cache, pruning stops a trial."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from kdcompress import Pipeline, data, models
from kdcompress import search as ks
from kdcompress.cli import load_pipeline, main
from kdcompress.data import Task
from kdcompress.options import RunOptions
from kdcompress.search.bestfile import best_file_text
from kdcompress.search.front import pareto
from kdcompress.search.live import SearchProgress
from kdcompress.search.study import Search, SearchConfig
from kdcompress.stages import train

PIPELINES = Path(__file__).resolve().parent / "pipelines"


class ReadTooEarly(Exception):
    """Raised by the guarded test split when something reads it during the search."""


class GuardedSplit(Dataset):
    """A split that raises while ``locked`` and records every attempt to read it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.locked = True
        self.attempts: list[str] = []

    def __len__(self) -> int:
        if self.locked:
            self.attempts.append("len")
            raise ReadTooEarly("the test split was read before the search ended")
        return len(self.y)

    def __getitem__(self, i: int):
        if self.locked:
            self.attempts.append(f"item {i}")
            raise ReadTooEarly("the test split was read before the search ended")
        return self.x[i], self.y[i]


class Unlock(SearchProgress):
    """Opens the test split when the search says its trials are over; records the order."""

    def __init__(self, split: GuardedSplit) -> None:
        self.split = split
        self.events: list[str] = []

    def trial_finished(self, trial) -> None:
        self.events.append(f"trial {trial.number} {trial.state}")

    def front_started(self, count: int) -> None:
        self.events.append("front")
        self.split.locked = False


@pytest.fixture(scope="module")
def searched(tmp_path_factory, fast_measure):
    """Six trials of tests/search/pipelines/tiny_search.py on digits whose test split raises
    until the front is measured."""
    digits = data.digits()
    x, y = digits.arrays("test")
    split = GuardedSplit(x, y)
    # the same images and labels as digits(), so the same fingerprint: the best files, which
    # load digits() themselves, find the search's stages
    task = Task(name="digits", train=digits.train, val=digits.val, test=split,
                num_classes=10, input_shape=digits.input_shape, fingerprint=digits.fingerprint)
    run = tmp_path_factory.mktemp("search") / "run"
    progress = Unlock(split)
    search = Search(load_pipeline(PIPELINES / "tiny_search.py"),
                    SearchConfig(objectives=("size", "latency"), max_drop=30.0,
                                 startup_trials=3),
                    RunOptions(out=run, data=task, measure=fast_measure), progress=progress)
    result = search.run(trials=6)
    return {"run": run, "result": result, "split": split, "progress": progress,
            "search": search}


def test_trials_share_the_cache_and_the_teacher_trains_once(searched):
    result = searched["result"]
    trials = result.trials
    distinct = [t for t in trials if not t.note.startswith("same values")]
    assert len(distinct) == 6 and all(t.state in ("complete", "pruned") for t in trials)
    assert len({tuple(t.values.items()) for t in distinct}) == 6
    assert trials[0].default and trials[0].values == {"student.rank": 2, "tuned.epochs": 1,
                                                      "tuned.lr": 0.002}
    ran = [s for t in trials for s in t.ran]
    assert ran.count("teacher") == 1
    assert sum("teacher" in t.cached for t in distinct) == 5  # every trial after the first
    # every distinct version of a stage was computed once, whatever trial needed it again
    run = searched["run"]
    for stage in ("teacher", "student", "tuned"):
        computed = sum(stage in t.ran for t in trials)
        stored = [p for p in (run / "stages" / stage).iterdir()
                  if p.is_dir() and not p.name.startswith(".")]
        assert computed == len(stored), stage
    assert result.stage_counts()[1] > 0


def test_the_test_split_is_read_only_after_the_last_trial(searched):
    split, events = searched["split"], searched["progress"].events
    assert events.index("front") == len(searched["result"].trials)  # after every trial
    assert events[-1] == "front"
    assert split.attempts == []  # no trial tried to read it (each attempt would have raised)
    trials_dir = searched["run"] / "search" / "trials"
    for report in trials_dir.glob("*/report.json"):
        rows = json.loads(report.read_text())["stages"]
        assert rows and all(r["accuracy"] is None and r["agreement"] is None for r in rows)
        assert all(r["val_accuracy"] is not None for r in rows)
    result = searched["result"]
    assert result.front and all(p.accuracy is not None for p in result.front)
    assert result.baseline_point["accuracy"] is not None


def test_the_front_is_the_pareto_set_of_trials_within_the_budget(searched):
    result = searched["result"]
    complete = [t for t in result.trials if t.state == "complete" and t.feasible]
    objectives = [t.objectives for t in complete]
    front = {complete[i].number for i in pareto(objectives, result.objectives,
                                                tolerance=searched["search"].config
                                                .latency_tolerance)}
    distinct = {p.trial for p in result.front}
    assert distinct <= front and distinct  # one point per value set
    for p in result.front:
        assert p.drop <= result.max_drop
        others = [t for t in complete if t.number not in distinct]
        assert not any(all(t.objectives[o] <= p.objectives[o] for o in result.objectives)
                       and any(t.objectives[o] < p.objectives[o] for o in result.objectives)
                       for t in others)
    assert set(result.best) == {"size", "latency"}
    best_size = min(result.front, key=lambda p: (p.objectives["size"], -p.val_accuracy))
    assert result.best["size"] == best_size.trial


def test_the_search_writes_its_files(searched):
    folder = searched["run"] / "search"
    doc = json.loads((folder / "frontier.json").read_text())
    assert doc["pending"] == 0 and len(doc["trials"]) == len(searched["result"].trials)
    assert doc["counts"] == searched["result"].counts()
    assert [p["trial"] for p in doc["front"]] == [p.trial for p in searched["result"].front]
    md = (folder / "frontier.md").read_text()
    assert "## Front (test split read after the search)" in md and "best size: trial" in md
    assert (folder / "frontier.png").stat().st_size > 10_000
    assert (folder / "study.db").is_file()
    for objective in ("size", "latency"):
        number = searched["result"].best[objective]
        point = next(p for p in searched["result"].front if p.trial == number)
        assert {f"best-{objective}.py", f"best-{objective}.onnx"} <= set(point.files)
        assert f"- best {objective}: trial {number}: `best-{objective}.py`, " \
               f"`best-{objective}.onnx`" in md
        onnx = folder / f"best-{objective}.onnx"
        assert onnx.stat().st_size > 0
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        x, y = data.digits().arrays("test")
        logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        point = next(p for p in searched["result"].front if objective in p.best_for)
        assert np.mean(logits.argmax(1) == y.numpy()) == pytest.approx(point.accuracy, abs=1e-6)


def test_a_best_file_runs_entirely_from_the_cache_with_the_same_rows(searched, capsys):
    run, result = searched["run"], searched["result"]
    best = result.best["size"]
    point = next(p for p in result.front if p.trial == best)
    path = run / "search" / "best-size.py"
    text = path.read_text()
    assert "ks.int" not in text and "ks.choice" not in text and "ks.float" not in text
    assert f"rank={point.values['student.rank']}" in text
    assert main(["run", str(path), "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert [r["cached"] for r in report["stages"]] == [True, True, True]
    tuned = report["stages"][-1]
    front_report = json.loads((run / "search" / "front" / f"{best:04d}" /
                               "report.json").read_text())
    measured = front_report["stages"][-1]
    for key in ("accuracy", "val_accuracy", "agreement", "size_bytes", "params", "macs"):
        assert tuned[key] == measured[key], key
    assert tuned["accuracy"] == point.accuracy
    # `kdcompress report RUN` shows the run's table and the search's front
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "search front" in out and "best for" in out and "tuned" in out


def test_a_resumed_search_with_other_settings_is_refused(searched):
    from kdcompress.errors import UsageError

    search = searched["search"]
    other = Search(search.pipeline, SearchConfig(objectives=("size",), max_drop=30.0),
                   search.options)
    with pytest.raises(UsageError, match="was made with other objectives: keep them to resume "
                                         "it, or start another study"):
        other.optimize(trials=1)


def test_best_file_keeps_the_listed_source_of_a_chosen_value(tmp_path):
    file = tmp_path / "p.py"
    file.write_text(
        "from kdcompress import Pipeline, models\n"
        "from kdcompress import search as ks\n"
        "from kdcompress.losses import CE, KD\n"
        "from kdcompress.stages import train, distill\n"
        "pipeline = Pipeline('p')\n"
        "t = pipeline.stage(train, out='t', model=models.cnn(width=8), epochs=1)\n"
        "s = pipeline.stage(distill, out='s', student=models.cnn(width=ks.choice([4, 8])),\n"
        "                   teacher=t, loss=ks.choice([KD(temperature=4) * 0.9 + CE() * 0.1,\n"
        "                                              CE()]),  # the loss\n"
        "                   epochs=ks.int(1, 3))\n")
    pipeline = load_pipeline(file)
    loss = pipeline.params["s.loss"].values[0]
    _, text = best_file_text(pipeline.params, {"s.student.width": 8, "s.loss": loss,
                                               "s.epochs": 2}, header=["chosen"])
    assert text.startswith("# chosen\n")
    assert ("student=models.cnn(width=8),\n                   teacher=t, "
            "loss=KD(temperature=4) * 0.9 + CE() * 0.1,  # the loss\n"
            "                   epochs=2)") in text
    written = tmp_path / "best.py"
    written.write_text(text)
    assert load_pipeline(written).params == {}


# -- pruning ----------------------------------------------------------------------------------

def shrink(model: nn.Module, *, factor: float = 1.0) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


def tune(model: nn.Module, *, epochs: int = 3, data=None, ctx=None) -> nn.Module:
    """Reports the validation accuracy of its input each epoch, as a training stage does."""
    x, y = data.arrays("val")
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    for epoch in range(1, epochs + 1):
        ctx.epoch_end(epoch, {"val_accuracy": acc, "loss": 1.0})
    return model


def test_a_trial_behind_every_trial_within_budget_is_pruned_and_not_cached(fast_measure,
                                                                          tmp_path):
    pipeline = Pipeline("pruning", data=data.digits(), seed=0)
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8, hidden=16),
                             epochs=2)
    shrunk = pipeline.stage(shrink, out="shrunk", model=teacher,
                            factor=ks.choice([1.0, 0.9, 0.8, 0.0]))
    pipeline.stage(tune, out="tuned", model=shrunk)
    run = tmp_path / "run"
    search = Search(pipeline, SearchConfig(objectives=("size",), max_drop=50.0),
                    RunOptions(out=run, measure=fast_measure, plot=False))
    for factor in (1.0, 0.9, 0.8, 0.0):  # three trials within budget, then a ruined model
        search.study.enqueue_trial({"shrunk.factor": factor})
    trials = search.optimize(trials=4)
    assert [t.state for t in trials] == ["complete", "complete", "complete", "pruned"]
    assert trials[3].note.startswith("'tuned' epoch 1: validation accuracy")
    assert "below every one of 3 trials within the budget" in trials[3].note
    stored = [p for p in (run / "stages" / "tuned").iterdir() if p.is_dir()
              and not p.name.startswith(".")]
    assert len(stored) == 3  # the pruned stage left nothing in the cache
    frozen = search.study.trials[3]
    assert frozen.state == optuna.trial.TrialState.PRUNED
    assert "tuned@" in next(iter(frozen.user_attrs["curves"]))


def test_no_trial_within_budget_exits_0_and_says_by_how_much(capsys, tmp_path):
    code = main(["search", str(PIPELINES / "lossy_search.py"), "--out", str(tmp_path / "run"),
                 "--trials", "2", "--max-drop", "0.5", "--objectives", "size"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "No trial met the budget of 0.5 points: the closest, trial" in out
    doc = json.loads((tmp_path / "run" / "search" / "frontier.json").read_text())
    miss = doc["closest_miss"]
    assert doc["front"] == [] and miss["over"] == pytest.approx(miss["drop"] - 0.5)
    assert miss["drop"] == min(t["drop"] for t in doc["trials"])
    assert not list((tmp_path / "run" / "search").glob("best-*"))


def test_search_refuses_an_invalid_space_with_exit_code_2(capsys, tmp_path):
    code = main(["search", str(PIPELINES / "bad_space.py"), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "step 2 does not divide the range 2..9" in capsys.readouterr().err


def test_a_value_set_is_known_by_the_values_the_pipeline_gets(searched):
    # optuna stores a grid value as computed (0.001 + 0.002); enqueued, it is the literal 0.003
    key = searched["search"]._key
    assert key({"student.rank": 2, "tuned.epochs": 1, "tuned.lr": 0.001 + 0.002}) == \
        key({"student.rank": 2, "tuned.epochs": 1, "tuned.lr": 0.003})
    assert key({"student.rank": 2, "tuned.epochs": 1, "tuned.lr": 0.002}) != \
        key({"student.rank": 2, "tuned.epochs": 1, "tuned.lr": 0.003})


def test_one_point_best_at_both_objectives_lists_each_objectives_files():
    from kdcompress.search.front import FrontPoint, SearchResult, TrialSummary, markdown

    point = FrontPoint(trial=3, values={"r": 4}, objectives={"size": 10.0, "latency": 1.0},
                       val_accuracy=0.9, drop=0.5, accuracy=0.9, agreement=0.95, size_bytes=10,
                       latency_ms={"batch_64": {"p50": 1.0, "p90": 1.1, "runs": 2}},
                       best_for=["size", "latency"],
                       files=["best-size.py", "best-size.onnx", "best-latency.py",
                              "best-latency.onnx"])
    result = SearchResult(pipeline="p", data="d", target="t", baseline="b",
                          objectives=("size", "latency"), max_drop=1.0,
                          trials=[TrialSummary(number=3, state="complete", values={"r": 4})],
                          front=[point], best={"size": 3, "latency": 3})
    md = markdown(result.to_dict())
    assert "- best size: trial 3: `best-size.py`, `best-size.onnx`\n" in md
    assert "- best latency: trial 3: `best-latency.py`, `best-latency.onnx`\n" in md


def test_after_the_defaults_each_parameter_is_screened_last_stage_first(searched):
    """Trials 1-5 change one parameter each from the defaults, the fine-tuning stage's first:
    they reuse the teacher and (for the tuned stage's values) the student from the cache."""
    trials = searched["result"].trials
    defaults = {"student.rank": 2, "tuned.epochs": 1, "tuned.lr": 0.002}
    changed = [{k: v for k, v in t.values.items() if v != defaults[k]} for t in trials[1:6]]
    # a range's neighbours of the default first (rank 1 and 3 around 2), then its ends (4)
    assert changed == [{"tuned.lr": 0.001}, {"tuned.lr": 0.003}, {"tuned.epochs": 2},
                       {"student.rank": 1}, {"student.rank": 3}]
    assert all(t.note.startswith("screening ") for t in trials[1:6])
    assert all("student" in t.cached for t in trials[1:4])  # only the tuned stage recomputed
    flagship = Search(load_pipeline(PIPELINES.parents[2] / "pipelines"
                                    / "tt_distill_quant_search.py"),
                      SearchConfig(), RunOptions(out=searched["run"].parent / "unused"))
    assert [name for name, _ in flagship.screening()] == [
        "fp32.tt_export='auto'", "pruned.ratio=0.2", "pruned.ratio=0.4", "pruned.ratio=0.0",
        "pruned.ratio=0.8", "student.rank=6", "student.rank=10", "student.rank=2",
        "student.rank=12"]


def test_latency_at_batch_1_is_an_objective_of_its_own(tmp_path, fast_measure):
    run = tmp_path / "run"
    search = Search(load_pipeline(PIPELINES / "tiny_search.py"),
                    SearchConfig(objectives=("size", "latency_b1"), max_drop=100.0,
                                 screen=False),
                    RunOptions(out=run, measure=fast_measure, plot=False))
    trials = search.optimize(trials=2)
    assert [t.state for t in trials] == ["complete", "complete"]
    for t in trials:
        report = json.loads((run / "search" / "trials" / f"{t.number:04d}" / "report.json")
                            .read_text())
        row = next(r for r in report["stages"] if r["name"] == "tuned")
        # batch 1's median, not the largest batch's (which "latency" minimises)
        assert t.objectives["latency_b1"] == row["latency_ms"]["batch_1"]["p50"]
        assert t.objectives["size"] == row["size_bytes"]
        assert row["latency_ms"]["batch_1"]["p50"] != row["latency_ms"]["batch_64"]["p50"]


def test_an_objective_the_measurement_does_not_time_is_refused_before_any_trial(tmp_path):
    from kdcompress.errors import PipelineError
    from kdcompress.metrics import MeasureConfig

    with pytest.raises(PipelineError, match=r"objective 'latency_b1' needs batch 1 timed, but "
                       r"the measurement times batch sizes \[64\]: add 1 to"):
        Search(load_pipeline(PIPELINES / "tiny_search.py"),
               SearchConfig(objectives=("latency_b1",), max_drop=100.0),
               RunOptions(out=tmp_path / "run", measure=MeasureConfig(batch_sizes=(64,))))
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written


def test_an_unknown_objective_is_refused_with_the_known_ones(capsys, tmp_path):
    code = main(["search", str(PIPELINES / "tiny_search.py"), "--out", str(tmp_path / "run"),
                 "--objectives", "size,latency_b2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "objective 'latency_b2' is unknown" in err and "latency_b1" in err


def test_a_negative_number_of_retiming_rounds_is_refused_before_any_trial(capsys, tmp_path):
    code = main(["search", str(PIPELINES / "tiny_search.py"), "--out", str(tmp_path / "run"),
                 "--retime-rounds", "-1"])
    assert code == 2
    assert "retime_rounds must be an integer >= 0, but got -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _done(number, params, *, screen=None, drop=0.0, size=1.0, latency=1.0):
    """A finished trial as the study holds it (what screening reads of one)."""
    from types import SimpleNamespace

    attrs = {"drop": drop, "objectives": {"size": size, "latency": latency}}
    attrs.update({"screen": screen} if screen else {"default": True})
    return SimpleNamespace(number=number, state=optuna.trial.TrialState.COMPLETE,
                           params=params, user_attrs=attrs)


def test_screening_goes_on_downstream_of_each_screening_trial_on_the_front(tmp_path):
    """A screened point on the front gets the later stages' parameters screened on top of its
    values, before any earlier stage's parameter: those trials reuse its stages. A dominated
    or out-of-budget point, and a parameter of the same or an earlier stage, get none."""
    search = Search(load_pipeline(PIPELINES.parents[2] / "pipelines"
                                  / "tt_distill_quant_search.py"),
                    SearchConfig(max_drop=0.5), RunOptions(out=tmp_path / "run"))
    assert search._downstream() == {"student.rank": {"pruned.ratio", "fp32.tt_export"},
                                    "pruned.ratio": {"fp32.tt_export"}, "fp32.tt_export": set()}

    def values(rank=8, ratio=0.3, export="factorized"):
        return {"student.rank": rank, "pruned.ratio": ratio, "fp32.tt_export": export}

    trials = [_done(0, values(), size=45, latency=16),
              _done(1, values(export="auto"), screen="fp32.tt_export='auto'", size=526,
                    latency=12),
              _done(2, values(ratio=0.0), screen="pruned.ratio=0.0", size=80, latency=31),
              _done(3, values(ratio=0.8), screen="pruned.ratio=0.8", size=28, latency=12.7),
              _done(4, values(rank=2), screen="student.rank=2", drop=1.0, size=20, latency=10)]
    listed = search.screening(trials)
    assert [name for name, _ in listed] == [
        "fp32.tt_export='auto'", "fp32.tt_export='auto' on trial 3", "pruned.ratio=0.2",
        "pruned.ratio=0.4", "pruned.ratio=0.0", "pruned.ratio=0.8", "student.rank=6",
        "student.rank=10", "student.rank=2", "student.rank=12"]
    assert dict(listed)["fp32.tt_export='auto' on trial 3"] == values(ratio=0.8, export="auto")
    # a rank on the front has the pruning ratio's ends and the export screened on top of it
    trials.append(_done(5, values(rank=12), screen="student.rank=12", size=30, latency=11))
    names = [name for name, _ in search.screening(trials)]
    assert names[:4] == ["fp32.tt_export='auto'", "fp32.tt_export='auto' on trial 3",
                         "fp32.tt_export='auto' on trial 5", "pruned.ratio=0.2"]
    assert [n for n in names if n.endswith("on trial 5") and n.startswith("pruned")] == [
        "pruned.ratio=0.2 on trial 5", "pruned.ratio=0.4 on trial 5",
        "pruned.ratio=0.0 on trial 5", "pruned.ratio=0.8 on trial 5"]
    assert not any(n.endswith(("on trial 1", "on trial 2", "on trial 4")) for n in names)

    class Queue:
        def __init__(self):
            self.queued = []

        def enqueue_trial(self, params, user_attrs):
            self.queued.append((params, user_attrs))

    # the next one queued is the first not run yet, and not a value set run under another name
    search._study = Queue()
    search._queue_screening(trials)
    assert search._study.queued == [(values(ratio=0.8, export="auto"),
                                     {"screen": "fp32.tt_export='auto' on trial 3"})]
    sampled = _done(6, values(ratio=0.8, export="auto"), size=600, latency=12.5)
    del sampled.user_attrs["default"]  # proposed by the sampler
    trials.append(sampled)
    search._study = Queue()
    search._queue_screening(trials)
    assert search._study.queued[0][1] == {"screen": "fp32.tt_export='auto' on trial 5"}


def test_the_trials_within_budget_are_timed_again_before_the_front_is_chosen(searched):
    result = searched["result"]
    within = {tuple(sorted(t.values.items())): t for t in result.trials
              if t.state == "complete" and t.feasible}
    assert result.retimed["models"] == len(within) >= 2 and result.retimed["rounds"] == 3
    study = {t.number: t for t in searched["search"].study.trials}
    for t in result.trials:
        if not (t.state == "complete" and t.feasible):
            assert t.search_objectives is None
            continue
        # the trial's own timing is kept beside the one the front was chosen on
        assert t.search_objectives == study[t.number].user_attrs["objectives"]
        assert t.objectives["size"] == t.search_objectives["size"]
        assert t.objectives["latency"] > 0
    for p in result.front:
        assert p.objectives == next(t.objectives for t in result.trials if t.number == p.trial)
    doc = json.loads((searched["run"] / "search" / "frontier.json").read_text())
    assert doc["retimed"]["models"] == len(within)
    assert "timed again side by side (3 rounds" in result.summary()


def test_the_front_follows_the_side_by_side_timing_not_the_trials_own(tmp_path, fast_measure,
                                                                      monkeypatch):
    import kdcompress.search.study as study_module

    run = tmp_path / "run"
    search = Search(load_pipeline(PIPELINES / "tiny_search.py"),
                    SearchConfig(objectives=("latency",), max_drop=100.0, screen=False,
                                 retime_rounds=2),
                    RunOptions(out=run, measure=fast_measure, plot=False))
    for rank in (1, 3):  # after the default (rank 2)
        search.study.enqueue_trial({"student.rank": rank, "tuned.epochs": 1, "tuned.lr": 0.002})
    trials = search.optimize(trials=3)
    assert [t.state for t in trials] == ["complete"] * 3
    timed: list = []

    def fake(models, x, config, *, rounds):
        # given the three trials' models in trial order: the later, the faster at batch 64
        timed.append((models, rounds))
        return [{"batch_1": {"p50": 1.0, "p90": 1.0, "runs": 2, "spread": 1.0},
                 "batch_64": {"p50": 10.0 - i, "p90": 10.0 - i, "runs": 2, "spread": 1.0}}
                for i in range(len(models))]

    monkeypatch.setattr(study_module, "latency_side_by_side", fake)
    result = search.finish()
    (models, rounds), = timed
    assert len(models) == 3 and rounds == 2 and all(isinstance(m, nn.Module) for m in models)
    last = max(trials, key=lambda t: t.number)  # the fake makes the last candidate fastest
    assert [p.trial for p in result.front] == [last.number]
    own = {t.number: t.search_objectives["latency"] for t in result.trials}
    before = min(own, key=lambda n: (own[n], n))
    assert result.retimed["joined"] == ([] if before == last.number else [last.number])
    assert result.retimed["left"] == ([] if before == last.number else [before])
    assert [t.objectives["latency"] for t in sorted(result.trials, key=lambda t: t.number)] \
        == [10.0, 9.0, 8.0]

    # a model that cannot be loaded: no trial's timing is replaced, and a note says why
    monkeypatch.setattr(study_module.FingerprintStore, "lookup", lambda self, name, fp: None)
    result = search.finish()
    assert "note" in result.retimed and any("could not be loaded to be timed again" in n
                                            for n in result.notes)
    assert all(t.search_objectives is None for t in result.trials)
    assert [p.trial for p in result.front] == [before]


def test_latencies_the_retiming_cannot_tell_apart_leave_the_front_to_the_smaller_model(
        tmp_path, fast_measure, monkeypatch):
    import dataclasses

    import kdcompress.search.study as study_module

    search = Search(load_pipeline(PIPELINES / "tiny_search.py"),
                    SearchConfig(objectives=("size", "latency"), max_drop=100.0, screen=False),
                    RunOptions(out=tmp_path / "run", measure=fast_measure, plot=False))
    for rank in (1, 3):  # after the default (rank 2): three sizes
        search.study.enqueue_trial({"student.rank": rank, "tuned.epochs": 1, "tuned.lr": 0.002})
    assert [t.state for t in search.optimize(trials=3)] == ["complete"] * 3
    spread = {"value": 1.0}

    def fake(models, x, config, *, rounds):
        # the larger the model, the faster, but by 2% a step: within a 5% tolerance
        counts = [sum(p.numel() for p in m.parameters()) for m in models]
        order = sorted(range(len(models)), key=lambda i: counts[i])
        out: list = [None] * len(models)
        for step, i in enumerate(order):
            ms = 10.0 * (1 - 0.02 * step)
            out[i] = {"batch_1": {"p50": ms, "p90": ms, "runs": 2, "spread": spread["value"]},
                      "batch_64": {"p50": ms, "p90": ms, "runs": 2, "spread": spread["value"]}}
        return out

    monkeypatch.setattr(study_module, "latency_side_by_side", fake)
    result = search.finish()
    sizes = {t.number: t.objectives["size"] for t in result.trials}
    assert len(set(sizes.values())) == 3
    smallest = min(sizes, key=sizes.get)
    assert [p.trial for p in result.front] == [smallest]
    assert result.retimed["tolerance"] == 0.05 and result.retimed["spread"] == 1.0
    assert "latencies within 5% counted equal" in result.summary()
    assert not any("disagreed" in n for n in result.notes)

    # plain dominance keeps all three: each is better at size or at latency
    search.config = dataclasses.replace(search.config, latency_tolerance=0.0)
    assert sorted(p.trial for p in search.finish().front) == sorted(sizes)

    # rounds that disagree by more than the tolerance are said, with what to do
    search.config = dataclasses.replace(search.config, latency_tolerance=0.05)
    spread["value"] = 1.2
    result = search.finish()
    assert result.retimed["spread"] == 1.2
    assert any("rounds disagreed by up to 1.20x, more than the front's latency tolerance of 5%"
               in n and "--retime-rounds" in n for n in result.notes)


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_latency_tolerance_outside_0_to_1_is_refused_before_any_trial(capsys, tmp_path, value):
    code = main(["search", str(PIPELINES / "tiny_search.py"), "--out", str(tmp_path / "run"),
                 "--latency-tolerance", value])
    assert code == 2
    assert f"latency_tolerance must be a fraction in [0, 1), e.g. 0.05 for 5%, but got " \
           f"{float(value)!r}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_accuracy_as_an_objective_keeps_the_most_accurate_trial_on_the_front(tmp_path,
                                                                             fast_measure):
    run = tmp_path / "run"
    search = Search(load_pipeline(PIPELINES / "tiny_search.py"),
                    SearchConfig(objectives=("accuracy", "size"), max_drop=100.0, screen=False),
                    RunOptions(out=run, measure=fast_measure))
    for rank, epochs in ((1, 1), (4, 2)):  # after the default (rank 2, one epoch)
        search.study.enqueue_trial({"student.rank": rank, "tuned.epochs": epochs,
                                    "tuned.lr": 0.003})
    trials = search.optimize(trials=3)
    assert [t.state for t in trials] == ["complete"] * 3
    result = search.finish()
    # the objective is the validation drop against the baseline, as the study was told it
    for t in search.study.trials:
        assert t.values[0] == pytest.approx(t.user_attrs["drop"])
        assert t.values[1] == t.user_attrs["objectives"]["size"]
    drops = {t.number: t.drop for t in result.trials}
    sizes = {t.number: t.objectives["size"] for t in result.trials}
    most_accurate = min(drops, key=lambda n: (drops[n], sizes[n]))
    smallest = min(sizes, key=lambda n: (sizes[n], drops[n]))
    front = {p.trial for p in result.front}
    assert {most_accurate, smallest} <= front
    expected = {n for n in drops if not any(
        drops[m] <= drops[n] and sizes[m] <= sizes[n] and (drops[m], sizes[m]) != (drops[n],
                                                                                  sizes[n])
        for m in drops)}
    assert front == expected
    assert result.best["accuracy"] == most_accurate
    assert (run / "search" / "best-accuracy.py").is_file()
    assert (run / "search" / "frontier.png").stat().st_size > 0
    md = (run / "search" / "frontier.md").read_text()
    assert "accuracy (validation points below the baseline)" in md
