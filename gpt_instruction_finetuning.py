"""Chapter 7: finetune GPT-2 to follow instructions, the chapter's helpers.

The functions of the chapter's listings, in the book's shape: `download_and_load_file`
(7.2), `format_input` (7.2), `InstructionDataset` (7.3), `custom_collate_fn` (7.3),
`get_device` (7.4) and `extract_response` (7.5). What the project adds beyond the book is
marked `# Not in the book:` (the checks on a download and on the data, and
`generate_responses`, which answers many test entries at once through `fast_gpt.py`).

The exercises' variants (Phi-3 prompts, masked instructions, LoRA) are in
`exercise_variants.py`, the command line in `finetune_cli.py`. Run this file to run the
whole chapter from the command line: `python gpt_instruction_finetuning.py --help`.
"""

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch.utils.data import Dataset

from instructkit.instruction_data import DatasetError, validate_entries

DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
    "01_main-chapter-code/instruction-data.json"
)


def download_and_load_file(file_path, url):
    if not os.path.exists(file_path):
        # Not in the book: a failed download says what to do instead of a urllib traceback.
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                text_data = response.read().decode("utf-8")
        except (urllib.error.URLError, TimeoutError) as e:
            raise RuntimeError(
                f"Could not download {url} ({e}). Check your connection, or download the "
                f"file by hand and save it as {file_path}."
            ) from None
        # Not in the book: written through a temporary file, so an interruption leaves none.
        from instructkit.safe_files import write_atomically

        write_atomically(file_path, lambda tmp: Path(tmp).write_text(text_data, encoding="utf-8"))

    with open(file_path, encoding="utf-8") as file:
        # Not in the book: a file that is not JSON, or has malformed entries, is a clear error.
        try:
            data = json.load(file)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{file_path} is not valid JSON: {e}") from None
    return validate_entries(data, source=str(file_path))


def format_input(entry):
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )

    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""

    return instruction_text + input_text


class InstructionDataset(Dataset):
    def __init__(self, data, tokenizer):
        self.data = data

        # Pre-tokenize texts
        self.encoded_texts = []
        for entry in data:
            instruction_plus_input = format_input(entry)
            response_text = f"\n\n### Response:\n{entry['output']}"
            full_text = instruction_plus_input + response_text
            self.encoded_texts.append(
                tokenizer.encode(full_text)
            )

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(
    batch,
    pad_token_id=50256,
    ignore_index=-100,
    allowed_max_length=None,
    device="cpu"
):
    # Find the longest sequence in the batch
    batch_max_length = max(len(item)+1 for item in batch)

    # Pad and prepare inputs and targets
    inputs_lst, targets_lst = [], []

    for item in batch:
        new_item = item.copy()
        # Add an <|endoftext|> token
        new_item += [pad_token_id]
        # Pad sequences to max_length
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])  # Truncate the last token for inputs
        targets = torch.tensor(padded[1:])  # Shift +1 to the right for targets

        # New: Replace all but the first padding tokens in targets by ignore_index
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index

        # New: Optionally truncate to maximum sequence length
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]

        inputs_lst.append(inputs)
        targets_lst.append(targets)

    # Convert list of inputs and targets to tensors and transfer to target device
    inputs_tensor = torch.stack(inputs_lst).to(device)
    targets_tensor = torch.stack(targets_lst).to(device)

    return inputs_tensor, targets_tensor


def get_device():
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        # Use PyTorch 2.9 or newer for stable mps results
        major, minor = map(int, torch.__version__.split(".")[:2])
        if (major, minor) >= (2, 9):
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        device = torch.device("cpu")
    return device


def extract_response(response_text, input_text):
    return response_text[len(input_text):].replace("### Response:", "").strip()


def generate_responses(model, entries, tokenizer, max_new_tokens=256, batch_size=16, progress=True):
    """Not in the book: the greedy answer to every entry, `batch_size` prompts at a time.

    The book answers one entry at a time with `generate(..., eos_id=50256)`, recomputing the
    whole text for each new token. `fast_gpt.generate_answer_ids` gives the same greedy tokens
    (up to float rounding, see its tests) with a key/value cache and batches of prompts of
    similar length. Each answer is cut as `extract_response` cuts the book's generated text.
    """
    input_texts = [format_input(entry) for entry in entries]
    answers = generate_answer_texts(model, input_texts, tokenizer, max_new_tokens, batch_size,
                                    progress)
    return [extract_response(input_text + answer, input_text)
            for input_text, answer in zip(input_texts, answers, strict=True)]


def generate_answer_texts(model, input_texts, tokenizer, max_new_tokens=256, batch_size=16,
                          progress=True):
    """Not in the book: the text greedy decoding adds to each prompt, up to the end-of-text.

    Prompts longer than the model's context keep their last `context_length` tokens, as
    `generate` does.
    """
    from fast_gpt import generate_answer_ids

    context_size = model.pos_emb.weight.shape[0]
    eos_id = tokenizer.encode("<|endoftext|>", allowed_special={"<|endoftext|>"})[0]
    prompts = [tokenizer.encode(text)[-context_size:] for text in input_texts]
    model.eval()
    answers = generate_answer_ids(model, prompts, max_new_tokens, context_size, eos_id,
                                  batch_size=batch_size, progress=progress)
    return [tokenizer.decode(ids) for ids in answers]


if __name__ == "__main__":
    # Not in the book: the whole chapter as one command (see finetune_cli.py).
    from instructkit.finetune import cli

    sys.exit(cli())
