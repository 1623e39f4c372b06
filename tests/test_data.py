"""Tasks: the bundled digits, MNIST read from local IDX files, and the user's own tensors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcompress import data
from kdcompress.errors import DataError

STEMS = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
         "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d)
                                                         for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, *, n_train: int = 12, n_test: int = 6, gz: bool = False,
                seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"x_train": rng.integers(0, 256, (n_train, 28, 28)),
              "y_train": np.arange(n_train) % 10,
              "x_test": rng.integers(0, 256, (n_test, 28, 28)),
              "y_test": np.arange(n_test) % 10}
    root.mkdir(parents=True, exist_ok=True)
    for key, stem in STEMS.items():
        raw = idx_bytes(arrays[key])
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
        else:
            (root / stem).write_bytes(raw)
    return arrays


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


def test_digits_shapes_and_splits(digits_task):
    task = digits_task
    assert task.name == "digits" and task.num_classes == 10 and task.input_shape == (1, 8, 8)
    sizes = {s: len(task.arrays(s)[0]) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == 360 and sizes["val"] == 180
    x, y = task.arrays("train")
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1.0, abs=1e-3)


def test_digits_splits_are_disjoint_and_stratified(digits_task):
    train, val, test = (rows(digits_task.arrays(s)[0]) for s in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == 1797  # every image of digits is distinct
    assert not (train & val) and not (train & test) and not (val & test)
    counts = torch.bincount(digits_task.arrays("test")[1], minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37


def test_digits_is_repeatable(digits_task):
    again = data.digits()
    assert again.fingerprint == digits_task.fingerprint
    assert torch.equal(again.arrays("test")[0], digits_task.arrays("test")[0])
    assert data.digits(seed=1).fingerprint != digits_task.fingerprint


def test_from_tensors_shapes_and_fingerprint():
    x, y = torch.randn(10, 3), torch.tensor([0, 1, 2, 0, 1, 2, 3, 1, 2, 4])
    task = data.from_tensors(x, y, x[:4], y[:4])
    assert task.input_shape == (3,) and task.num_classes == 5 and task.val is None
    assert data.from_tensors(x, y, x[:4], y[:4]).fingerprint == task.fingerprint
    assert data.from_tensors(x + 1, y, x[:4], y[:4]).fingerprint != task.fingerprint
    assert data.from_tensors(x, y, x[:4], y[:4], num_classes=7).num_classes == 7
    with pytest.raises(DataError, match="has no 'val' split"):
        task.split("val")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        task.split("dev")
    loader = task.loader("train", batch_size=4, shuffle=True, seed=3)
    assert torch.equal(next(iter(loader))[0], next(iter(task.loader(
        "train", batch_size=4, shuffle=True, seed=3)))[0])


def test_from_tensors_errors():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(DataError, match="x_train has 10 samples but y_train has 9"):
        data.from_tensors(x, y[:9], x, y)
    with pytest.raises(DataError, match="the train split holds label -1 at sample 0"):
        data.from_tensors(x, y - 1, x, y)
    with pytest.raises(DataError, match=r"x_train samples have shape \(3,\) but x_test samples "
                                        r"have shape \(4,\)"):
        data.from_tensors(x, y, torch.randn(10, 4), y)
    with pytest.raises(DataError, match="give both x_val and y_val"):
        data.from_tensors(x, y, x, y, x_val=x)
    with pytest.raises(DataError, match=r"the train split holds label 2 at sample 1, outside "
                                        r"0\.\.1 \(num_classes=2\)"):
        data.from_tensors(x, y + 1, x, y, num_classes=2)
    with pytest.raises(DataError, match=r"y_train must be a 1-D tensor of class indices, but got "
                                        r"shape \(10, 2\)"):
        data.from_tensors(x, y.view(5, 2).repeat(2, 1), x, y)


def test_from_datasets_matches_from_tensors():
    x, y = torch.randn(8, 2), torch.arange(8) % 3
    tensors = data.from_tensors(x, y, x, y)
    train = torch.utils.data.TensorDataset(x, y)
    task = data.from_datasets(train, train)
    assert task.num_classes == 3 and task.input_shape == (2,)
    assert torch.equal(task.arrays("test")[0], tensors.arrays("test")[0])
    with pytest.raises(DataError, match="give num_classes"):
        data.from_datasets(train, train, fingerprint="mine")


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    task = data.mnist(tmp_path, val_size=2)
    assert task.name == "mnist" and task.input_shape == (1, 28, 28) and task.num_classes == 10
    x, y = task.arrays("train")
    assert x.shape == (10, 1, 28, 28) and len(task.arrays("val")[0]) == 2
    assert torch.equal(y, torch.from_numpy(arrays["y_train"][:10]))
    expected = (arrays["x_test"][0] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(task.arrays("test")[0][0, 0].numpy(), expected, rtol=1e-5)
    assert data.mnist(tmp_path, val_size=2, train_limit=4).arrays("train")[0].shape[0] == 4


def test_mnist_gzipped_and_raw_are_the_same_task(tmp_path):
    write_mnist(tmp_path / "raw")
    write_mnist(tmp_path / "gz", gz=True)
    raw, gz = data.mnist(tmp_path / "raw", val_size=2), data.mnist(tmp_path / "gz", val_size=2)
    assert raw.fingerprint == gz.fingerprint
    assert write_mnist(tmp_path / "other", seed=1) and \
        data.mnist(tmp_path / "other", val_size=2).fingerprint != raw.fingerprint


def test_mnist_val_size_zero_keeps_all_training_images(tmp_path):
    write_mnist(tmp_path)
    task = data.mnist(tmp_path, val_size=0)
    assert len(task.arrays("train")[0]) == 12 and task.val is None
    with pytest.raises(DataError, match="val_size must be >= 0 and below the 12 training images"):
        data.mnist(tmp_path, val_size=12)


def test_mnist_bad_files(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / STEMS["y_test"]
    good = path.read_bytes()
    path.write_bytes(b"\x00\x00\x0d\x01" + good[4:])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte is not an unsigned-byte IDX file "
                                        r"\(bad magic number: type 0x0d, float32\)"):
        data.mnist(tmp_path, val_size=2)
    path.write_bytes(good[:-1])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte is truncated or corrupt: header "
                                        r"says \[6\] \(6 bytes\) but the file holds 5"):
        data.mnist(tmp_path, val_size=2)
    path.write_bytes(idx_bytes(np.zeros(5)))
    with pytest.raises(DataError, match="MNIST test: 6 images but 5 labels"):
        data.mnist(tmp_path, val_size=2)
    path.unlink()
    with pytest.raises(DataError, match=r"MNIST file 't10k-labels-idx1-ubyte' \(or "
                                        r"'t10k-labels-idx1-ubyte.gz'\) not found in .*never "
                                        r"downloads"):
        data.mnist(tmp_path, val_size=2)


def test_mnist_needs_a_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("KDCOMPRESS_DATA", raising=False)
    with pytest.raises(DataError, match="mnist needs a folder.*KDCOMPRESS_DATA"):
        data.mnist()
    with pytest.raises(DataError, match="MNIST folder .*nowhere does not exist"):
        data.mnist(tmp_path / "nowhere")
    write_mnist(tmp_path / "mnist")  # a mnist/ folder inside the root is found too
    monkeypatch.setenv("KDCOMPRESS_DATA", str(tmp_path))
    assert len(data.mnist(val_size=2).arrays("test")[0]) == 6


def test_get_by_name(tmp_path, digits_task):
    assert data.get("digits").fingerprint == digits_task.fingerprint
    write_mnist(tmp_path, n_train=5010, gz=True)
    task = data.get(f"mnist:{tmp_path}")
    assert task.name == "mnist" and len(task.arrays("train")[0]) == 10
    with pytest.raises(DataError, match="unknown data set 'cifar': use 'digits', 'mnist:DIR', "
                                        "'folder:DIR' or 'npz:FILE'"):
        data.get("cifar")
    with pytest.raises(DataError, match="'folder' needs a path: folder:DIR"):
        data.get("folder")
    with pytest.raises(DataError, match="'digits' is bundled with scikit-learn and takes no "
                                        "folder"):
        data.get(f"digits:{tmp_path}")


def test_limit_train_shortens_only_the_training_split():
    task = data.digits()
    small = data.limit_train(task, 100)
    assert len(small.train) == 100 and len(small.test) == len(task.test)
    assert len(small.val) == len(task.val)
    assert torch.equal(small.arrays("train")[0], task.arrays("train")[0][:100])
    assert small.name == "digits-100" and small.fingerprint != task.fingerprint
    assert data.limit_train(task, 200).fingerprint != small.fingerprint
    with pytest.raises(DataError, match="limit must be >= 1"):
        data.limit_train(task, 0)


# ----------------------------------------------------------------------------------------------
# data sets that are not in memory: streamed, read sample by sample, never stacked


class _Generated(torch.utils.data.Dataset):
    """Samples made on demand (a stand-in for data on disk); counts the samples read."""

    def __init__(self, n: int, *, seed: int = 0, bad: dict[int, tuple] | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 4, 4, generator=g)
        self.y = torch.arange(n) % 3
        self.bad = bad or {}
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.bad.get(i, (self.x[i].clone(), int(self.y[i])))


def test_from_datasets_fingerprint_streams_the_same_hash_as_stacking():
    from kdcompress.data._checks import _hash_tensors

    train, test = _Generated(20), _Generated(8, seed=1)
    task = data.from_datasets(train, test)
    labels = [torch.tensor([int(v) for v in d.y]) for d in (train, test)]
    assert task.fingerprint == _hash_tensors(train.x, labels[0], test.x, labels[1])
    assert task.num_classes == 3


def test_a_lazy_task_trains_and_is_measured_without_being_stacked(monkeypatch, fast_measure):
    import torch.nn.functional as F

    from kdcompress import models
    from kdcompress.metrics import measure
    from kdcompress.training import FitConfig, fit

    train, test = _Generated(40), _Generated(12, seed=1)
    lazy = data.from_datasets(train, test, val=_Generated(12, seed=2), num_classes=3,
                              fingerprint="v1")
    memory = data.from_tensors(train.x, train.y, test.x, test.y, x_val=_Generated(12, seed=2).x,
                               y_val=_Generated(12, seed=2).y, num_classes=3)
    model = models.mlp(hidden=(8,)).build((1, 4, 4), 3)
    expected = measure(model, memory, config=fast_measure)

    def refuse(self, split="test"):
        raise AssertionError(f"the {split} split was stacked whole")

    monkeypatch.setattr(data.Task, "arrays", refuse)
    row = measure(model, lazy, config=fast_measure)
    assert (row["accuracy"], row["val_accuracy"]) == (expected["accuracy"],
                                                      expected["val_accuracy"])
    result = fit(model, lambda net, x, y: F.cross_entropy(net(x), y), lazy,
                 config=FitConfig(epochs=1, batch_size=8))
    assert result.steps == 5
    train.reads = 0
    x = lazy.calibration(6, seed=0)
    assert train.reads == 6 and x.shape == (6, 1, 4, 4)
    monkeypatch.undo()
    assert torch.equal(x, memory.calibration(6, seed=0))


def test_streamed_batches_are_checked_naming_the_sample():
    nan = torch.zeros(1, 4, 4)
    nan[0, 1, 1] = float("nan")
    bad_label = data.from_datasets(_Generated(10), _Generated(20, bad={13: (torch.zeros(1, 4, 4),
                                                                            7)}),
                                   num_classes=3, fingerprint="v1")
    with pytest.raises(DataError, match=r"the test split holds label 7 at sample 13, outside "
                                        r"0\.\.2"):
        list(bad_label.batches("test", batch_size=5))
    bad_input = data.from_datasets(_Generated(10), _Generated(20, bad={6: (nan, 0)}),
                                   num_classes=3, fingerprint="v1")
    with pytest.raises(DataError, match=r"the test split: sample 6 holds NaN or inf"):
        list(bad_input.batches("test", batch_size=5))


def test_workers_and_pinned_memory_reach_the_loaders():
    task = data.from_datasets(_Generated(10), _Generated(6), num_classes=3, fingerprint="v",
                              num_workers=2, pin_memory=True)
    assert task.loader("train").num_workers == 2 and task.loader("train").pin_memory
    memory = data.from_tensors(torch.randn(4, 2), torch.arange(4) % 2, torch.randn(2, 2),
                               torch.arange(2))
    assert memory.loader_options(memory.train)["num_workers"] == 0
    assert data.limit_train(task, 5).num_workers == 2
    with pytest.raises(DataError, match=r"num_workers must be an integer >= 0, but got -1"):
        data.from_datasets(_Generated(10), _Generated(6), num_classes=3, fingerprint="v",
                           num_workers=-1)


# ----------------------------------------------------------------------------------------------
# .npz files


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_from_numpy_is_from_tensors_of_the_arrays(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((12, 1, 4, 4)), "y_train": np.arange(12) % 3,
              "x_val": rng.random((6, 1, 4, 4)), "y_val": np.arange(6) % 3,
              "x_test": rng.random((6, 1, 4, 4)), "y_test": np.arange(6) % 3}
    task = data.from_numpy(_npz(tmp_path / "toy.npz", **arrays))
    same = data.from_tensors(arrays["x_train"], arrays["y_train"], arrays["x_test"],
                             arrays["y_test"], x_val=arrays["x_val"], y_val=arrays["y_val"])
    assert task.name == "toy" and task.fingerprint == same.fingerprint
    assert task.input_shape == (1, 4, 4) and task.num_classes == 3
    for split in ("train", "val", "test"):
        assert torch.equal(task.arrays(split)[0], same.arrays(split)[0])
    scaled = data.from_numpy(tmp_path / "toy.npz", standardize=True)
    x = scaled.arrays("train")[0]
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-4


def test_get_npz(tmp_path):
    x, y = np.random.default_rng(0).random((6, 2)), np.arange(6) % 2
    path = _npz(tmp_path / "toy.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    assert data.get(f"npz:{path}").fingerprint == data.from_numpy(path).fingerprint


def test_from_numpy_errors_name_the_key(tmp_path):
    x, y = np.zeros((4, 2)), np.arange(4) % 2
    path = _npz(tmp_path / "a.npz", x_train=x, y_train=y, x_test=x, y_tset=y)
    with pytest.raises(DataError, match=r"has no array 'y_test' \(it holds x_train, y_train, "
                                        r"x_test, y_tset\)\. Did you mean 'y_tset'\?"):
        data.from_numpy(path)
    path = _npz(tmp_path / "b.npz", x_train=x, y_train=y, x_test=x, y_test=y, x_val=x)
    with pytest.raises(DataError, match=r"has 'x_val' but no 'y_val'"):
        data.from_numpy(path)
    path = _npz(tmp_path / "c.npz", x_train=np.array([{"a": 1}] * 4, dtype=object), y_train=y,
                x_test=x, y_test=y)
    with pytest.raises(DataError, match=r"array 'x_train' in .*c\.npz holds Python objects"):
        data.from_numpy(path)
    np.save(tmp_path / "d.npy", x)
    with pytest.raises(DataError, match=r"holds a single array, not a \.npz archive"):
        data.from_numpy(tmp_path / "d.npy")
    with pytest.raises(DataError, match=r"missing\.npz does not exist"):
        data.from_numpy(tmp_path / "missing.npz")
    path = _npz(tmp_path / "e.npz", x_train=x, y_train=y + 0.5, x_test=x, y_test=y)
    with pytest.raises(DataError, match=r"y_train holds torch.float64 values"):
        data.from_numpy(path)
