"""Benchmark: the book's simple code path against the fast path, side by side in one process.

    python benchmarks/bench.py [--device cpu|cuda] [--models gpt2-small,gpt2-medium] [--tiny]

For each model (random weights of the right shape: no GPT-2 download is needed) both paths run
on the same inputs:

- simple: the book's code, previous_chapters.py: its GPTModel (explicit attention, the
  book's LayerNorm and GELU), the default `torch.optim.AdamW`, `train_model_simple`
  (`calc_loss_batch`: logits at every position), `generate` one prompt at a time.
- fast: fast_gpt.py on the same GPTModel and weights: fused attention, LayerNorm and GELU,
  `make_optimizer` (AdamW(fused=True) where torch has it, as in the CLI), `train_model_fast`
  (`calc_loss_batch_packed`; bfloat16 autocast and TF32 on CUDA), `generate` with the KV
  cache, the test prompts in batches sorted by length (`generate_answer_ids`, as
  `generate_responses` does).

It prints absolute figures and ratios: training tokens/s on real instruction batches,
generation tokens/s at batch 1, the wall time for all 110 test prompts, peak memory and model
FLOP utilisation against a matmul peak measured here, and it checks that both paths agree
(the same greedy tokens, the same losses). Where a run would take too long (the uncached
loop on a CPU takes hours) it times a subset and scales, and says so. `--tiny` runs a tiny
model in a few seconds (CI). The exit status is 1 when a check of agreement fails.

On a CPU it also measures decoding at batch 1 against the hardware's limit (each token reads
every weight once): the read bandwidth of a plain sum over the model's linear weights, and
fast_gpt's decode tokens/s with those weights read as fp32 or bf16, through the library's
matrix-vector products (plain), split over the cores (parallel), or the whole step in C
(native, fp32; instructkit/native_decode.py), as GB/s and as a fraction of that limit; the
pick of the calibration (auto); Hugging Face transformers' GPT-2 side by side where it is
installed; and how often bf16's greedy answers to the 110 test prompts equal fp32's (rows
identical, the first differing position). Only that, in a few minutes:

    python benchmarks/bench.py --decode-only [--models gpt2-small,gpt2-medium] [--weights PATH]
"""

import argparse
import contextlib
import ctypes
import functools
import gc
import io
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the flat modules live at the repository root

import fast_gpt  # noqa: E402
from gpt_instruction_finetuning import (  # noqa: E402
    ALPACA,
    InstructionDataset,
    custom_collate_fn,
    download_and_load_file,
    format_input,
)
from instructkit.answers import generate_responses  # noqa: E402
from instructkit.fast_llm import fast_path  # noqa: E402
from instructkit.gpt2_sizes import GPT2_SIZES, TEST_MODE_CONFIG, book_model_name, gpt2_config  # noqa: E402
from instructkit.gpt2_tokenizer import get_tokenizer  # noqa: E402
from instructkit.instruction_data import CHAPTER_DATASET, split_data  # noqa: E402
from previous_chapters import (  # noqa: E402
    GPTModel,
    calc_loss_batch,
    evaluate_model,
    generate,
    train_model_simple,
)

SHARED_DATA = ROOT.parent / "shared" / "data"  # offline copies (tests, CI)
# --tiny: the CLI's test-mode model, with the real context so prompts + 256 tokens fit
TINY_CONFIG = dict(TEST_MODE_CONFIG, context_length=1024)
# The targets, for gpt2-small on a CPU: (metric, minimum ratio fast/simple).
TARGETS = {"training tokens/s": 1.3, "generation tokens/s, batch 1": 5.0,
           "all test prompts, wall time": 15.0}
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # relative; bf16 autocast rounds every matmul
EOS_ID = 50256
CPU_PROMPTS_LARGER_MODELS = 24  # test prompts the fast path runs for models above gpt2-small on a CPU
BATCH_SIZE = 8  # training batches, as in the chapter
LR, WEIGHT_DECAY = 0.00005, 0.1
EVAL_FREQ, EVAL_ITER = 5, 5


def log(line=""):
    print(line, flush=True)


#####################################
# Setup: tokenizer, data, devices
#####################################

def load_data(path):
    if path is not None:
        return download_and_load_file(path, CHAPTER_DATASET.urls[0]), Path(path)
    for candidate in (ROOT / "instruction-data.json", SHARED_DATA / "instruction-data.json"):
        if candidate.exists():
            return download_and_load_file(candidate, CHAPTER_DATASET.urls[0]), candidate
    path = ROOT / CHAPTER_DATASET.file_name
    return download_and_load_file(path, CHAPTER_DATASET.urls[0]), path


def cpu_name():
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(fn(), seconds), with the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def matmul_peak(device, dtype, n, repeats):
    """FLOP/s of the best of `repeats` n x n matmuls in `dtype` (TF32 off for float32)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        _, seconds = timed(lambda: a @ b, device)
        best = min(best, seconds)
    return 2 * n ** 3 / best


class PeakMemory:
    """Peak memory of the process during a `with` block, and its growth over the start.

    CPU: resident set size. On Linux the kernel's own high-water mark (VmHWM), reset at the
    start through /proc/self/clear_refs; elsewhere psutil's RSS sampled by a thread (a thread
    that wakes often would slow down PyTorch's worker threads on a small machine).
    CUDA: the allocator's torch.cuda.max_memory_allocated.
    """

    STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        with contextlib.suppress(OSError, AttributeError):  # give freed heap back (glibc)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        import psutil

        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._thread = None
        try:
            self.CLEAR_REFS.write_text("5")  # VmHWM := the current RSS
            self._high_water_mark()
        except (OSError, TypeError):
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _high_water_mark(self):
        for line in self.STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise OSError("no VmHWM in /proc/self/status")

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            self.peak = max(self.peak, self._high_water_mark())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self):
        return self.peak - self.start

    def describe(self):
        what = "peak allocated" if self.device.type == "cuda" else "peak RSS"
        return f"{what} {self.peak / 2**20:,.0f} MiB (+{self.growth / 2**20:,.0f} MiB in this phase)"


def tf32(enabled):
    """TF32 for float32 matmuls on CUDA inside the block (the fast path), restored after,
    through torch's current API (instructkit.precision.tf32)."""
    from instructkit.precision import tf32 as tf32_block

    return tf32_block(enabled)


