"""Chapter 7: finetune GPT-2 to follow instructions.

The chapter's helpers (dataset download, Alpaca prompts, the padding/masking collate, the
85/10/5 split, response extraction, device choice) and a command-line `main` that runs the
whole chapter: `python gpt_instruction_finetuning.py --help`.
"""

import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch.utils.data import Dataset

from instruction_data import DatasetError, split_data, validate_entries
from previous_chapters import generate_batch
from safe_files import save_state_dict, write_atomically, write_json

HERE = Path(__file__).resolve().parent
DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
    "01_main-chapter-code/instruction-data.json"
)


class DeviceError(RuntimeError):
    """The requested device is not available."""


def download_and_load_file(file_path, url=DATA_URL):
    """Download the JSON file to `file_path` unless it is there already, then load it."""
    file_path = Path(file_path)
    if not file_path.exists():
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                text_data = response.read().decode("utf-8")
        except (urllib.error.URLError, TimeoutError) as e:
            raise RuntimeError(
                f"Could not download {url} ({e}). Check your connection, or download the "
                f"file by hand and save it as {file_path}."
            ) from None
        write_atomically(file_path, lambda tmp: Path(tmp).write_text(text_data, encoding="utf-8"))

    try:
        with open(file_path, encoding="utf-8") as file:
            data = json.load(file)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{file_path} is not valid JSON: {e}") from None
    return validate_entries(data, source=str(file_path))


def format_input(entry):
    """The Alpaca-style prompt: a preamble, the instruction, and the input when there is one."""
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def format_input_phi(entry):
    """Exercise 7.1: the Phi-3 prompt style, shorter than Alpaca's."""
    input_text = f"\n{entry['input']}" if entry["input"] else ""
    return f"<|user|>\n{entry['instruction']}{input_text}"


# Each prompt style: how to write the prompt, what joins it to the answer, and the tag that
# `extract_response` removes from a generated answer.
PROMPT_STYLES = {
    "alpaca": {"format_input": format_input, "response_prefix": "\n\n### Response:\n",
               "response_tag": "### Response:"},
    "phi3": {"format_input": format_input_phi, "response_prefix": "\n<|assistant|>:\n",
             "response_tag": "<|assistant|>:"},
}


def prompt_style(name):
    if name not in PROMPT_STYLES:
        raise ValueError(f"Unknown prompt style {name!r}; choose one of {list(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


class InstructionDataset(Dataset):
    """Pre-tokenizes every entry as prompt + response.

    New (exercise 7.2): with `mask_instructions=True` an item is `(prompt_length, token_ids)`,
    so the collate can mask the prompt's targets; otherwise it is just `token_ids`.
    """

    def __init__(self, data, tokenizer, style="alpaca", mask_instructions=False):
        self.data = data
        self.mask_instructions = mask_instructions
        fmt = prompt_style(style)
        self.encoded_texts, self.prompt_lengths = [], []
        for entry in data:
            prompt = fmt["format_input"](entry)
            full_text = prompt + fmt["response_prefix"] + entry["output"]
            self.encoded_texts.append(tokenizer.encode(full_text))
            self.prompt_lengths.append(len(tokenizer.encode(prompt)))

    def __getitem__(self, index):
        if self.mask_instructions:
            return self.prompt_lengths[index], self.encoded_texts[index]
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None,
                      device="cpu"):
    """Pad a batch of token-id lists into (inputs, targets), both (batch, n_tokens).

    Every sequence gets one end-of-text token, then padding to the longest sequence. Targets
    are the inputs shifted left by one; all padding after the first end-of-text becomes
    `ignore_index`, so the loss skips it. Items given as (prompt_length, token_ids)
    (exercise 7.2) also get `ignore_index` wherever a target would predict a prompt token.
    """
    prompt_lengths = [item[0] if isinstance(item, tuple) else 0 for item in batch]
    sequences = [item[1] if isinstance(item, tuple) else item for item in batch]
    batch_max_length = max(len(seq) + 1 for seq in sequences)

    inputs_lst, targets_lst = [], []
    for seq, prompt_length in zip(sequences, prompt_lengths, strict=True):
        new_item = list(seq) + [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])  # drop the extra position
        targets = torch.tensor(padded[1:])  # shifted left by one

        # Keep the first padding token as the end-of-text target, ignore the rest.
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze(1)
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if prompt_length > 1:  # New (exercise 7.2): targets that predict prompt tokens
            targets[:prompt_length - 1] = ignore_index

        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)

    inputs_tensor = torch.stack(inputs_lst).to(device)
    targets_tensor = torch.stack(targets_lst).to(device)
    return inputs_tensor, targets_tensor


