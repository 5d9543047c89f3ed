"""The measured cost of every method: step time, FLOPs, utilisation, memory, data loading.

    python benchmark/cost.py                                   # every registered method, mini-gta2cs
    python benchmark/cost.py --methods daformer hrda --steps 10 --warmup 2 --threads 2

All methods live in one process and their training steps are interleaved (``benchmark/step_time.py``,
which builds each method, its loaders and optimiser as ``train.py`` does), so load on the machine from
elsewhere falls on all of them alike; the ratios are the robust figures, absolute times vary with the
machine's load. Every method starts from the weights its run starts from (the profile's warm start):
at random weights the teacher is confident nowhere, every pseudo-label is ignored, and PiPa's patch
contrast had no anchors, which made its step look about 0.1x of daformer cheaper than in a run. Per
method (one row of ``results/cost.csv``):

- ``step_time_s``: median seconds of a training iteration, taking the batches included;
  ``ratio_to_daformer``: the median over rounds of its iteration time over daformer's in the same
  round (paired, so a slow stretch of the machine cancels; empty when daformer is not measured);
  ``data_time_s``: median seconds the iteration waits for its batches (the loop's loaders draw them
  ahead, in worker processes or a background thread: ``train._batches``), the time the data
  starves the step; ``data_share``: total waiting time over total iteration time.
- ``flops_per_step``: floating-point operations of one step (forward, backward; counted by
  ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix products and convolutions, the
  bulk of the work; the optimiser's element-wise updates are not counted). Its formula for a
  convolution's weight gradient ignores ``groups`` and counts a grouped convolution as if every input
  channel met every output channel: ``groups`` times too many, 128 times on a 128-channel depthwise
  layer, which inflated the count of the embedded profile's DAFormer step about fourfold. The count
  here divides that term by ``groups`` (``convolution_backward_flops``).
- ``achieved_flops``: ``flops_per_step / step_time_s``; ``peak_flops``: the best FLOP/s of a square
  float32 matrix product of ``--matmul-size`` on the same device and threads, timed once per round
  between the methods' steps (the same load); ``utilisation``: their ratio.
- ``peak_memory_mb``: the process's peak memory during the method's steps: resident set size on the
  CPU (the high-water mark reset before each step through ``/proc/self/clear_refs`` where Linux offers
  it, so it is this method's peak, including what the other methods keep resident), memory allocated
  by tensors on a GPU.
- where the iteration goes, median seconds per part (``step_time.PARTS``; the medians need not add
  up to ``step_time_s`` exactly): ``teacher_s`` (the teacher's pass and pseudo-labels), ``mix_s``
  (the mixed batch and its augmentation), ``student_s`` (the student's one pass over every input it
  predicts), ``addon_s`` (the add-ons' own terms: PiPa's patch pass, MIC's masking, SePiCo's
  statistics), ``losses_s`` (the rest of ``Method.step``: the source and mixed losses; the whole step of
  source_only and target_oracle), ``backward_s``, ``optimizer_s`` and ``ema_s`` (the teacher's update),
  with ``data_time_s`` above. The stages are timed by wrapping the method's step hooks
  (``step_time.StageTimer``), a few microseconds per step.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from benchmark.config import ConfigError
from benchmark.formats import DatasetFormatError, write_bytes_atomic
from benchmark.profiles import resolve
from benchmark.step_time import PARTS, Contender, StageTimer, build_contenders, interleaved, timed_parts, timed_step
from benchmark.train import REPO, WARM_START_DIR
from methods import registered

COLUMNS = [
    "method", "benchmark", "profile", "device", "threads", "steps", "step_time_s", "ratio_to_daformer",
    "data_time_s", "data_share", "flops_per_step", "achieved_flops", "peak_flops", "utilisation", "peak_memory_mb",
    *(f"{part}_s" for part in PARTS if part != "data"),
]
DEFAULT_OUT = REPO / "results" / "cost.csv"
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def matmul_flops(device: torch.device, size: int = 1024) -> float:
    """FLOP/s of one ``size`` x ``size`` float32 matrix product (2 size^3 operations) on ``device``."""
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.randn(size, size, generator=generator).to(device) for _ in range(2))
    left @ right  # the first product pays for allocation and kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    left @ right
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 / (time.perf_counter() - started)


def convolution_backward_flops(
    grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups,
    output_mask, out_shape=None, **kwargs,
) -> int:
    """FLOPs of ``aten.convolution_backward`` with the weight gradient counted per group.

    As torch's formula: the input gradient is the transposed convolution of the output gradient with
    the weight, the weight gradient the convolution of the input with the output gradient over the
    channel pairs. torch's pairs all C_in x C_out channels; a grouped convolution pairs only the
    C_in / groups input channels of a group with that group's outputs, so its term is divided by
    ``groups`` here (each gradient then takes as many operations as the forward pass). Shapes as
    torch's formula takes them; ``out_shape``: the shapes of (grad_input, grad_weight, grad_bias)."""

    def swapped(shape):
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], transposed=not transposed)
    if output_mask[1]:
        if transposed:
            pairs = conv_flop_count(swapped(grad_out_shape), swapped(x_shape), swapped(out_shape[1]))
        else:
            pairs = conv_flop_count(swapped(x_shape), swapped(grad_out_shape), swapped(out_shape[1]))
        flops += pairs // groups
    return flops


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter with the grouped convolutions' backward counted right (above)."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: convolution_backward_flops})


