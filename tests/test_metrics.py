"""The ruler: MACs, latency and the measured row, the same for every artifact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdcompress import models
from kdcompress.artifacts import save_module
from kdcompress.metrics import MeasureConfig, count_macs, latency, measure, predict, time_calls


def test_count_macs_of_a_linear_layer_is_per_sample():
    assert count_macs(nn.Linear(100, 10), torch.zeros(1, 100)) == 1000
    assert count_macs(nn.Linear(100, 10), torch.zeros(4, 100)) == 4000


def test_count_macs_of_a_conv_layer():
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)  # 8x8 outputs * 4 channels * 2*3*3
    assert count_macs(conv, torch.zeros(1, 2, 8, 8)) == 8 * 8 * 4 * 2 * 9


def test_latency_keys_and_repeats(fast_measure):
    config = MeasureConfig(batch_sizes=(1, 8), warmup=1, repeats=3, min_seconds=0.0)
    result = latency(nn.Linear(4, 2), torch.randn(5, 4), config)
    assert set(result) == {"batch_1", "batch_8"}
    for value in result.values():
        assert value["runs"] == 3 and 0 < value["p50"] <= value["p90"]
    assert torch.get_num_threads() == 1  # restored after timing with config.threads


def test_latency_repeats_until_min_seconds():
    config = MeasureConfig(batch_sizes=(1,), warmup=0, repeats=1, min_seconds=0.05,
                           max_repeats=5)
    assert latency(nn.Linear(4, 2), torch.randn(2, 4), config)["batch_1"]["runs"] == 5


def test_measure_returns_the_row_schema(tiny_task, fast_measure, tmp_path):
    model = models.cnn(width=8, hidden=16).build(tiny_task.input_shape, tiny_task.num_classes)
    save_module(model, tmp_path)
    x, y = tiny_task.arrays("test")
    preds = predict(model, x).argmax(1)
    row = measure(model, tiny_task, config=fast_measure, folder=tmp_path, reference=preds)
    assert set(row) == {"params", "size_bytes", "macs", "latency_ms", "engine", "accuracy",
                        "val_accuracy", "agreement", "score", "val_score"}
    assert row["val_accuracy"] is None and row["val_score"] is None  # tiny has no validation
    assert row["score"] == row["accuracy"]  # the default metric is top-1 accuracy
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["size_bytes"] == sum(f.stat().st_size for f in tmp_path.iterdir())
    assert row["macs"] == count_macs(model, x[:1]) and row["macs"] > 0
    assert set(row["latency_ms"]) == {"batch_1", "batch_64"}
    assert row["engine"] == "torch"
    assert row["accuracy"] == pytest.approx(float((preds == y).float().mean()), abs=1e-6)
    assert row["agreement"] == 1.0
    flipped = measure(model, tiny_task, config=fast_measure, reference=(preds + 1) % 4)
    assert flipped["agreement"] == 0.0
    assert measure(model, tiny_task, config=fast_measure)["agreement"] is None


def test_val_accuracy_is_scored_on_the_validation_split(digits_task, fast_measure):
    model = models.cnn(width=4, hidden=8).build(digits_task.input_shape, digits_task.num_classes)
    row = measure(model, digits_task, config=fast_measure)
    xv, yv = digits_task.arrays("val")
    expected = float((predict(model, xv).argmax(1) == yv).float().mean())
    assert row["val_accuracy"] == pytest.approx(expected, abs=1e-6)


def test_latency_against_times_both_models_interleaved(tiny_task):
    import time

    from torch import nn

    from kdcompress.metrics import MeasureConfig, latency_against

    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.004)
            return x.flatten(1)[:, :4]

    class Fast(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :4]

    config = MeasureConfig(repeats=5, warmup=1, min_seconds=0.0, batch_sizes=(1,))
    x, _ = tiny_task.arrays("test")
    fast, slow, timing = latency_against(Fast(), Slow(), x, config)
    assert slow["batch_1"]["p50"] >= 4.0 > fast["batch_1"]["p50"]
    assert slow["batch_1"]["runs"] == fast["batch_1"]["runs"] >= 5
    assert timing["baseline_latency_ms"] == slow


def test_onnx_stage_without_a_cuda_provider_says_why(cnn_onnx, digits_task, fast_measure):
    """On a CUDA run, an ONNX stage gets CUDA latency from onnxruntime-gpu; without its CUDA
    provider the row says why in one line, and the report shows it among the stage's flags."""
    import dataclasses

    import onnxruntime as ort

    from kdcompress.report import Report, StageRow

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    config = dataclasses.replace(fast_measure, cuda=True)
    row = measure(cnn_onnx, digits_task, config=config)
    assert "latency_ms_cuda" not in row
    assert "CUDAExecutionProvider" in row["timing"]["cuda"] and "onnxruntime-gpu" in \
        row["timing"]["cuda"]
    report = Report("p")
    report.add(StageRow(name="int8", function="quantize_onnx", inputs=[], format="onnx", **row))
    assert row["timing"]["cuda"] in report.row("int8").flags


