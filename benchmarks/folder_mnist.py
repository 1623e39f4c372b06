"""The image-folder loader against the IDX loader on the same MNIST images.

Writes the first ``--train`` training and ``--test`` test images of MNIST as PNG files into
``OUT/train/<digit>/`` and ``OUT/test/<digit>/``, reads them back with ``data.from_folder``
(MNIST's published normalisation, so the tensors can be compared with ``data.mnist``'s), and
reports:

- whether every input tensor and label read from the folder equals the IDX loader's;
- the test accuracy of one model trained on the IDX images, measured through each loader;
- a model trained through each loader (same images, same order, same seed): accuracy and
  seconds per epoch, so the cost of decoding PNGs lazily shows.

    python benchmarks/folder_mnist.py --data /work/shared/data/mnist            # 6000 + 1000
    python benchmarks/folder_mnist.py --data ... --train 600 --test 200 --epochs 1  # quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcompress import data, models
from kdcompress.stages.train import train
from kdcompress.training import accuracy

MEAN, STD = 0.1307, 0.3081  # data.mnist's normalisation


def write_pngs(out: Path, images: np.ndarray, labels: np.ndarray, split: str) -> None:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = out / split / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / f"{i:05d}.png")


def folder_order(labels: np.ndarray) -> np.ndarray:
    """The order from_folder reads the images in: by digit, then by file name (the index)."""
    return np.lexsort((np.arange(len(labels)), labels))


def in_folder_order(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The images as data.mnist normalises them, in the folder's order."""
    order = folder_order(labels)
    x = torch.from_numpy(images[order].astype(np.float32) / 255.0)
    return ((x - MEAN) / STD).unsqueeze(1), torch.from_numpy(labels[order].astype(np.int64))


def same_tensors(a: data.Task, b: data.Task, split: str) -> bool:
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb)
               in zip(a.batches(split), b.batches(split), strict=True))


def timed_train(task: data.Task, width: int, epochs: int) -> tuple[torch.nn.Module, float]:
    start = time.perf_counter()
    model = train(models.cnn(width=width), epochs=epochs, data=task)
    return model, (time.perf_counter() - start) / max(epochs, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get(data.DATA_ENV),
                        help="folder with the four MNIST IDX files (or set KDCOMPRESS_DATA)")
    parser.add_argument("--train", type=int, default=6000, help="training images written")
    parser.add_argument("--test", type=int, default=1000, help="test images written")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers decoding the PNGs")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the PNG folders go (a temporary folder by default)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    idx = data.mnist(args.data, val_size=0)
    arrays = {}
    for split, n in (("train", args.train), ("test", args.test)):
        x, y = idx.arrays(split)
        pixels = np.rint((x[:n, 0].numpy() * STD + MEAN) * 255).astype(np.uint8)
        arrays[split] = (pixels, y[:n].numpy())
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        start = time.perf_counter()
        for split, (images, labels) in arrays.items():
            write_pngs(out, images, labels, split)
        write_s = time.perf_counter() - start

        start = time.perf_counter()
        folder = data.from_folder(out, mean=MEAN, std=STD, val_fraction=0,
                                  num_workers=args.workers, name="mnist-png")
        build_s = time.perf_counter() - start
        memory = data.from_tensors(*in_folder_order(*arrays["train"]),
                                   *in_folder_order(*arrays["test"]), num_classes=10,
                                   name="mnist-idx")
        # the pixels went from the IDX loader's tensors back to bytes: check the round trip
        for split, (images, labels) in arrays.items():
            order = torch.from_numpy(folder_order(labels))
            assert torch.equal(in_folder_order(images, labels)[0],
                               idx.arrays(split)[0][:len(labels)][order]), split

        identical = {s: same_tensors(folder, memory, s) for s in ("train", "test")}
        model, _ = timed_train(memory, args.width, args.epochs)
        acc_memory = accuracy(model, memory, "test")
        acc_folder = accuracy(model, folder, "test")
        through_memory, epoch_memory = timed_train(memory, args.width, args.epochs)
        through_folder, epoch_folder = timed_train(folder, args.width, args.epochs)
        weights_equal = all(torch.equal(a, b) for a, b in zip(
            through_memory.state_dict().values(), through_folder.state_dict().values(),
            strict=True))
        after = (accuracy(through_memory, memory, "test"), accuracy(through_folder, folder, "test"))

    load = os.getloadavg()
    print(f"MNIST, first {args.train} training and {args.test} test images; cnn(width="
          f"{args.width}), {args.epochs} epochs; {args.workers} DataLoader workers; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    print(f"write PNGs: {write_s:.1f} s; from_folder (hash + headers of "
          f"{args.train + args.test} files): {build_s:.2f} s")
    print(f"identical tensors and labels: train {identical['train']}, test {identical['test']}")
    print("| model | test accuracy via IDX tensors | via PNG folder |")
    print("|---|---|---|")
    print(f"| trained on IDX tensors | {acc_memory:.4f} | {acc_folder:.4f} |")
    print("| loader trained through | test accuracy | seconds per epoch |")
    print("|---|---|---|")
    print(f"| IDX tensors in memory | {after[0]:.4f} | {epoch_memory:.2f} |")
    print(f"| PNG folder, decoded lazily | {after[1]:.4f} | {epoch_folder:.2f} |")
    print(f"weights trained through both loaders identical: {weights_equal}")


if __name__ == "__main__":
    main()
