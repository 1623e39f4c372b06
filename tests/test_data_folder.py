"""data.from_folder: image folders read lazily, the same tensors as in memory, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdcompress import data, models
from kdcompress.errors import DataError
from kdcompress.training import FitConfig, accuracy, fit

MEAN, STD = 0.3, 0.4


def _digit_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` of scikit-learn's 8x8 digits as unsigned bytes, and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images[:n] * 16).clip(0, 255).astype(np.uint8), bunch.target[:n]


def _write(folder: Path, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
    for i in index:
        d = folder / str(labels[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], "L").save(d / f"{i:05d}.png")


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """240 digits as PNG files in root/train|val|test/<class>/, and the index of each split in
    the order the folder loader reads it (by class, then file name)."""
    images, labels = _digit_images(240)
    root = tmp_path_factory.mktemp("digits_png")
    order = np.random.default_rng(0).permutation(len(labels))
    parts = {"train": order[:160], "val": order[160:200], "test": order[200:]}
    for split, index in parts.items():
        _write(root / split, images, labels, index)
    ordered = {s: np.array(sorted(idx, key=lambda i: (labels[i], i))) for s, idx in parts.items()}
    return root, ordered, images, labels


def _memory_task(ordered, images, labels) -> data.Task:
    """The same images, normalised with the same operations, as tensors in memory."""
    def x(split):
        pixels = torch.from_numpy(images[ordered[split]].astype(np.float32) / 255.0)
        return ((pixels - MEAN) / STD).unsqueeze(1)

    def y(split):
        return torch.from_numpy(labels[ordered[split]].astype(np.int64))

    return data.from_tensors(x("train"), y("train"), x("test"), y("test"), x_val=x("val"),
                             y_val=y("val"), num_classes=10)


def test_folder_reads_the_same_tensors_and_trains_to_the_same_model(digits_folder):
    root, ordered, images, labels = digits_folder
    folder = data.from_folder(root, mean=MEAN, std=STD)
    memory = _memory_task(ordered, images, labels)
    assert not folder.in_memory and memory.in_memory
    assert folder.classes == tuple(str(c) for c in range(10))
    assert folder.input_shape == (1, 8, 8) and folder.num_classes == 10
    for split in ("train", "val", "test"):
        xf, yf = folder.arrays(split)
        xm, ym = memory.arrays(split)
        assert torch.equal(xf, xm) and torch.equal(yf, ym), split
    # one epoch through fit on each: the same batches, so the same weights and accuracy
    trained = []
    for task in (folder, memory):
        model = models.cnn(width=8, hidden=16).build(task.input_shape, task.num_classes)
        torch.manual_seed(0)
        fit(model, lambda net, x, y: F.cross_entropy(net(x), y), task,
            config=FitConfig(epochs=1, batch_size=32))
        trained.append(model)
    for key, value in trained[0].state_dict().items():
        torch.testing.assert_close(trained[1].state_dict()[key], value, rtol=0, atol=0)
    assert accuracy(trained[0], folder, "test") == accuracy(trained[1], memory, "test")


def test_measurement_streams_a_folder_without_stacking_it(digits_folder, monkeypatch,
                                                          fast_measure):
    from kdcompress.metrics import measure

    root, ordered, images, labels = digits_folder
    folder = data.from_folder(root, mean=MEAN, std=STD)
    memory = _memory_task(ordered, images, labels)
    model = models.cnn(width=8, hidden=16).build((1, 8, 8), 10)
    expected = measure(model, memory, config=fast_measure)

    def refuse(self, split="test"):
        raise AssertionError(f"{split} split stacked whole")

    monkeypatch.setattr(data.Task, "arrays", refuse)
    row = measure(model, folder, config=fast_measure)
    assert (row["accuracy"], row["val_accuracy"]) == (expected["accuracy"],
                                                      expected["val_accuracy"])
    assert row["macs"] == expected["macs"]
    assert folder.calibration(16, seed=3).shape == (16, 1, 8, 8)  # only 16 samples read


def test_calibration_and_head_match_memory(digits_folder):
    root, ordered, images, labels = digits_folder
    folder = data.from_folder(root, mean=MEAN, std=STD)
    memory = _memory_task(ordered, images, labels)
    assert torch.equal(folder.calibration(16, seed=3), memory.calibration(16, seed=3))
    assert torch.equal(folder.example(5), memory.example(5))
    assert torch.equal(folder.head("val", 7), memory.head("val", 7))


def test_get_reads_a_folder_and_distill_may_cache_its_teacher(digits_folder):
    from kdcompress.stages.distill import _index_cacheable

    root, *_ = digits_folder
    task = data.get(f"folder:{root}")
    assert task.fingerprint == data.from_folder(root).fingerprint
    assert _index_cacheable(task.train)  # decoded the same way every epoch


def test_workers_stream_the_same_batches(digits_folder):
    root, *_ = digits_folder
    serial = data.from_folder(root, mean=MEAN, std=STD)
    workers = data.from_folder(root, mean=MEAN, std=STD, num_workers=2)
    assert workers.fingerprint == serial.fingerprint
    for (xa, ya), (xb, yb) in zip(serial.batches("test", batch_size=16),
                                  workers.batches("test", batch_size=16), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_class_folders_split_by_fraction_per_class_with_a_seed(tmp_path):
    images, labels = _digit_images(200)
    _write(tmp_path, images, labels, np.arange(200))
    task = data.from_folder(tmp_path, val_fraction=0.1, test_fraction=0.25, seed=1)
    files = {s: [f.path for f in task.split(s).files] for s in ("train", "val", "test")}
    every = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert sorted(sum(files.values(), [])) == every  # each file in exactly one split
    for c in range(10):
        n = int((labels == c).sum())
        in_test = [p for p in files["test"] if p.startswith(f"{c}/")]
        assert len(in_test) == round(n * 0.25)
    again = data.from_folder(tmp_path, val_fraction=0.1, test_fraction=0.25, seed=1)
    other = data.from_folder(tmp_path, val_fraction=0.1, test_fraction=0.25, seed=2)
    assert [f.path for f in again.test.files] == files["test"]
    assert [f.path for f in other.test.files] != files["test"]
    assert again.fingerprint == task.fingerprint != other.fingerprint
    assert data.from_folder(tmp_path, val_fraction=0).val is None


def test_default_normalisation_is_estimated_from_training_images(tmp_path):
    images, labels = _digit_images(60)
    _write(tmp_path, images, labels, np.arange(60))
    task = data.from_folder(tmp_path, val_fraction=0, test_fraction=0.2)
    x, _ = task.arrays("train")
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2  # all train < 1000


def test_colour_images_per_channel(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(8, 6, 5, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        (tmp_path / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(p, "RGB").save(tmp_path / "train" / f"c{i % 2}" / f"{i}.png")
        (tmp_path / "test" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(p, "RGB").save(tmp_path / "test" / f"c{i % 2}" / f"{i}.png")
    task = data.from_folder(tmp_path, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), val_fraction=0)
    assert task.input_shape == (3, 6, 5)
    x, y = task.test[0]  # test/c0/0.png
    want = (torch.from_numpy(pixels[0].astype(np.float32) / 255).permute(2, 0, 1)
            - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)) / torch.tensor([0.5, 0.6, 0.7]).view(
        3, 1, 1)
    torch.testing.assert_close(x, want)
    gray = data.from_folder(tmp_path, grayscale=True, mean=0.5, std=0.5, val_fraction=0)
    assert gray.input_shape == (1, 6, 5)


def test_fingerprint_hashes_content_not_file_times(tmp_path):
    images, labels = _digit_images(40)
    _write(tmp_path, images, labels, np.arange(40))
    before = data.from_folder(tmp_path, mean=MEAN, std=STD).fingerprint
    path = next(tmp_path.rglob("*.png"))
    os.utime(path, (1, 1))  # touched, same bytes
    assert data.from_folder(tmp_path, mean=MEAN, std=STD).fingerprint == before
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels, "L").save(path)
    assert data.from_folder(tmp_path, mean=MEAN, std=STD).fingerprint != before


def test_a_file_changed_after_the_task_was_built_is_named(tmp_path):
    images, labels = _digit_images(40)
    _write(tmp_path, images, labels, np.arange(40))
    task = data.from_folder(tmp_path, mean=MEAN, std=STD, test_fraction=0.5)
    path = tmp_path / task.test.files[0].path
    Image.fromarray(255 - images[0], "L").save(path)
    with pytest.raises(DataError, match=rf"image {path} changed after the task was built"):
        task.test[0]


def test_with_a_fingerprint_files_are_read_only_when_used(tmp_path):
    images, labels = _digit_images(30)
    _write(tmp_path / "train", images, labels, np.arange(20))
    _write(tmp_path / "test", images, labels, np.arange(20, 30))
    bad = tmp_path / "test" / str(labels[29]) / "00029.png"
    bad.write_bytes(b"not an image")
    task = data.from_folder(tmp_path, mean=MEAN, std=STD, fingerprint="v1", val_fraction=0)
    i = [f.path for f in task.test.files].index(bad.relative_to(tmp_path).as_posix())
    with pytest.raises(DataError, match=rf"cannot decode image {bad}"):
        task.test[i]
    with pytest.raises(DataError, match=rf"cannot read image {bad}"):  # hashed: found at once
        data.from_folder(tmp_path, mean=MEAN, std=STD, val_fraction=0)


@pytest.fixture
def small_folder(tmp_path) -> Path:
    images, labels = _digit_images(30)
    _write(tmp_path / "train", images, labels, np.arange(20))
    _write(tmp_path / "test", images, labels, np.arange(20, 30))
    return tmp_path


def test_empty_class_folder_is_named(small_folder):
    empty = small_folder / "train" / "7"
    for f in empty.iterdir():
        f.unlink()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=rf"class folder {empty} holds no image \(1 other file"):
        data.from_folder(small_folder)


def test_unreadable_image_is_named(small_folder):
    bad = small_folder / "train" / "3" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=rf"cannot read image {bad}: it is not a PNG or JPEG"):
        data.from_folder(small_folder)


def test_sizes_differ_without_resize_names_both_files(small_folder):
    odd = small_folder / "test" / "1" / "odd.png"
    Image.fromarray(np.zeros((10, 12), np.uint8), "L").save(odd)
    with pytest.raises(DataError, match=r"images differ in size: train/0/\d+\.png is 8x8 but "
                                        r"test/1/odd\.png is 12x10 \(width x height\); pass "
                                        r"size=\(height, width\)"):
        data.from_folder(small_folder)
    task = data.from_folder(small_folder, size=(8, 8), mean=MEAN, std=STD)
    assert task.input_shape == (1, 8, 8)
    resized = [f.path for f in task.test.files].index("test/1/odd.png")
    assert task.test[resized][0].shape == (1, 8, 8)


def test_classes_differing_between_splits(small_folder):
    (small_folder / "test" / "x").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(small_folder / "test" / "x" / "a.png")
    with pytest.raises(DataError, match=r"the test split \(.*test\) has other classes than "
                                        r"train/: it has x, which train/ lacks"):
        data.from_folder(small_folder)


def test_grayscale_and_colour_mixed_needs_a_choice(small_folder):
    colour = small_folder / "train" / "2" / "colour.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), "RGB").save(colour)
    with pytest.raises(DataError, match=r"train/2/colour\.png is colour .*pass grayscale=True"):
        data.from_folder(small_folder)
    assert data.from_folder(small_folder, grayscale=True).input_shape == (1, 8, 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"val_fraction": 0.2, "test_fraction": 0.3}, r"test_fraction=0.3 draws a test split from "
                                                  r"the training images, but .*test is the test"),
    ({"test_fraction": 0.0}, r"test_fraction=0.0 draws a test split"),
    ({"val_fraction": 1.2}, r"val_fraction must satisfy 0 <= val_fraction < 1 \(there is no "
                            r"val/ folder\), but got 1.2"),
    ({"mean": 0.5}, r"give both mean and std, or neither"),
    ({"mean": (0.1, 0.2), "std": 0.3}, r"mean must be one number \(the images have one "
                                       r"channel\), but got \(0.1, 0.2\)"),
    ({"size": (8, 0)}, r"size must be an integer >= 1 or a pair"),
])
def test_bad_settings(small_folder, kwargs, match):
    with pytest.raises(DataError, match=match):
        data.from_folder(small_folder, **kwargs)


def test_layout_errors(tmp_path):
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"holds val/ but no train/ folder"):
        data.from_folder(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataError, match=r"split folders \(train, val\) and other folders "
                                        r"\(cats\)"):
        data.from_folder(tmp_path)
    with pytest.raises(DataError, match=r"is not a folder"):
        data.from_folder(tmp_path / "missing")


def test_a_fraction_that_leaves_a_class_nothing_to_train_on(tmp_path):
    images, labels = _digit_images(40)
    _write(tmp_path, images, labels, np.arange(40))
    one = tmp_path / "9"
    for f in sorted(one.iterdir())[2:]:
        f.unlink()
    with pytest.raises(DataError, match=r"class '9' has 2 image\(s\) and the fractions"):
        data.from_folder(tmp_path, val_fraction=0.3, test_fraction=0.4)
