"""Decoding's matrix-vector products split over the CPU's cores, chosen by measurement.

At batch 1 every new token reads every weight once, so a decode step is bound by how fast the
CPU reads memory. Some BLAS libraries leave cores idle there: on the project's 2-core AMD EPYC
(MKL), `F.linear` on one row reads about 15 GB/s with 1 thread or 2, while a plain sum over the
same weights reads 27-36 GB/s. On an Intel Xeon the library already reads near the limit and a
split only adds overhead. So the split is kept only where it is measured to be faster:

- `DecodeLinear` calls a model's linear layers for a decode step: the modules themselves (the
  reference), or each weight's output rows cut into equal blocks multiplied as ONE batched
  product (`SplitWeight`): torch hands a batch's members to its own intra-op threads, which
  are already waiting, so a hand-out costs microseconds. (An earlier version handed the
  blocks to a Python thread pool: tens of microseconds a hand-out, 49 a gpt2-small step; it
  decoded 30 tokens/s where this decodes 39-41 on the same machine.) Either of the two can
  run on bfloat16 copies of the weights (`--decode-dtype bf16`, off by default since tokens
  may differ).
- `MatvecChooser` picks, for one generation, which path each decode step uses: one of the two
  DecodeLinears, or, where instructkit/native_decode.py applies (a GPT-2, Qwen3 or Llama
  model in fp32 at batch 1, on a machine with a C compiler), "native": the whole step in one
  C call. In the
  mode "auto" the first decode steps take the paths in turn and are timed: they are real
  steps, so the calibration costs nothing beyond the slower paths' few steps. Once each path
  has CALIBRATION_STEPS timings, a path other than the plain one is kept only when clearly
  faster (its best step at least 5% faster than the plain path's best, and its median step
  faster too), so it is never chosen on noise; of several such, the lowest median wins. The
  choice is cached for the process, per device, weight dtype, batch size, thread count and
  the paths offered (`CHOICES`); generations too short to finish the calibration add their
  timings to the next one's.
- The mode: "auto", or one of PATHS forced, no calibration ("native" where it does not apply
  is "parallel"). `set_mode` (the commands' --decode-matvec flag) wins over the environment
  variable INSTRUCTKIT_DECODE_MATVEC, which wins over "auto".

The split changes no formula: each output element is still one row of the weight times the
input, so greedy tokens equal the plain path's (tests/test_decode_matvec.py forces each path).
The native step adds each dot product in another order: logits agree to float32 rounding.
"""

import contextlib
import os
import statistics
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from instructkit import native_decode
from instructkit.errors import BadInputError

PATHS = ("plain", "parallel", "native")
MODES = ("auto", *PATHS)
ENV_VAR = "INSTRUCTKIT_DECODE_MATVEC"
# --decode-dtype's choices: the weights' dtype for the decode steps (None: the model's own)
DECODE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
CALIBRATION_STEPS = 4  # timed decode steps of each path before choosing
MARGIN = 0.95  # the split's best step must take at most this share of the plain path's best
# Inputs with more rows than this are matrix products, which BLAS spreads over the cores itself.
MAX_ROWS = 16

_mode = None  # set_mode's choice, None: the environment variable's or "auto"
CHOICES = {}  # (device type, dtype, rows, threads, paths offered) -> one of them, for the process
_timings = {}  # the same keys -> {"plain": [seconds, ...], "parallel": [...]}, while calibrating
# bfloat16 copies of nn.Linear weights, made once per module (again only if its weight changes)
_LOW_PRECISION = weakref.WeakKeyDictionary()


#####################################
# The mode and the calibration's choices
#####################################

def set_mode(mode):
    """Force "parallel" or "plain", or "auto" (calibrate); None goes back to the env variable."""
    global _mode
    if mode is not None and mode not in MODES:
        raise BadInputError(f"unknown decode matvec mode {mode!r}: choose one of {', '.join(MODES)}")
    _mode = mode


def current_mode():
    """set_mode's mode, else the environment variable's, else "auto"."""
    if _mode is not None:
        return _mode
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in MODES:
        raise BadInputError(f"{ENV_VAR}={value!r}: expected one of {', '.join(MODES)}")
    return value


def check_mode(mode=None):
    """`mode` (a flag's value), else current_mode(), checked before any work: "native" needs
    a machine that can build instructkit/native_decode.c (BadInputError otherwise)."""
    mode = mode or current_mode()
    if mode == "native":
        native_decode.require()
    return mode


def reset_calibration():
    """Forget every cached choice and timing (tests; or after moving to other hardware)."""
    CHOICES.clear()
    _timings.clear()


