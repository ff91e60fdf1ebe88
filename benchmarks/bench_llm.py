"""Benchmark: the project's Qwen3 and Llama models (fast_llm.py) against Hugging Face transformers.

    python benchmarks/bench_llm.py [--models qwen3-0.6b,smollm2-360m] [--new-tokens 32]
        [--steps 2] [--threads N] [--dtypes fp32] [--out FILE] [--tiny]

For each model, at its real size (the config.json of Qwen/Qwen3-0.6B-Base and
HuggingFaceTB/SmolLM2-360M, written out below) with random weights (seeded), one run builds
transformers' model (attn_implementation="sdpa"), saves it with `save_pretrained` to a
temporary folder and loads that folder with the project's `load_hub_model`: both sides have
the same weights. Then, on the CPU:

- decode at batch 1: greedy tokens/s after a prompt of ~100 tokens, the project's KV-cached
  `generate` (fast_llm: its products plain, split over the cores, or the whole step in C,
  each forced, and the calibration's pick) against transformers' `generate`, the prefill not
  counted, best of `--repeats` interleaved runs; both against the read-bandwidth limit (the
  bytes of every linear weight, read once per token, over the bandwidth of a plain sum over
  those weights, measured between the runs: benchmarks/bench.py's method), and whether both
  produce the same greedy tokens; plus the largest difference of their logits on the prompt;
- a training step (forward, backward, AdamW step) on the chapter's kind of batch (8 rows of up
  to 128 tokens, padded as the chapter's `custom_collate_fn` pads, -100 targets after the
  first pad): the project's packed, chunked loss (`fast_llm.calc_loss_batch_packed`) against
  transformers' forward and cross-entropy over all its logits (the chapter's calc_loss_batch),
  both with the CLI's optimizer (`fast_gpt.make_optimizer`: AdamW(fused=True)); tokens/s over
  the steps after a first, untimed one, and whether the first losses agree;
- peak memory (resident set size) of full finetuning and of LoRA (rank 16, alpha 16: the
  chapter's `exercise_variants.replace_linear_with_lora`, on every linear layer as the CLI
  does) of the project's model, and of transformers' full finetuning, each in a fresh process
  (the training runs above run there): the process's own high-water mark, from
  `resource.getrusage` (POSIX; psutil's peak working set on Windows), for the whole process:
  the Python interpreter, torch, the weights, the gradients, AdamW's two moments, activations.

`--tiny` runs tiny models of both families in seconds (tests/test_bench.py). The exit status
is 1 when a check of agreement fails (the first training losses; the greedy tokens of the
tiny models, whose logits are far apart: with random weights at the real configs' scale the
top logits of the real sizes can be within float rounding of each other, so there a
difference is reported with its logit margin and not counted as a failure).
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the flat modules and the package live at the repository root

# The config.json of each model on the hub (the values a run needs; random weights).
REAL_CONFIGS = {
    "qwen3-0.6b": {  # Qwen/Qwen3-0.6B-Base
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 32768, "max_window_layers": 28,
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    },
    "smollm2-360m": {  # HuggingFaceTB/SmolLM2-360M
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 0,
        "hidden_act": "silu", "hidden_size": 960,
        "initializer_range": 0.02, "intermediate_size": 2560,
        "max_position_embeddings": 8192, "mlp_bias": False,
        "num_attention_heads": 15, "num_hidden_layers": 32, "num_key_value_heads": 5,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 49152,
    },
}
# --tiny: the same families, a few layers of 64; a larger initialisation spreads the logits
# so that greedy tokens are decided by clear margins
TINY_SIZES = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
              "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2,
              "initializer_range": 0.2}
TINY_CONFIGS = {
    "qwen3-0.6b": {**REAL_CONFIGS["qwen3-0.6b"], **TINY_SIZES, "head_dim": 32},
    "smollm2-360m": {**REAL_CONFIGS["smollm2-360m"], **TINY_SIZES},
}
LR, WEIGHT_DECAY = 0.00005, 0.1  # the chapter's AdamW settings
LORA_RANK = LORA_ALPHA = 16
LOSS_TOLERANCE = 1e-4  # relative, fp32: the same loss through different kernels
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(line=""):
    print(line, flush=True)


#####################################
# Peak memory, in the worker process
#####################################

def peak_rss():
    """The process's peak resident set size in bytes, since it started (None where unknown).

    POSIX: resource.getrusage's ru_maxrss (KiB on Linux, bytes on macOS); Windows has no
    `resource`: psutil's peak working set."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return getattr(psutil.Process().memory_info(), "peak_wset", None)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def current_rss():
    import psutil

    return psutil.Process().memory_info().rss