#####################################
# Models
#####################################

def build_model(cfg, state, device, share_weights):
    """GPTModel with the weights in `state`; shares their storage when `share_weights`."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    if not share_weights:
        state = {name: tensor.clone() for name, tensor in state.items()}
    model.load_state_dict(state, assign=True)
    return model.to(device)


def matmul_params(model):
    """N for the FLOP counts: every weight except the two embedding tables (lookups)."""
    lookups = {"tok_emb.weight", "pos_emb.weight"}
    return sum(p.numel() for name, p in model.named_parameters() if name not in lookups)


#####################################
# Training
#####################################

def training_batches(train_data, val_data, tokenizer, device, n_steps):
    """The chapter's loaders (batch 8, train shuffled with seed 123): the first batches of each."""
    collate = functools.partial(custom_collate_fn, device=device, allowed_max_length=1024)
    torch.manual_seed(123)
    train_loader = DataLoader(InstructionDataset(train_data, tokenizer), batch_size=BATCH_SIZE,
                              collate_fn=collate, shuffle=True, drop_last=True)
    val_loader = DataLoader(InstructionDataset(val_data, tokenizer), batch_size=BATCH_SIZE,
                            collate_fn=collate, shuffle=False, drop_last=False)
    train = [batch for _, batch in zip(range(n_steps), train_loader, strict=False)]
    val = [batch for _, batch in zip(range(EVAL_ITER), val_loader, strict=False)]
    return train, val


def useful_tokens(batch):
    """Input positions up to each row's last counted target (the rest is padding)."""
    _, targets = batch
    counted = targets != -100
    positions = torch.arange(1, targets.shape[1] + 1, device=targets.device)
    return int(torch.where(counted, positions, 0).amax(dim=1).sum())


def warm_up(model, state, batches, val_batches, device, fast):
    """A few untimed forward and backward passes and an evaluation of the path, then the
    weights restored: compiled blocks get compiled, and on a GPU every kernel is loaded and
    chosen before the timing (a CUDA GPU loads its kernels on first use, which costs more
    than the chapter's 20 small steps themselves)."""
    for x, y in batches[:3]:
        if fast:
            with fast_gpt.autocast(device):
                loss = fast_gpt.calc_loss_batch_packed(x, y, model, device)
        else:
            loss = calc_loss_batch(x, y, model, device)
        loss.backward()
    if fast:
        fast_gpt.evaluate_model_fast(model, batches, val_batches, device, EVAL_ITER)
    else:
        evaluate_model(model, batches, val_batches, device, EVAL_ITER)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.load_state_dict(state)


def run_training(cfg, state, batches, val_batches, device, fast, compile_blocks):
    """One path's training run over `batches`; returns a dict of figures."""
    model = build_model(cfg, state, device=device, share_weights=False)
    model.train()
    if compile_blocks:
        fast_gpt.compile_blocks(model, dynamic=True)  # batch lengths vary
    if compile_blocks or device.type == "cuda":
        with tf32(fast and device.type == "cuda"):
            warm_up(model, state, batches, val_batches, device, fast)
    if fast:  # the CLI's optimizer: AdamW(fused=True) where torch has it
        optimizer = fast_gpt.make_optimizer(model, LR, WEIGHT_DECAY)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    fused = bool(optimizer.defaults["fused"])
    printed = io.StringIO()
    with PeakMemory(device) as memory, tf32(fast and device.type == "cuda"), \
            contextlib.redirect_stdout(printed):
        train = fast_gpt.train_model_fast if fast else train_model_simple
        (train_losses, val_losses, _), seconds = timed(lambda: train(
            model, batches, val_batches, optimizer, device, num_epochs=1, eval_freq=EVAL_FREQ,
            eval_iter=EVAL_ITER, start_context=None, tokenizer=None), device)
    n_evals = len(train_losses)
    evaluated = batches[:EVAL_ITER] + val_batches[:EVAL_ITER]
    return {"seconds": seconds, "evals": n_evals, "losses": train_losses + val_losses,
            "tokens": sum(x.numel() for x, _ in batches),  # the book's tokens_seen
            "useful": sum(map(useful_tokens, batches)),
            "useful_eval": n_evals * sum(map(useful_tokens, evaluated)),
            "memory": memory, "printed": printed.getvalue().splitlines(), "fused": fused,
            "n": matmul_params(model)}


