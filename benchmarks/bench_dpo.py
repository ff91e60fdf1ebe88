"""Benchmark: DPO's plain batch loss against fast_dpo's, side by side in one process.

    python benchmarks/bench_dpo.py [--model gpt2-small] [--steps 3] [--device cpu|cuda] [--tiny]

A model of the chosen size with random weights (no download) is the policy, a frozen copy
the reference. On the same real preference batches (the first training batches of the
chapter's split, batch size 8, in order) it times three ways to compute the DPO loss:

- plain:  dpo.compute_dpo_loss_batch, four full model calls per batch (logits everywhere);
- fast:   fast_dpo.compute_dpo_loss_batch_fast: packed rows (no compute for padding), output
          head only where a response token is predicted, chosen and rejected in one call,
          the reference under torch.inference_mode;
- cached: the same with the reference log-probabilities cached per entry beforehand
          (fast_dpo.cache_reference_logprobs; the one-off cost is printed separately).

For each it times training steps (loss, backward, AdamW step) and evaluation batches (the
loss without gradients), and the book's loop, which evaluates 5 training and 5 validation
batches every 5 steps: one step plus two evaluation batches per step. It checks that the
three agree (losses after the same steps, rewards) and prints RATIO lines. `--tiny` runs the
test-mode model on one batch of 2 pairs, in seconds (used by the tests). Exit status 1 when a check fails.
"""

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the flat modules live at the repository root

from instructkit import dpo, fast_dpo  # noqa: E402
from instructkit.gpt2_sizes import GPT2_SIZES, TEST_MODE_CONFIG, gpt2_config  # noqa: E402
from instructkit.instruction_data import PREFERENCE_KEYS, load_instruction_file, split_data  # noqa: E402
from previous_chapters import GPTModel  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"  # offline copies (tests, CI)
BETA, LR, WEIGHT_DECAY, BATCH_SIZE = 0.1, 5e-6, 0.01, 8
RTOL, ATOL = 1e-4, 1e-6  # float32; rewards start at 0, so they need an absolute tolerance


def log(line=""):
    print(line, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_batches(data_path, tokenizer, n_batches, batch_size, allowed_max_length, device):
    """The first `n_batches` training batches (list of item lists) and the collate kwargs."""
    train_data, _, _ = split_data(load_instruction_file(data_path, keys=PREFERENCE_KEYS))
    dataset = dpo.PreferenceDataset(train_data[:n_batches * batch_size], tokenizer)
    items = [[dataset[i] for i in range(b * batch_size, (b + 1) * batch_size)]
             for b in range(n_batches)]
    return dataset, items, {"allowed_max_length": allowed_max_length, "device": device}


def run_variant(name, policy0, reference, batches, steps, device):
    """Time `steps` training steps, then an evaluation pass over the same batches."""
    loss_fn = dpo.compute_dpo_loss_batch if name == "plain" else fast_dpo.compute_dpo_loss_batch_fast
    policy = copy.deepcopy(policy0).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    losses = []
    loss_fn(batches[0], policy, reference, BETA)[0].backward()  # warm-up, not timed
    policy.zero_grad()
    sync(device)
    start = time.perf_counter()
    for batch in batches[:steps]:
        optimizer.zero_grad()
        loss, chosen, rejected = loss_fn(batch, policy, reference, BETA)
        loss.backward()
        optimizer.step()
        losses.append((loss.item(), chosen.item(), rejected.item()))
    sync(device)
    step_seconds = (time.perf_counter() - start) / steps

    policy.eval()
    start = time.perf_counter()
    with torch.no_grad():
        evals = [tuple(t.item() for t in loss_fn(batch, policy, reference, BETA)) for batch in batches]
    sync(device)
    eval_seconds = (time.perf_counter() - start) / len(batches)
    return {"step": step_seconds, "eval": eval_seconds, "losses": losses, "evals": evals}


def worst_difference(a, b):
    """The largest |x - y| / (ATOL + RTOL |y|) over rows of (loss, chosen, rejected): <= 1 is OK."""
    return max(abs(x - y) / (ATOL + RTOL * abs(y)) for ra, rb in zip(a, b, strict=True)
               for x, y in zip(ra, rb, strict=True))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-small", choices=list(GPT2_SIZES))
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per variant")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--tiny", action="store_true", help="the test-mode model, in seconds")
    parser.add_argument("--data", default=None,
                        help="instruction-data-with-preference.json (default: ../shared/data)")
    parser.add_argument("--tokenizer-dir", default=None, help="GPT-2's encoder.json and vocab.bpe")
    parser.add_argument("--seed", type=int, default=123, help="random weights")
    return parser.parse_args(argv)