#####################################
# Training worker: one fresh process per (implementation, full or LoRA)
#####################################

def hf_loss(model, input_batch, target_batch):
    """The chapter's calc_loss_batch on a transformers model: logits everywhere, mean CE."""
    logits = model(input_ids=input_batch, use_cache=False).logits  # (batch, n_tokens, vocab)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def train_worker(spec):
    """Load one side's model from spec["folder"], run spec["steps"] + 1 training steps on the
    saved batches; returns a dict of losses, seconds and memory (printed as one JSON line)."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    rss_start = current_rss()
    batches = torch.load(spec["batches"])
    if spec["impl"] == "ours":
        from fast_gpt import make_optimizer
        from instructkit.fast_llm import calc_loss_batch_packed
        from instructkit.hub_model_files import load_hub_model

        model, _ = load_hub_model(spec["folder"], dtype=torch.float32)

        def loss_fn(x, y):
            return calc_loss_batch_packed(x, y, model, "cpu")
    else:
        import transformers

        from fast_gpt import make_optimizer

        transformers.utils.logging.disable_progress_bar()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            spec["folder"], attn_implementation="sdpa", dtype=torch.float32)

        def loss_fn(x, y):
            return hf_loss(model, x, y)
    if spec["lora"]:
        from exercise_variants import replace_linear_with_lora

        model.requires_grad_(False)  # only the adapters train, as the CLI's --lora-rank does
        replace_linear_with_lora(model, rank=LORA_RANK, alpha=LORA_ALPHA)
    gc.collect()
    rss_loaded = current_rss()
    model.train()
    optimizer = make_optimizer(model, LR, WEIGHT_DECAY)
    losses, seconds = [], []
    for step in range(spec["steps"] + 1):
        x, y = batches[step % len(batches)]
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"losses": losses, "seconds": seconds, "rss_start": rss_start,
            "rss_loaded": rss_loaded, "peak": peak_rss(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "fused": bool(optimizer.defaults.get("fused"))}


def run_worker(spec):
    """train_worker in a fresh Python process (its own peak memory); None when it fails."""
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                             json.dumps(spec)], capture_output=True, text=True, cwd=ROOT)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    log(f"  worker failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return None


#####################################
# Inputs
#####################################

def make_prompt(vocab_size, n_tokens, seed):
    """A random prompt of n_tokens ids (seeded), away from the special tokens at the ends."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size - 3, (n_tokens,), generator=generator).tolist()


