"""Image folders as tasks: one sub-folder per class, images decoded only when a sample is read.

Two layouts are read. With split folders, ``root/train/<class>/``, and optionally
``root/val/<class>/`` and ``root/test/<class>/``; without them, ``root/<class>/``. A split that has
no folder is drawn from the training images, class by class, with a seeded permutation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcompress.data._task import Task
from kdcompress.errors import DataError

__all__ = ["from_folder", "ImageFolder", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

#: Files read as images (case-insensitive); other files in class folders are skipped with a
#: warning.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SPLITS = ("train", "val", "test")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
#: Training images decoded to estimate the normalisation when ``mean``/``std`` are not given.
_STATS_SAMPLES = 1000
_DEFAULT_VAL, _DEFAULT_TEST = 0.1, 0.2


@dataclass(frozen=True)
class _File:
    """One image: its path relative to the root, its class, and its content digest."""

    path: str
    label: int
    digest: bytes | None = None


class ImageFolder(Dataset):
    """A map-style data set of image files, each decoded when its sample is read.

    Yields ``(input, label)``: a float32 tensor of shape ``(channels, height, width)`` scaled to
    ``[0, 1]`` and normalised per channel as ``(x - mean) / std``, and an int64 class index.
    When the files' digests are known (the task hashed them), each file is checked against its
    digest when read, so an image changed after the task was built is an error, not a silent
    mismatch with the cache.

    Parameters
    ----------
    root : Path
        The folder the file paths are relative to.
    files : sequence of _File
        The images, in sample order.
    mode : {"L", "RGB"}
        Pillow mode every image is converted to (1 or 3 channels).
    shape : (int, int)
        ``(height, width)`` of every input.
    resize : bool
        Resize each image to ``shape`` (bilinear); otherwise an image of another size is an
        error naming it.
    mean, std : tuple of float
        One value per channel.
    """

    def __init__(self, root: Path, files: Sequence[_File], *, mode: str, shape: tuple[int, int],
                 resize: bool, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.root = Path(root)
        self.files = list(files)
        self.mode, self.shape, self.resize = mode, tuple(shape), resize
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.files[i]
        x = _normalise(self.pixels(i), self.mean, self.std)
        return x, torch.tensor(item.label)

    def pixels(self, i: int) -> np.ndarray:
        """Image ``i`` as an array of unsigned bytes, ``(height, width, channels)``."""
        item = self.files[i]
        path = self.root / item.path
        raw = _read(path)
        if item.digest is not None and _digest(raw) != item.digest:
            raise DataError(f"image {path} changed after the task was built (its content no "
                            "longer matches the task's fingerprint): build the task again")
        image = _decode(path, raw, self.mode)
        height, width = self.shape
        if self.resize:
            if image.size != (width, height):
                from PIL import Image

                image = image.resize((width, height), Image.BILINEAR)
        elif image.size != (width, height):
            raise DataError(f"image {path} is {image.size[0]}x{image.size[1]} (width x height) "
                            f"but the task's images are {width}x{height}: pass "
                            f"size=({height}, {width}) to from_folder to resize every image")
        pixels = np.asarray(image, dtype=np.uint8)
        return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _normalise(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
               ) -> torch.Tensor:
    """``(H, W, C)`` bytes -> ``(C, H, W)`` float32 in [0, 1], then ``(x - mean) / std``: the
    same operations, in the same order, as :func:`~kdcompress.data.mnist`."""
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
    if len(set(mean)) == 1 and len(set(std)) == 1:
        return (x - mean[0]) / std[0]
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def _decode(path: Path, raw: bytes, mode: str):
    """The image in ``raw``, fully decoded and converted to ``mode``; a DataError naming it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert(mode)
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBomb
        raise DataError(f"cannot decode image {path} ({type(exc).__name__}: {exc}): replace "
                        "or delete the file") from exc


