"""Bad data is refused with a DataError that names the split, the sample or the file at fault."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from kdcompress import data
from kdcompress.errors import DataError

STEMS = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
         "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def xy(n: int = 8, classes: int = 2, shape: tuple[int, ...] = (3,)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, *shape, generator=g), torch.arange(n) % classes


class Samples(Dataset):
    """A map-style data set over a list of ``(input, label)`` pairs, as a user would write one."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def pairs(x: torch.Tensor, y: torch.Tensor) -> Samples:
    return Samples([(x[i], int(y[i])) for i in range(len(x))])


def header(ndim_dims: tuple[int, ...], kind: int = 0x08) -> bytes:
    return bytes([0, 0, kind, len(ndim_dims)]) + struct.pack(f">{len(ndim_dims)}I", *ndim_dims)


def idx_bytes(array: np.ndarray) -> bytes:
    return header(array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, *, gz: bool = False, **override: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (12, 28, 28)), "y_train": np.arange(12) % 10,
              "x_test": rng.integers(0, 256, (6, 28, 28)), "y_test": np.arange(6) % 10}
    arrays.update(override)
    root.mkdir(parents=True, exist_ok=True)
    for key, stem in STEMS.items():
        raw = idx_bytes(arrays[key])
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / stem).write_bytes(raw)


# 1. empty splits ---------------------------------------------------------------------------------

def test_empty_val_split_is_named():
    x, y = xy()
    with pytest.raises(DataError, match=r"the val split is empty \(x_val has 0 samples\)"):
        data.from_tensors(x, y, x, y, x_val=x[:0], y_val=y[:0])
    with pytest.raises(DataError, match="the train split is empty"):
        data.from_tensors(x[:0], y[:0], x, y)


@pytest.mark.parametrize("split", ["train", "test", "val"])
def test_from_datasets_empty_split_is_named(split):
    x, y = xy()
    sets = {"train": pairs(x, y), "test": pairs(x, y), "val": pairs(x, y), split: Samples([])}
    with pytest.raises(DataError, match=f"the {split} split is empty"):
        data.from_datasets(sets["train"], sets["test"], val=sets["val"])


# 2. labels ---------------------------------------------------------------------------------------

def test_label_outside_num_classes_names_split_value_and_sample():
    x, y = xy()
    bad = y.clone()
    bad[5] = 7
    with pytest.raises(DataError, match=r"the test split holds label 7 at sample 5, outside 0\.\.1 "
                                        r"\(num_classes=2\)"):
        data.from_tensors(x, y, x, bad, num_classes=2)
    bad[5] = -3
    with pytest.raises(DataError, match="the val split holds label -3 at sample 5"):
        data.from_tensors(x, y, x, y, x_val=x, y_val=bad)


def test_inferred_classes_must_all_occur_in_training_split():
    x = torch.randn(6, 3)
    y = torch.tensor([0, 1, 5, 0, 1, 5])
    with pytest.raises(DataError, match=r"classes \[2, 3, 4\] never occur in the training split.*"
                                        r"pass num_classes=6 explicitly"):
        data.from_tensors(x, y, x, y)
    # a class only the test split has also widens the inferred count: refused the same way
    with pytest.raises(DataError, match=r"inferred as 3 .*2, in the test split at sample 2.*"
                                        r"classes \[2\] never occur"):
        data.from_tensors(x, y % 2, x[:3], torch.tensor([0, 1, 2]))
    assert data.from_tensors(x, y, x, y, num_classes=6).num_classes == 6  # asked for: kept


def test_inferred_classes_from_datasets_are_checked_too():
    x = torch.randn(6, 3)
    y = torch.tensor([0, 1, 5, 0, 1, 5])
    with pytest.raises(DataError, match=r"classes \[2, 3, 4\] never occur"):
        data.from_datasets(pairs(x, y), pairs(x, y))


def test_single_class_training_split_is_refused():
    x = torch.randn(6, 3)
    ones = torch.ones(6, dtype=torch.long)
    with pytest.raises(DataError, match=r"the training split holds only class 1 \(6 samples\)"):
        data.from_tensors(x, ones, x, ones, num_classes=3)
    with pytest.raises(DataError, match="holds only class 1"):
        data.from_datasets(pairs(x, ones), pairs(x, ones))