def make_batches(vocab_size, pad_id, batch_size, max_len, n_batches, seed):
    """The chapter's kind of training batches: random token rows of lengths spread from
    max_len // 2 to max_len, collated by the chapter's custom_collate_fn (padded with the
    model's end-of-text id, -100 targets after the first pad; inputs max_len wide)."""
    from gpt_instruction_finetuning import custom_collate_fn

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        lengths = torch.linspace(max_len // 2, max_len, batch_size).round().long().tolist()
        rows = [torch.randint(3, vocab_size - 3, (n,), generator=generator).tolist() for n in lengths]
        batches.append(custom_collate_fn(rows, pad_token_id=pad_id))
    return batches


#####################################
# Sections
#####################################

def build_models(name, config_values, folder, seed):
    """transformers' model (sdpa, float32, random weights with the seed) saved to `folder`,
    and the project's model loaded from that folder: (hf_model, our_model, our_cfg)."""
    import transformers

    from instructkit.hub_model_files import load_hub_model

    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" on stderr
    skip = ("architectures", "model_type", "torch_dtype")  # set below, or the weights' own
    values = {k: v for k, v in config_values.items() if k not in skip}
    config = transformers.AutoConfig.for_model(config_values["model_type"], **values)
    config.architectures = config_values["architectures"]
    torch.manual_seed(seed)
    hf_model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="sdpa", dtype=torch.float32).eval()
    hf_model.save_pretrained(folder, safe_serialization=True)
    ours, cfg = load_hub_model(folder, dtype=torch.float32)
    return hf_model, ours.eval(), cfg


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def bench_decode(label, hf_model, ours, cfg, dtype, prompt, args, tiny):
    """Batch-1 decode rows (label, dtype, path, tokens/s, GB/s, fraction of the limit) and
    whether the greedy tokens check passes."""
    from bench import decode_rate as our_decode_rate
    from bench import (
        hf_decode_rate,
        linear_weights,
        log_products_alone,
        read_bandwidth,
        split_products_bandwidth,
    )

    from instructkit import native_decode, parallel_matvec

    pad_id = hf_model.config.eos_token_id
    weights = linear_weights(ours)  # each read in full once per token; the embedding lookups are rows
    n_bytes = sum(w.numel() * w.element_size() for w in weights)
    n_new, context = args.new_tokens, cfg["context_length"]
    best, tokens, bandwidth, products = {}, {}, 0.0, 0.0
    # the whole step in C (instructkit/native_decode.py): fp32, with a C compiler
    native_missing = native_decode.layout_problem(ours) or native_decode.unavailable_reason()
    paths = ("ours plain", "ours parallel", *(() if native_missing else ("ours native",)),
             "transformers")
    try:
        for _ in range(args.repeats):  # interleaved, best of each; the limit measured between them
            bandwidth = max(bandwidth, read_bandwidth(weights, 3))
            products = max(products, split_products_bandwidth(ours, 3))
            for path in paths:
                if path == "transformers":
                    rate, tokens[path] = hf_decode_rate(hf_model, prompt, n_new, pad_id)
                else:  # each of fast_llm's ways of computing a decode step, forced
                    parallel_matvec.set_mode(path.split()[1])
                    rate, tokens[path] = our_decode_rate(ours, prompt, n_new, context, None)
                best[path] = max(best.get(path, 0.0), rate)
        # what the commands use: "auto", which times both on the first decode steps
        parallel_matvec.set_mode("auto")
        parallel_matvec.reset_calibration()
        for _ in range(2):
            our_decode_rate(ours, prompt, 2 * parallel_matvec.CALIBRATION_STEPS + 1, context, None)
        # the generations' own chooser: its cache key names the paths they were offered
        pick = parallel_matvec.MatvecChooser.for_generation(ours, torch.tensor([prompt])).choice() or "plain"
    finally:
        parallel_matvec.set_mode(None)
    best["ours"] = best[f"ours {pick}"]
    tokens["ours"] = tokens[f"ours {pick}"]
    limit = bandwidth / n_bytes
    log(f"  read bandwidth (measured): a plain sum over the {len(weights)} linear weights "
        f"({n_bytes / 1e6:,.0f} MB in {dtype}), best of {3 * args.repeats} passes between the "
        f"runs: {bandwidth / 1e9:,.1f} GB/s -> limit {limit:,.1f} tokens/s (the KV cache, a few "
        f"% more, not counted)")
    log_products_alone(products, bandwidth, n_bytes, best["ours parallel"])
    rows = []
    for path in paths:
        rate = best[path]
        if path != "transformers":
            log(f"  {dtype} {path:14s}: {rate:7,.2f} tokens/s, reads {rate * n_bytes / 1e9:5.1f} "
                f"GB/s, {rate / limit:.0%} of the limit")
    if native_missing:
        log(f"  ours native: not run here ({native_missing})")
    log(f"  the calibration (auto, the commands' default) picks: {pick}")
    for path in ("ours", "transformers"):
        rate = best[path]
        rows.append((label, dtype, path, rate, rate * n_bytes, rate / limit))
        log(f"  {dtype} {path:14s}: {rate:7,.2f} tokens/s, reads {rate * n_bytes / 1e9:5.1f} GB/s, "
            f"{rate / limit:.0%} of the limit")

    # the same greedy tokens? where not, how close the two best logits were there
    ours_tokens, hf_tokens = tokens["ours"], tokens["transformers"]
    first = first_difference(ours_tokens, hf_tokens)
    if tokens["ours plain"] != tokens["ours parallel"]:  # the same products: the same tokens
        log(f"CHECK {label} {dtype} greedy tokens, ours plain vs parallel: differ: FAILED")
        return rows, False
    if "ours native" in tokens:  # the same formulas, each dot product added in another order
        differ = first_difference(tokens["ours plain"], tokens["ours native"])
        log(f"CHECK {label} {dtype} greedy tokens, ours native vs plain: "
            + ("identical: OK" if differ is None else f"differ from new token {differ}: "
               + ("FAILED" if tiny else "DIFFERENT, not counted (random weights: near-ties "
                                        "decided by float rounding)")))
        if differ is not None and tiny:
            return rows, False
    same = sum(a == b for a, b in zip(ours_tokens, hf_tokens, strict=True))
    with torch.inference_mode():
        ids = torch.tensor([prompt + ours_tokens])
        ours_logits = ours(ids)[0].float()
        hf_logits = hf_model(input_ids=ids, use_cache=False).logits[0].float()
    n_prompt = len(prompt)
    diff = (ours_logits[:n_prompt] - hf_logits[:n_prompt]).abs().max().item()
    scale = hf_logits[:n_prompt].abs().max().item()
    where = ""
    if first is not None:
        top2 = hf_logits[n_prompt - 1 + first].topk(2).values
        where = (f"; the first difference at new token {first}, where transformers' two best "
                 f"logits are {(top2[0] - top2[1]).item():.2e} apart")
    ok = first is None or not tiny
    verdict = "OK" if first is None else "FAILED" if tiny else \
        "DIFFERENT, not counted (random weights: near-ties decided by float rounding)"
    log(f"AGREEMENT {label} {dtype} greedy tokens, ours vs transformers: {same}/{n_new} identical"
        f"{where}; logits on the prompt: max |ours - transformers| {diff:.2e} (largest "
        f"|logit| {scale:.2f}): {verdict}")
    return rows, ok


