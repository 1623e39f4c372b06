"""Search workers as processes: a search killed mid-trial resumes with no trial lost or repeated,
and two workers on one SQLite study share the trials and the cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from kdcompress.cli import load_pipeline
from kdcompress.options import RunOptions
from kdcompress.search.study import Search, SearchConfig

HERE = Path(__file__).resolve().parent
PAUSE = str(HERE / "pipelines" / "pause_search.py")


def worker(run: Path, trials: int, pause: float) -> subprocess.Popen:
    env = {**os.environ, "KDC_TEST_PAUSE": str(pause), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(HERE / "worker.py"), PAUSE, str(run),
                             str(trials)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def study(run: Path) -> optuna.Study:
    return optuna.load_study(study_name="pause_search",
                             storage=f"sqlite:///{run / 'search' / 'study.db'}")


@pytest.mark.slow
def test_a_killed_search_resumes_with_no_trial_lost_or_repeated(tmp_path, fast_measure):
    run = tmp_path / "run"
    proc = worker(run, 3, pause=600)  # its first trial hangs in the 'paused' stage
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if (run / "search" / "study.db").is_file() and (run / "stages" / "teacher").is_dir():
                trials = study(run).get_trials()
                if trials and trials[0].state == optuna.trial.TrialState.RUNNING and \
                        "worker" in trials[0].user_attrs and any(
                        p.is_dir() and not p.name.startswith(".")
                        for p in (run / "stages" / "teacher").iterdir()):
                    break
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.5)
        else:
            pytest.fail("the worker never reached its first trial")
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = study(run).trials[0]
    assert killed.state == optuna.trial.TrialState.RUNNING  # left behind by the dead process

    search = Search(load_pipeline(PAUSE), SearchConfig(objectives=("size",), max_drop=100.0,
                                                       startup_trials=2),
                    RunOptions(out=run, plot=False, measure=fast_measure))
    done = search.optimize(trials=3)
    trials = study(run).trials
    states = [t.state for t in trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.WAITING not in states
    assert states[0] == optuna.trial.TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == killed.params  # its values were not lost
    assert retry[0].number == done[0].number  # and were redone first
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials[1:])
    # three value sets tried, none twice (a proposal repeating one took its results)
    counted = [t for t in trials[1:] if "duplicate_of" not in t.user_attrs]
    assert len(counted) == 3
    assert len({json.dumps(t.params, sort_keys=True) for t in counted}) == 3
    # the teacher the killed process trained is loaded, not trained again
    assert "teacher" in retry[0].user_attrs["cached"]
    assert search.summary(trials[0]).note == \
        f"its worker stopped; values queued again as trial {retry[0].number}"


@pytest.mark.slow
def test_two_workers_share_one_study_and_complete_its_trials_once(tmp_path):
    run = tmp_path / "run"
    procs = [worker(run, 6, pause=1.0), worker(run, 6, pause=1.0)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trials = study(run).trials
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # six value sets, each run once; a proposal repeating one takes the earlier results
    ran = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert len(ran) == 6, [(t.number, t.params, t.user_attrs.get("worker")) for t in trials]
    assert len({json.dumps(t.params, sort_keys=True) for t in ran}) == 6
    workers = {t.user_attrs["worker"] for t in ran}
    assert len(workers) == 2  # both took part
    # no work done twice: every stage version was computed by one trial of one worker
    computed = [(stage, t.user_attrs["fingerprints"][stage]) for t in trials
                for stage in t.user_attrs["ran"]]
    assert len(computed) == len(set(computed))
    assert sum(stage == "teacher" for stage, _ in computed) == 1
    # the last worker to finish wrote the front of every trial
    doc = json.loads((run / "search" / "frontier.json").read_text())
    assert doc["pending"] == 0 and len(doc["trials"]) == len(trials)
    assert any("pending=0" in out for out in outputs)
