"""Time deployable models against a reference, side by side, with the library's own ruler.

Run by hand (it is not a test)::

    python benchmarks/time_side_by_side.py --reference RUN/stages/teacher/<fingerprint> \\
        --model flagship=RUN/stages/int8/<fingerprint>/model.onnx \\
        --model fastest=RUN/search/best-latency.onnx --rounds 5

Each ``--model`` (an ``.onnx`` file, run by ONNX Runtime, or a folder saved by
``kdcompress.artifacts.save_module``, run by PyTorch) is timed against ``--reference`` with
:func:`kdcompress.metrics.latency_against`, the function that fills the report's latency
columns: the two alternate in turns of consecutive runs, one intra-op thread, on an input of the
reference's shape (``--shape``, MNIST's by default). Each pair is timed ``--rounds`` times, the
models in turn; the table gives the median over rounds of each median (ms) and of the
reference-to-model ratio measured within the same pair, with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from kdcompress.artifacts import OnnxModel, load_module
from kdcompress.metrics import MeasureConfig, latency_against


def _load(path: Path):
    return OnnxModel(path) if path.suffix == ".onnx" else load_module(path).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="a saved module folder or an .onnx file (the teacher)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a model to time against the reference (repeatable)")
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 28, 28],
                        help="one input's shape")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    models = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--model takes NAME=PATH, got {item!r}")
        models[name] = _load(Path(path))
    reference = _load(args.reference)
    torch.manual_seed(0)
    x = torch.rand(64, *args.shape)
    config = MeasureConfig(threads=args.threads, batch_sizes=(1, 64))
    load_before = os.getloadavg()
    results: dict[str, list[tuple[dict, dict]]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            mine, theirs, _ = latency_against(model, reference, x, config)
            results[name].append((mine, theirs))
    load_after = os.getloadavg()

    print(f"\n{args.rounds} rounds, {args.threads} thread(s); load average "
          f"{' / '.join(f'{v:.2f}' for v in load_before)} before, "
          f"{' / '.join(f'{v:.2f}' for v in load_after)} after\n")
    print("| model | b1 ms | reference b1 ms | faster at b1 | b64 ms | reference b64 ms "
          "| faster at b64 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, pairs in results.items():
        cells = [name]
        for key in ("batch_1", "batch_64"):
            mine = [m[key]["p50"] for m, _ in pairs]
            theirs = [t[key]["p50"] for _, t in pairs]
            ratio = [t / m for m, t in zip(mine, theirs, strict=True)]
            cells += [f"{statistics.median(mine):.3f}", f"{statistics.median(theirs):.3f}",
                      f"{statistics.median(ratio):.1f}x"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
