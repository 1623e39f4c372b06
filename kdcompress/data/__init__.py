"""Data sets as tasks: train / val / test splits plus what every stage needs to know about them.

A :class:`Task` flows into every stage that asks for ``data``. Built-in tasks: :func:`digits`
(scikit-learn's bundled 8x8 digits, the embedded default, no download) and :func:`mnist` (the four
standard IDX files from a local folder, never downloaded). The user's own data:
:func:`from_tensors` (tensors or arrays in memory), :func:`from_numpy` (an ``.npz`` file),
:func:`from_folder` (an image folder, decoded lazily) and :func:`from_datasets` (any map-style
``Dataset``, read through DataLoader workers). Training and measurement stream a split in batches
(:meth:`Task.batches`), so a data set larger than memory is never read whole.
"""

from kdcompress.data._builtin import DATA_ENV, digits, get, mnist, read_idx
from kdcompress.data._folder import IMAGE_SUFFIXES, ImageFolder, from_folder
from kdcompress.data._memory import from_datasets, from_tensors, limit_train, subset
from kdcompress.data._npz import from_numpy
from kdcompress.data._task import EVAL_BATCH, Task

__all__ = ["Task", "digits", "mnist", "from_tensors", "from_datasets", "from_folder",
           "from_numpy", "get", "limit_train", "read_idx", "subset", "ImageFolder",
           "IMAGE_SUFFIXES", "DATA_ENV", "EVAL_BATCH"]
