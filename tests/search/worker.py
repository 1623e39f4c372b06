"""One search worker, run as a subprocess by the tests: python worker.py FILE RUN TRIALS."""

import sys

import torch

from kdcompress.cli import load_pipeline
from kdcompress.metrics import MeasureConfig
from kdcompress.options import RunOptions
from kdcompress.search.study import Search, SearchConfig

torch.set_num_threads(1)
file, run_dir, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
search = Search(load_pipeline(file), SearchConfig(objectives=("size",), max_drop=100.0,
                                                  startup_trials=2, heartbeat=1.0),
                RunOptions(out=run_dir, plot=False,
                           measure=MeasureConfig(repeats=2, warmup=1, min_seconds=0.0)))
result = search.run(trials=trials)
print(f"pending={result.pending} front={len(result.front)}")