def get_device(preferred=None):
    """CUDA, then Apple MPS (PyTorch >= 2.9), then CPU; `preferred` ('cuda', 'mps', 'cpu') overrides."""
    if preferred is not None:
        preferred = str(preferred)
        kind = torch.device(preferred).type
        if kind == "cuda" and not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but is not available: this PyTorch build or "
                               "machine has no CUDA GPU. Use --device cpu (or mps on a Mac).")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise DeviceError("MPS was requested but is not available (it needs an Apple "
                               "silicon Mac). Use --device cpu.")
        return torch.device(preferred)
    if torch.cuda.is_available():
        return torch.device("cuda")
    # MPS gave wrong losses for this chapter before PyTorch 2.9.
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if torch.backends.mps.is_available() and (major, minor) >= (2, 9):
        return torch.device("mps")
    return torch.device("cpu")


def extract_response(response_text, input_text, style="alpaca"):
    """The generated answer: the text after the prompt, without the response tag."""
    tag = prompt_style(style)["response_tag"]
    return response_text[len(input_text):].replace(tag, "").strip()


def generate_responses(model, entries, tokenizer, device, max_new_tokens=256, batch_size=16,
                       style="alpaca", use_cache=True, progress=True):
    """New: greedy answers for many entries, generated in batches with a progress bar.

    Each answer equals what one-at-a-time generation with `generate(..., eos_id=50256)`
    gives, with the response tag removed.
    """
    fmt = prompt_style(style)
    context_size = model.pos_emb.weight.shape[0]
    eos_id = tokenizer.encode("<|endoftext|>", allowed_special={"<|endoftext|>"})[0]
    prompts = [tokenizer.encode(fmt["format_input"](entry))[-context_size:] for entry in entries]
    model.eval()
    answers = generate_answer_ids(model, prompts, max_new_tokens, context_size, eos_id,
                                  batch_size, use_cache, progress)
    return [tokenizer.decode(ids).replace(fmt["response_tag"], "").strip() for ids in answers]


def generate_answer_ids(model, prompts, max_new_tokens, context_size, eos_id, batch_size=16,
                        use_cache=True, progress=False):
    """New: `generate_batch` over many token-id prompts, `batch_size` at a time.

    Prompts are sorted by length so a batch holds similar lengths (less padding); the
    answers (new token ids, up to the first `eos_id`) come back in the prompts' order.
    """
    from tqdm import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    with tqdm(total=len(prompts), disable=not progress, desc="Generating responses") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = generate_batch(model, [prompts[i] for i in rows], max_new_tokens,
                                   context_size, eos_id=eos_id, use_cache=use_cache)
            for i, answer in zip(rows, batch, strict=True):
                answers[i] = answer
            bar.update(len(rows))
    return answers


#####################################
# The tokenizer
#####################################

# GPT-2's pre-tokenizer pattern (the same as tiktoken's "gpt2" encoding uses).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+$|\s+(?!\S)|\s"""