def test_limit_train_to_one_class_is_refused():
    x, y = torch.randn(8, 3), torch.tensor([0, 0, 0, 1, 1, 1, 0, 1])
    task = data.from_tensors(x, y, x, y)
    assert len(data.limit_train(task, 4).train) == 4
    with pytest.raises(DataError, match="the first 3 training samples of 'tensors' hold only "
                                        "class 0"):
        data.limit_train(task, 3)


@pytest.mark.parametrize("num_classes", [1, 0, 2.5, True])
def test_bad_num_classes(num_classes):
    x, y = xy()
    with pytest.raises(DataError, match="num_classes must be an integer >= 2"):
        data.from_tensors(x, y, x, y, num_classes=num_classes)


# 3. shapes across and within splits --------------------------------------------------------------

def test_sample_shapes_must_agree_across_splits():
    x, y = xy(shape=(1, 8, 8))
    big, _ = xy(shape=(1, 28, 28))
    with pytest.raises(DataError, match=r"x_train samples have shape \(1, 8, 8\) but x_val samples "
                                        r"have shape \(1, 28, 28\)"):
        data.from_tensors(x, y, x, y, x_val=big, y_val=y)


def test_from_datasets_shapes_must_agree_across_splits():
    x, y = xy(shape=(1, 8, 8))
    big, _ = xy(shape=(1, 28, 28))
    with pytest.raises(DataError, match=r"the test split: sample 0 has shape \(1, 28, 28\) but "
                                        r"train sample 0 has shape \(1, 8, 8\)"):
        data.from_datasets(pairs(x, y), pairs(big, y), fingerprint="mine", num_classes=2)


def test_from_datasets_shapes_must_agree_within_a_split():
    x, y = xy(shape=(1, 8, 8))
    items = [(x[i], int(y[i])) for i in range(8)]
    items[3] = (torch.zeros(1, 7, 7), 1)
    with pytest.raises(DataError, match=r"the train split: sample 3 has shape \(1, 7, 7\) but "
                                        r"sample 0 has shape \(1, 8, 8\)"):
        data.from_datasets(Samples(items), pairs(x, y))
    # with its own fingerprint nothing is read up front: the fault shows when the split is read
    task = data.from_datasets(Samples(items), pairs(x, y), fingerprint="mine", num_classes=2)
    with pytest.raises(DataError, match="the train split: sample 3 has shape"):
        task.arrays("train")


# 4. NaN and inf ----------------------------------------------------------------------------------

def test_non_finite_inputs_name_split_and_first_sample():
    x, y = xy(n=10)
    bad = x.clone()
    bad[6, 1] = float("nan")
    bad[8, 0] = float("inf")
    with pytest.raises(DataError, match="x_train: sample 6 holds NaN or inf"):
        data.from_tensors(bad, y, x, y)
    with pytest.raises(DataError, match="x_test: sample 6 holds NaN or inf"):
        data.from_tensors(x, y, bad, y)
    too_big = x.double()
    too_big[2, 2] = 1e300  # finite in float64, inf in the float32 the models see
    with pytest.raises(DataError, match="x_val: sample 2 holds NaN or inf"):
        data.from_tensors(x, y, x, y, x_val=too_big, y_val=y)


def test_large_finite_inputs_are_kept():
    x, y = torch.full((8, 3), 3e38), torch.arange(8) % 2  # their sum overflows; each is finite
    assert data.from_tensors(x, y, x, y).input_shape == (3,)


def test_digits_checks_its_inputs(monkeypatch):
    import sklearn.datasets

    real = sklearn.datasets.load_digits()

    def broken():
        real.images[0, 3, 3] = np.nan
        return real

    monkeypatch.setattr(sklearn.datasets, "load_digits", broken)
    with pytest.raises(DataError, match="digits: .*holds NaN or inf"):
        data.digits()


def test_from_datasets_non_finite_found_when_read():
    x, y = xy(n=10)
    bad = x.clone()
    bad[4, 0] = float("nan")
    with pytest.raises(DataError, match="the val split: sample 4 holds NaN or inf"):
        data.from_datasets(pairs(x, y), pairs(x, y), val=pairs(bad, y))
    task = data.from_datasets(pairs(x, y), pairs(bad, y), fingerprint="mine", num_classes=2)
    assert len(task.arrays("train")[0]) == 10
    with pytest.raises(DataError, match="the test split: sample 4 holds NaN or inf"):
        task.arrays("test")