def bench_training(label, cfg, state, data, tokenizer, device, args, peaks):
    train_data, _, val_data = data
    batches, val_batches = training_batches(train_data, val_data, tokenizer, device, args.train_steps)
    shapes = ", ".join(str(list(x.shape)) for x, _ in batches)
    padding = sum((y == -100).sum().item() for _, y in batches) / sum(y.numel() for _, y in batches)
    evals = math.ceil(len(batches) / EVAL_FREQ)
    log(f"-- training: {len(batches)} steps of train_model_simple / train_model_fast on the chapter's first "
        f"{len(batches)} training batches ({shapes}; {padding:.0%} of target positions are "
        f"padding, -100), evaluating every {EVAL_FREQ} steps on {EVAL_ITER} train + "
        f"{len(val_batches)} validation batches ({evals * 2 * EVAL_ITER / len(batches):.1f} "
        f"evaluation forward passes per step; the chapter's 2-epoch run has 2.0); "
        f"per-epoch sample skipped (start_context=None). tokens/s counts every input "
        f"position (the book's tokens_seen); MFU counts the non-padding ones --")
    if args.compile:
        log("  fast: fast_gpt.compile_blocks(model) (every transformer block), compiled before the "
            "timing (untimed)")
    if device.type == "cuda":
        log("  both paths warmed up first (3 forward and backward passes and an evaluation, "
            "untimed, the weights restored): a GPU loads and picks its kernels on first use")
    results = {}
    for path in ("simple", "fast"):
        fast = path == "fast"
        r = run_training(cfg, state, batches, val_batches, device, fast, args.compile and fast)
        results[path] = r
        flops = 6 * r["n"] * r["useful"] + 2 * r["n"] * r["useful_eval"]
        peak = peaks["bf16" if fast and device.type == "cuda" else "fp32"]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["mfu"] = flops / r["seconds"] / peak
        optimizer = "AdamW(fused=True)" if r["fused"] else "AdamW"
        log(f"  {path:6s} ({optimizer}): {r['tokens']:,} tokens in {r['seconds']:.1f} s "
            f"({r['evals']} evaluations included) -> {r['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {r['mfu']:.1%}, {r['memory'].describe()}")
        for line in r["printed"]:
            log(f"           {line}")
    simple, fast = results["simple"]["losses"], results["fast"]["losses"]
    worst = max(abs(a - b) / abs(a) for a, b in zip(simple, fast, strict=True))
    precision = "bf16" if device.type == "cuda" else "fp32"
    tolerance = LOSS_TOLERANCE[precision]
    ok = worst <= tolerance and len(simple) == len(fast) > 0
    log(f"CHECK {label} training losses (train and validation at every evaluation): fast vs "
        f"simple max relative difference {worst:.1e} (tolerance {tolerance:.0e}, {precision}): "
        f"{'OK' if ok else 'FAILED'}")
    return results, ok


#####################################
# Generation
#####################################

def fit_step_time(samples):
    """t(L) = a + b L + c L^2, least squares over (context length, seconds) samples."""
    lengths = np.array([length for length, _ in samples], dtype=float)
    seconds = np.array([s for _, s in samples], dtype=float)
    degree = min(2, len(set(lengths.tolist())) - 1)
    coefficients = np.polyfit(lengths, seconds, degree)
    floor = seconds.min() * 0.5

    def step_time(length):
        return max(float(np.polyval(coefficients, length)), floor)

    return step_time


def uncached_step(model, context, context_size, device):
    """One step of the book's loop: previous_chapters.generate for one new token."""
    ids = torch.tensor([context], device=device)
    out, seconds = timed(lambda: generate(model, ids, 1, context_size, eos_id=EOS_ID), device)
    return out[0, -1].item() if out.shape[1] > len(context) else EOS_ID, seconds


def teacher_forced_mismatches(model, prompt, answer, device):
    """Positions where the uncached model's greedy choice differs from `answer`.

    One forward pass over prompt + answer: the logits at each position are what the uncached
    loop computes at that step (attention is causal), so this checks every step at once.
    """
    ids = torch.tensor([prompt + answer], device=device)
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:len(prompt) - 1 + len(answer)]
    chosen = logits.argmax(-1).tolist()
    mismatches = []
    for i, (a, b) in enumerate(zip(answer, chosen, strict=True)):
        if a != b:
            top2 = torch.topk(logits[i].float(), 2).values
            mismatches.append((i, a, b, (top2[0] - top2[1]).item()))
    return mismatches


def describe_mismatches(mismatches):
    if not mismatches:
        return ""
    i, expected, got, margin = mismatches[0]
    return (f" (first at new token {i}: {expected} vs {got}, top-2 logit margin {margin:.1e})")


def spread(items, n):
    """n items evenly spread over `items` (all of them when n >= len(items))."""
    if n >= len(items):
        return list(items)
    return [items[round(k * (len(items) - 1) / max(n - 1, 1))] for k in range(n)]


