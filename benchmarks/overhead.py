"""What guidance costs: plain sampling vs Attend-and-Excite vs each ait2i mode, measured side by side.

On one pipeline, with the same prompts and seeds, in one run (the methods interleaved, their order
rotated every repeat), it reports per method: seconds per image (median over repeats), process CPU
seconds per image (user + system of this process: on a CPU shared with other jobs it moves less
than wall time; with one thread it is the work done), UNet calls
per image (full, and partial: the truncated passes that stop after the map layers), peak memory,
the ratios to plain sampling, and how far the images are from the ``full`` mode's.

    python benchmarks/overhead.py                                   # tiny components, CPU, < 3 min
    python benchmarks/overhead.py --arch shapes --methods plain truncated down-maps   # shipped model, 25 steps
    python benchmarks/overhead.py --arch sd15 --device cuda --dtype fp16 --steps 50 --json sd15.json

Methods:
    plain               the stock pipeline call
    attend-and-excite   diffusers' StableDiffusionAttendAndExcitePipeline on the same components,
                        its defaults (refinement included; with fewer than 50 steps its step
                        indices ``max_iter_to_alter`` and ``thresholds`` are scaled to the step count)
    full, truncated, lagged
                        ``ait2i_ext.generate`` with ``AIT2IConfig(mode=...)`` (the model's schedule)
    lagged-split        ``lagged`` with ``LaggedGuide.split_cfg = True``: the CFG batch is run as two
                        halves and only the conditional one is differentiated (less memory)
    truncated-frozen    ``truncated`` with the UNet's parameters not requiring grad during the call
                        (``ait2i_ext.fast.frozen_parameters``): what skipping weight-gradient
                        bookkeeping saves
    reference, fast     ``truncated`` with that preset of ``ait2i_ext.config.PRESETS`` (``reference``:
                        the authors' schedule; ``fast``: fewer guided steps) on top of the model's
                        settings; ``truncated`` is the model's own schedule (its ``ait2i.json``,
                        e.g. of ``--settings-from``)
    down-maps           ``truncated`` with ``map_blocks="down"``: the guided pass reads the down-block
                        maps only and stops before the mid block (a fast-preset candidate that lost
                        to plain sampling on quality: docs/performance.md)
    --variants FIELDS   one more row each: ``truncated`` with the model's settings and these
                        ``LossConfig`` / ``ScheduleConfig`` field overrides (``"radius_mode=calibrated;
                        guided_fraction=0.32"``, as ``benchmarks/deviations.py --variants`` reads them)
    truncated+compiled, lagged+compiled
                        opt-in what-if rows: the losses through ``torch.compile`` (see
                        ``compiled_losses``); the compile happens in the untimed warm-up

Memory is measured in one more, untimed, round after the timed ones (max over the prompts and seeds): on CUDA the peak of
``torch.cuda.max_memory_allocated`` (weights included, as in the reference figures of ``docs/performance.md``); on CPU the peak
resident set above the one before sampling (weights excluded), read from ``VmHWM`` after resetting
it through ``/proc/self/clear_refs``, with glibc set to mmap every block of 4 KiB or more so that
freed tensors leave the resident set instead of staying in malloc's heap (see ``PeakMemory``); the
timed rounds run with glibc's own settings, as a user's process does.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import inspect
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

from ait2i_ext import fast, generate, guidance, resolve_groups
from ait2i_ext.capture import map_shape, select_factor
from ait2i_ext.config import model_config
from ait2i_ext.fast import LaggedGuide, frozen_parameters
from ait2i_ext.testing import build_pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deviations import parse_variant, variant_config  # noqa: E402

PROMPTS = {
    "a red circle and a blue square": ["red circle", "blue square"],
    "a cat and a dog": ["cat", "dog"],
}
SHAPES_PROMPTS = {  # --arch shapes: two prompts of the shapes `two` set (its prompts 2 and 3)
    "a red circle and a pink triangle": ["red circle", "pink triangle"],
    "a blue triangle and a pink square": ["blue triangle", "pink square"],
}
METHODS = (
    "plain",
    "attend-and-excite",
    "full",
    "truncated",
    "lagged",
    "lagged-split",
    "truncated-frozen",
    "down-maps",
    "reference",
    "fast",
)
COMPILED = ("truncated+compiled", "lagged+compiled")  # opt-in: compiling takes minutes on a small CPU
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AE_STEPS = 50  # the step count Attend-and-Excite's defaults are written for


# --- measuring ----------------------------------------------------------------------------------


class UNetCalls:
    """Counts the UNet's calls: started (pre-hook) and completed (forward hook); the rest stopped early."""

    def __init__(self, unet):
        self.started = self.completed = 0
        self._hooks = [unet.register_forward_pre_hook(self._start), unet.register_forward_hook(self._end)]

    def _start(self, *_) -> None:
        self.started += 1

    def _end(self, *_) -> None:
        self.completed += 1

    def take(self) -> tuple[int, int]:
        """``(full, partial)`` calls since the last ``take``."""
        full, partial = self.completed, self.started - self.completed
        self.started = self.completed = 0
        return full, partial


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory of a block: the CUDA allocator's peak, or on Linux the resident-set peak above the start.

    CPU: glibc keeps freed blocks in its heap, where the next run reuses them unseen. While
    measuring, every allocation of 4 KiB or more is mmapped (returned to the system when freed)
    and the heap is trimmed first, so the resident set follows the live tensors. Setting the
    threshold turns off glibc's own, adaptive one for the rest of the process (every later block of
    128 KiB or more is mmapped and faulted in anew), which slows the methods that allocate more
    (the guided passes) far beyond what they cost in a user's process: the first measurement must
    come after every timed round.
    """

    MMAP_THRESHOLD = -3  # mallopt's M_MMAP_THRESHOLD

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.libc = None
        if not self.cuda and os.path.exists("/proc/self/clear_refs"):
            with contextlib.suppress(OSError):
                self.libc = ctypes.CDLL("libc.so.6")
        self.peak_bytes = float("nan")

    @property
    def available(self) -> bool:
        return self.cuda or self.libc is not None

    @contextlib.contextmanager
    def measure(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.libc is not None:
            self.libc.mallopt(self.MMAP_THRESHOLD, 4096)
            self.libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            start = _rss_kib("VmRSS")
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                self.peak_bytes = torch.cuda.max_memory_allocated()
            elif self.libc is not None:
                self.peak_bytes = max(0, _rss_kib("VmHWM") - start) * 1024
                self.libc.mallopt(self.MMAP_THRESHOLD, 128 * 1024)


# --- the methods ----------------------------------------------------------------------------------


def _ae_pipeline(pipe):
    from diffusers import StableDiffusionAttendAndExcitePipeline

    accepted = set(inspect.signature(StableDiffusionAttendAndExcitePipeline.__init__).parameters)
    ae = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in pipe.components.items() if k in accepted})
    ae.set_progress_bar_config(disable=True)
    return ae


def _ae_kwargs(pipe, ae, prompt: str, subjects: list[str], steps: int) -> dict:
    """Attend-and-Excite's defaults, its step indices scaled to ``steps``, at ait2i's map resolution."""
    groups = resolve_groups(pipe.tokenizer, prompt, subjects)
    size = pipe.unet.config.sample_size
    res = map_shape((size, size), select_factor(pipe.unet, (size, size)))
    defaults = {p.name: p.default for p in inspect.signature(type(ae).__call__).parameters.values()}
    scale = steps / AE_STEPS
    return dict(
        token_indices=[g.main for g in groups],
        max_iter_to_alter=round(defaults["max_iter_to_alter"] * scale),
        thresholds={round(k * scale): v for k, v in defaults["thresholds"].items()},
        attn_res=res,
    )


_COMPILED = {}


@contextlib.contextmanager
def compiled_losses():
    """What-if: ``batch_losses`` through ``torch.compile`` (the losses are ~2k tiny ops per call).

    Swaps the function the guidance modules call for the block. A measurement, not an option of the
    package yet: it recompiles for every new prompt layout (the groups are compile-time constants).
    """
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(guidance.batch_losses, dynamic=False)
    originals = guidance.batch_losses, fast.batch_losses
    guidance.batch_losses = fast.batch_losses = _COMPILED["fn"]
    try:
        yield
    finally:
        guidance.batch_losses, fast.batch_losses = originals


def make_runner(method: str, pipe, ae, steps: int, batch: int = 1, settings=None):
    """``run(prompt, subjects, seed) -> images`` (numpy, ``batch`` images: seeds ``seed..``) for ``method``.

    ``settings``: a model folder whose ``ait2i.json`` the ait2i methods use instead of ``pipe``'s.
    """

    def gen(seed: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed + k) for k in range(batch)]

    common = dict(num_inference_steps=steps, output_type="np", num_images_per_prompt=batch)
    if method == "plain":
        return lambda prompt, subjects, seed: pipe(prompt, generator=gen(seed), **common).images
    if method == "attend-and-excite":

        def run_ae(prompt, subjects, seed):
            processors = pipe.unet.attn_processors
            try:
                return ae(
                    prompt, generator=gen(seed), **_ae_kwargs(pipe, ae, prompt, subjects, steps), **common
                ).images
            finally:
                pipe.unet.set_attn_processor(processors)

        return run_ae
    if method not in METHODS + COMPILED:  # a --variants row: the model's settings and these fields
        config = variant_config(model_config(settings or pipe), parse_variant(method))

        def run_variant(prompt, subjects, seed):
            return generate(pipe, prompt, subjects, config=config, generator=gen(seed), **common).images

        return run_variant
    blocks = "down" if method == "down-maps" else "down_up"
    preset = method if method in ("reference", "fast") else "default"
    mode = (
        "truncated"
        if method in ("down-maps", "reference", "fast")
        else method.split("-")[0].removesuffix("+compiled")
    )
    frozen, split, compiled = (
        method.endswith("-frozen"),
        method.endswith("-split"),
        method.endswith("+compiled"),
    )

    def run_ait2i(prompt, subjects, seed):
        LaggedGuide.split_cfg = split
        try:
            with (
                frozen_parameters(pipe.unet) if frozen else contextlib.nullcontext(),
                compiled_losses() if compiled else contextlib.nullcontext(),
            ):
                # the model's ait2i.json, if any, then the preset
                config = model_config(settings or pipe, mode=mode, map_blocks=blocks, preset=preset)
                out = generate(pipe, prompt, subjects, config=config, generator=gen(seed), **common)
        finally:
            LaggedGuide.split_cfg = False
        return out.images

    return run_ait2i


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    seconds_per_image: float
    time_ratio: float
    cpu_seconds_per_image: float
    cpu_ratio: float
    unet_full_per_image: float
    unet_partial_per_image: float
    peak_memory_mib: float
    memory_ratio: float
    max_abs_diff_vs_full: float | None


def benchmark(args) -> tuple[list[Row], dict]:
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {} if args.arch != "sd15" else {"dtype": DTYPES[args.dtype], "device": args.device}
    if args.arch == "shapes":
        from diffusers import DiffusionPipeline

        from ait2i_ext.shapes.model import default_model_path

        pipe = DiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None)
    else:
        pipe = build_pipeline(args.arch, **kwargs)
    if args.arch != "sd15" and (device.type != "cpu" or args.dtype != "fp32"):
        pipe = pipe.to(device=device, dtype=DTYPES[args.dtype])
    pipe.set_progress_bar_config(disable=True)
    methods = list(args.methods) + list(args.variants)
    if "plain" not in methods:
        methods.insert(0, "plain")
    ae = _ae_pipeline(pipe) if "attend-and-excite" in methods else None
    runners = {m: make_runner(m, pipe, ae, args.steps, args.batch, args.settings_from) for m in methods}
    pool = SHAPES_PROMPTS if args.arch == "shapes" else PROMPTS
    prompts = {p: pool[p] for p in list(pool)[: args.num_prompts]}
    cases = [(p, tuple(s), seed) for p, s in prompts.items() for seed in args.seeds]

    calls, memory = UNetCalls(pipe.unet), PeakMemory(device)
    per_round = {m: [] for m in methods}  # seconds per image, one value per repeat
    cpu_round = {m: [] for m in methods}  # process CPU seconds per image (steadier on a shared machine)
    peaks = {m: [] for m in methods}
    counts = {m: (0, 0) for m in methods}
    images: dict[tuple, dict] = {}

    for m in tqdm(methods, desc="warm-up", file=sys.stderr):  # a short untimed run per method and prompt
        for prompt, subjects in prompts.items():
            make_runner(m, pipe, ae, 2, settings=args.settings_from)(prompt, tuple(subjects), 0)
    calls.take()
    progress = tqdm(total=(args.repeats + 1) * len(cases) * len(methods), desc="sampling", file=sys.stderr)
    for r in range(args.repeats):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        seconds = {m: 0.0 for m in methods}
        cpu = {m: 0.0 for m in methods}
        for case in cases:
            for m in order:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start, cpu_start = time.perf_counter(), time.process_time()
                out = runners[m](*case)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[m] += time.perf_counter() - start
                cpu[m] += time.process_time() - cpu_start
                counts[m] = tuple(a + b for a, b in zip(counts[m], calls.take()))
                images.setdefault(case, {})[m] = out
                progress.update()
        for m in methods:
            per_round[m].append(seconds[m] / (len(cases) * args.batch))
            cpu_round[m].append(cpu[m] / (len(cases) * args.batch))
    for case in cases:  # memory, untimed (on CPU the measurement slows allocations down)
        for m in methods:
            with memory.measure():
                runners[m](*case)
            peaks[m].append(memory.peak_bytes)
            progress.update()
    calls.take()
    progress.close()

    runs = args.repeats * len(cases)  # UNet calls are counted per pipeline call (a batch)
    plain_time = per_round["plain"]
    plain_peak = max(peaks["plain"])
    rows = []
    for m in methods:
        diff = None
        if "full" in methods:
            diff = max(float(abs(images[c][m].astype("float64") - images[c]["full"]).max()) for c in cases)
        peak = max(peaks[m])
        rows.append(
            Row(
                method=m,
                seconds_per_image=statistics.median(per_round[m]),
                time_ratio=statistics.median(a / b for a, b in zip(per_round[m], plain_time)),
                cpu_seconds_per_image=statistics.median(cpu_round[m]),
                cpu_ratio=statistics.median(a / b for a, b in zip(cpu_round[m], cpu_round["plain"])),
                unet_full_per_image=counts[m][0] / runs,
                unet_partial_per_image=counts[m][1] / runs,
                peak_memory_mib=peak / 2**20,
                memory_ratio=peak / plain_peak if plain_peak else float("nan"),
                max_abs_diff_vs_full=diff,
            )
        )
    setup = dict(
        arch=args.arch,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        dtype=args.dtype,
        steps=args.steps,
        prompts=list(prompts),
        seeds=list(args.seeds),
        repeats=args.repeats,
        batch=args.batch,
        threads=torch.get_num_threads(),
        memory="CUDA max_memory_allocated (absolute)"
        if device.type == "cuda"
        else "peak RSS above RSS before sampling",
        settings_from=args.settings_from,
        torch=torch.__version__,
        command="python " + " ".join(sys.argv),
    )
    return rows, setup


def format_table(rows: list[Row], setup: dict) -> str:
    head = "| method | s/image | x plain | CPU s/image | x plain | UNet calls per call (full + partial) | peak memory MiB | x plain | max abs diff vs full |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        diff = "-" if r.max_abs_diff_vs_full is None else f"{r.max_abs_diff_vs_full:.1e}"
        lines.append(
            f"| {r.method} | {r.seconds_per_image:.3f} | {r.time_ratio:.2f} | "
            f"{r.cpu_seconds_per_image:.3f} | {r.cpu_ratio:.2f} | "
            f"{r.unet_full_per_image:g} + {r.unet_partial_per_image:g} | {r.peak_memory_mib:.1f} | "
            f"{r.memory_ratio:.2f} | {diff} |"
        )
    info = ", ".join(f"{k}={v}" for k, v in setup.items() if k != "command")
    return "\n".join([f"# {setup['command']}", f"# {info}", *lines])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", choices=("tiny", "sd15", "shapes"), default="tiny", help="shapes: the shipped shapes model"
    )
    parser.add_argument("--device", default=None, help="default: cuda for sd15, cpu for tiny")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: 50 for sd15, 25 for shapes, 20 for tiny)",
    )
    parser.add_argument("--num-prompts", type=int, default=2, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batch", type=int, default=1, help="images per call (num_images_per_prompt; seeds SEED..SEED+N-1)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS + COMPILED, default=list(METHODS))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[],
        metavar="FIELDS",
        help="more rows: the model's settings with these field overrides, each 'field=value;field=value'",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared box OpenMP spinning makes more slower)",
    )
    parser.add_argument(
        "--settings-from",
        metavar="FOLDER",
        help="the ait2i methods use this model folder's ait2i.json (e.g. the shapes model's schedule on "
        "--arch tiny; 'shapes': the shipped shapes model) instead of the pipeline's own (default: none)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.settings_from == "shapes":
        from ait2i_ext.shapes.model import default_model_path

        args.settings_from = default_model_path()
    args.device = args.device or ("cuda" if args.arch == "sd15" else "cpu")
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    args.steps = args.steps or {"sd15": 50, "shapes": 25}.get(args.arch, 20)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # deprecation and safety-checker notices
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # raised inside Attend-and-Excite
    rows, setup = benchmark(args)
    print(format_table(rows, setup))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": [asdict(r) for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