def test_from_datasets_labels_checked_when_read():
    x, y = xy(n=10)
    task = data.from_datasets(pairs(x, y), pairs(x, y + 3 * (torch.arange(10) == 7)),
                              fingerprint="mine", num_classes=2)
    with pytest.raises(DataError, match=r"the test split holds label 4 at sample 7, "
                                        r"outside 0\.\.1"):
        task.arrays("test")


# 6. label types, label and input dimensions ------------------------------------------------------

def test_float_labels_are_refused():
    x, y = xy()
    with pytest.raises(DataError, match=r"y_train holds torch.float32 values: labels must be "
                                        r"integer class indices"):
        data.from_tensors(x, y.float(), x, y)
    with pytest.raises(DataError, match="y_test holds torch.bool values"):
        data.from_tensors(x, y, x, y.bool())
    items = [(x[i], float(y[i])) for i in range(8)]
    with pytest.raises(DataError, match=r"the train split: sample 0's label 0.0 is torch.float32"):
        data.from_datasets(Samples(items), pairs(x, y))


def test_labels_of_the_wrong_dimensionality_are_refused():
    x, y = xy()
    with pytest.raises(DataError, match=r"y_test must be a 1-D tensor of class indices, but got "
                                        r"shape \(\)"):
        data.from_tensors(x, y, x, torch.tensor(1))
    items = [(x[i], torch.tensor([int(y[i])])) for i in range(8)]
    with pytest.raises(DataError, match=r"the test split: sample 0's label has shape \(1,\)"):
        data.from_datasets(pairs(x, y), Samples(items))


def test_inputs_need_a_batch_axis_and_a_sample_axis():
    x, y = xy()
    with pytest.raises(DataError, match=r"x_train must have shape \(samples, \.\.\.\) .* but got "
                                        r"shape \(8,\).*unsqueeze\(1\)"):
        data.from_tensors(x[:, 0], y, x, y)
    with pytest.raises(DataError, match=r"x_test must have shape \(samples, \.\.\.\).*shape \(\)"):
        data.from_tensors(x, y, torch.tensor(1.0), y)
    with pytest.raises(DataError, match=r"the train split: sample 0's input is a scalar"):
        data.from_datasets(pairs(x[:, 0], y), pairs(x, y))


def test_from_datasets_odd_samples_are_named():
    x, y = xy()
    with pytest.raises(DataError, match=r"the train split: sample 0 is a int, but a data set must "
                                        r"yield \(input, label\) pairs"):
        data.from_datasets(Samples(list(range(8))), pairs(x, y))
    with pytest.raises(DataError, match="the train split: sample 0's input of type str cannot be "
                                        "made a tensor"):
        data.from_datasets(Samples([("img.png", 0)] * 8), pairs(x, y))

    class Broken(Samples):
        def __getitem__(self, i: int):
            raise KeyError(i)

    with pytest.raises(DataError, match="the train split: reading sample 0 raised KeyError"):
        data.from_datasets(Broken([None] * 8), pairs(x, y))


def test_tensor_datasets_still_work():
    x, y = xy(shape=(1, 4, 4))
    task = data.from_datasets(TensorDataset(x, y), TensorDataset(x, y))
    assert task.input_shape == (1, 4, 4) and task.num_classes == 2


# 5. IDX files ------------------------------------------------------------------------------------

