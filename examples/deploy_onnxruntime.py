"""Serve the final student with plain ONNX Runtime: the .onnx file is all that ships.

Run the flagship pipeline first (``kdcompress run pipelines/tt_distill_quant.py``), then::

    python examples/deploy_onnxruntime.py                       # the int8 student, random inputs
    python examples/deploy_onnxruntime.py path/to/model.onnx --inputs images.npy --threads 2

The serving code below needs only ``onnxruntime`` and ``numpy``; nothing from kdcompress or
PyTorch. Inputs must be preprocessed as in training (for the built-in digits task: pixels / 16,
then standardised with the training split's mean and standard deviation). With ``--evaluate``,
and kdcompress installed, the script also reports accuracy on the digits test split.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

DEFAULT_MODEL = Path("runs/tt_distill_quant/stages/int8/model.onnx")


def open_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """An inference session on the GPU when onnxruntime-gpu sees one, else on the CPU."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")  # falls back to the CPU without a GPU
    return ort.InferenceSession(str(path), options, providers=providers)


def classify(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 256
             ) -> tuple[np.ndarray, np.ndarray]:
    """Class indices and softmax probabilities for ``images`` of shape (N, C, H, W)."""
    meta = session.get_inputs()[0]
    expected = [d if isinstance(d, int) else None for d in meta.shape]
    if images.ndim != len(expected) or any(
            e is not None and e != s for e, s in zip(expected, images.shape, strict=True)):
        raise ValueError(f"the model takes {meta.name} of shape {meta.shape}, "
                         f"but got {images.shape}")
    images = np.ascontiguousarray(images, dtype=np.float32)
    logits = np.concatenate([session.run(None, {meta.name: images[i:i + batch_size]})[0]
                             for i in range(0, len(images), batch_size)])
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits.argmax(axis=1), z / z.sum(axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--inputs", type=Path, help=".npy file of preprocessed inputs (N, C, H, W)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--evaluate", action="store_true",
                        help="also report accuracy on the digits test split (needs kdcompress)")
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"{args.model} not found: run `kdcompress run "
                         "pipelines/tt_distill_quant.py` first, or pass the path of a .onnx")

    session = open_session(args.model, args.threads)
    meta = session.get_inputs()[0]
    print(f"{args.model} ({args.model.stat().st_size / 1024:.1f} KiB) on "
          f"{session.get_providers()[0]}; input {meta.name} {meta.shape}")
    if args.inputs:
        images = np.load(args.inputs)
    else:
        shape = [8 if not isinstance(d, int) else d for d in meta.shape]
        images = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    start = time.perf_counter()
    labels, proba = classify(session, images)
    elapsed = time.perf_counter() - start
    print(f"classified {len(images)} inputs in {elapsed * 1e3:.1f} ms")
    for i in range(min(5, len(images))):
        print(f"  input {i}: class {labels[i]} (p = {proba[i, labels[i]]:.3f})")

    if args.evaluate:  # evaluation only: serving above never imports kdcompress
        from kdcompress import data

        x, y = data.digits().arrays("test")
        predicted, _ = classify(session, x.numpy())
        print(f"digits test accuracy: {(predicted == y.numpy()).mean():.4f} ({len(y)} images)")


if __name__ == "__main__":
    main()