def test_a_cuda_provider_that_does_not_load_is_named_not_timed_as_the_cpu(
        cnn_onnx, digits_task, fast_measure, monkeypatch):
    """onnxruntime-gpu lists its CUDA provider even where the CUDA libraries do not load, and
    then runs the session on the CPU with only a warning: that must not become a CUDA latency."""
    import dataclasses

    import onnxruntime as ort

    from kdcompress.artifacts import OnnxModel
    from kdcompress.errors import ArtifactError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    fresh = OnnxModel(cnn_onnx.path)  # no session cached yet
    with pytest.raises(ArtifactError, match="CUDAExecutionProvider did not load.*runs on "
                                            "CPUExecutionProvider"):
        fresh.session("cuda")
    row = measure(OnnxModel(cnn_onnx.path), digits_task,
                  config=dataclasses.replace(fast_measure, cuda=True))
    assert "latency_ms_cuda" not in row
    assert "did not load" in row["timing"]["cuda"]


def test_an_io_bound_onnx_call_gives_the_plain_run_s_outputs(cnn_onnx, digits_task):
    """The call timed on CUDA (input and outputs bound to the device) computes what
    ``session.run`` does; checked here with the CPU as the device."""
    from kdcompress.metrics import onnx_bound_call

    session = cnn_onnx.session()
    x = digits_task.head("test", 16).numpy()
    binding = onnx_bound_call(session, x, "cpu")()
    bound = binding.copy_outputs_to_cpu()[0]
    plain = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(bound, plain, rtol=1e-6, atol=1e-6)
    assert bound.shape == (16, digits_task.num_classes)


def test_callables_timed_side_by_side_take_turns_of_consecutive_runs():
    """Each turn is turn_warmup untimed runs then a block of timed ones, so no timed run of a
    small model follows a run of the other callable (whose data would have evicted its own)."""
    calls: list[str] = []
    config = MeasureConfig(warmup=1, repeats=6, block=3, turn_warmup=2, min_seconds=0.0)
    a, b = time_calls([lambda: calls.append("a"), lambda: calls.append("b")], config)
    assert a["runs"] == b["runs"] == 6
    assert "".join(calls) == "a" + "b" + ("aaaaa" + "bbbbb") * 2  # warm-up, then two turns
    calls.clear()  # one callable alone: no turn warm-up; the block never exceeds max_repeats
    (only,) = time_calls([lambda: calls.append("a")],
                         MeasureConfig(warmup=0, repeats=2, block=10, max_repeats=2,
                                       min_seconds=0.0))
    assert only["runs"] == 2 and calls == ["a", "a"]