def step_flops(contender: Contender, step: int) -> int:
    """Floating-point operations of one training step of ``contender`` (it takes the step)."""
    with flop_counter() as counter:
        timed_step(contender, step)
    return counter.get_total_flops()


class PeakMemory:
    """The process's peak memory over a stretch of work, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = device.type == "cpu" and _CLEAR_REFS.exists() and _STATUS.exists()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _CLEAR_REFS.write_text("5")  # Linux >= 4.0: reset the resident-set high-water mark

    def read(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.resettable:
            line = next(line for line in _STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
            return int(line.split()[1]) / 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; since start


def measure_cost(
    params: dict | Path | str,
    benchmark: str,
    methods: list[str],
    steps: int = 20,
    warmup: int = 3,
    seed: int = 0,
    profile: str | None = None,
    overrides: list[str] | None = None,
    matmul_size: int = 1024,
    device: torch.device | None = None,
    progress: bool = True,
    warm_start_dir: Path = WARM_START_DIR,
) -> list[dict]:
    """One row of ``COLUMNS`` per method of ``methods``, in that order; the models start from the
    profile's warm start (``step_time.build_contenders``), cached in ``warm_start_dir``."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if len(set(methods)) != len(methods) or not methods:
        raise ValueError(f"need distinct methods, got {methods}")
    run = resolve(params, benchmark, methods[0], seed, profile, overrides)
    contenders = build_contenders(params, benchmark, methods, seed, profile, overrides, device, warm_start_dir, progress)
    device = contenders[0].device
    memory = PeakMemory(device)
    stages = {contender.name: StageTimer(contender.method, device) for contender in contenders}
    parts_s = {name: {part: [] for part in PARTS} for name in methods}
    peaks = {name: 0.0 for name in methods}
    flops: dict[str, int] = {}
    peak_flops = 0.0
    last_round = -1
    for step, contender in interleaved(contenders, warmup + steps, progress, description="cost"):
        if step != last_round:
            last_round = step
            peak_flops = max(peak_flops, matmul_flops(device, matmul_size))
        if step == warmup and contender.name not in flops:
            flops[contender.name] = step_flops(contender, step)  # an extra, untimed step
            stages[contender.name].take()  # not a timed step's
        memory.reset()
        parts = timed_parts(contender, step, stages[contender.name])
        peaks[contender.name] = max(peaks[contender.name], memory.read())
        if step >= warmup:
            for part, seconds in parts.items():
                parts_s[contender.name][part].append(seconds)
    iterations = {name: [sum(step) for step in zip(*parts_s[name].values())] for name in methods}
    rows = []
    for name in methods:
        data_s = parts_s[name]["data"]
        median = statistics.median(iterations[name])
        achieved = flops[name] / median
        rows.append(
            {
                "method": name,
                "benchmark": benchmark,
                "profile": run.profile,
                "device": device.type,
                "threads": torch.get_num_threads(),
                "steps": steps,
                "step_time_s": median,
                "data_time_s": statistics.median(data_s),
                "data_share": sum(data_s) / sum(iterations[name]),
                "flops_per_step": flops[name],
                "achieved_flops": achieved,
                "peak_flops": peak_flops,
                "utilisation": achieved / peak_flops,
                "peak_memory_mb": peaks[name],
                **{f"{part}_s": statistics.median(parts_s[name][part]) for part in PARTS if part != "data"},
            }
        )
    reference = iterations.get("daformer")
    for row in rows:
        # paired by round: both steps of a round ran under the same load from elsewhere
        row["ratio_to_daformer"] = (
            None if reference is None else statistics.median(t / r for t, r in zip(iterations[row["method"]], reference))
        )
    return rows


def _formatted(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(rows: list[dict], out: Path) -> None:
    """``rows`` as CSV with the columns of ``COLUMNS``, written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: _formatted(row[column]) for column in COLUMNS})
    write_bytes_atomic(out, text.getvalue().encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="mini-gta2cs")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (torch.set_num_threads)")
    parser.add_argument("--matmul-size", type=int, default=1024, help="side of the matrices timing the peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 1:
        print(f"cost.py: error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    methods = args.methods or registered()
    try:
        rows = measure_cost(
            args.params, args.benchmark, methods, args.steps, args.warmup, args.seed, args.profile, args.set,
            args.matmul_size, progress=not args.no_progress,
        )
    except (ConfigError, DatasetFormatError, KeyError, ValueError) as error:
        print(f"cost.py: error: {error}", file=sys.stderr)
        return 2
    write_csv(rows, args.out)
    print(f"{args.benchmark}: {args.steps} timed steps per method after {args.warmup}, {args.threads} threads")
    for row in rows:
        ratio = "" if row["ratio_to_daformer"] is None else f" {row['ratio_to_daformer']:.2f}x daformer,"
        print(
            f"{row['method']}: {row['step_time_s']:.3f} s/step,{ratio} data {row['data_share']:.1%},"
            f" {row['flops_per_step'] / 1e9:.2f} GFLOP, utilisation {row['utilisation']:.1%},"
            f" peak {row['peak_memory_mb']:.0f} MiB"
        )
    width = max(len(row["method"]) for row in rows)
    print(f"where each step goes, median ms:\n{'':{width}s}" + "".join(f"{part:>10s}" for part in PARTS))
    for row in rows:
        times = [row["data_time_s"], *(row[f"{part}_s"] for part in PARTS[1:])]
        print(f"{row['method']:{width}s}" + "".join(f"{1e3 * seconds:10.1f}" for seconds in times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