def record(key, path, seconds):
    """One timed decode step of `path`; chooses once every path offered has enough timings."""
    times = _timings.setdefault(key, {name: [] for name in key[-1]})
    times[path].append(seconds)
    if min(len(t) for t in times.values()) >= CALIBRATION_STEPS:
        plain = times.pop("plain")
        faster = {name: statistics.median(t) for name, t in times.items()
                  if min(t) <= MARGIN * min(plain) and statistics.median(t) < statistics.median(plain)}
        CHOICES[key] = min(faster, key=faster.get) if faster else "plain"
        del _timings[key]


def calibration_report():
    """One line per cached choice, for the benchmark's output."""
    return [f"{device} {dtype}, batch {rows}, {threads} threads ({'/'.join(paths)}): {choice}"
            for (device, dtype, rows, threads, paths), choice in CHOICES.items()]


#####################################
# The command-line flags
#####################################

def add_decode_arguments(parser):
    """--decode-dtype and --decode-matvec, for the chat, the web chat and the benchmark."""
    parser.add_argument("--decode-dtype", choices=list(DECODE_DTYPES), default="fp32",
                        help="weights for decoding: fp32 (default), or bf16 copies read at half "
                             "the bytes (faster where memory bandwidth limits; tokens may differ)")
    parser.add_argument("--decode-matvec", choices=list(MODES), default=None,
                        help="decode steps: products split over the CPU's cores (parallel), "
                             "not (plain), the whole step in C (native: fp32, batch 1, with a "
                             "C compiler), or chosen by a short measurement (auto, the "
                             f"default; also set by the environment variable {ENV_VAR})")


def apply_decode_arguments(args):
    """Applies --decode-matvec; returns --decode-dtype's torch dtype (None for fp32)."""
    if args.decode_matvec is not None:
        set_mode(args.decode_matvec)
    check_mode()  # a bad environment variable (or native without a compiler) fails now
    return DECODE_DTYPES[args.decode_dtype]


#####################################
# The linear layers of a decode step
#####################################

def decode_weights(linear, dtype):
    """(weight, bias) of an nn.Linear in `dtype`: its own, or copies made once and kept."""
    if dtype is None or linear.weight.dtype == dtype:
        return linear.weight, linear.bias
    try:
        version = linear.weight._version  # changes when the weights are updated in place
    except RuntimeError:  # an inference tensor keeps no version: it is never updated
        version = 0
    key = (dtype, version, linear.weight.data_ptr())
    cached = _LOW_PRECISION.get(linear)
    if cached is None or cached[0] != key:
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        cached = (key, linear.weight.detach().to(dtype), bias)
        _LOW_PRECISION[linear] = cached
    return cached[1], cached[2]


def split_blocks():
    """Into how many runs the split path cuts each weight: one per thread, and at least 2 (forced
    with one thread, the runs are multiplied one after the other)."""
    return max(2, torch.get_num_threads())


def _is_lora(module):
    """exercise_variants.LinearWithLoRA's layout: `linear` (nn.Linear) plus `lora`."""
    return isinstance(getattr(module, "linear", None), nn.Linear) and hasattr(module, "lora")


class SplitWeight:
    """F.linear(x, weight, bias) with the weight's output rows cut into `blocks` equal runs.

    weight: (out_features, in_features), contiguous. The runs are views of the weight, made
    once, and multiplied by the same x as one batched product, which torch spreads over its
    threads. The out_features % blocks rows left over (fewer than `blocks`: the LM head's
    50,257) are one small product of their own. Calling it on x (..., in_features) returns
    (..., out_features) in x's dtype.
    """

    def __init__(self, weight, bias, blocks):
        n_out, n_in = weight.shape
        size = n_out // blocks
        self.shape, self.blocks, self.main = (n_out, n_in), blocks, blocks * size
        # (blocks, size, in) -> (blocks, in, size): each run's rows, transposed as a view
        self.runs = weight[:self.main].view(blocks, size, n_in).transpose(1, 2)
        self.bias_runs = None if bias is None else bias[:self.main].view(blocks, 1, size)
        self.rest = None
        if self.main < n_out:
            self.rest = (weight[self.main:], None if bias is None else bias[self.main:])

    def __call__(self, x):
        n_out, n_in = self.shape
        rows = x.numel() // n_in
        # the same x for every run: (blocks, rows, in_features), no copy
        x_runs = x.reshape(1, rows, n_in).expand(self.blocks, rows, n_in)
        if x.dtype != self.runs.dtype:  # bf16 weights (a Python test costs less than a no-op .to)
            x_runs = x_runs.to(self.runs.dtype)
        if self.bias_runs is None:
            y = torch.bmm(x_runs, self.runs)  # (blocks, rows, size)
        else:
            y = torch.baddbmm(self.bias_runs, x_runs, self.runs)
        if rows == 1 and self.rest is None and y.dtype == x.dtype:  # a batch-1 decode step
            return y.view(*x.shape[:-1], n_out)  # the runs side by side, as a view
        y = y.view(rows, self.main) if rows == 1 else y.transpose(0, 1).reshape(rows, self.main)
        if self.rest is not None:
            y = torch.cat((y, F.linear(x_runs[0], *self.rest)), dim=1)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], n_out)