def bench_generation(label, cfg, state, data, tokenizer, device, args, peaks):
    _, test_data, val_data = data
    # One model, two ways of running it: its own forward (the book's) and fast_gpt's.
    simple = fast = build_model(cfg, state, device=device, share_weights=True).eval()
    n = matmul_params(fast)
    context_size = cfg["context_length"]
    max_new = args.max_new_tokens
    checks_ok = True
    samples = []  # (context length, seconds) of single uncached steps
    uncached_full = args.uncached == "full"

    # ---- batch 1 ----
    prompt = tokenizer.encode(format_input(val_data[0]))
    log(f"-- generation at batch 1: {max_new} new tokens (greedy, no eos_id, so all are "
        f"generated) after the chapter's first validation prompt ({len(prompt)} tokens) --")
    ids = torch.tensor([prompt], device=device)
    with PeakMemory(device) as fast_mem:
        out, fast_s = timed(lambda: fast_gpt.generate(fast, ids, max_new, context_size), device)
    tokens = out[0, len(prompt):].tolist()
    with PeakMemory(device) as simple_mem:
        if uncached_full:
            out, simple_s = timed(lambda: generate(simple, ids, max_new, context_size), device)
            uncached_tokens = out[0, len(prompt):].tolist()
            same = sum(a == b for a, b in zip(tokens, uncached_tokens, strict=True))
            ok = same == len(tokens) == max_new
            how = "the full uncached run"
        else:
            steps = spread(list(range(max_new)), args.samples)
            same = 0
            for i in steps:
                token, seconds = uncached_step(simple, prompt + tokens[:i], context_size, device)
                samples.append((len(prompt) + i, seconds))
                same += token == tokens[i]
            step_time = fit_step_time(samples)
            simple_s = sum(step_time(len(prompt) + i) for i in range(max_new))
            mismatches = teacher_forced_mismatches(simple, prompt, tokens, device)
            ok = same == len(steps) and not mismatches and len(tokens) == max_new
            how = (f"checked by one uncached forward over all {len(tokens)} tokens"
                   f"{describe_mismatches(mismatches)}; the {len(steps)} timed uncached steps: "
                   f"{same}/{len(steps)} tokens equal")
            same = len(tokens) - len(mismatches)
    batch1 = {"simple": {"seconds": simple_s, "memory": simple_mem},
              "fast": {"seconds": fast_s, "memory": fast_mem}}
    for r in batch1.values():
        r["tokens_per_s"] = max_new / r["seconds"]
        r["mfu"] = 2 * n * max_new / r["seconds"] / peaks["fp32"]
    if not uncached_full:
        log(f"  simple (no cache): ESTIMATED, not run in full: {max_new} steps would take "
            f"{simple_s:.1f} s, from {len(steps)} timed steps of the uncached loop at contexts "
            f"{len(prompt) + steps[0]}..{len(prompt) + steps[-1]} tokens, fitted as "
            f"t(L) = a + bL + cL^2 and summed over the {max_new} steps")
    for path in ("simple", "fast"):
        r = batch1[path]
        log(f"  {path:6s}: {max_new} tokens in {r['seconds']:.2f} s -> {r['tokens_per_s']:,.1f} "
            f"tokens/s, MFU {r['mfu']:.1%}, {r['memory'].describe()}")
    checks_ok &= ok
    log(f"CHECK {label} batch-1 greedy tokens, fast (KV cache, SDPA) vs simple (uncached, "
        f"explicit attention): {same}/{len(tokens)} identical ({how}): {'OK' if ok else 'FAILED'}")

    # ---- all test prompts ----
    prompts = [tokenizer.encode(format_input(entry))[-context_size:] for entry in test_data]
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    n_prompts = args.prompts
    if n_prompts is None and device.type == "cpu" and label not in ("tiny", "gpt2-small"):
        n_prompts = CPU_PROMPTS_LARGER_MODELS  # keeps the full CPU run under 15 minutes
    subset = sorted(spread(by_length, n_prompts)) if n_prompts else list(range(len(prompts)))
    bs = args.gen_batch_size
    batches_all, batches_run = math.ceil(len(prompts) / bs), math.ceil(len(subset) / bs)
    log(f"-- all {len(prompts)} test prompts ({min(map(len, prompts))}..{max(map(len, prompts))} "
        f"tokens), up to {max_new} new tokens each, stopping at <|endoftext|> --")

    def run_cached():
        answers = fast_gpt.generate_answer_ids(fast, [prompts[i] for i in subset], max_new, context_size,
                                      EOS_ID, batch_size=bs)
        texts = [tokenizer.decode(a).replace("### Response:", "").strip() for a in answers]
        return answers, texts

    with PeakMemory(device) as fast_mem:
        (answers, texts), fast_s = timed(run_cached, device)
    answers = dict(zip(subset, answers, strict=True))
    generated = sum(len(a) for a in answers.values())
    fast_total = fast_s * batches_all / batches_run
    if len(subset) < len(prompts):
        log(f"  fast: SCALED: ran {len(subset)} of the {len(prompts)} prompts (spread over the "
            f"lengths) in {batches_run} batches of up to {bs} in {fast_s:.1f} s; "
            f"x {batches_all}/{batches_run} batches -> {fast_total:.1f} s for all")
    never_stopped = sum(len(a) == max_new for a in answers.values())
    log(f"  {never_stopped} of {len(answers)} answers ran to {max_new} tokens (random weights "
        f"never produce <|endoftext|>)")

    with PeakMemory(device) as simple_mem:
        if uncached_full:
            same_rows, simple_total = 0, 0.0
            for i in subset:
                ids = torch.tensor([prompts[i]], device=device)
                out, seconds = timed(lambda ids=ids: generate(
                    simple, ids, max_new, context_size, eos_id=EOS_ID), device)
                simple_total += seconds
                same_rows += out[0, len(prompts[i]):].tolist() == answers[i]
            simple_total *= len(prompts) / len(subset)
            how = f"{same_rows}/{len(subset)} answers identical (the full uncached loop)"
            ok = same_rows == len(subset)
        else:
            lo = min(len(prompts[i]) for i in subset)
            hi = max(len(prompts[i]) + len(answers[i]) - 1 for i in subset)
            lengths = spread(list(range(lo, hi + 1)), args.samples)
            same, used = 0, []
            for k, length in enumerate(lengths):
                fits = [i for i in subset if len(prompts[i]) <= length < len(prompts[i]) + len(answers[i])]
                if not fits:  # no answer is that long
                    continue
                i = fits[k % len(fits)]
                step = length - len(prompts[i])
                token, seconds = uncached_step(simple, prompts[i] + answers[i][:step], context_size,
                                               device)
                samples.append((length, seconds))
                same += token == answers[i][step]
                used.append(i)
            lengths = [length for length, _ in samples[-len(used):]]
            step_time = fit_step_time(samples)
            # the loop's steps: each answer's tokens, plus the step that yields eos if it stopped
            simple_total = sum(step_time(len(prompts[i]) + step) for i in subset
                               for step in range(min(len(answers[i]) + 1, max_new)))
            simple_total *= len(prompts) / len(subset)
            forced = list(dict.fromkeys(used))[:args.forced_checks]
            bad = {i: teacher_forced_mismatches(simple, prompts[i], answers[i], device) for i in forced}
            wrong = [m for m in bad.values() if m]
            checked = sum(len(answers[i]) for i in forced)
            how = (f"{same}/{len(lengths)} sampled uncached steps equal, and one uncached forward "
                   f"over each of {len(forced)} whole answers: "
                   f"{checked - sum(len(m) for m in bad.values())}/{checked} tokens equal"
                   f"{describe_mismatches(wrong[0]) if wrong else ''}")
            ok = same == len(lengths) and not wrong
            log(f"  simple (uncached one-by-one loop): ESTIMATED, not run in full (hours on a "
                f"CPU): {len(lengths)} single steps timed at contexts {lengths[0]}..{lengths[-1]} "
                f"tokens, plus the {len(samples) - len(lengths)} batch-1 steps above, fitted as "
                f"t(L) = a + bL + cL^2 and summed over every step of every prompt")
    if len(subset) < len(prompts):
        log(f"  simple: SCALED from the same {len(subset)} prompts by {len(prompts)}/{len(subset)}")
    checks_ok &= ok
    prompts_result = {"simple": {"seconds": simple_total, "memory": simple_mem},
                      "fast": {"seconds": fast_total, "memory": fast_mem}}
    scale = len(prompts) / len(subset)
    for r in prompts_result.values():
        r["mfu"] = 2 * n * generated * scale / r["seconds"] / peaks["fp32"]
        r["tokens_per_s"] = generated * scale / r["seconds"]
    for path in ("simple", "fast"):
        r = prompts_result[path]
        log(f"  {path:6s}: {r['seconds']:,.1f} s for all {len(prompts)} prompts "
            f"({r['tokens_per_s']:,.1f} generated tokens/s), MFU {r['mfu']:.1%}, "
            f"{r['memory'].describe()}")
    log(f"CHECK {label} test-prompt answers, fast (batched, KV cache) vs simple (uncached, one by "
        f"one): {how}: {'OK' if ok else 'FAILED'}")

    if args.check_generate_responses:
        # The answering function the command line uses must give what the batched path above gives.
        entries = [test_data[i] for i in subset]
        responses = generate_responses(fast, entries, tokenizer, ALPACA, max_new,
                                       batch_size=bs, progress=False)
        ok = responses == texts
        checks_ok &= ok
        log(f"CHECK {label} generate_responses texts equal the batched path's: "
            f"{sum(a == b for a, b in zip(responses, texts, strict=True))}/{len(texts)}: "
            f"{'OK' if ok else 'FAILED'}")
    return batch1, prompts_result, checks_ok


