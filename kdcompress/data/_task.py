"""The :class:`Task`: a data set's splits and what every stage needs to know about them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kdcompress.data._checks import _check_range, _first, _is_integer, _sample, _stack
from kdcompress.errors import DataError

#: Samples per batch when a split is streamed for measurement (:meth:`Task.batches`).
EVAL_BATCH = 512


@dataclass(frozen=True, eq=False)
class Task:
    """A classification task: its splits, its shapes and a fingerprint of its contents.

    Parameters
    ----------
    name : str
        Short name shown in reports (``"digits"``, ``"mnist"``).
    train, val, test : Dataset
        Map-style data sets yielding ``(input, label)`` pairs; ``val`` may be ``None``.
    num_classes : int
        Number of classes; labels are ``0 .. num_classes - 1``.
    input_shape : tuple of int
        Shape of one input, without the batch axis, e.g. ``(1, 8, 8)``.
    fingerprint : str
        Hash of the contents; a stage is re-run when the data's fingerprint changes.
    num_workers : int
        DataLoader worker processes that read samples (0: in the calling process). Data held
        in memory (:class:`~torch.utils.data.TensorDataset`) is always sliced directly.
    pin_memory : bool
        Page-locked batches, for faster copies to a GPU.
    classes : tuple of str, optional
        The class names, in label order (an image folder's class folders).
    """

    name: str
    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    fingerprint: str
    num_workers: int = 0
    pin_memory: bool = False
    classes: tuple[str, ...] | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) \
                or self.num_workers < 0:
            raise DataError(f"task '{self.name}': num_workers must be an integer >= 0, but got "
                            f"{self.num_workers!r}")

    def loader(
        self, split: str = "train", *, batch_size: int = 64, shuffle: bool = False, seed: int = 0,
        drop_last: bool = False,
    ) -> DataLoader:
        """Return a DataLoader over one split with the task's workers; shuffling is seeded so
        runs repeat exactly."""
        dataset = self.split(split)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          drop_last=drop_last, **self.loader_options(dataset))

    def loader_options(self, dataset: Dataset | None = None) -> dict:
        """``num_workers`` and ``pin_memory`` for a DataLoader over ``dataset`` (no workers for
        tensors already in memory: they would only add start-up time)."""
        workers = 0 if _in_memory(dataset) else self.num_workers
        return {"num_workers": workers, "pin_memory": self.pin_memory}

    @property
    def eval_split(self) -> str:
        """The split training stages score themselves on: ``"val"``, or ``"train"`` without one."""
        return "val" if self.val is not None else "train"

    @property
    def in_memory(self) -> bool:
        """Whether every split is a tensor in memory (then :meth:`arrays` costs nothing)."""
        return all(_in_memory(d) for d in (self.train, self.val, self.test) if d is not None)

    def split(self, split: str) -> Dataset:
        """Return the data set of ``"train"``, ``"val"`` or ``"test"``."""
        if split not in ("train", "val", "test"):
            raise DataError(f"unknown split '{split}': use 'train', 'val' or 'test'")
        dataset = getattr(self, split)
        if dataset is None:
            raise DataError(f"task '{self.name}' has no '{split}' split")
        return dataset

    def arrays(self, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """Return one split as two tensors ``(inputs, labels)``, cached after the first call.

        This holds the whole split in memory: measuring and training stream it instead
        (:meth:`batches`), so large data sets never need this.
        """
        if split not in self._cache:
            dataset = self.split(split)
            if isinstance(dataset, TensorDataset):
                x, y = dataset.tensors[0], dataset.tensors[1]
            else:  # a user's data set, read for the first time: check what it yields
                x, y = _stack(dataset, split)
                if tuple(x.shape[1:]) != self.input_shape:
                    raise DataError(f"the {split} split: samples have shape {tuple(x.shape[1:])} "
                                    f"but task '{self.name}' has input_shape {self.input_shape}")
                _check_range(f"the {split} split", y, self.num_classes)
            self._cache[split] = (x.float(), y.long())
        return self._cache[split]

    def batches(self, split: str = "test", *,
                batch_size: int = EVAL_BATCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield one split in order as ``(inputs, labels)`` batches, never all of it at once.

        Tensors in memory are sliced; other data sets are read through a DataLoader with the
        task's ``num_workers``, and every batch is checked (input shape, integer labels in
        ``0..num_classes-1``, finite inputs) with an error naming the split and the sample.
        """
        dataset = self.split(split)
        if split in self._cache or isinstance(dataset, TensorDataset):
            x, y = self.arrays(split)
            for i in range(0, len(x), batch_size):
                yield x[i:i + batch_size], y[i:i + batch_size]
            return
        start = 0
        for x, y in DataLoader(dataset, batch_size=batch_size, **self.loader_options(dataset)):
            yield self._checked(split, start, x, y)
            start += len(x)

    def _checked(self, split: str, start: int, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One streamed batch, starting at sample ``start``, as float inputs and long labels."""
        where = f"task '{self.name}', the {split} split"
        if tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"{where}: samples {start}..{start + len(x) - 1} have shape "
                            f"{tuple(x.shape[1:])} but the task has input_shape "
                            f"{self.input_shape}")
        if y.ndim != 1 or not _is_integer(y):
            raise DataError(f"{where}: samples {start}..{start + len(x) - 1} have labels of "
                            f"shape {tuple(y.shape)} and dtype {y.dtype}; each label must be one "
                            "integer class index")
        bad = (y < 0) | (y >= self.num_classes)
        if bool(bad.any()):
            i = _first(bad)
            raise DataError(f"{where} holds label {int(y[i])} at sample {start + i}, outside "
                            f"0..{self.num_classes - 1} (num_classes={self.num_classes})")
        if x.is_floating_point():
            bad = ~torch.isfinite(x).reshape(len(x), -1).all(dim=1)
            if bool(bad.any()):
                raise DataError(f"{where}: sample {start + _first(bad)} holds NaN or inf "
                                "(inputs must be finite float32 values): repair or drop it")
        return x.float(), y.long()

    def head(self, split: str = "train", n: int = 1) -> torch.Tensor:
        """The first ``n`` inputs of a split (all of them when it holds fewer), read alone."""
        dataset = self.split(split)
        if split in self._cache or isinstance(dataset, TensorDataset):
            return self.arrays(split)[0][:n]
        return self._inputs(split, range(min(n, len(dataset))))  # type: ignore[arg-type]

    def calibration(self, n: int = 256, *, seed: int = 0) -> torch.Tensor:
        """Return ``n`` training inputs drawn with a fixed seed (int8 calibration, tracing);
        only those samples are read."""
        train = self.split("train")
        size = len(train)  # type: ignore[arg-type]
        n = min(n, size)
        index = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]
        if "train" in self._cache or isinstance(train, TensorDataset):
            return self.arrays("train")[0][index]
        return self._inputs("train", index.tolist())

    def example(self, batch_size: int = 1) -> torch.Tensor:
        """Return the first ``batch_size`` training inputs (for export and tracing)."""
        return self.head("train", batch_size)

    def _inputs(self, split: str, index) -> torch.Tensor:
        """The inputs of the samples at ``index`` of a user's data set, checked, stacked."""
        dataset = self.split(split)
        xs = []
        for i in index:
            x, _ = _sample(dataset, split, i)
            where = f"task '{self.name}', the {split} split: sample {i}"
            if tuple(x.shape) != self.input_shape:
                raise DataError(f"{where} has shape {tuple(x.shape)} but the task has "
                                f"input_shape {self.input_shape}")
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise DataError(f"{where} holds NaN or inf (inputs must be finite float32 "
                                "values): repair or drop it")
            xs.append(x)
        return torch.stack(xs).float()

def _in_memory(dataset: Dataset | None) -> bool:
    return dataset is None or isinstance(dataset, TensorDataset)