def get_tokenizer(tokenizer_dir=None):
    """tiktoken's GPT-2 tokenizer; from `tokenizer_dir` (encoder.json + vocab.bpe) when given.

    The GPT-2 download puts those two files in e.g. gpt2/355M/, so a machine that has the
    weights can build the tokenizer offline too.
    """
    import tiktoken

    if tokenizer_dir is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except OSError as e:  # tiktoken downloads its vocabulary on first use
            raise RuntimeError(
                f"tiktoken could not download GPT-2's vocabulary ({e}). Connect to the internet "
                "once, or pass a folder holding encoder.json and vocab.bpe (--tokenizer-dir)."
            ) from None
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    folder = Path(tokenizer_dir)
    missing = [n for n in ("encoder.json", "vocab.bpe") if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)} (GPT-2's tokenizer files)")
    ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


#####################################
# The whole chapter as one command
#####################################

# Short names for the command line -> the chapter's names (and OpenAI's folder names).
MODEL_NAMES = {
    "gpt2-small": "gpt2-small (124M)",
    "gpt2-medium": "gpt2-medium (355M)",
    "gpt2-large": "gpt2-large (774M)",
    "gpt2-xl": "gpt2-xl (1558M)",
}

# The book's measured minutes for 2 epochs (spec, section 7.6).
BOOK_MINUTES = {
    "gpt2-medium (355M)": {"cpu": (15.78, "M3 MacBook Air CPU"), "mps": (10.77, "M3 MacBook Air GPU"),
                           "cuda": (0.86, "A100; 1.83 on an L4")},
    "gpt2-small (124M)": {"cpu": (5.74, "M3 MacBook Air CPU"), "cuda": (0.39, "A100")},
}

# A tiny random GPT for --test_mode: the whole pipeline in seconds, nothing downloaded.
TEST_MODE_CONFIG = {
    "vocab_size": 50257, "context_length": 256, "emb_dim": 64,
    "n_heads": 4, "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True,
}


def resolve_model_name(model):
    """'gpt2-medium', 'gpt2-medium (355M)' or '355M' -> 'gpt2-medium (355M)'."""
    for short, full in MODEL_NAMES.items():
        if model in (short, full, full.split("(")[1].rstrip(")")):
            return full
    raise ValueError(f"Unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")


def output_suffix(style="alpaca", mask_instructions=False, lora_rank=None, test_mode=False,
                  data_name=None):
    """Variants get their own file names, so runs never overwrite each other.

    `data_name`: the stem of a dataset other than the chapter's (e.g. "alpaca_data").
    """
    suffix = f"-{data_name}" if data_name else ""
    suffix += "" if style == "alpaca" else f"-{style}"
    suffix += "-mask" if mask_instructions else ""
    suffix += f"-lora{lora_rank}" if lora_rank else ""
    return suffix + ("-test" if test_mode else "")


def package_versions(names=("matplotlib", "tiktoken", "torch", "tensorflow", "tqdm", "psutil")):
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def make_optimizer(model, lr, weight_decay):
    """AdamW over the trainable parameters; New: `fused=True`, one kernel for all of them."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def describe_expected_cost(model, model_name, device, num_epochs, test_mode=False):
    """Print the estimated memory, and the book's runtime for this model and device."""
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # float32 weights, plus gradients and two AdamW moments for every trainable parameter
    gigabytes = (4 * n_params + 12 * n_trainable) / 1e9
    print(f"Parameters: {n_params:,} ({n_trainable:,} trainable); weights, gradients and "
          f"optimizer state need about {gigabytes:.1f} GB, plus activations.")
    book = BOOK_MINUTES.get(model_name, {}).get(torch.device(device).type)
    if test_mode:
        print("Test mode: training and answering take seconds.")
    elif book is not None:
        minutes, where = book
        print(f"Expect about {minutes * num_epochs / 2:.1f} min of training: the book's 2 epochs "
              f"of {model_name} took {minutes} min ({where}).")


def build_loaders(train_data, val_data, test_data, tokenizer, device, batch_size,
                  allowed_max_length, style="alpaca", mask_instructions=False, seed=123):
    """The chapter's three data loaders (train shuffles and drops the last partial batch)."""
    from functools import partial

    from torch.utils.data import DataLoader

    collate = partial(custom_collate_fn, device=device, allowed_max_length=allowed_max_length)
    loaders = []
    for data, is_train in ((train_data, True), (val_data, False), (test_data, False)):
        dataset = InstructionDataset(data, tokenizer, style, mask_instructions)
        torch.manual_seed(seed)
        loaders.append(DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                  shuffle=is_train, drop_last=is_train, num_workers=0))
    if len(loaders[0]) == 0:
        raise DatasetError(f"The training split has {len(train_data)} entries, fewer than one "
                           f"batch of {batch_size}: use a smaller --batch-size or more data.")
    return loaders


