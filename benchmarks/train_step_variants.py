"""Benchmark: one training step of the chapter, taken apart, on a GPU (or the CPU).

    python benchmarks/train_step_variants.py [--device cuda] [--models gpt2-small,gpt2-medium]

Why the fast path's training step was slower than the book's on an H200: each variant below
trains the same random-weight GPT-2 on the chapter's first batches (8 rows of 61-83 tokens),
after 3 untimed steps that load and pick the kernels, and reports tokens/s over the next
`--steps` steps and how often a step makes the CPU wait for the GPU (torch's sync debug mode):

- the book's loss (`calc_loss_batch`: logits at every position) with the book's AdamW, then
  with the fused AdamW and TF32;
- fast_gpt's loss with the rows packed (`loss_sum_and_count(pack=True)`: no compute for the
  padding, but the number of kept positions must reach the CPU, which waits for the GPU),
  under bfloat16 autocast (`--precision auto` on such a GPU) and in float32/TF32;
- fast_gpt's loss as it runs on a CUDA GPU now (`packs_rows`: the whole batch, no wait),
  likewise.

The chapter's batches are too small to keep a large GPU busy: its steps are bound by the
launches of their kernels, so a wait for the GPU stalls the whole step. `--tiny` runs a tiny
model on the CPU in seconds (tests/test_bench.py).
"""

import argparse
import functools
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the flat modules live at the repository root

import fast_gpt  # noqa: E402
import previous_chapters as pc  # noqa: E402
from gpt_instruction_finetuning import InstructionDataset, custom_collate_fn  # noqa: E402
from instructkit.gpt2_sizes import TEST_MODE_CONFIG, book_model_name, gpt2_config  # noqa: E402
from instructkit.gpt2_tokenizer import get_tokenizer  # noqa: E402
from instructkit.instruction_data import load_instruction_file  # noqa: E402

DATA = ROOT.parent / "shared" / "data"  # offline copies (tests, CI); else --data


def book_loss(x, y, model, device):
    return pc.calc_loss_batch(x, y, model, device)


def packed_loss(x, y, model, device):
    loss_sum, count = fast_gpt.loss_sum_and_count(x, y, model, device, pack=True)
    return loss_sum / count


def fast_loss(x, y, model, device):
    return fast_gpt.calc_loss_batch_packed(x, y, model, device)


# name -> (loss, bfloat16 autocast, fused AdamW, TF32)
VARIANTS = {
    "book's loss, fp32, AdamW (the book)": (book_loss, False, False, False),
    "book's loss, fp32/TF32, fused AdamW": (book_loss, False, True, True),
    "packed rows, bf16 autocast, fused AdamW": (packed_loss, True, True, False),
    "fast_gpt now, bf16 autocast, fused AdamW": (fast_loss, True, True, False),
    "packed rows, fp32/TF32, fused AdamW": (packed_loss, False, True, True),
    "fast_gpt now, fp32/TF32, fused AdamW": (fast_loss, False, True, True),
}


def chapter_batches(data_path, device, n):
    """The chapter's first n training batches (batch 8, shuffled with seed 123)."""
    tokenizer = get_tokenizer(DATA / "gpt2-tokenizer" if (DATA / "gpt2-tokenizer").is_dir() else None)
    data = load_instruction_file(data_path)
    train = data[:int(len(data) * 0.85)]
    torch.manual_seed(123)
    loader = DataLoader(InstructionDataset(train, tokenizer), batch_size=8, shuffle=True, drop_last=True,
                        collate_fn=functools.partial(custom_collate_fn, device=device,
                                                     allowed_max_length=1024))
    return [batch for _, batch in zip(range(n), loader, strict=False)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def waits_in_one_step(step, batch, device):
    """How many times one step makes the CPU wait for the GPU (0 off a CUDA GPU)."""
    if device.type != "cuda":
        step(*batch)
        return 0
    torch.cuda.set_sync_debug_mode(1)  # a warning at every wait
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(*batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def run_variant(cfg, state, batches, device, loss_fn, bf16, fused, tf32, steps):
    """(tokens/s over `steps` steps after 3 warm-up steps, waits per step)."""
    model = pc.GPTModel(cfg).to(device)
    model.load_state_dict(state)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=fused)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32

    def step(x, y):
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(x, y, model, device)
        loss.backward()
        optimizer.step()

    for x, y in batches[:3]:
        step(x, y)
    waits = waits_in_one_step(step, batches[3], device)
    timed = batches[4:4 + steps]
    sync(device)
    start = time.perf_counter()
    for x, y in timed:
        step(x, y)
    sync(device)
    return sum(x.numel() for x, _ in timed) / (time.perf_counter() - start), waits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="gpt2-small,gpt2-medium")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", default=str(DATA / "instruction-data.json"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, 2 steps (tests)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny else args.device)
    steps = 2 if args.tiny else args.steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}); torch {torch.__version__}; {steps} timed steps after 3 "
          f"untimed, the chapter's batches of 8; tokens/s counts every input position")
    batches = chapter_batches(args.data, device, 4 + steps)
    models = ["tiny"] if args.tiny else [m.strip() for m in args.models.split(",")]
    for label in models:
        cfg = TEST_MODE_CONFIG if label == "tiny" else gpt2_config(book_model_name(label))
        torch.manual_seed(123)
        state = pc.GPTModel(cfg).state_dict()
        for variant, (loss_fn, bf16, fused, tf32) in VARIANTS.items():
            if bf16 and device.type != "cuda":
                continue  # bfloat16 autocast is the GPU's default only
            rate, waits = run_variant(cfg, state, batches, device, loss_fn, bf16, fused, tf32, steps)
            print(f"{label:12s} {variant:42s} {rate:9,.0f} tokens/s, waits for the GPU {waits} "
                  f"times a step", flush=True)


if __name__ == "__main__":
    main()
