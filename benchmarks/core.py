"""Time and memory of regflow's registration core against MONAI, on the CPU with 2 threads.

Run ``python -m benchmarks.core [--json PATH] [--results PATH] [--sizes 64 96] [--repeats N]``
(``make bench`` updates the committed ``benchmarks/results/speed.json``: each (row, size) replaced,
the others kept, with the commit, date and machine note of :mod:`benchmarks.records`). Every row
runs at batch 2 on smooth random volumes of ``size^3`` voxels:

- ``warp``: forward + backward (gradient w.r.t. the DDF), trilinear, zeros outside.
  ``regflow.spatial.warp`` vs ``monai.networks.blocks.Warp(mode="bilinear",
  padding_mode="zeros")``. Both take the DDF in voxels with channel i along array axis i and call
  ``grid_sample(align_corners=True)``, so they give the same result (MONAI's default padding is
  "border": the benchmark asks for "zeros").
- ``lncc``: forward + backward, 9^3 rectangular window. MONAI zero-pads and divides by the full
  window weight, regflow crops the window at the border (same values inside).
- ``gmi``: forward + backward, 23 bins, sigma = 0.5 bin spacing, both Gaussian Parzen windows.
- ``bending_energy``: forward + backward of a 3-channel DDF.
- ``localnet_forward``: forward only, ``torch.no_grad()``, ``eval()`` mode.
  regflow ``LocalNet(ndim=3, in_channels=2, out_channels=3, channels=[16, 32, 64])`` vs MONAI
  ``LocalNet(spatial_dims=3, in_channels=2, out_channels=3, num_channel_initial=16,
  extract_levels=(0, 1, 2, 3))``: both have 3 poolings, levels of 16/32/64 features, a bottom of
  128 and a field head on every level (MONAI averages the nearest-upsampled heads, regflow sums
  linearly upsampled ones). Both normalise after every convolution, regflow with its default
  instance norm, MONAI with BatchNorm; MONAI has a 7^3 first kernel, one more convolution per
  decoder level and one fewer at the bottom.
- ``train_step``: forward + backward + Adam step of LocalNet -> warp -> LNCC + 0.5 bending energy,
  input concat(moving, fixed) of 2 channels, each side with its own components, ``train()`` mode.

Timing: both implementations run in the same process, alternating repetitions so that background
load hits both alike, after one warm-up call each; the table shows medians in seconds.

Peak memory: each (row, size, implementation) runs in a fresh subprocess
(``python -m benchmarks.core --one ROW SIZE IMPL``, which prints JSON) with glibc's mmap threshold
fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so that every freed tensor is returned to the system
at once instead of staying resident in the heap. After the imports, the inputs, the model and one
warm-up call (which also creates Adam's state), the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``) and the current RSS taken as the baseline; the reported peak is the
high-water mark of one more call minus that baseline: the extra memory one call needs on top of
what is already resident. Without ``clear_refs`` the fallback is ``ru_maxrss`` minus the baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import records

ROWS = ("warp", "lncc", "gmi", "bending_energy", "localnet_forward", "train_step")
IMPLS = ("regflow", "monai")
BATCH = 2
THREADS = 2
KERNEL_SIZE = 9
NUM_BINS = 23
SIGMA_RATIO = 0.5
BENDING_WEIGHT = 0.5
CHANNELS = (16, 32, 64)
MMAP_THRESHOLD = "65536"

Case = Callable[[], object]


def monai_available() -> bool:
    """True when MONAI can be imported (it is an optional benchmark dependency)."""
    return importlib.util.find_spec("monai") is not None


def smooth_volume(size: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random field (BATCH, channels, size, size, size): 8^3 noise, upsampled."""
    coarse = torch.rand(BATCH, channels, 8, 8, 8, generator=generator)
    return F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)


def make_inputs(size: int) -> dict[str, torch.Tensor]:
    """Fixed and moving images in [0, 1], (B, 1, *S); a smooth DDF within 3 voxels, (B, 3, *S)."""
    generator = torch.Generator().manual_seed(size)
    return {"fixed": smooth_volume(size, 1, generator),
            "moving": smooth_volume(size, 1, generator),
            "ddf": 6.0 * smooth_volume(size, 3, generator) - 3.0}


def _backward(loss_fn: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor) -> Case:
    """A case that evaluates ``loss_fn(leaf)`` and back-propagates into ``leaf``."""
    def run() -> torch.Tensor:
        leaf.grad = None
        loss = loss_fn(leaf)
        loss.backward()
        return loss
    return run


def _forward(network: torch.nn.Module, image: torch.Tensor) -> Case:
    """A case that runs ``network(image)`` in eval mode without autograd."""
    network.eval()

    def run() -> torch.Tensor:
        with torch.no_grad():
            return network(image)
    return run