#####################################
# Decode at the memory limit
#####################################

def linear_weights(model):
    """The weights every decode step reads in full: each linear layer's, the output head's."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def read_bandwidth(weights, repeats):
    """Bytes/s of a plain `sum` over `weights` (all of them, in turn), best of `repeats`."""
    n_bytes = sum(w.numel() * w.element_size() for w in weights)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            w.sum()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best


def split_products_bandwidth(model, repeats):
    """Bytes/s of a decode step's products alone: every linear layer's weight, split as the
    parallel path splits it (parallel_matvec.SplitWeight), times one random row, all of them
    back to back, best of `repeats`. What a decode step would read with nothing between its
    products (no norms, attention, cache or sampling)."""
    from instructkit.parallel_matvec import SplitWeight, split_blocks

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    products = [(SplitWeight(m.weight.detach(), None if m.bias is None else m.bias.detach(),
                             split_blocks()),
                 torch.randn(1, 1, m.in_features, dtype=m.weight.dtype)) for m in layers]
    n_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    best = math.inf
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for split, x in products:
                split(x)
            best = min(best, time.perf_counter() - start)
    return n_bytes / best


def log_products_alone(products, bandwidth, n_bytes, parallel_rate):
    """The decode step split in two: its products (read at `products` bytes/s back to back)
    and the rest, from the parallel path's best rate (tokens/s)."""
    rest_ms = (1 / parallel_rate - n_bytes / products) * 1e3
    log(f"  the split products alone, back to back, best of the passes between the runs: "
        f"{products / 1e9:,.1f} GB/s ({products / bandwidth:.0%} of the plain sum); the rest of "
        f"a parallel decode step (norms, attention, the cache, sampling, calls): {rest_ms:,.1f} "
        f"ms a token")


def decode_rate(model, prompt, n_new, context_size, dtype):
    """Decode tokens/s at batch 1: the time from the first new token (the prefill's) to the last.

    Through the model's fast path (fast_llm.fast_path): fast_gpt for a GPT, fast_llm for the
    Qwen3 and Llama models (benchmarks/bench_llm.py), which decode in their weights' dtype
    (dtype None)."""
    ids = torch.tensor([prompt])
    stamps, tokens = [], []
    for token in fast_path(model).generate_stream(model, ids, n_new, context_size, decode_dtype=dtype):
        stamps.append(time.perf_counter())
        tokens.append(token)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens


def transformers_rate(cfg, prompt, n_new, dtype):
    """The same decode with Hugging Face transformers' GPT2LMHeadModel (random weights of the
    same shapes): (time for n_new tokens - time for 1) per token; None if not installed."""
    try:
        import transformers
    except ImportError:
        return None
    config = transformers.GPT2Config(
        vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
        n_layer=cfg["n_layers"], n_head=cfg["n_heads"])
    model = transformers.GPT2LMHeadModel(config).to(dtype or torch.float32).eval()
    return hf_decode_rate(model, prompt, n_new, EOS_ID)[0]


def hf_decode_rate(model, prompt, n_new, pad_id):
    """(tokens/s, the new token ids) of a transformers model's own greedy `generate` (KV cache)
    at batch 1 on `prompt`, exactly n_new tokens: (time for n_new tokens - time for 1) per
    token, so the prefill is not counted."""
    ids = torch.tensor([prompt])

    def run(n):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=pad_id)
        return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()

    run(2)  # warm-up
    (seconds, tokens), (first, _) = run(n_new), run(1)
    return (n_new - 1) / (seconds - first), tokens