def count_truncated(dataset, allowed_max_length):
    """Entries whose prompt + response + end-of-text do not fit in `allowed_max_length`."""
    return sum(len(ids) + 1 > allowed_max_length for ids in dataset.encoded_texts)


def main(model="gpt2-medium", data=None, data_url=None, epochs=2, batch_size=8, lr=5e-5,
         weight_decay=0.1, max_length=1024, seed=123, device=None, models_dir=None,
         output_dir=None, test_mode=False, style="alpaca", mask_instructions=False,
         lora_rank=None, lora_alpha=None, tokenizer_dir=None, max_new_tokens=256,
         eval_freq=5, eval_iter=5, compile_model=False):
    """Run the chapter: data, GPT-2, finetuning, plot, responses, saved files.

    Returns a dict with the losses, the responses and the paths written.
    """
    from previous_chapters import (
        GPTModel,
        calc_loss_batch_fast,
        calc_loss_loader,
        gpt2_config,
        load_weights_into_gpt,
        plot_losses,
        replace_linear_with_lora,
        train_model_simple,
    )

    model_name = resolve_model_name(model)
    prompt_style(style)  # fail early on an unknown style
    output_dir = Path(output_dir) if output_dir is not None else HERE
    models_dir = Path(models_dir) if models_dir is not None else HERE / "gpt2"
    data_path = Path(data) if data is not None else HERE / "instruction-data.json"
    if data is not None and data_url is None and not data_path.exists():
        raise DatasetError(f"{data_path} does not exist (pass --data-url to download it)")

    for name, value in package_versions().items():
        print(f"{name} version: {value}")

    #######################################
    # Data: download, split, loaders
    #######################################
    data_list = download_and_load_file(data_path, data_url or DATA_URL)
    print(f"Number of entries: {len(data_list)}")
    train_data, test_data, val_data = split_data(data_list)
    if test_mode:  # about 10 entries per split
        train_data, test_data, val_data = train_data[:10], test_data[:10], val_data[:10]
        batch_size = min(batch_size, 2)
    print(f"Training set length: {len(train_data)}")
    print(f"Validation set length: {len(val_data)}")
    print(f"Test set length: {len(test_data)}")

    device = torch.device("cpu") if test_mode and device is None else get_device(device)
    print(f"Device: {device}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # New: TF32 matmuls, bf16 autocast in training
        torch.backends.cudnn.allow_tf32 = True

    tokenizer = get_tokenizer(tokenizer_dir)
    base_config = TEST_MODE_CONFIG if test_mode else gpt2_config(model_name)
    allowed_max_length = min(max_length, base_config["context_length"])
    train_loader, val_loader, test_loader = build_loaders(
        train_data, val_data, test_data, tokenizer, device, batch_size, allowed_max_length,
        style, mask_instructions, seed)
    truncated = sum(count_truncated(loader.dataset, allowed_max_length)
                    for loader in (train_loader, val_loader, test_loader))
    if truncated:
        print(f"Warning: {truncated} entries are longer than {allowed_max_length} tokens "
              f"and were truncated.")

    #######################################
    # The model
    #######################################
    if test_mode:
        torch.manual_seed(seed)
        gpt = GPTModel(base_config)
        print("Test mode: a tiny random GPT, no weights downloaded.")
    else:
        from gpt_download import download_and_load_gpt2

        model_size = model_name.split(" ")[-1].strip("()")
        settings, params = download_and_load_gpt2(model_size=model_size, models_dir=models_dir)
        gpt = GPTModel(base_config)
        load_weights_into_gpt(gpt, params)
        del settings, params
    gpt.eval()

    if lora_rank:  # New (exercise 7.4): train low-rank adapters only
        gpt.requires_grad_(False)
        replace_linear_with_lora(gpt, rank=lora_rank, alpha=lora_alpha or lora_rank)
    gpt.to(device)
    describe_expected_cost(gpt, model_name, device, epochs, test_mode)

    #######################################
    # Finetuning
    #######################################
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, gpt, device, 5, calc_loss_batch_fast)
        val_loss = calc_loss_loader(val_loader, gpt, device, 5, calc_loss_batch_fast)
    print(f"Initial training loss: {train_loss:.3f}")
    print(f"Initial validation loss: {val_loss:.3f}")

    if compile_model:  # New: torch.compile the transformer blocks (GPTModel.compile)
        gpt.compile(dynamic=True)  # batch lengths vary from batch to batch
    optimizer = make_optimizer(gpt, lr, weight_decay)
    fmt = prompt_style(style)
    start_time = time.time()
    torch.manual_seed(seed)
    try:
        train_losses, val_losses, tokens_seen = train_model_simple(
            gpt, train_loader, val_loader, optimizer, device, num_epochs=epochs,
            eval_freq=eval_freq, eval_iter=eval_iter,
            start_context=fmt["format_input"](val_data[0]), tokenizer=tokenizer)
    except KeyboardInterrupt:
        print("\nTraining interrupted: nothing was saved.", file=sys.stderr)
        raise
    minutes = (time.time() - start_time) / 60
    print(f"Training completed in {minutes:.2f} minutes.")

    data_name = None if data_path.name == "instruction-data.json" else data_path.stem
    suffix = output_suffix(style, mask_instructions, lora_rank, test_mode, data_name)
    paths = {}
    if train_losses:
        epochs_tensor = torch.linspace(0, epochs, len(train_losses))
        paths["plot"] = output_dir / f"loss-plot{suffix}.pdf"
        output_dir.mkdir(parents=True, exist_ok=True)
        plot_losses(epochs_tensor, tokens_seen, train_losses, val_losses,
                    save_path=paths["plot"], show=False)
        print(f"Loss plot saved as {paths['plot']}")

    #######################################
    # Responses
    #######################################
    responses = generate_responses(gpt, test_data, tokenizer, device, max_new_tokens,
                                   style=style, progress=True)
    for entry, response in zip(test_data[:3], responses[:3], strict=False):
        print(fmt["format_input"](entry))
        print(f"\nCorrect response:\n>> {entry['output']}")
        print(f"\nModel response:\n>> {response}")
        print("-------------------------------------")
    results = [dict(entry, model_response=response)
               for entry, response in zip(test_data, responses, strict=True)]
    paths["responses"] = output_dir / f"instruction-data-with-response{suffix}.json"
    write_json(paths["responses"], results)
    print(f"Responses saved as {paths['responses']}")

    #######################################
    # The finetuned model
    #######################################
    file_stem = re.sub(r"[ ()]", "", model_name) + "-sft" + suffix
    if lora_rank:
        paths["adapters"] = output_dir / f"{file_stem}-adapters.pth"
        save_state_dict(lora_state_dict(gpt), paths["adapters"])
        print(f"LoRA adapters saved as {paths['adapters']}")
        merge_lora(gpt)
    paths["model"] = output_dir / f"{file_stem}.pth"
    save_state_dict(gpt.state_dict(), paths["model"])
    print(f"Model saved as {paths['model']}")

    return {"train_losses": train_losses, "val_losses": val_losses, "tokens_seen": tokens_seen,
            "initial_losses": (train_loss, val_loss), "responses": results, "paths": paths,
            "minutes": minutes}