def test_several_models_timed_side_by_side_over_rounds(tiny_task):
    import time

    from kdcompress.metrics import latency_side_by_side

    class Sleeps(nn.Module):
        def __init__(self, seconds: float) -> None:
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            time.sleep(self.seconds)
            return x.flatten(1)[:, :4]

    config = MeasureConfig(repeats=3, warmup=1, min_seconds=0.0, block=3, turn_warmup=0,
                           batch_sizes=(1, 8))
    x, _ = tiny_task.arrays("test")
    slow, fast, middle = latency_side_by_side([Sleeps(0.006), Sleeps(0.0), Sleeps(0.003)], x,
                                              config, rounds=2)
    for key in ("batch_1", "batch_8"):
        # the order of the arguments is kept, and each model's own time is measured
        assert slow[key]["p50"] >= 6.0 > middle[key]["p50"] >= 3.0 > fast[key]["p50"]
        assert slow[key]["runs"] == fast[key]["runs"] == middle[key]["runs"] == 2 * 3
        # how far the two rounds' medians lie apart: sleeps of 6 ms repeat within 2x
        assert 1.0 <= slow[key]["spread"] < 2.0
    single, = latency_side_by_side([Sleeps(0.001)], x, config, rounds=1)
    assert single["batch_1"]["spread"] == 1.0
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        latency_side_by_side([Sleeps(0.0)], x, config, rounds=0)


def _sleeper(seconds: float, calls: list[str], name: str = "a"):
    import time

    def call() -> None:
        calls.append(name)
        time.sleep(seconds)
    return call


def test_a_slow_call_is_timed_fewer_times_to_fit_max_seconds():
    """20 ms a call, 0.1 s of timed runs: 4 or 5 timed runs (sleep may overshoot), not 20; the
    warm-up stops once it has taken half the budget, after at least two runs."""
    calls: list[str] = []
    config = MeasureConfig(warmup=10, repeats=20, min_seconds=0.0, max_seconds=0.1,
                           min_repeats=2)
    (timed,) = time_calls([_sleeper(0.02, calls)], config)
    assert 2 <= timed["runs"] <= 5
    warm = len(calls) - timed["runs"]
    assert 2 <= warm <= 3  # 50 ms of warm-up: two or three 20 ms runs, not ten
    assert timed["p50"] >= 20.0


def test_max_seconds_never_leaves_fewer_than_min_repeats_and_none_turns_it_off():
    calls: list[str] = []
    config = MeasureConfig(warmup=3, repeats=8, min_seconds=0.0, max_seconds=0.001,
                           min_repeats=4)
    (timed,) = time_calls([_sleeper(0.01, calls)], config)
    assert timed["runs"] == 4 and len(calls) == 2 + 4  # warm-up over budget after two runs
    calls.clear()
    (timed,) = time_calls([_sleeper(0.01, calls)],
                          MeasureConfig(warmup=3, repeats=8, min_seconds=0.0, max_seconds=None))
    assert timed["runs"] == 8 and len(calls) == 3 + 8  # every warm-up and timed run
    calls.clear()  # a fast call keeps its repeats (and min_seconds' extension) under the budget
    (timed,) = time_calls([lambda: calls.append("a")],
                          MeasureConfig(warmup=2, repeats=20, min_seconds=0.0))
    assert timed["runs"] == 20


def test_side_by_side_calls_share_the_slowest_ones_count():
    """A 20 ms model beside a fast one: both get the count that fits the slow one, in turns."""
    calls: list[str] = []
    config = MeasureConfig(warmup=2, repeats=20, min_seconds=0.0, max_seconds=0.1,
                           min_repeats=3, block=10, turn_warmup=0)
    slow, fast = time_calls([_sleeper(0.02, calls, "s"), lambda: calls.append("f")], config)
    assert slow["runs"] == fast["runs"] and 3 <= slow["runs"] <= 5
    assert "".join(calls) == "ss" + "ff" + "s" * slow["runs"] + "f" * fast["runs"]


@pytest.mark.parametrize(("field", "value", "match"), [
    ("max_seconds", 0.0, "max_seconds must be > 0 or None"),
    ("max_seconds", -1.0, "max_seconds must be > 0 or None"),
    ("min_repeats", 0, "min_repeats must be >= 1"),
])
def test_bad_timing_budget_is_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        MeasureConfig(**{field: value})