def _header(path: Path, raw: bytes) -> tuple[tuple[int, int], str]:
    """``((width, height), mode)`` from an image's header, without decoding its pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.size, image.mode
    except Exception as exc:
        raise DataError(f"cannot read image {path}: it is not a PNG or JPEG image Pillow can "
                        f"open ({type(exc).__name__}: {exc}); replace or delete the file") \
            from exc


def from_folder(
    root: str | os.PathLike, *, size: int | tuple[int, int] | None = None,
    grayscale: bool | None = None, mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None, val_fraction: float | None = None,
    test_fraction: float | None = None, seed: int = 0, name: str | None = None,
    fingerprint: str | None = None, num_workers: int = 0, pin_memory: bool = False,
) -> Task:
    """A task from an image folder: one sub-folder per class, PNG or JPEG files, read lazily.

    Layouts: ``root/train/<class>/`` with optional ``root/val/<class>/`` and
    ``root/test/<class>/``, or ``root/<class>/`` alone. Classes are the sub-folder names in
    sorted order (label 0 is the first); files are found recursively, in sorted order. A split
    without a folder is drawn from the training images of each class with a seeded permutation
    (``val_fraction``, default 0.1; ``test_fraction``, default 0.2). Images are decoded when a
    sample is read (:class:`ImageFolder`), so a data set larger than memory streams through
    training and measurement.

    Parameters
    ----------
    root : path
        The folder.
    size : int or (int, int), optional
        Resize every image to ``(height, width)`` (an int: square). Without it every image
        must have the size of the first training image.
    grayscale : bool, optional
        One channel (Pillow mode ``"L"``) or three (``"RGB"``). By default taken from the
        images: one channel when every image is grayscale, three when every image is colour.
    mean, std : float or sequence of float, optional
        Normalisation, per channel or one value for all: inputs are ``(pixel / 255 - mean) /
        std``. Both or neither; by default estimated from up to 1000 training images drawn
        with ``seed``, as the built-in tasks standardise with training statistics. MNIST's
        published values are ``mean=0.1307, std=0.3081``.
    val_fraction, test_fraction : float, optional
        Fractions of each class's training images drawn for a split that has no folder; an
        error for a split that has one (its folder is used).
    seed : int
        Seed of the split draw and of the images the normalisation is estimated from.
    name : str, optional
        Shown in reports; the folder's name by default.
    fingerprint : str, optional
        Your own content key. Without it every file is read once here (not decoded): its bytes
        are hashed into the task's fingerprint and its header gives its size and mode, so size
        and mode errors come before any training. With it, no file is read beyond the first
        training image and the normalisation sample, and an image of the wrong size is an
        error when it is read.
    num_workers : int
        DataLoader worker processes that decode images (0: the calling process).
    pin_memory : bool
        Page-locked batches, for faster copies to a GPU.

    Returns
    -------
    Task
        ``classes`` holds the class names in label order.

    Raises
    ------
    DataError
        The folder or a class folder is missing or holds no image (the folder is named); an
        image cannot be read (the file is named); images differ in size without ``size`` (two
        files and their sizes are named) or mix grayscale and colour without ``grayscale``;
        the splits have different classes; a fraction leaves a class without training images.

    Examples
    --------
    >>> task = from_folder("digits_png/", mean=0.1307, std=0.3081)  # doctest: +SKIP
    >>> task.classes, task.input_shape  # doctest: +SKIP
    (('0', '1', ..., '9'), (1, 28, 28))
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"from_folder: {root} is not a folder")
    shape = _size(size)
    folders = _layout(root)
    fractions = _fractions(folders, val_fraction, test_fraction)
    scanned = {split: _scan(root, folder) for split, folder in folders.items()}
    classes = _check_class_names(root, scanned, folders)
    splits = _splits(root, scanned, classes, fractions, seed)
    hashed = fingerprint is None
    if hashed:
        splits, headers = _hash_files(root, splits)
        mode = _mode(grayscale, headers)
        first = _same_size(headers) if shape is None else shape
    else:
        path = root / splits["train"][0].path
        (width, height), found = _header(path, _read(path))
        mode = _mode(grayscale, {path.relative_to(root).as_posix(): ((width, height), found)})
        first = shape or (height, width)
    channels = 1 if mode == "L" else 3
    norm = _normalisation(root, splits["train"], mode, first, shape is not None, mean, std,
                          channels, seed)
    datasets = {s: ImageFolder(root, files, mode=mode, shape=first, resize=shape is not None,
                               mean=norm[0], std=norm[1]) if files else None
                for s, files in splits.items()}
    settings = {"size": shape, "mode": mode, "mean": norm[0], "std": norm[1], "seed": seed,
                "fractions": fractions, "classes": classes}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    if hashed:
        for split, files in splits.items():
            for f in files:
                key.update(f"{split}\0{f.label}\0{f.path}\0".encode() + (f.digest or b""))
    else:
        key.update(f"user:{fingerprint}".encode())
    return Task(name=name or root.name, train=datasets["train"], val=datasets["val"],
                test=datasets["test"], num_classes=len(classes),
                input_shape=(channels, *first), fingerprint=key.hexdigest()[:16],
                num_workers=num_workers, pin_memory=pin_memory, classes=tuple(classes))