def lora_state_dict(model):
    """Only the LoRA matrices (and their alpha): a few MB instead of the whole model."""
    from previous_chapters import LoRALayer

    alphas = {m.alpha for m in model.modules() if isinstance(m, LoRALayer)}
    if len(alphas) != 1:
        raise ValueError("The model has no LoRA layers (or several alphas)")
    adapters = {k: v for k, v in model.state_dict().items() if ".lora." in k}
    adapters["lora_alpha"] = torch.tensor(float(alphas.pop()))
    return adapters


def load_lora_adapters(model, adapters):
    """Add LoRA layers to a GPT-2 `model` (base weights loaded) and load saved `adapters`."""
    from previous_chapters import replace_linear_with_lora

    a_key = next((k for k in adapters if k.endswith(".lora.A")), None)
    if a_key is None:
        raise ValueError("These are not LoRA adapters: no '*.lora.A' entry")
    rank = adapters[a_key].shape[1]
    alpha = float(adapters.get("lora_alpha", torch.tensor(rank)).item())
    model.requires_grad_(False)
    replace_linear_with_lora(model, rank=rank, alpha=alpha)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in adapters.items() if k != "lora_alpha"}, strict=False)
    if unexpected or any(".lora." in k for k in missing):
        raise ValueError(f"Adapters do not match the model: unexpected {unexpected[:3]}, "
                         f"missing {[k for k in missing if '.lora.' in k][:3]}")
    return model