TRUNCATED = r"is truncated or corrupt: header says "
BAD_IDX = [
    pytest.param(b"", r"is not an IDX file \(bad magic number: the file holds only 0 bytes\)",
                 id="empty"),
    pytest.param(b"\x00\x00", r"is not an IDX file \(bad magic number: the file holds only 2 "
                              r"bytes\)", id="short"),
    pytest.param(b"PK\x03\x04rest", r"is not an IDX file \(bad magic number 50 4b 03 04",
                 id="zip"),
    pytest.param(header((2,), kind=0x0D) + b"\x00" * 8, r"is not an unsigned-byte IDX file "
                 r"\(bad magic number: type 0x0d, float32\)", id="float-idx"),
    pytest.param(b"\x00\x00\x08\x00", "is malformed: its header declares 0 dimensions",
                 id="0-dims"),
    pytest.param(header((5, 3))[:9], r"is truncated: its header declares 2 dimensions but the "
                 r"file ends after 9 bytes", id="cut-header"),
    pytest.param(header((6,)) + b"\x00" * 5, TRUNCATED + r"\[6\] \(6 bytes\) but the file holds 5",
                 id="cut-data"),
    pytest.param(header((6,)) + b"\x00" * 9, TRUNCATED + r"\[6\] \(6 bytes\) but the file holds "
                 r"more", id="too-long"),
    pytest.param(header((2**31, 2**31, 2**31)), TRUNCATED + r"\[2147483648, 2147483648, "
                 r"2147483648\] \(9903520314283042199192993792 bytes\)", id="huge-dims"),
    # int64 product wraps to 0 here: a header that "matches" an empty body if not computed exactly
    pytest.param(header((2**31, 2**31, 4)), TRUNCATED + r"\[2147483648, 2147483648, 4\]",
                 id="wrapping-dims"),
]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(("raw", "fault"), BAD_IDX)
def test_read_idx_names_the_file_and_the_fault(tmp_path, gz, raw, fault):
    path = tmp_path / ("t.idx.gz" if gz else "t.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError, match=f"{path.name} {fault}"):
        data.read_idx(path)


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "crc", "not gzip"])
def test_read_idx_damaged_gzip(tmp_path, damage):
    packed = gzip.compress(idx_bytes(np.arange(600).reshape(6, 10, 10) % 256))
    packed = {"truncated": packed[: len(packed) // 2],
              "corrupt": packed[:12] + bytes(b ^ 0x5A for b in packed[12:40]) + packed[40:],
              "crc": packed[:-8] + bytes(8 * [0xFF]),
              "not gzip": b"\x1f\x8b" + b"garbage" * 4}[damage]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(packed)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz is a damaged or truncated "
                                        r"gzip file \(.*\): download it again"):
        data.read_idx(path)


def test_read_idx_huge_header_in_a_small_gzip_is_refused_before_reading(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(header((60000, 28000, 28000)) + b"\x00" * 1000))
    with pytest.raises(DataError, match=r"header says \[60000, 28000, 28000\] .* a gzip file of "
                                        r"\d+ bytes cannot hold"):
        data.read_idx(path)


def test_read_idx_gzip_is_recognised_by_content(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(gzip.compress(idx_bytes(array)))
    (tmp_path / "b.gz").write_bytes(idx_bytes(array))  # already decompressed, name kept
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b.gz"), array)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated_file_is_a_data_error(tmp_path, gz):
    write_mnist(tmp_path, gz=gz)
    path = tmp_path / (STEMS["x_train"] + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        data.mnist(tmp_path, val_size=2)


def test_mnist_images_and_labels_need_their_dimensions(tmp_path):
    write_mnist(tmp_path, x_train=np.zeros((12, 784)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte holds an array of shape "
                                        r"\(12, 784\), but MNIST images need 3 dimensions"):
        data.mnist(tmp_path, val_size=2)
    write_mnist(tmp_path, y_test=np.zeros((6, 1)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte holds an array of shape \(6, 1\), "
                                        r"but MNIST labels need 1 dimension"):
        data.mnist(tmp_path, val_size=2)


def test_mnist_count_mismatch_names_both_files(tmp_path):
    write_mnist(tmp_path, y_train=np.arange(11) % 10)
    with pytest.raises(DataError, match=r"MNIST train: 12 images but 11 labels \(.*"
                                        r"train-images-idx3-ubyte and .*train-labels-idx1-ubyte\)"):
        data.mnist(tmp_path, val_size=2)


def test_mnist_label_out_of_range_names_file_and_sample(tmp_path):
    labels = np.arange(6) % 10
    labels[3] = 12
    write_mnist(tmp_path, y_test=labels)
    with pytest.raises(DataError, match=r"the test split \(.*t10k-labels-idx1-ubyte\) holds label "
                                        r"12 at sample 3, outside 0\.\.9"):
        data.mnist(tmp_path, val_size=2)


def test_mnist_image_sizes_must_agree(tmp_path):
    write_mnist(tmp_path, x_test=np.zeros((6, 20, 20)))
    with pytest.raises(DataError, match=r"training images are 28x28 \(.*\) but test images are "
                                        r"20x20"):
        data.mnist(tmp_path, val_size=2)


def test_mnist_empty_split_and_bad_limit(tmp_path):
    write_mnist(tmp_path, x_test=np.zeros((0, 28, 28)), y_test=np.zeros(0))
    with pytest.raises(DataError, match="the test split is empty.*t10k-images-idx3-ubyte"):
        data.mnist(tmp_path, val_size=2)
    write_mnist(tmp_path)
    with pytest.raises(DataError, match="train_limit must be >= 1, but got 0"):
        data.mnist(tmp_path, val_size=2, train_limit=0)