def _size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in pair)):
        raise DataError(f"from_folder: size must be an integer >= 1 or a pair (height, width) "
                        f"of them, but got {size!r}")
    return int(pair[0]), int(pair[1])


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _layout(root: Path) -> dict[str, Path]:
    """The folder of each split that has one: ``{"train": root/train, ...}``, or
    ``{"train": root}`` when the class folders sit in ``root``."""
    names = _subfolders(root)
    present = [s for s in _SPLITS if s in names]
    if not present:
        return {"train": root}
    if "train" not in present:
        raise DataError(f"from_folder: {root} holds {'/, '.join(present)}/ but no train/ folder: "
                        "put the training images in train/<class>/ (or, without split folders, "
                        "the class folders directly in the root)")
    others = [n for n in names if n not in _SPLITS]
    if others:
        raise DataError(f"from_folder: {root} holds split folders ({', '.join(present)}) and "
                        f"other folders ({', '.join(others[:5])}); use either "
                        "root/train/<class>/ (with optional val/ and test/) or root/<class>/")
    return {s: root / s for s in present}


def _fractions(folders: dict[str, Path], val_fraction: float | None,
               test_fraction: float | None) -> dict[str, float]:
    """The fraction drawn from the training images for each split that has no folder."""
    fractions = {}
    for split, value, default in (("val", val_fraction, _DEFAULT_VAL),
                                  ("test", test_fraction, _DEFAULT_TEST)):
        key = f"{split}_fraction"
        if split in folders:
            if value is not None:
                raise DataError(f"from_folder: {key}={value!r} draws a {split} split from the "
                                f"training images, but {folders[split]} is the {split} split; "
                                f"drop {key} (or the {split}/ folder)")
            continue
        value = default if value is None else value
        # a drawn val split may be empty (val_fraction=0: no val split); a test split may not
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (0 <= value < 1) or (split == "test" and value == 0):
            need = "0 <= val_fraction < 1" if split == "val" else "0 < test_fraction < 1"
            raise DataError(f"from_folder: {key} must satisfy {need} (there is no {split}/ "
                            f"folder), but got {value!r}")
        fractions[split] = float(value)
    if sum(fractions.values()) >= 1:
        raise DataError(f"from_folder: val_fraction + test_fraction must be below 1, but got "
                        f"{sum(fractions.values()):g}; nothing would be left to train on")
    return fractions