def main(argv=None):
    from instructkit.gpt2_tokenizer import get_tokenizer

    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    label = "tiny" if args.tiny else args.model
    cfg = dict(TEST_MODE_CONFIG) if args.tiny else gpt2_config(args.model)
    steps = 1 if args.tiny else args.steps
    batch_size = 2 if args.tiny else BATCH_SIZE
    data_path = Path(args.data) if args.data else SHARED_DATA / "instruction-data-with-preference.json"

    log("== Setup ==")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"device: {device} ({platform.processor() or platform.machine()}, {os.cpu_count()} logical "
        f"CPUs, {torch.get_num_threads()} threads); torch {torch.__version__}")
    log(f"load average at start: {load:.2f} (other processes share this machine when above 0)")
    log(f"command: python benchmarks/bench_dpo.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    torch.manual_seed(args.seed)
    policy = GPTModel(cfg).to(device)
    reference = dpo.make_reference_model(policy)
    tokenizer = get_tokenizer(args.tokenizer_dir)
    dataset, items, collate_kwargs = build_batches(data_path, tokenizer, steps, batch_size,
                                                    cfg["context_length"], device)
    batches = [dpo.preference_collate_fn(b, **collate_kwargs) for b in items]
    masks = torch.cat([torch.cat([b["chosen_mask"], b["rejected_mask"]]).flatten() for b in batches])
    shapes = ", ".join(str(list(b["chosen"].shape)) for b in batches)
    log(f"model: {label}, random weights (seed {args.seed}), float32, "
        f"{sum(p.numel() for p in policy.parameters()):,} parameters")
    log(f"batches: the first {steps} training batches of {batch_size} pairs, chosen/rejected "
        f"shapes {shapes}; {masks.float().mean().item():.0%} of positions are response tokens")

    start = time.perf_counter()
    cached_items = fast_dpo.cache_reference_logprobs(reference, dataset, batch_size, **collate_kwargs)
    sync(device)
    cache_seconds = time.perf_counter() - start
    cached_batches = [fast_dpo.collate_with_reference(cached_items[i * batch_size:(i + 1) * batch_size],
                                                      **collate_kwargs) for i in range(steps)]
    log(f"reference cache: {len(cached_items)} entries in {cache_seconds:.2f} s "
        f"({cache_seconds / steps:.2f} s per batch, once per run)")

    log(f"\n== {label} ==")
    results = {}
    for name, runs_on in (("plain", batches), ("fast", batches), ("cached", cached_batches)):
        results[name] = run_variant(name, policy, reference, runs_on, steps, device)
        r = results[name]
        log(f"  {name:6}: training step {r['step']:.3f} s, evaluation batch {r['eval']:.3f} s; "
            f"losses {', '.join(f'{x[0]:.6f}' for x in r['losses'])}")

    failed = False
    for name in ("fast", "cached"):
        diff = max(worst_difference(results[name]["losses"], results["plain"]["losses"]),
                   worst_difference(results[name]["evals"], results["plain"]["evals"]))
        ok = diff <= 1
        failed |= not ok
        log(f"CHECK {label} {name} vs plain: losses and rewards after the same steps, largest "
            f"difference {diff:.2f} of the tolerance ({ATOL:.0e} + {RTOL:.0e} x value): "
            f"{'OK' if ok else 'FAILED'}")

    plain = results["plain"]
    log(f"\n-- {label}: ratios (plain time over the variant's; the book's loop = 1 step + 2 "
        f"evaluation batches per step) --")
    for name in ("fast", "cached"):
        r = results[name]
        loop_plain = plain["step"] + 2 * plain["eval"]
        loop = r["step"] + 2 * r["eval"]
        log(f"RATIO {label} {name} training step: {plain['step'] / r['step']:.2f}x")
        log(f"RATIO {label} {name} evaluation batch: {plain['eval'] / r['eval']:.2f}x")
        log(f"RATIO {label} {name} book loop: {loop_plain / loop:.2f}x "
            f"({loop_plain:.2f} s -> {loop:.2f} s per step)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