class DecodeLinear:
    """`linear(module, x)` for the linear layers of a decode step.

    blocks: 1 for the library's own product, more to split each weight's output rows into
    that many runs (SplitWeight). dtype: None for the module's own weights, or
    torch.bfloat16 for copies (computed in bfloat16, the result back in x's dtype). With
    blocks=1 and dtype=None it is exactly `module(x)`. One generation's DecodeLinear keeps
    what it works out for each module (its weights, their runs): the weights do not change
    while it decodes.
    """

    def __init__(self, blocks=1, dtype=None):
        self.blocks, self.dtype = blocks, dtype
        self.is_reference = blocks == 1 and dtype is None
        self._prepared = {}  # module -> its product for a decode step's x (_prepare)

    def _prepare(self, module):
        """The function `product(x)` this DecodeLinear computes `module(x)` with."""
        base = module if isinstance(module, nn.Linear) else module.linear if _is_lora(module) else None
        if base is None:  # not a layout known here: the module itself
            return module
        weight, bias = decode_weights(base, self.dtype)
        split = SplitWeight(weight, bias, self.blocks) \
            if self.blocks > 1 and weight.is_contiguous() else None

        def product(x):
            if split is not None and x.numel() <= MAX_ROWS * x.shape[-1]:
                y = split(x)
            else:
                y = F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
            # a LoRA layer: the base layer's product from here, the small update as it is
            return y if base is module else y + module.lora(x)

        return product

    def __call__(self, module, x):
        if self.is_reference:
            return module(x)
        product = self._prepared.get(module)
        if product is None:
            product = self._prepared[module] = self._prepare(module)
        return product(x)


class MatvecChooser:
    """Which path each decode step of one generation takes (see the module's notes).

    device: where the model runs (the split is for CPUs only); n_rows: the batch size;
    dtype: --decode-dtype's torch dtype (None: the model's own weights); native: a
    native_decode.NativeDecoder where that path applies to this generation, else None
    (`for_generation` makes one where it does).
    """

    def __init__(self, device, n_rows, dtype=None, native=None):
        threads = torch.get_num_threads()
        self.plain = DecodeLinear(1, dtype)
        self.parallel = DecodeLinear(split_blocks(), dtype)
        self.paths = {"plain": self.plain, "parallel": self.parallel}
        if native is not None:
            self.paths["native"] = native
        # those the calibration times (with one thread there is nothing to split)
        self.candidates = tuple(name for name in self.paths if threads >= 2 or name != "parallel")
        mode = current_mode()
        if device.type != "cpu" or n_rows > MAX_ROWS:
            self.fixed = "plain"
        elif mode == "native" and native is None:  # not for this model or batch: the nearest
            self.fixed = "parallel"
        elif mode != "auto":
            self.fixed = mode
        else:
            self.fixed = "plain" if len(self.candidates) == 1 else None
        self.key = (device.type, str(dtype or "model's dtype").replace("torch.", ""), n_rows,
                    threads, self.candidates)

    @classmethod
    def for_generation(cls, model, idx, pad_mask=None, dtype=None):
        """The chooser of one generation of `model` from idx (batch, n_tokens): with the native
        step among its paths where the mode may pick it and it applies (batch 1 in fp32 on the
        CPU; native_decode.decoder_for), so that a forced plain or parallel mode, a batch or
        a GPU never builds or loads the C library."""
        mode, rows = current_mode(), idx.shape[0]
        native = None
        if mode in ("auto", "native") and idx.device.type == "cpu" and rows == 1:
            native = native_decode.decoder_for(model, rows, pad_mask, dtype, forced=mode == "native")
        return cls(idx.device, rows, dtype, native)

    def choice(self):
        """One of PATHS, or None while calibrating."""
        return self.fixed or CHOICES.get(self.key)

    def current(self):
        """The DecodeLinear to use without timing (for a whole window of tokens; the plain
        one while calibrating, the split one where the native step was chosen)."""
        return self.plain if self.choice() in (None, "plain") else self.parallel

    @contextlib.contextmanager
    def step(self):
        """Gives this decode step's path: a DecodeLinear, or the NativeDecoder; times the step
        while calibrating."""
        choice = self.choice()
        if choice is not None:
            yield self.paths[choice]
            return
        # the path with the fewest timings so far: in turn, so that all see the same load
        times = _timings.get(self.key, {})
        path = min(self.candidates, key=lambda name: len(times.get(name, ())))
        start = time.perf_counter()
        yield self.paths[path]
        record(self.key, path, time.perf_counter() - start)
