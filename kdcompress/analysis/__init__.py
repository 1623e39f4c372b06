"""Analyses of a model that guide compression: per-layer sensitivity (and per-layer budgets).

Below the stages: stages may import it; it never imports the runner or the CLI.
"""

from kdcompress.analysis.allocate import Allocation, Option, allocate
from kdcompress.analysis.int8 import int8_sensitivity
from kdcompress.analysis.sensitivity import KINDS, Cell, Sensitivity, sensitivity

__all__ = ["Cell", "Sensitivity", "sensitivity", "KINDS", "int8_sensitivity", "allocate",
           "Option", "Allocation"]