def _train_step(network: torch.nn.Module, warp: Callable, similarity: Callable,
                bending: Callable, inputs: dict[str, torch.Tensor]) -> Case:
    """One Adam step of ``network`` on the moving/fixed pair with the given components."""
    network.train()
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-4)
    pair = torch.cat([inputs["moving"], inputs["fixed"]], dim=1)  # (B, 2, *S)

    def run() -> torch.Tensor:
        optimiser.zero_grad(set_to_none=True)
        ddf = network(pair)
        warped = warp(inputs["moving"], ddf)
        loss = similarity(inputs["fixed"], warped) + BENDING_WEIGHT * bending(ddf)
        loss.backward()
        optimiser.step()
        return loss.detach()
    return run


@dataclass(frozen=True)
class Components:
    """One implementation's parts, each called in regflow's argument order."""

    warp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (image, ddf) -> warped
    lncc: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (fixed, warped) -> loss
    gmi: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (fixed, warped) -> loss
    bending: Callable[[torch.Tensor], torch.Tensor]  # ddf -> loss
    localnet: Callable[[], torch.nn.Module]  # a fresh (B, 2, *S) -> (B, 3, *S) network


def regflow_components() -> Components:
    """regflow's warp, losses and LocalNet (see the module docstring)."""
    from regflow.losses.deform import bending_energy
    from regflow.losses.image import gmi, lncc
    from regflow.networks import LocalNet
    from regflow.spatial import warp

    return Components(
        warp=warp,
        lncc=lambda fixed, warped: lncc(fixed, warped, KERNEL_SIZE, "rectangular"),
        gmi=lambda fixed, warped: gmi(fixed, warped, NUM_BINS, SIGMA_RATIO),
        bending=bending_energy,
        localnet=lambda: LocalNet(ndim=3, in_channels=2, out_channels=3, channels=CHANNELS))


def monai_components() -> Components:
    """MONAI's equivalents (needs MONAI installed; imported here because it takes ~5 s)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Using PyTorch native grid_sample" and friends
        from monai.losses import (
            BendingEnergyLoss,
            GlobalMutualInformationLoss,
            LocalNormalizedCrossCorrelationLoss,
        )
        from monai.networks.blocks import Warp
        from monai.networks.nets import LocalNet

        warp = Warp(mode="bilinear", padding_mode="zeros")
    ncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=KERNEL_SIZE,
                                              kernel_type="rectangular")
    mutual_information = GlobalMutualInformationLoss(num_bins=NUM_BINS, sigma_ratio=SIGMA_RATIO)
    return Components(
        warp=warp,
        lncc=lambda fixed, warped: ncc(warped, fixed),
        gmi=lambda fixed, warped: mutual_information(warped, fixed),
        bending=BendingEnergyLoss(),
        localnet=lambda: LocalNet(spatial_dims=3, in_channels=2, out_channels=3,
                                  num_channel_initial=CHANNELS[0],
                                  extract_levels=tuple(range(len(CHANNELS) + 1))))


def build_case(row: str, inputs: dict[str, torch.Tensor], parts: Components) -> Case:
    """The callable timed for ``row``, made of one implementation's ``parts``."""
    fixed, moving = inputs["fixed"], inputs["moving"]
    ddf = inputs["ddf"].clone().requires_grad_(True)
    warped = moving.clone().requires_grad_(True)
    if row == "warp":
        return _backward(lambda field: parts.warp(moving, field).sum(), ddf)
    if row == "lncc":
        return _backward(lambda image: parts.lncc(fixed, image), warped)
    if row == "gmi":
        return _backward(lambda image: parts.gmi(fixed, image), warped)
    if row == "bending_energy":
        return _backward(parts.bending, ddf)
    if row == "localnet_forward":
        return _forward(parts.localnet(), torch.cat([moving, fixed], dim=1))
    return _train_step(parts.localnet(), parts.warp, parts.lncc, parts.bending, inputs)


def regflow_case(row: str, inputs: dict[str, torch.Tensor]) -> Case:
    """The regflow callable for ``row`` on ``inputs``."""
    return build_case(row, inputs, regflow_components())


def monai_case(row: str, inputs: dict[str, torch.Tensor]) -> Case:
    """The MONAI callable for ``row`` on ``inputs``."""
    return build_case(row, inputs, monai_components())


CASES = {"regflow": regflow_case, "monai": monai_case}


def time_row(row: str, size: int, repeats: int, impls: list[str]) -> dict[str, float]:
    """Median seconds per call of each implementation, repetitions interleaved.

    Returns:
        impl -> median wall-clock seconds over ``repeats`` calls (after one warm-up call each).
    """
    inputs = make_inputs(size)
    cases = {impl: CASES[impl](row, inputs) for impl in impls}
    for case in cases.values():
        case()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for repetition in range(repeats):
        # alternate which one goes first, so neither always follows the other's cache state
        order = impls if repetition % 2 == 0 else impls[::-1]
        for impl in order:
            start = time.perf_counter()
            cases[impl]()
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(values) for impl, values in times.items()}


