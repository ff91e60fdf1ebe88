"""Chapter 7: finetune GPT-2 to follow instructions.

The chapter's helpers (dataset download, Alpaca prompts, the padding/masking collate, the
85/10/5 split, response extraction, device choice) and a command-line `main` that runs the
whole chapter: `python gpt_instruction_finetuning.py --help`.
"""

import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch.utils.data import Dataset

from previous_chapters import generate_batch

HERE = Path(__file__).resolve().parent
DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
    "01_main-chapter-code/instruction-data.json"
)
REQUIRED_KEYS = ("instruction", "input", "output")


class DatasetError(ValueError):
    """The instruction data is not a JSON list of {instruction, input, output} strings."""


def write_atomically(path, write):
    """Call `write(tmp_path)`, then rename the temporary file to `path`.

    A crash or Ctrl-C halfway leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=4)

    write_atomically(path, write)


def validate_entries(data, source="dataset"):
    """Raise DatasetError naming the first bad entry; return the data unchanged."""
    if not isinstance(data, list):
        raise DatasetError(f"{source}: expected a JSON list of entries, got {type(data).__name__}")
    if not data:
        raise DatasetError(f"{source}: the list of entries is empty")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DatasetError(f"{source}: entry {i} is a {type(entry).__name__}, not an object")
        for key in REQUIRED_KEYS:
            if key not in entry:
                raise DatasetError(f"{source}: entry {i} has no '{key}' key")
            if not isinstance(entry[key], str):
                raise DatasetError(
                    f"{source}: entry {i}: '{key}' must be a string, "
                    f"got {type(entry[key]).__name__}"
                )
    return data


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


def split_data(data, train_frac=0.85, test_frac=0.1):
    """The chapter's split, in order: the first 85% train, the next 10% test, the rest validation."""
    train_portion = int(len(data) * train_frac)
    test_portion = int(len(data) * test_frac)
    train_data = data[:train_portion]
    test_data = data[train_portion:train_portion + test_portion]
    val_data = data[train_portion + test_portion:]
    for name, split in (("training", train_data), ("test", test_data), ("validation", val_data)):
        if not split:
            raise DatasetError(f"The {name} split is empty: {len(data)} entries are too few "
                               f"(need at least 20 for an 85/10/5 split).")
    return train_data, test_data, val_data


def get_device(preferred=None):
    """CUDA, then Apple MPS (PyTorch >= 2.9), then CPU; `preferred` ('cuda', 'mps', 'cpu') overrides."""
    if preferred is not None:
        preferred = str(preferred)
        kind = torch.device(preferred).type
        if kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA was requested but is not available: this PyTorch build or "
                               "machine has no CUDA GPU. Use --device cpu (or mps on a Mac).")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError("MPS was requested but is not available (it needs an Apple "
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


def generate_responses(model, entries, tokenizer, device, max_new_tokens=256, batch_size=8,
                       style="alpaca", use_cache=True, progress=True):
    """New: greedy answers for many entries, generated in batches with a progress bar.

    Each answer equals what one-at-a-time generation with `generate(..., eos_id=50256)`
    gives. Prompts are sorted by length so a batch holds similar lengths (less padding).
    """
    from tqdm import tqdm

    fmt = prompt_style(style)
    context_size = model.pos_emb.weight.shape[0]
    eos_id = tokenizer.encode("<|endoftext|>", allowed_special={"<|endoftext|>"})[0]
    prompts = [tokenizer.encode(fmt["format_input"](entry))[-context_size:] for entry in entries]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses = [None] * len(prompts)

    model.eval()
    with tqdm(total=len(prompts), disable=not progress, desc="Generating responses") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            answers = generate_batch(model, [prompts[i] for i in rows], max_new_tokens,
                                     context_size, eos_id=eos_id, use_cache=use_cache)
            for i, answer in zip(rows, answers, strict=True):
                text = tokenizer.decode(answer)
                responses[i] = text.replace(fmt["response_tag"], "").strip()
            bar.update(len(rows))
    return responses