def bench_training(label, folder, batches_path, n_tokens, n_useful, args):
    """Three fresh processes: ours full, transformers full, ours LoRA. Returns (results, ok)."""
    spec = {"folder": str(folder), "batches": str(batches_path), "steps": args.steps,
            "threads": torch.get_num_threads(), "seed": args.seed}
    results = {}
    for key, impl, lora in (("ours full", "ours", False), ("transformers full", "transformers", False),
                            ("ours LoRA", "ours", True)):
        results[key] = r = run_worker({**spec, "impl": impl, "lora": lora})
        if r is None:
            continue
        timed = r["seconds"][1:]
        r["tokens_per_s"] = n_tokens * len(timed) / sum(timed)
        log(f"  {key:18s}: step 1 (untimed) {r['seconds'][0]:.2f} s, then {len(timed)} steps "
            f"in {sum(timed):.2f} s -> {r['tokens_per_s']:,.1f} tokens/s "
            f"({n_useful * len(timed) / sum(timed):,.1f} counted-target tokens/s); "
            f"trainable {r['trainable']:,}; "
            f"losses {', '.join(f'{loss:.4f}' for loss in r['losses'])}")
    ok = all(r is not None for r in results.values())
    for key, r in results.items():
        if r is None:
            continue
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**30:,.2f} GiB"
        log(f"  peak RSS {key:18s}: {peak} (process after imports {r['rss_start'] / 2**30:,.2f} "
            f"GiB, with the model loaded {r['rss_loaded'] / 2**30:,.2f} GiB)")
    if results["ours full"] and results["transformers full"]:
        a, b = results["ours full"]["losses"][0], results["transformers full"]["losses"][0]
        same = abs(a - b) <= LOSS_TOLERANCE * abs(b)
        ok &= same
        log(f"CHECK {label} first training loss, ours vs transformers: {a:.6f} vs {b:.6f} "
            f"(relative tolerance {LOSS_TOLERANCE:g}): {'OK' if same else 'FAILED'}")
    return results, ok