def bench_decode(label, cfg, model, data, tokenizer, args, agreement):
    """Batch-1 decode tokens/s against the read-bandwidth limit; bf16's agreement with fp32."""
    from instructkit import native_decode, parallel_matvec

    _, test_data, val_data = data
    context_size = cfg["context_length"]
    prompt = tokenizer.encode(format_input(val_data[0]))
    weights = linear_weights(model)
    n_bytes = {"fp32": sum(w.numel() * 4 for w in weights)}
    n_bytes["bf16"] = n_bytes["fp32"] // 2
    n_new = args.decode_tokens
    log(f"-- decode at batch 1 ({label}): {n_new} greedy tokens after the chapter's first "
        f"validation prompt ({len(prompt)} tokens); tokens/s from the first new token to the last "
        f"(the prefill not counted), best of {args.decode_repeats} runs, the variants interleaved --")
    # the native step (instructkit/native_decode.py) decodes fp32 weights only
    native_missing = native_decode.layout_problem(model) or native_decode.unavailable_reason()
    variants = [(dtype, path) for dtype in ("fp32", "bf16") for path in ("plain", "parallel", "native")
                if path != "native" or (dtype == "fp32" and not native_missing)]
    best, tokens, bandwidth, products = {}, {}, 0.0, 0.0
    try:
        for _ in range(args.decode_repeats):
            # the limit measured between the runs too: the same conditions for all
            bandwidth = max(bandwidth, read_bandwidth(weights, 3))
            products = max(products, split_products_bandwidth(model, 3))
            for dtype, path in variants:
                parallel_matvec.set_mode(path)
                rate, tokens[dtype, path] = decode_rate(
                    model, prompt, n_new, context_size, parallel_matvec.DECODE_DTYPES[dtype])
                best[dtype, path] = max(best.get((dtype, path), 0.0), rate)
        parallel_matvec.set_mode("auto")
        parallel_matvec.reset_calibration()
        for _ in range(2):  # enough decode steps for the calibration to choose
            decode_rate(model, prompt, 2 * parallel_matvec.CALIBRATION_STEPS + 1, context_size, None)
        auto = ", ".join(parallel_matvec.calibration_report()) or "plain (one thread: nothing to split)"
    finally:
        parallel_matvec.set_mode(None)
    log(f"  read bandwidth (measured): a plain sum over the {len(weights)} linear weights "
        f"({n_bytes['fp32'] / 1e6:,.0f} MB in fp32), best of {3 * args.decode_repeats} passes "
        f"between the runs: {bandwidth / 1e9:,.1f} GB/s")
    log(f"  limit at batch 1: the weights read once per token: fp32 {n_bytes['fp32'] / 1e6:,.0f} "
        f"MB -> {bandwidth / n_bytes['fp32']:,.1f} tokens/s, bf16 {n_bytes['bf16'] / 1e6:,.0f} MB "
        f"-> {bandwidth / n_bytes['bf16']:,.1f} tokens/s (the KV cache, a few % more, not counted)")
    log_products_alone(products, bandwidth, n_bytes["fp32"], best["fp32", "parallel"])
    rows = []
    for dtype, path in variants:
        rate = best[dtype, path]
        read = rate * n_bytes[dtype]
        rows.append((label, dtype, f"fast_gpt {path}", rate, read, read / bandwidth))
    for dtype in ("fp32", "bf16"):
        rate = transformers_rate(cfg, prompt, n_new, parallel_matvec.DECODE_DTYPES[dtype])
        if rate is not None:
            read = rate * n_bytes[dtype]
            rows.append((label, dtype, "transformers", rate, read, read / bandwidth))
    for _, dtype, path, rate, read, fraction in rows:
        log(f"  {dtype} {path:22s}: {rate:7,.1f} tokens/s, reads {read / 1e9:5.1f} GB/s, "
            f"{fraction:.0%} of the limit")
    if not any(path == "transformers" for _, _, path, *_ in rows):
        log("  transformers: not installed (pip install transformers for the side-by-side rows)")
    if native_missing:
        log(f"  fast_gpt native: not run here ({native_missing})")
    log(f"  the calibration (auto) picks: {auto}")
    ok = True
    for path in ("parallel", "native"):
        if ("fp32", path) in tokens:
            same = sum(a == b for a, b in zip(tokens["fp32", "plain"], tokens["fp32", path], strict=True))
            ok = ok and same == n_new
            log(f"CHECK {label} decode fp32 greedy tokens, {path} vs plain: {same}/{n_new} "
                f"identical: {'OK' if same == n_new else 'FAILED'}")

    if agreement:
        prompts = [tokenizer.encode(format_input(entry))[-context_size:] for entry in test_data]
        answers = {}
        for dtype in ("fp32", "bf16"):
            answers[dtype] = fast_gpt.generate_answer_ids(
                model, prompts, args.agreement_tokens, context_size, EOS_ID,
                batch_size=args.gen_batch_size,
                decode_dtype=parallel_matvec.DECODE_DTYPES[dtype])
        firsts = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b),
                       min(len(x), len(y))) for x, y in zip(answers["fp32"], answers["bf16"],
                                                              strict=True)]
        differing = sorted(f for f, x, y in zip(firsts, answers["fp32"], answers["bf16"],
                                                strict=True) if x != y)
        identical = len(prompts) - len(differing)
        where = (f"; where they differ, the first differing new token is at position "
                 f"{differing[0]}..{differing[-1]} (median {differing[len(differing) // 2]})"
                 if differing else "")
        log(f"AGREEMENT {label} bf16 vs fp32 greedy answers on the {len(prompts)} test prompts "
            f"(up to {args.agreement_tokens} new tokens, batches of {args.gen_batch_size}): "
            f"{identical}/{len(prompts)} rows identical{where}")
    return rows, ok


