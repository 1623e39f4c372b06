"""Forward + backward of ``rkd_angle_loss`` against the straightforward vectorised formula.

The straightforward formula (as in the RKD authors' code) builds the ``(B, B, D)`` tensor of
differences, normalises it and multiplies it by itself with ``bmm``; kdcompress uses the Gram
identity ``<x_i - x_j, x_k - x_j> = G_ik - G_ij - G_jk + G_jj`` in chunks of apexes with an
analytic backward. Both run in this process on the same inputs; times are medians over repeats,
memory is the growth of the peak resident set size (``VmHWM``) over one forward + backward, each
implementation in a fresh process.

Usage: ``python benchmarks/bench_losses.py [--batch 256] [--dim 512] [--repeats 7]``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from kdcompress.losses.functional import rkd_angle_loss


def bmm_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The straightforward vectorised RKD angle loss: (B, B, D) differences, then bmm."""
    def angles(x: torch.Tensor) -> torch.Tensor:
        d = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # (B, B, D)
        return torch.bmm(d, d.transpose(1, 2)).view(-1)  # (B^3,)

    with torch.no_grad():
        t = angles(teacher)
    return F.smooth_l1_loss(angles(student), t)


def step(fn, s: torch.Tensor, t: torch.Tensor) -> None:
    s.grad = None
    fn(s, t).backward()


def median_ms(fns: dict, s: torch.Tensor, t: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median wall time per implementation; runs are interleaved so load affects both alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        step(fn, s, t)  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            step(fn, s, t)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_mib(name: str, args: argparse.Namespace) -> float:
    """Peak resident memory added by one forward + backward, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--peak-of", name, "--batch", str(args.batch),
           "--dim", str(args.dim), "--teacher-dim", str(args.teacher_dim or args.dim)]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def _report_peak(name: str, s: torch.Tensor, t: torch.Tensor) -> None:
    step(IMPLEMENTATIONS[name], s[:8], t[:8])  # load the kernels on a tiny batch first
    before = _high_water_kib()
    step(IMPLEMENTATIONS[name], s, t)
    print((_high_water_kib() - before) / 1024)


def _high_water_kib() -> int:
    """Peak resident set size of this process (VmHWM; unlike ru_maxrss, not inherited from the
    parent across exec). Falls back to ru_maxrss off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


IMPLEMENTATIONS = {"bmm over (B, B, D)": bmm_angle_loss,
                   "kdcompress (Gram, chunked)": rkd_angle_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--teacher-dim", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    b, d = args.batch, args.dim
    s = torch.randn(b, d, requires_grad=True)
    t = torch.randn(b, args.teacher_dim or d)
    if args.peak_of:
        _report_peak(args.peak_of, s, t)
        return
    a, ref = rkd_angle_loss(s, t), bmm_angle_loss(s, t)
    (ga,) = torch.autograd.grad(a, s)
    (gr,) = torch.autograd.grad(ref, s)
    print(f"rkd_angle_loss, B={b}, D={d}, float32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"values agree: {abs(a.item() - ref.item()):.2e} abs; gradients agree: "
          f"{(ga - gr).abs().max().item():.2e} max abs\n")
    ms = median_ms(IMPLEMENTATIONS, s, t, args.repeats)
    mib = {name: peak_mib(name, args) for name in IMPLEMENTATIONS}
    print("| implementation | forward+backward median (ms) | peak memory added (MiB) |")
    print("|---|---:|---:|")
    for name in IMPLEMENTATIONS:
        print(f"| {name} | {ms[name]:.1f} | {mib[name]:.1f} |")
    base, ours = IMPLEMENTATIONS
    print(f"\nspeed-up x{ms[base] / ms[ours]:.1f}, "
          f"peak memory / {mib[base] / max(mib[ours], 0.1):.1f}")


if __name__ == "__main__":
    main()