#####################################
# The run
#####################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen3-0.6b,smollm2-360m",
                        help=f"comma-separated, from {', '.join(REAL_CONFIGS)}")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="greedy tokens per timed decode run (default 32; --tiny 16)")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="decode prompt length")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed decode runs of each side, interleaved; the best counts")
    parser.add_argument("--dtypes", default="fp32",
                        help="decode in these weight dtypes: fp32, bf16 or fp32,bf16 (bf16 "
                             "through transformers is slow on many CPUs: minutes)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps after one untimed step (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="training rows per batch")
    parser.add_argument("--max-length", type=int, default=128,
                        help="training rows' longest length (the others spread down to half)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, usually the physical cores)")
    parser.add_argument("--seed", type=int, default=123, help="random weights and inputs")
    parser.add_argument("--out", default=None, help="also write everything printed to this file")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models of both families: seconds (tests)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = 16 if args.tiny else 32
    if args.steps is None:
        args.steps = 2
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in args.model_list:
        if name not in REAL_CONFIGS:
            parser.error(f"unknown model {name!r}: choose from {', '.join(REAL_CONFIGS)}")
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for dtype in args.dtype_list:
        if dtype not in DTYPES:
            parser.error(f"unknown dtype {dtype!r}: fp32 or bf16")
    for flag in ("new_tokens", "prompt_tokens", "repeats", "steps", "batch_size", "max_length"):
        if getattr(args, flag) < 1 or (flag == "new_tokens" and args.new_tokens < 2):
            parser.error(f"--{flag.replace('_', '-')} must be at least {2 if flag == 'new_tokens' else 1}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import transformers
    except ImportError:
        sys.exit("error: bench_llm.py compares with Hugging Face transformers: pip install transformers")
    from bench import cpu_name

    started = time.perf_counter()
    log("== Setup ==")
    log(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs; {platform.system()} "
        f"{platform.release()}")
    log(f"torch {torch.__version__} ({torch.get_num_threads()} threads); transformers "
        f"{transformers.__version__}; python {platform.python_version()}")
    if hasattr(os, "getloadavg"):
        log(f"load average at start: {os.getloadavg()[0]:.2f} (other processes share this "
            f"machine when it is above 0)")
    log(f"command: python benchmarks/bench_llm.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    log(f"models: {', '.join(args.model_list)} at {'TINY test sizes' if args.tiny else 'their real configs'}"
        f", random weights (seed {args.seed}), float32 unless said; transformers: "
        f"AutoModelForCausalLM, attn_implementation='sdpa', saved with save_pretrained and "
        f"loaded by instructkit.hub_model_files.load_hub_model: the same weights on both sides")
    log(f"decode: batch 1, greedy, a {args.prompt_tokens}-token random prompt, {args.new_tokens} "
        f"new tokens, the prefill not counted; ours fast_llm.generate_stream (KV cache; its "
        f"decode products plain or split over the cores (parallel_matvec), or the whole step "
        f"in C (native_decode), each forced, and the one the calibration picks), transformers "
        f"generate (its KV cache); best of "
        f"{args.repeats}, interleaved")
    log(f"training: batches of {args.batch_size} rows of {args.max_length // 2}..{args.max_length} "
        f"random tokens collated as the chapter does (padded to {args.max_length}, -100 after "
        f"the first pad); 1 untimed + {args.steps} timed steps; ours "
        f"fast_llm.calc_loss_batch_packed (packed rows, chunked output head on counted "
        f"targets only), transformers logits + cross_entropy (the chapter's calc_loss_batch); "
        f"both fast_gpt.make_optimizer (AdamW(fused=True) where torch has it, lr {LR}, "
        f"weight decay {WEIGHT_DECAY}); tokens/s counts every input position (the book's "
        f"tokens_seen)")
    log(f"peak memory: each training run in a fresh process; its peak resident set size "
        f"({'resource.getrusage ru_maxrss' if os.name == 'posix' else 'psutil peak_wset'}: the "
        f"whole process); LoRA: exercise_variants.replace_linear_with_lora, rank {LORA_RANK}, "
        f"alpha {LORA_ALPHA}, every linear layer (the output head too), base weights frozen")

    all_ok, decode_rows, training_rows = True, [], []
    configs = TINY_CONFIGS if args.tiny else REAL_CONFIGS
    for index, name in enumerate(args.model_list):
        label = f"{name}{' (tiny)' if args.tiny else ''}"
        values = configs[name]
        log()
        log(f"== {label} ==")
        with tempfile.TemporaryDirectory(prefix="bench_llm_") as tmp:
            folder = Path(tmp) / "model"
            start = time.perf_counter()
            hf_model, ours, cfg = build_models(name, values, folder, args.seed + index)
            n_params = sum(p.numel() for p in ours.parameters())
            log(f"parameters: {n_params:,} (tied embeddings: {cfg['tie_embeddings']}); vocabulary "
                f"{cfg['vocab_size']:,}, {cfg['n_layers']} layers, {cfg['n_heads']} query heads, "
                f"{cfg['n_kv_groups']} key/value heads of {cfg['head_dim']}; built, saved and "
                f"loaded in {time.perf_counter() - start:.1f} s")
            prompt = make_prompt(cfg["vocab_size"], args.prompt_tokens, args.seed)
            for dtype in args.dtype_list:
                log(f"-- decode at batch 1, {dtype} --")
                if dtype != "fp32":  # both sides converted from the same float32 weights
                    from instructkit.hub_model_files import load_hub_model

                    del ours
                    gc.collect()
                    ours = load_hub_model(folder, dtype=DTYPES[dtype])[0].eval()
                    hf_model.to(DTYPES[dtype])
                rows, ok = bench_decode(label, hf_model, ours, cfg, dtype, prompt, args, args.tiny)
                decode_rows += rows
                all_ok &= ok
            del hf_model, ours
            gc.collect()

            log(f"-- training step and peak memory ({args.batch_size} x {args.max_length} tokens) --")
            pad_id = values["eos_token_id"]
            batches = make_batches(cfg["vocab_size"], pad_id, args.batch_size, args.max_length,
                                   args.steps + 1, args.seed)
            batches_path = Path(tmp) / "batches.pt"
            torch.save(batches, batches_path)
            n_tokens = batches[0][0].numel()
            n_useful = int((batches[0][1] != -100).sum())
            results, ok = bench_training(label, folder, batches_path, n_tokens, n_useful, args)
            all_ok &= ok
            training_rows.append((label, results))

    log()
    log("== Summary ==")
    log(f"{'model':22s} {'metric':34s} {'ours':>12s} {'transformers':>13s} {'ratio':>7s}")
    by_key = {}
    for label, dtype, path, rate, _, fraction in decode_rows:
        by_key.setdefault((label, dtype), {})[path] = (rate, fraction)
    for (label, dtype), sides in by_key.items():
        (ours_rate, ours_frac), (hf_rate, hf_frac) = sides["ours"], sides["transformers"]
        log(f"{label:22s} {'decode ' + dtype + ' tokens/s':34s} {ours_rate:12,.2f} {hf_rate:13,.2f} "
            f"{ours_rate / hf_rate:6.2f}x  (>= 1x {'MET' if ours_rate >= hf_rate else 'MISSED'})")
        log(f"{label:22s} {'decode ' + dtype + ', % of the limit':34s} {ours_frac:12.0%} {hf_frac:13.0%} "
            f"{'':7s}  (ours >= 80% {'MET' if ours_frac >= 0.8 else 'MISSED'})")
    for label, results in training_rows:
        ours_r, hf_r = results["ours full"], results["transformers full"]
        if ours_r and hf_r:
            ratio = ours_r["tokens_per_s"] / hf_r["tokens_per_s"]
            log(f"{label:22s} {'training tokens/s (full)':34s} {ours_r['tokens_per_s']:12,.1f} "
                f"{hf_r['tokens_per_s']:13,.1f} {ratio:6.2f}x  (>= 1x {'MET' if ratio >= 1 else 'MISSED'})")
        for key, what in (("ours full", "full finetuning"), ("ours LoRA", "LoRA (rank 16)")):
            r, other = results[key], hf_r if key == "ours full" else None
            if r and r["peak"] is not None:
                theirs = f"{other['peak'] / 2**30:13,.2f}" if other and other["peak"] else f"{'':13s}"
                log(f"{label:22s} {'peak RSS GiB, ' + what:34s} {r['peak'] / 2**30:12,.2f} {theirs}")
        if results["ours LoRA"]:
            log(f"{label:22s} {'training tokens/s (LoRA)':34s} "
                f"{results['ours LoRA']['tokens_per_s']:12,.1f}")
    log(f"checks of agreement: {'all OK' if all_ok else 'SOME FAILED'}")
    if hasattr(os, "getloadavg"):
        log(f"load average at the end: {os.getloadavg()[0]:.2f}")
    log(f"total time: {time.perf_counter() - started:.0f} s")
    return 0 if all_ok else 1


def _cli():
    args = parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(train_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.out is None:
        return main()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import Tee

    with open(args.out, "w", encoding="utf-8") as f, contextlib.redirect_stdout(Tee(sys.stdout, f)):
        return main()


if __name__ == "__main__":
    sys.exit(_cli())