def _rss_kb() -> int:
    """Current resident set size of this process in KiB."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _peak_kb(reset: bool) -> int:
    """Peak RSS in KiB since the reset (VmHWM), or over the process's life (ru_maxrss)."""
    if reset:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_one(row: str, size: int, impl: str) -> dict[str, float | str | int]:
    """Peak extra memory and time of one call, in this process (see the module docstring).

    Returns:
        {"row", "size", "impl", "peak_mb": MiB above the resident baseline, "seconds"}.
    """
    torch.set_num_threads(THREADS)
    case = CASES[impl](row, make_inputs(size))
    case()
    reset = _reset_peak()
    baseline = _rss_kb()
    start = time.perf_counter()
    case()
    seconds = time.perf_counter() - start
    peak_mb = max(_peak_kb(reset) - baseline, 0) / 1024
    return {"row": row, "size": size, "impl": impl, "peak_mb": peak_mb, "seconds": seconds}


def peak_memory_mb(row: str, size: int, impl: str) -> float:
    """Run :func:`measure_one` in a fresh interpreter and return its peak in MiB."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    command = [sys.executable, "-m", "benchmarks.core", "--one", row, str(size), impl]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                            cwd=Path(__file__).resolve().parent.parent)
    if result.returncode != 0:
        raise RuntimeError(f"benchmarks.core --one {row} {size} {impl} failed: "
                           f"{result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def run_row(row: str, size: int, repeats: int, with_monai: bool) -> dict[str, object]:
    """One table row: medians, their ratio and both peaks (MONAI fields None without MONAI)."""
    impls = ["regflow", "monai"] if with_monai else ["regflow"]
    seconds = time_row(row, size, repeats, impls)
    peaks = {impl: peak_memory_mb(row, size, impl) for impl in impls}
    monai_s = seconds.get("monai")
    return {"name": row, "size": size, "regflow_s": seconds["regflow"], "monai_s": monai_s,
            "ratio": seconds["regflow"] / monai_s if monai_s else None,
            "regflow_peak_mb": peaks["regflow"], "monai_peak_mb": peaks.get("monai")}


def format_table(rows: list[dict[str, object]]) -> str:
    """Fixed-width text table of benchmark rows; missing MONAI values print as "n/a"."""
    columns = [("name", "{}"), ("size", "{}"), ("regflow_s", "{:.4f}"), ("monai_s", "{:.4f}"),
               ("ratio", "{:.2f}"), ("regflow_peak_mb", "{:.0f}"), ("monai_peak_mb", "{:.0f}")]
    cells = [[name for name, _ in columns]]
    cells += [["n/a" if row[name] is None else spec.format(row[name]) for name, spec in columns]
              for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
                     for line in cells)


def write_json(rows: list[dict[str, object]], path: Path) -> None:
    """Write the rows as a JSON list, through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(rows, handle, indent=2)
    os.replace(handle.name, path)


def run_benchmarks(rows: list[str], sizes: list[int], repeats: int, with_monai: bool,
                   on_row: Callable[[], None] = lambda: None) -> list[dict[str, object]]:
    """Every row at every size; one progress line per row on stderr, ``on_row()`` after each."""
    torch.set_num_threads(THREADS)
    results = []
    for size in sizes:
        for row in rows:
            result = run_row(row, size, repeats, with_monai)
            on_row()
            monai_s = "n/a" if result["monai_s"] is None else f"{result['monai_s']:.4f} s"
            print(f"done {row} {size}^3: regflow {result['regflow_s']:.4f} s, monai {monai_s}",
                  file=sys.stderr)
            results.append(result)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.core", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--results", type=Path,
                        help="update these rows (by name and size) in this results file")
    parser.add_argument("--machine-note", default="", help="added to the rows' machine note")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96],
                        help="cube sizes in voxels (default: 64 96)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                        help="which rows to run (default: all)")
    parser.add_argument("--no-monai", action="store_true", help="time regflow only")
    parser.add_argument("--one", nargs=3, metavar=("ROW", "SIZE", "IMPL"),
                        help="measure one call's peak memory here and print it as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.core``."""
    args = parse_args(argv)
    if args.one:
        row, size, impl = args.one
        if row not in ROWS or impl not in IMPLS:
            raise SystemExit(f"--one: expected ROW in {ROWS} and IMPL in {IMPLS}")
        print(json.dumps(measure_one(row, int(size), impl)))
        return 0
    with_monai = not args.no_monai and monai_available()
    note = None if with_monai else ("MONAI columns are n/a: " + (
        "--no-monai" if args.no_monai else "MONAI is not installed (pip install '.[bench]')"))
    if note:
        print(note, file=sys.stderr)
    # MONAI 1.6.1 indexes with lists (a torch deprecation warning) and notes its grid_sample path
    warnings.filterwarnings("ignore", category=UserWarning, module=r"monai\.")
    commit, watch = records.git_commit(), records.LoadWatch(THREADS)
    rows = run_benchmarks(args.rows, args.sizes, args.repeats, with_monai, on_row=watch.sample)
    print(format_table(rows))
    if note:
        print(note)
    if args.json:
        write_json(rows, args.json)
    if args.results:
        machine = watch.note("; ".join(filter(None, [note, args.machine_note])))
        records.upsert(args.results, [{**row, **records.provenance(commit, machine)}
                                      for row in rows], key_fields=("name", "size"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