def decode_summary(rows):
    log()
    log("== Decode at batch 1: summary ==")
    log(f"{'model':14s} {'weights':8s} {'path':22s} {'tokens/s':>9s} {'GB/s':>6s} {'limit':>6s}")
    for label, dtype, path, rate, read, fraction in rows:
        log(f"{label:14s} {dtype:8s} {path:22s} {rate:9,.1f} {read / 1e9:6.1f} {fraction:6.0%}")


#####################################
# The run
#####################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--models", default="gpt2-small,gpt2-medium",
                        help=f"comma-separated, from {', '.join(GPT2_SIZES)}")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model, 16 prompts, 24 new tokens: a few seconds (CI)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="training steps per path (default 5 on CPU, 20 on CUDA)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 256")
    parser.add_argument("--prompts", type=int, default=None,
                        help="time the fast path on this many test prompts and scale (default: "
                             f"all; on a CPU {CPU_PROMPTS_LARGER_MODELS} for models above gpt2-small)")
    parser.add_argument("--gen-batch-size", type=int, default=8,
                        help="prompts per batch for the fast path (default 8, a conservative "
                             "figure: generate_responses uses 16)")
    parser.add_argument("--uncached", choices=["full", "sampled"], default=None,
                        help="run the uncached loop in full, or time sampled steps and sum a fit "
                             "(default: sampled on CPU, full on CUDA and with --tiny)")
    parser.add_argument("--samples", type=int, default=8,
                        help="timed uncached steps per estimate (batch 1; test prompts)")
    parser.add_argument("--forced-checks", type=int, default=3,
                        help="whole answers checked against one uncached forward each")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the fast path's blocks for training (fast_gpt.compile_blocks)")
    parser.add_argument("--data", default=None, help="instruction-data.json (default: found or "
                        "downloaded as the chapter does)")
    parser.add_argument("--seed", type=int, default=123, help="random weights")
    parser.add_argument("--output", default=None, help="also write everything printed to this file")
    decode = parser.add_argument_group("decode at batch 1 (CPU)")
    decode.add_argument("--decode-only", action="store_true",
                        help="run only the decode section: batch-1 tokens/s against the measured "
                             "read bandwidth, plain and parallel, fp32 and bf16, and bf16's "
                             "agreement with fp32 (a few minutes for gpt2-small and gpt2-medium)")
    decode.add_argument("--decode-tokens", type=int, default=None,
                        help="new tokens per timed decode run (default 64)")
    decode.add_argument("--decode-repeats", type=int, default=None,
                        help="timed runs of each variant, interleaved; the best counts (default 3)")
    decode.add_argument("--agreement-tokens", type=int, default=None,
                        help="new tokens per test prompt for bf16's agreement with fp32 (default 64)")
    decode.add_argument("--weights", default=None,
                        help="a model .pth (finetuned, any GPT-2 size) for the decode section "
                             "instead of random weights; its answers make the agreement figure "
                             "meaningful (random weights stop at no <|endoftext|>)")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = args.device == "cpu"
    if args.tiny:
        args.models = "tiny"
        defaults = {"train_steps": 5, "max_new_tokens": 24, "prompts": 16, "uncached": "full",
                    "decode_tokens": 16, "decode_repeats": 2, "agreement_tokens": 8}
        args.check_generate_responses = True
    else:
        defaults = {"train_steps": 5 if cpu else 20, "max_new_tokens": 256, "prompts": None,
                    "uncached": "sampled" if cpu else "full", "decode_tokens": 64,
                    "decode_repeats": 3, "agreement_tokens": 64}
        args.check_generate_responses = False
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA was requested but is not available")
    offline_tokenizer = SHARED_DATA / "gpt2-tokenizer"  # no download where a local copy exists
    tokenizer = get_tokenizer(offline_tokenizer if offline_tokenizer.is_dir() else None)
    data_list, data_path = load_data(args.data)
    data = split_data(data_list)  # train, test, validation
    names = ["tiny"] if args.tiny else [book_model_name(m.strip()) for m in args.models.split(",")]

    started = time.perf_counter()
    log("== Setup ==")
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads"
    log(f"device: {device} ({hardware}); torch {torch.__version__}; python {platform.python_version()}")
    if hasattr(os, "getloadavg"):
        log(f"load average at start: {os.getloadavg()[0]:.2f} (other processes share this machine "
            f"when it is above 0)")
    log(f"command: python benchmarks/bench.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    log(f"data: {os.path.relpath(data_path, ROOT)} ({len(data_list)} entries: {len(data[0])} "
        f"train, {len(data[1])} test, {len(data[2])} validation)")
    log("simple path: previous_chapters (the book's code: explicit attention, LayerNorm and "
        "GELU), torch.optim.AdamW (not fused), train_model_simple (calc_loss_batch: logits at "
        "every position), generate one prompt at a time")
    log(f"fast path:   fast_gpt on the same model (fused attention, LayerNorm and GELU), "
        f"make_optimizer (AdamW(fused=True) where supported), train_model_fast "
        f"(calc_loss_batch_packed: no compute for padding or ignored targets"
        f"{'; bf16 autocast, TF32' if device.type == 'cuda' else ''}"
        f"{'; compiled blocks' if args.compile else ''}), generate with the KV cache, "
        f"test prompts sorted by length in batches of {args.gen_batch_size} (generate_answer_ids)")
    log(f"weights: random (seed {args.seed}), float32; random weights never produce "
        f"<|endoftext|>, so every prompt generates all {args.max_new_tokens} new tokens; the "
        f"decode section's bandwidth does not depend on the values (its bf16 agreement does: "
        f"--weights PATH for a finetuned model's)")
    n_peak = 1024 if args.tiny else (8192 if device.type == "cuda" else 3072)
    peaks = {"fp32": matmul_peak(device, torch.float32, n_peak, 3)}
    log(f"matmul peak (measured): {n_peak}x{n_peak} float32 matmul: {peaks['fp32'] / 1e9:,.1f} "
        f"GFLOP/s (best of 3)")
    if device.type == "cuda":
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, n_peak, 3)
        log(f"matmul peak (measured): {n_peak}x{n_peak} bfloat16 matmul: "
            f"{peaks['bf16'] / 1e9:,.1f} GFLOP/s (the fast path's training MFU uses this one)")
    log("MFU: model FLOPs / time / peak, with N = weights except the embedding tables; "
        "training 6N per trained token + 2N per evaluated token (padding not counted), "
        "generation 2N per new token")

    all_ok, table, decode_rows = True, [], []
    if device.type != "cpu":
        log("decode at batch 1 against the read bandwidth: measured on CPUs only (--device cpu)")
    if args.weights is not None:  # the decode section on a saved model
        from instructkit.model_files import load_finetuned_model

        model, _, info = load_finetuned_model(args.weights)
        log()
        log(f"== {Path(args.weights).name} ({info['model']}) ==")
        rows, ok = bench_decode(Path(args.weights).stem, info["model_config"], model, data,
                                tokenizer, args, agreement=True)
        decode_rows += rows
        all_ok &= ok
        names = [] if args.decode_only else names
    for index, name in enumerate(names):
        cfg = TINY_CONFIG if name == "tiny" else gpt2_config(name)
        label = name.split(" ")[0]
        log()
        log(f"== {name} ==")
        torch.manual_seed(args.seed)
        state = {k: v.to(device) for k, v in GPTModel(cfg).state_dict().items()}
        n_params = sum(v.numel() for k, v in state.items() if not k.endswith(".mask"))
        log(f"parameters: {n_params:,} (output head separate from the token embedding)")
        if device.type == "cpu" and args.weights is None:
            # the first model's bf16 agreement (each model's takes minutes on a CPU)
            rows, ok = bench_decode(label, cfg, build_model(cfg, state, device, True).eval(),
                                    data, tokenizer, args, agreement=index == 0)
            decode_rows += rows
            all_ok &= ok
        if args.decode_only:
            continue
        model_start = time.perf_counter()
        training, ok = bench_training(label, cfg, state, data, tokenizer, device, args, peaks)
        all_ok &= ok
        gc.collect()
        batch1, prompts, ok = bench_generation(label, cfg, state, data, tokenizer, device, args, peaks)
        all_ok &= ok
        del state
        gc.collect()
        log(f"-- {label}: ratios (fast over simple; {time.perf_counter() - model_start:.0f} s "
            f"for this model) --")
        phases = (("training", training), ("generation, batch 1", batch1),
                  ("all test prompts", prompts))
        speed = (("training tokens/s", training, "tokens_per_s", "tokens/s", False),
                 ("generation tokens/s, batch 1", batch1, "tokens_per_s", "tokens/s", False),
                 ("all test prompts, wall time", prompts, "seconds", "s", True))
        for metric, result, key, unit, lower_is_better in speed:
            simple, fast = result["simple"][key], result["fast"][key]
            ratio = simple / fast if lower_is_better else fast / simple
            target = TARGETS[metric] if label == "gpt2-small" and device.type == "cpu" else None
            verdict = "" if target is None else \
                f" (target >= {target:g}x: {'MET' if ratio >= target else 'MISSED'})"
            log(f"RATIO {label} {metric}: {ratio:.2f}x{verdict}")
            table.append((label, metric, simple, fast, unit, ratio, target))
        for metric, result in phases:
            simple, fast = (result[p]["memory"].growth / 2**20 for p in ("simple", "fast"))
            log(f"RATIO {label} peak memory growth, {metric}: simple {simple:,.0f} MiB, "
                f"fast {fast:,.0f} MiB: {simple / max(fast, 1):.2f}x")
            table.append((label, f"peak memory growth, {metric}", simple, fast, "MiB",
                          simple / max(fast, 1), None))
        for metric, result in phases:
            simple, fast = (100 * result[p]["mfu"] for p in ("simple", "fast"))
            log(f"MFU {label} {metric}: simple {simple:.1f}%, fast {fast:.1f}%")
            table.append((label, f"MFU, {metric}", simple, fast, "%", fast / simple, None))

    if decode_rows:
        decode_summary(decode_rows)
    if args.decode_only:
        log(f"checks of agreement: {'all OK' if all_ok else 'SOME FAILED'}")
        log(f"total time: {time.perf_counter() - started:.0f} s")
        return 0 if all_ok else 1
    log()
    log("== Summary ==")
    log("ratio: how many times faster (or less memory, or higher MFU) the fast path is")
    log(f"{'model':12s} {'metric':40s} {'simple':>18s} {'fast':>18s} {'ratio':>9s}  target")
    for label, metric, simple, fast, unit, ratio, target in table:
        verdict = "" if target is None else f">= {target:g}x {'MET' if ratio >= target else 'MISSED'}"
        log(f"{label:12s} {metric:40s} {simple:>9,.1f} {unit:8s} {fast:>9,.1f} {unit:8s} "
            f"{ratio:>8.2f}x  {verdict}".rstrip())
    log(f"checks of agreement: {'all OK' if all_ok else 'SOME FAILED'}")
    if hasattr(os, "getloadavg"):
        log(f"load average at the end: {os.getloadavg()[0]:.2f}")
    log(f"total time: {time.perf_counter() - started:.0f} s")
    return 0 if all_ok else 1


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


if __name__ == "__main__":
    output = parse_args().output
    if output is None:
        sys.exit(main())
    with open(output, "w", encoding="utf-8") as f, contextlib.redirect_stdout(Tee(sys.stdout, f)):
        status = main()
    sys.exit(status)