def _scan(root: Path, folder: Path) -> dict[str, list[str]]:
    """``{class name: [image paths relative to root, sorted]}`` of one split's folder."""
    classes = _subfolders(folder)
    if not classes:
        raise DataError(f"from_folder: {folder} holds no class folders; put each class's images "
                        "in a sub-folder named after the class")
    loose = [p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        log.warning("from_folder: %d file(s) directly in %s are not in a class folder and are "
                    "skipped (e.g. %s)", len(loose), folder, sorted(loose)[0])
    found = {}
    for name in classes:
        images, skipped = [], []
        for dirpath, dirnames, filenames in os.walk(folder / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if f.startswith("."):
                    continue
                path = Path(dirpath) / f
                (images if path.suffix.lower() in IMAGE_SUFFIXES else skipped).append(path)
        if not images:
            other = f" ({len(skipped)} other file(s), e.g. {skipped[0].name}: only " \
                f"{', '.join(IMAGE_SUFFIXES)} are read)" if skipped else ""
            raise DataError(f"from_folder: class folder {folder / name} holds no image{other}; "
                            "add images or remove the folder")
        if skipped:
            log.warning("from_folder: %d file(s) in %s are not %s images and are skipped (e.g. "
                        "%s)", len(skipped), folder / name, "/".join(IMAGE_SUFFIXES),
                        skipped[0].name)
        found[name] = sorted(p.relative_to(root).as_posix() for p in images)
    return found


def _check_class_names(root: Path, scanned: dict[str, dict[str, list[str]]],
                       folders: dict[str, Path]) -> list[str]:
    classes = list(scanned["train"])
    if len(classes) < 2:
        raise DataError(f"from_folder: {folders['train']} holds one class folder "
                        f"({classes[0]}); a classifier needs at least two classes")
    for split, found in scanned.items():
        if list(found) != classes:
            missing = [c for c in classes if c not in found]
            extra = [c for c in found if c not in classes]
            parts = ([f"lacks {', '.join(missing[:5])}"] if missing else []) + \
                ([f"has {', '.join(extra[:5])}, which train/ lacks"] if extra else [])
            raise DataError(f"from_folder: the {split} split ({folders[split]}) has other classes "
                            f"than train/: it {' and '.join(parts)}; every split needs the same "
                            "class folders")
    return classes


def _splits(root: Path, scanned: dict[str, dict[str, list[str]]], classes: list[str],
            fractions: dict[str, float], seed: int) -> dict[str, list[_File]]:
    """The files of each split, drawing the splits without a folder from train's classes."""
    out: dict[str, list[_File]] = {s: [] for s in _SPLITS}
    label_of = {name: label for label, name in enumerate(classes)}
    for split, found in scanned.items():
        if split != "train":
            out[split] = [_File(p, label_of[c]) for c, paths in found.items() for p in paths]
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        paths = scanned["train"][name]
        order = rng.permutation(len(paths))
        start = 0
        taken: dict[str, set[int]] = {}
        for split in ("test", "val"):
            if split in fractions:
                n = round(len(paths) * fractions[split])
                taken[split] = set(order[start:start + n].tolist())
                start += n
        if start >= len(paths):
            folder = Path(root, paths[0]).parent if paths else root / name
            raise DataError(f"from_folder: class '{name}' has {len(paths)} image(s) and the "
                            f"fractions {fractions} take them all; none is left to train on "
                            f"(add images to {folder} or lower the fractions)")
        for i, p in enumerate(paths):
            split = next((s for s, idx in taken.items() if i in idx), "train")
            out[split].append(_File(p, label))
    for split in ("train", "test"):
        if not out[split]:
            raise DataError(f"from_folder: the {split} split drawn from {root} is empty: raise "
                            f"{split}_fraction or add images")
    return out


def _hash_files(root: Path, splits: dict[str, list[_File]]
                ) -> tuple[dict[str, list[_File]], dict[str, tuple[tuple[int, int], str]]]:
    """Read every file once: its digest, and its size and mode from the header (no decoding)."""
    headers: dict[str, tuple[tuple[int, int], str]] = {}
    out = {}
    for split, files in splits.items():
        hashed = []
        for f in files:
            path = root / f.path
            raw = _read(path)
            headers[f.path] = _header(path, raw)
            hashed.append(_File(f.path, f.label, _digest(raw)))
        out[split] = hashed
    return out, headers


def _mode(grayscale: bool | None, headers: dict[str, tuple[tuple[int, int], str]]) -> str:
    if grayscale is not None:
        if not isinstance(grayscale, bool):
            raise DataError(f"from_folder: grayscale must be True, False or None, but got "
                            f"{grayscale!r}")
        return "L" if grayscale else "RGB"
    gray = {path: mode in _GRAY_MODES for path, (_, mode) in headers.items()}
    first = next(iter(gray))
    other = next((p for p, g in gray.items() if g != gray[first]), None)
    if other is not None:
        kinds = {True: "grayscale", False: "colour"}
        raise DataError(f"from_folder: {first} is {kinds[gray[first]]} (mode "
                        f"{headers[first][1]}) but {other} is {kinds[gray[other]]} (mode "
                        f"{headers[other][1]}); pass grayscale=True or grayscale=False to convert "
                        "every image to one")
    return "L" if gray[first] else "RGB"


def _same_size(headers: dict[str, tuple[tuple[int, int], str]]) -> tuple[int, int]:
    """The one ``(height, width)`` of every image, or a DataError naming two that differ."""
    first = next(iter(headers))
    (width, height), _ = headers[first]
    for path, ((w, h), _) in headers.items():
        if (w, h) != (width, height):
            raise DataError(f"from_folder: images differ in size: {first} is {width}x{height} "
                            f"but {path} is {w}x{h} (width x height); pass size=(height, width) "
                            "to resize every image, e.g. "
                            f"size=({height}, {width})")
    return height, width


def _normalisation(root: Path, train: list[_File], mode: str, shape: tuple[int, int],
                   resize: bool, mean: float | Sequence[float] | None,
                   std: float | Sequence[float] | None, channels: int, seed: int
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)``: as given, or estimated from up to :data:`_STATS_SAMPLES`
    training images drawn with ``seed``."""
    if (mean is None) != (std is None):
        raise DataError("from_folder: give both mean and std, or neither (they are then "
                        "estimated from the training images)")
    if mean is not None:
        m = _per_channel("mean", mean, channels)
        s = _per_channel("std", std, channels)
        if not all(v > 0 for v in s):
            raise DataError(f"from_folder: std must be > 0 in every channel, but got {std!r}")
        return m, s
    reader = ImageFolder(root, train, mode=mode, shape=shape, resize=resize,
                         mean=(0.0,) * channels, std=(1.0,) * channels)
    n = min(_STATS_SAMPLES, len(train))
    index = np.random.default_rng(seed).permutation(len(train))[:n]
    pixels = np.stack([reader.pixels(int(i)) for i in sorted(index)]).astype(np.float64) / 255.0
    m = pixels.mean(axis=(0, 1, 2))
    s = pixels.std(axis=(0, 1, 2))
    s = np.where(s > 0, s, 1.0)  # a constant channel is only centred
    return tuple(round(float(v), 6) for v in m), tuple(round(float(v), 6) for v in s)


def _per_channel(key: str, value: float | Sequence[float], channels: int) -> tuple[float, ...]:
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else list(value) if isinstance(value, (list, tuple)) else None
    if values is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and math.isfinite(v) for v in values) \
            or len(values) not in (1, channels):
        what = "one number (the images have one channel)" if channels == 1 else \
            f"a number or {channels} numbers (one per channel)"
        raise DataError(f"from_folder: {key} must be {what}, but got {value!r}")
    return tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)
