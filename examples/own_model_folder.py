"""Your own model and your own image folder through every stage, then served from the .onnx.

    python examples/own_model_folder.py [--images DIR] [--out runs/own_model_folder]

* Data: an image folder (``DIR/train/<class>/*.png`` and ``DIR/test/<class>/*.png``), decoded
  lazily by ``data.from_folder``. Without ``--images`` the script writes scikit-learn's bundled
  8x8 digits there as PNG files first, so it runs offline.
* Model: ``SmallResNet`` below is plain PyTorch (BatchNorm, residual additions), with nothing
  from kdcompress in it: the stages take it as it is.
* Training: random crops and noise on the training batches of ``train`` and ``distill``
  (teacher and student see the same augmented batch); every automatic choice and the report use
  macro-F1 instead of top-1.
* Deployment: the int8 ``.onnx`` classifies a PNG with ONNX Runtime and Pillow alone, with the
  normalisation the task was built with.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch import Tensor, nn

from kdcompress import Pipeline, augment, data
from kdcompress.losses import CE, KD
from kdcompress.progress import RichProgress
from kdcompress.report import Report
from kdcompress.stages import decompose_tt, distill, export_onnx, prune, quantize_onnx, train

#: The task's normalisation, fixed so that serving code can apply it: ``(pixel / 255 - MEAN) /
#: STD`` (``from_folder`` estimates both from the training images when they are not given).
MEAN, STD = 0.3, 0.4


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual addition."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class SmallResNet(nn.Module):
    """A user's model: stem, two residual blocks, global pooling, linear classifier."""

    def __init__(self, channels: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def write_digits(root: Path) -> None:
    """scikit-learn's 8x8 digits as ``root/{train,test}/<class>/<n>.png`` (grey, 0-255)."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    test = set(rng.permutation(len(labels))[: len(labels) // 5].tolist())
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("test" if i in test else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image.reshape(8, 8) * 255 / 16).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")


def build(images: Path, *, epochs: int = 10) -> Pipeline:
    """Teacher -> TT student -> KD -> prune with KD recovery -> ONNX -> compact int8."""
    task = data.from_folder(images, mean=MEAN, std=STD, val_fraction=0.1)
    crops = [augment.RandomCrop(padding=1), augment.Noise(std=0.05)]
    pipeline = Pipeline("own_model_folder", data=task, seed=0, metric="macro_f1")
    teacher = pipeline.stage(train, out="teacher", model=SmallResNet(), epochs=epochs,
                             transforms=crops)
    convs = [f"blocks.{b}.conv{c}" for b in (0, 1) for c in (1, 2)]
    student = pipeline.stage(decompose_tt, out="student", model=teacher, rank=8, layers=convs)
    student_kd = pipeline.stage(distill, out="student_kd", student=student, teacher=teacher,
                                loss=KD(temperature=4) * 0.9 + CE() * 0.1, epochs=epochs,
                                transforms=crops)
    pruned = pipeline.stage(prune, out="pruned", model=student_kd, ratio=0.3, teacher=teacher,
                            recovery_epochs=max(1, epochs // 4))
    fp32 = pipeline.stage(export_onnx, out="fp32", model=pruned)
    pipeline.stage(quantize_onnx, out="int8", model=fp32, mode="static", compact=True)
    return pipeline


def serve(model: Path, png: Path) -> tuple[int, float]:
    """Class and probability of one PNG, with ONNX Runtime, Pillow and numpy only."""
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    x = ((pixels / 255 - MEAN) / STD)[None, None]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0][0]
    p = np.exp(logits - logits.max())
    return int(p.argmax()), float(p.max() / p.sum())


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path,
                        help="image folder (train/ and test/ with one folder per class); "
                             "default: the digits written as PNG files to a temporary folder")
    parser.add_argument("--out", default="runs/own_model_folder")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        images = args.images
        if images is None:
            images = Path(tmp) / "digits"
            write_digits(images)
        report = build(images, epochs=args.epochs).run(out=args.out, progress=RichProgress())
        teacher, final = report.row("teacher"), report.row("int8")
        print(f"int8: test macro-F1 {final.score:.4f} (teacher {teacher.score:.4f}), "
              f"{teacher.size_bytes / final.size_bytes:.1f}x smaller than the teacher")
        png = next((images / "test").rglob("*.png"))
        label, p = serve(Path(args.out) / "stages" / "int8" / "model.onnx", png)
        print(f"{png.relative_to(images)}: class {task_class(images, label)} (p = {p:.3f})")
    return report


def task_class(images: Path, label: int) -> str:
    """The class folder name of ``label`` (classes are the sorted folder names)."""
    return sorted(p.name for p in (images / "train").iterdir() if p.is_dir())[label]


if __name__ == "__main__":
    main()
