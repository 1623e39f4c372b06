"""The same ruler for every artifact: size, MACs, latency, accuracy, agreement.

Latency is measured with warm-up, a fixed thread count, and real test inputs (validation inputs
while a search must not read the test split); medians and 90th percentiles are reported in
milliseconds. PyTorch runs torch models, ONNX Runtime runs ONNX ones, and the row names the engine.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcompress.artifacts import RECIPE_FILE, WEIGHTS_FILE, OnnxModel, num_params
from kdcompress.data import Task
from kdcompress.errors import ArtifactError
from kdcompress.scoring import Metric, MetricLike
from kdcompress.training import predict_logits

__all__ = ["MeasureConfig", "measure", "measure_with_predictions", "latency", "latency_against",
           "latency_side_by_side", "predict", "predict_split", "count_macs", "time_call",
           "time_calls"]


@dataclass(frozen=True)
class MeasureConfig:
    """How artifacts are measured.

    Attributes
    ----------
    threads : int
        Intra-op threads for PyTorch and ONNX Runtime while timing.
    batch_sizes : tuple of int
        Batch sizes timed (the report's ``batch_1`` and ``batch_64``).
    warmup : int
        Untimed runs before timing; a call whose warm-up has taken half of ``max_seconds`` stops
        it early, after at least two runs.
    repeats : int
        Timed runs per batch size (at least; short runs are repeated up to ``min_seconds``;
        slow ones are cut to fit ``max_seconds``).
    min_seconds : float
        Keep timing a batch size until this much time has passed, up to ``max_repeats``.
    max_seconds : float or None
        The timed runs' budget per callable and batch size: when ``repeats`` runs of the slowest
        callable (its last warm-up run) would take longer, fewer are timed, but never fewer than
        ``min_repeats``. A 50 ms call is timed 10 times instead of 20; calls under
        ``max_seconds / repeats`` (25 ms by default) are unaffected. ``None`` times ``repeats``
        runs whatever they cost.
    min_repeats : int
        The fewest timed runs ``max_seconds`` may leave.
    block : int
        Callables timed side by side take turns of this many consecutive timed runs (at most
        ``repeats``), each turn after ``turn_warmup`` untimed runs: a small model timed one
        call at a time between the calls of a large one finds its weights and code evicted
        every time, and measured that way a 0.11 ms int8 CNN took 0.25-0.30 ms next to its
        PyTorch teacher. Turns keep the comparison side by side and time what a process
        serving the model sees.
    turn_warmup : int
        Untimed runs at the start of each turn (only when several callables take turns).
    cuda : bool
        Also time torch models on the GPU, and score them there (accuracy on the validation
        and test splits; ONNX graphs are scored in ONNX Runtime on the CPU).
    """

    threads: int = 1
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 5
    repeats: int = 20
    min_seconds: float = 0.2
    max_seconds: float | None = 0.5
    min_repeats: int = 5
    max_repeats: int = 200
    block: int = 10
    turn_warmup: int = 2
    cuda: bool = False

    def __post_init__(self) -> None:
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"MeasureConfig.max_seconds must be > 0 or None, but got "
                             f"{self.max_seconds!r}")
        if self.min_repeats < 1:
            raise ValueError(f"MeasureConfig.min_repeats must be >= 1, but got "
                             f"{self.min_repeats!r}")


def predict(
    model: nn.Module | OnnxModel, x: torch.Tensor, *, batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits of a torch or ONNX model on ``x``, returned on the CPU.

    A torch model runs on ``device`` (it must already be there); an ONNX graph always runs in
    ONNX Runtime on the CPU.
    """
    if isinstance(model, OnnxModel):
        return torch.cat([model.predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return predict_logits(model, x, batch_size=batch_size, device=device)


def predict_split(model: nn.Module | OnnxModel, task: Task, split: str, *,
                  batch_size: int = 512, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a torch or ONNX model on one split of ``task`` and its labels (on the CPU).

    The split is streamed in batches (:meth:`~kdcompress.data.Task.batches`), so a data set
    larger than memory is measured without being loaded whole. A torch model runs on
    ``device`` (it must already be there).
    """
    logits, labels = [], []
    for x, y in task.batches(split, batch_size=batch_size):
        logits.append(predict(model, x, batch_size=batch_size, device=device))
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


@contextlib.contextmanager
def _scoring_on(model: nn.Module | OnnxModel, device: str) -> Iterator[str]:
    """Put a torch model on ``device`` while it is scored, back on the CPU afterwards."""
    if isinstance(model, OnnxModel) or device == "cpu":
        yield "cpu"
        return
    model.to(device)
    try:
        yield device
    finally:
        model.to("cpu")


def _batch(x: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.ndim - 1)))[:n].contiguous()


def time_call(fn: Callable[[], Any], config: MeasureConfig | None = None,
              sync: Callable[[], None] = lambda: None) -> dict:
    """Time ``fn()`` after warm-up: ``{"p50", "p90"}`` in milliseconds and the number of runs."""
    return time_calls([fn], config, sync)[0]


def time_calls(fns: list[Callable[[], Any]], config: MeasureConfig | None = None,
               sync: Callable[[], None] = lambda: None) -> list[dict]:
    """Time several callables interleaved, after warm-up: they take turns of
    ``config.block`` consecutive timed runs, each turn after ``config.turn_warmup`` untimed
    ones (see :class:`MeasureConfig`).

    Interleaving exposes every callable to the same machine state, so ratios between them hold
    even when the load changes while timing. Every callable gets the same number of timed runs:
    ``config.repeats``, or fewer when the slowest one's would not fit ``config.max_seconds``.
    Returns one ``{"p50", "p90", "runs"}`` per callable.
    """
    config = config or MeasureConfig()
    per_call = [_warm_up(fn, config, sync) for fn in fns]
    repeats = _repeats(config, [t for t in per_call if t is not None])
    times: list[list[float]] = [[] for _ in fns]
    block = max(1, min(config.block, repeats, config.max_repeats))
    turn_warmup = config.turn_warmup if len(fns) > 1 else 0
    start = time.perf_counter()
    while len(times[0]) < repeats or (
            time.perf_counter() - start < config.min_seconds * len(fns)
            and len(times[0]) < config.max_repeats):
        done = len(times[0])
        runs = min(block, max((repeats if done < repeats else config.max_repeats) - done, 1))
        for fn, bucket in zip(fns, times, strict=True):
            for _ in range(turn_warmup):
                fn()
            sync()
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                sync()
                bucket.append((time.perf_counter() - t0) * 1e3)
    return [{"p50": round(float(np.percentile(t, 50)), 4),
             "p90": round(float(np.percentile(t, 90)), 4), "runs": len(t)} for t in times]


def _warm_up(fn: Callable[[], Any], config: MeasureConfig,
             sync: Callable[[], None]) -> float | None:
    """Run ``fn`` untimed ``config.warmup`` times (see :class:`MeasureConfig`); return the last
    run's seconds, or None without warm-up."""
    spent = 0.0
    last = None
    for i in range(config.warmup):
        t0 = time.perf_counter()
        fn()
        sync()
        last = time.perf_counter() - t0
        spent += last
        if i >= 1 and config.max_seconds is not None and spent >= config.max_seconds / 2:
            break
    return last


def _repeats(config: MeasureConfig, per_call: list[float]) -> int:
    """Timed runs per callable: ``config.repeats``, cut to fit ``config.max_seconds`` when the
    slowest callable's warm-up says they would not."""
    if config.max_seconds is None or not per_call:
        return config.repeats
    slowest = max(per_call)
    if slowest * config.repeats <= config.max_seconds:
        return config.repeats
    fit = int(config.max_seconds / slowest)  # fewer than config.repeats here
    return max(min(config.min_repeats, config.repeats), fit)


@contextlib.contextmanager
def _calls(model: nn.Module | OnnxModel, x: torch.Tensor, config: MeasureConfig,
           device: str = "cpu") -> Iterator[tuple[dict[str, Callable[[], Any]], Callable]]:
    """One zero-argument inference call per batch size, with the thread count set while open."""
    if isinstance(model, OnnxModel):
        session = model.session(device, config.threads)
        if device.startswith("cuda"):  # input and output stay on the GPU, as torch's do
            yield {f"batch_{b}": onnx_bound_call(session, _batch(x, b).numpy(), "cuda")
                   for b in config.batch_sizes}, lambda: None
            return
        name = session.get_inputs()[0].name
        feeds = {f"batch_{b}": {name: _batch(x, b).numpy()} for b in config.batch_sizes}
        yield ({k: (lambda feed=feed: session.run(None, feed)) for k, feed in feeds.items()},
               lambda: None)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        model = model.to(device).eval()
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        with torch.inference_mode():
            batches = {f"batch_{b}": _batch(x, b).to(device) for b in config.batch_sizes}
            yield {k: (lambda xb=xb: model(xb)) for k, xb in batches.items()}, sync
    finally:
        torch.set_num_threads(previous)
        model.to("cpu")


def latency(model: nn.Module | OnnxModel, x: torch.Tensor, config: MeasureConfig,
            device: str = "cpu") -> dict[str, dict]:
    """Latency in ms per batch size: ``{"batch_1": {"p50", "p90", "runs"}, ...}``."""
    with _calls(model, x, config, device) as (calls, sync):
        return {k: time_call(fn, config, sync) for k, fn in calls.items()}


def latency_side_by_side(models: Sequence[nn.Module | OnnxModel], x: torch.Tensor,
                         config: MeasureConfig, *, rounds: int = 1) -> list[dict[str, dict]]:
    """Latency of several models on the CPU, timed in turns in one session.

    Each batch size is timed ``rounds`` times with :func:`time_calls` (the models taking turns
    of ``config.block`` runs); a model's latency is the median of its per-round medians. Every
    model meets the same moments of the machine's load, so their order holds when separate
    timings, minutes apart, would not.

    Returns
    -------
    list of dict
        One ``{"batch_1": {"p50", "p90", "runs", "spread"}, ...}`` per model, in the order
        given; ``spread`` is the slowest round's median over the fastest's (1 for one round).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, but got {rounds!r}")
    out: list[dict[str, dict]] = [{} for _ in models]
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(_calls(m, x, config)) for m in models]
        if not opened:
            return out

        def sync() -> None:
            for _, model_sync in opened:
                model_sync()

        for key in opened[0][0]:
            per_round = [time_calls([calls[key] for calls, _ in opened], config, sync)
                         for _ in range(rounds)]
            for i, timed in enumerate(out):
                runs = [r[i] for r in per_round]
                medians = [r["p50"] for r in runs]
                timed[key] = {"p50": round(float(np.median(medians)), 4),
                              "p90": round(float(np.median([r["p90"] for r in runs])), 4),
                              "runs": sum(r["runs"] for r in runs),
                              "spread": round(max(medians) / max(min(medians), 1e-9), 4)}
    return out


def latency_against(model: nn.Module | OnnxModel, reference: nn.Module | OnnxModel,
                    x: torch.Tensor, config: MeasureConfig) -> tuple[dict, dict, dict]:
    """Time ``model`` and ``reference`` interleaved on the CPU.

    Returns ``(latency of model, latency of reference, timing)`` where ``timing`` holds the
    machine's load average before and after and ``flags`` when the ratio cannot be trusted: a
    p90/p50 spread above :data:`SPREAD_LIMIT` for either model, or a load average above the
    number of CPU cores while timing.
    """
    load_before = _load()
    mine: dict[str, dict] = {}
    theirs: dict[str, dict] = {}
    with _calls(model, x, config) as (calls, sync), _calls(reference, x, config) as (rcalls, _):
        for key, fn in calls.items():
            mine[key], theirs[key] = time_calls([fn, rcalls[key]], config, sync)
    load_after = _load()
    flags = []
    for key in mine:
        spread = max(mine[key]["p90"] / max(mine[key]["p50"], 1e-9),
                     theirs[key]["p90"] / max(theirs[key]["p50"], 1e-9))
        if spread > SPREAD_LIMIT:
            flags.append(f"latency ratio at {key.replace('_', ' ')} is unreliable: p90/p50 "
                         f"spread {spread:.2f} (noisy timings; measure on a quiet machine)")
    cores = os.cpu_count() or 1
    load = max(v for v in (load_before, load_after) if v is not None) \
        if load_before is not None else None
    if load is not None and load > cores:
        flags.append(f"latency ratios are unreliable: load average {load:.1f} on {cores} cores "
                     "while timing")
    timing = {"baseline_latency_ms": theirs, "load_before": load_before,
              "load_after": load_after, "flags": flags}
    return mine, theirs, timing


#: p90/p50 above this marks a timing as too noisy to compare.
SPREAD_LIMIT = 1.5


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def count_macs(model: nn.Module, example: torch.Tensor) -> int | None:
    """Multiply-accumulates of one forward pass on ``example`` (torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.eval()(example)
        return int(counter.get_total_flops() // 2)
    except Exception:  # an op the counter does not know: report no number rather than a wrong one
        return None


def _torch_size(folder: Path | None, model: nn.Module) -> int:
    if folder is not None and (folder / WEIGHTS_FILE).is_file():
        return sum((folder / f).stat().st_size for f in (WEIGHTS_FILE, RECIPE_FILE)
                   if (folder / f).is_file())
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def measure(model: nn.Module | OnnxModel, task: Task, *, config: MeasureConfig | None = None,
            folder: Path | None = None, reference: torch.Tensor | None = None,
            baseline: nn.Module | OnnxModel | None = None, test: bool = True,
            metric: MetricLike = "accuracy") -> dict[str, Any]:
    """Measure one artifact: params, size on disk, MACs, latency, accuracy, agreement.

    The row of :func:`measure_with_predictions`, without the predictions.

    Parameters
    ----------
    model : nn.Module or OnnxModel
        The artifact.
    task : Task
        Its data: test inputs are timed; the validation split (when there is one) and the test
        split are scored.
    folder : Path, optional
        Where a torch artifact is saved (its size on disk); ONNX sizes come from the file.
    reference : Tensor, optional
        The baseline's predicted classes on the test split, for ``agreement``.
    baseline : nn.Module or OnnxModel, optional
        Timed interleaved with ``model``: the row then holds ``faster_by`` from that pairing and
        ``timing`` (load average, reliability flags).
    test : bool
        Read the test split. ``False`` (while a search chooses) leaves ``accuracy`` and
        ``agreement`` ``None`` and times the validation inputs (the training inputs when the task
        has no validation split), so no test image or label is read.
    metric : str or callable or Metric
        The pipeline's metric (:mod:`kdcompress.scoring`), scored as ``val_score`` and ``score``
        beside the top-1 ``val_accuracy`` and ``accuracy``.

    Returns
    -------
    dict
        ``params``, ``size_bytes``, ``macs``, ``latency_ms``, ``engine``, ``accuracy``,
        ``val_accuracy``, ``score``, ``val_score``, ``agreement`` (and ``faster_by``,
        ``timing`` with a baseline,
        ``latency_ms_cuda`` when CUDA is measured: torch models, and ONNX graphs when
        onnxruntime has its CUDA provider, else ``timing["cuda"]`` says why not, and the
        report shows it).
    """
    return measure_with_predictions(model, task, config=config, folder=folder,
                                    reference=reference, baseline=baseline, test=test,
                                    metric=metric)[0]


def measure_with_predictions(
        model: nn.Module | OnnxModel, task: Task, *, config: MeasureConfig | None = None,
        folder: Path | None = None, reference: torch.Tensor | None = None,
        baseline: nn.Module | OnnxModel | None = None, test: bool = True,
        metric: MetricLike = "accuracy") -> tuple[dict[str, Any], torch.Tensor | None]:
    """:func:`measure`, also returning the artifact's predicted classes on the test split.

    The parameters are :func:`measure`'s. A run keeps its baseline's predictions for every
    later row's ``agreement`` without scoring the test split a second time.

    Returns
    -------
    row : dict
        :func:`measure`'s row.
    predictions : Tensor or None
        The predicted class of every test sample, None when ``test`` is False.
    """
    config = config or MeasureConfig()
    onnx = isinstance(model, OnnxModel)
    metric = Metric.resolve(metric)
    val_accuracy = val_score = None
    accuracy = agreement = score = None
    preds = None
    # a CUDA run scores torch models on the GPU (ONNX graphs run in ONNX Runtime on the CPU)
    with _scoring_on(model, "cuda" if config.cuda else "cpu") as device:
        if task.val is not None:
            logits, yv = predict_split(model, task, "val", device=device)
            val_accuracy = round(float((logits.argmax(1) == yv).float().mean()), 6)
            val_score = round(metric(logits, yv), 6)
        if test:
            logits, y = predict_split(model, task, "test", device=device)
            preds = logits.argmax(1)
            accuracy = round(float((preds == y).float().mean()), 6)
            score = round(metric(logits, y), 6)
            if reference is not None:
                agreement = round(float((preds == reference).float().mean()), 6)
    # the timed inputs: the first samples of the split (as many as the largest batch timed)
    x = task.head("test" if test else task.eval_split, max(config.batch_sizes))
    row: dict[str, Any] = {
        "params": num_params(model),
        "size_bytes": model.size_bytes if onnx else _torch_size(folder, model),
        "macs": None if onnx else count_macs(model, x[:1]),
        "engine": "onnxruntime" if onnx else "torch",
        "accuracy": accuracy,
        "val_accuracy": val_accuracy,
        "score": score,
        "val_score": val_score,
        "agreement": agreement,
    }
    if baseline is None:
        row["latency_ms"] = latency(model, x, config)
    else:
        row["latency_ms"], base, row["timing"] = latency_against(model, baseline, x, config)
        row["faster_by"] = {k: round(base[k]["p50"] / v["p50"], 3) if v["p50"] > 0 else None
                            for k, v in row["latency_ms"].items()}
    if config.cuda:
        missing = onnx_cuda_missing(model, config.threads) if onnx else None
        if missing is None:
            row["latency_ms_cuda"] = latency(model, x, config, device="cuda")
        else:  # the report says, in one line, why this ONNX stage has no CUDA latency
            row.setdefault("timing", {})["cuda"] = missing
    return row, preds


def onnx_cuda_missing(model: OnnxModel | None = None, threads: int | None = None) -> str | None:
    """Why ONNX Runtime cannot time a graph on CUDA here, or None when it can.

    With ``model``, its CUDA session (for ``threads``, the one timing will reuse) is opened, so a
    provider that is installed but whose libraries do not load (ONNX Runtime would fall back to
    the CPU) is reported too.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"no CUDA latency for this ONNX graph: onnxruntime {ort.__version__} has no "
                "CUDAExecutionProvider (install onnxruntime-gpu to measure it)")
    if model is not None:
        try:
            model.session("cuda", threads)
        except ArtifactError as e:
            return f"no CUDA latency for this ONNX graph: {e}"
    return None


def onnx_bound_call(session: Any, array: np.ndarray, device: str) -> Callable[[], Any]:
    """One inference of ``session`` on ``array`` with its input and outputs bound to ``device``.

    On ``"cuda"`` the input is copied to the GPU once, here, and the outputs stay there, so a
    timed call is the graph's own work, as a torch model's call on a GPU tensor is; a plain
    ``session.run`` would add a host-to-device and a device-to-host copy to every call.
    """
    import onnxruntime as ort

    binding = session.io_binding()
    value = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
    binding.bind_ortvalue_input(session.get_inputs()[0].name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, device)

    def call() -> Any:
        session.run_with_iobinding(binding)
        return binding

    return call