def merge_lora(model):
    """Fold every LinearWithLoRA into a plain nn.Linear (W + alpha * (A @ B)^T), in place.

    The merged model has the plain GPTModel's state-dict keys, so it loads without LoRA code.
    Parameters keep their `requires_grad` (frozen, after LoRA training): unfreeze with
    `model.requires_grad_(True)` to train the merged model further.
    """
    from previous_chapters import LinearWithLoRA

    for name, module in model.named_children():
        if isinstance(module, LinearWithLoRA):
            linear, lora = module.linear, module.lora
            with torch.no_grad():
                linear.weight += (lora.alpha * (lora.A @ lora.B)).T.to(linear.weight.dtype)
            setattr(model, name, linear)
        else:
            merge_lora(module)
    return model


def build_arg_parser():
    import argparse

    parser = argparse.ArgumentParser(
        description="Finetune GPT-2 to follow instructions (chapter 7), end to end.")
    parser.add_argument("--model", default="gpt2-medium", choices=list(MODEL_NAMES),
                        help="GPT-2 size (default: gpt2-medium, as in the chapter)")
    parser.add_argument("--data", default=None,
                        help="instruction JSON: a list of {instruction, input, output} "
                             "(default: the chapter's dataset, downloaded on first run)")
    parser.add_argument("--data-url", default=None,
                        help="download --data from this URL when the file is missing "
                             "(default: the chapter's dataset URL when --data is not given)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=1024,
                        help="truncate training sequences to this many tokens")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default=None,
                        help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--models-dir", default=None,
                        help="where GPT-2 checkpoints are stored (default: gpt2/ next to this file)")
    parser.add_argument("--output-dir", default=None,
                        help="where responses, model and plot go (default: next to this file)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="a folder with GPT-2's encoder.json and vocab.bpe (offline use)")
    parser.add_argument("--prompt-style", default="alpaca", choices=list(PROMPT_STYLES))
    parser.add_argument("--mask-instructions", action="store_true",
                        help="exercise 7.2: compute the loss on the response tokens only")
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="exercise 7.4: train LoRA adapters of this rank instead of all weights")
    parser.add_argument("--lora-alpha", type=float, default=None,
                        help="LoRA scaling (default: equal to the rank)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer blocks (worth it on a GPU)")
    parser.add_argument("--test_mode", "--test-mode", action="store_true",
                        help="a tiny random GPT and ~10 entries per split on the CPU: the whole "
                             "pipeline in seconds, for checking the setup")
    return parser


def cli(argv=None):
    """The command line: parse, run `main`, turn known problems into a message and an exit code."""
    args = build_arg_parser().parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # save plots to files; no window
    from gpt_download import DownloadError

    try:
        main(model=args.model, data=args.data, data_url=args.data_url, epochs=args.epochs,
             batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
             max_length=args.max_length, seed=args.seed, device=args.device,
             models_dir=args.models_dir, output_dir=args.output_dir, test_mode=args.test_mode,
             style=args.prompt_style, mask_instructions=args.mask_instructions,
             lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
             tokenizer_dir=args.tokenizer_dir, max_new_tokens=args.max_new_tokens,
             compile_model=args.compile)
    except (DatasetError, DeviceError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DownloadError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
