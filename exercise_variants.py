"""The exercises of chapter 7, beside the chapter's code rather than inside it.

As the book's exercise solutions have them, each exercise brings its own functions and
classes and leaves the chapter's `format_input`, `InstructionDataset` and `custom_collate_fn`
(in gpt_instruction_finetuning.py) alone. This file imports nothing from the chapter's
script, which imports it: where an exercise builds on a chapter function, it takes it as an
argument.

- 7.1 the Phi-3 prompt style: `format_input_phi`, `extract_response_phi`,
  `InstructionDatasetPhi`; `PromptStyle` keeps a style's three parts together (`PHI3` here,
  the chapter's `ALPACA` in gpt_instruction_finetuning.py), so the command line can pick one
  by name;
- 7.2 masking the instructions: `InstructionDatasetWithMasking` (records each prompt's token
  length) and `with_instruction_masking(collate_fn)`, which turns the chapter's collate
  function into the exercise's (`targets[:instruction_length-1] = -100`);
- 7.3 the Alpaca dataset: `ALPACA_URL`;
- 7.4 LoRA: appendix E's `LoRALayer`, `LinearWithLoRA` and `replace_linear_with_lora`, which
  the book's exercise solution imports from appendix E's code; `lora_state_dict`,
  `load_lora_adapters`, `merge_lora`.

Not in the book: the variants combine (Phi-3 prompts with masking, with LoRA, on another
dataset), and `output_suffix` gives each combination its own file names.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import Dataset

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"


#####################################
# Exercise 7.1: the Phi-3 prompt style
#####################################

def format_input_phi(entry):
    instruction_text = (
        f"<|user|>\n{entry['instruction']}"
    )

    input_text = f"\n{entry['input']}" if entry["input"] else ""

    return instruction_text + input_text


def extract_response_phi(response_text, input_text):
    return response_text[len(input_text):].replace("<|assistant|>:", "").strip()


@dataclass(frozen=True)
class PromptStyle:
    """A prompt style's three parts, which have to change together."""

    name: str
    format_input: Callable  # entry -> prompt text
    response_prefix: str  # joins the prompt and the response in a training text
    extract_response: Callable  # (generated text, prompt text) -> the answer alone


PHI3 = PromptStyle("phi3", format_input_phi, "\n<|assistant|>:\n", extract_response_phi)


class InstructionDatasetWithStyle(Dataset):
    """The chapter's InstructionDataset, with the prompt style as an argument."""

    def __init__(self, data, tokenizer, style=PHI3):
        self.data = data

        # Pre-tokenize texts
        self.encoded_texts = []
        for entry in data:
            instruction_plus_input = style.format_input(entry)  # New: the style's prompt
            response_text = style.response_prefix + entry["output"]  # New: the style's joiner
            full_text = instruction_plus_input + response_text
            self.encoded_texts.append(tokenizer.encode(full_text))

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


class InstructionDatasetPhi(InstructionDatasetWithStyle):
    """Exercise 7.1's dataset: Phi-3 prompts, `\\n<|assistant|>:\\n` before each response."""

    def __init__(self, data, tokenizer):
        super().__init__(data, tokenizer, PHI3)


#####################################
# Exercise 7.2: masking the instructions
#####################################

class InstructionDatasetWithMasking(InstructionDatasetWithStyle):
    """Items are (instruction_length, token_ids): the prompt's length in tokens, and the text."""

    def __init__(self, data, tokenizer, style):
        super().__init__(data, tokenizer, style)
        # New: Separate list for instruction lengths
        self.instruction_lengths = [len(tokenizer.encode(style.format_input(entry)))
                                    for entry in data]

    def __getitem__(self, index):
        # New: return both instruction lengths and texts separately
        return self.instruction_lengths[index], self.encoded_texts[index]


def with_instruction_masking(collate_fn):
    """Exercise 7.2's collate function, made from the chapter's `collate_fn`.

    The batch's items are InstructionDatasetWithMasking's (instruction_length, token_ids).
    `collate_fn` (the chapter's custom_collate_fn) pads and shifts the token ids; then the
    targets that predict a prompt token get `ignore_index` too. The target at position i is
    input token i + 1, so targets 0 to instruction_length - 2 are prompt tokens and the first
    counted target is the response's first token.
    """
    def custom_collate_with_masking_fn(
        batch,
        pad_token_id=50256,
        ignore_index=-100,
        allowed_max_length=None,
        device="cpu"
    ):
        # New: the items are (instruction_length, token_ids) pairs; the chapter's collate pads
        # the token ids
        inputs, targets = collate_fn([item for _, item in batch], pad_token_id, ignore_index,
                                     allowed_max_length, device)  # (batch, length) each
        for row, (instruction_length, _) in enumerate(batch):
            # New: the prompt's targets are ignored as well
            targets[row, :instruction_length-1] = ignore_index
        return inputs, targets

    return custom_collate_with_masking_fn


#####################################
# Exercise 7.4: LoRA adapters, saved, reloaded and merged
#####################################

class LoRALayer(nn.Module):
    """The low-rank update alpha * (x @ A @ B); B starts at zero, so it starts as a no-op."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))  # (in_dim, rank)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises weights
        self.B = nn.Parameter(torch.zeros(rank, out_dim))  # (rank, out_dim)
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    """Swap every nn.Linear in `model` (the output head too) for a LinearWithLoRA, in place.

    Freeze the model first (`requires_grad_(False)`), so only A and B are trained.
    """
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)


def lora_state_dict(model):
    """Only the LoRA matrices (and their alpha): a few MB instead of the whole model."""
    alphas = {m.alpha for m in model.modules() if isinstance(m, LoRALayer)}
    if len(alphas) != 1:
        raise ValueError("The model has no LoRA layers (or several alphas)")
    adapters = {k: v for k, v in model.state_dict().items() if ".lora." in k}
    adapters["lora_alpha"] = torch.tensor(float(alphas.pop()))
    return adapters


def load_lora_adapters(model, adapters):
    """Add LoRA layers to a GPT-2 `model` (base weights loaded) and load saved `adapters`."""
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
    A tied output head (Qwen3, SmolLM2) gets a weight of its own: the model is untied.
    Parameters keep their `requires_grad` (frozen, after LoRA training): unfreeze with
    `model.requires_grad_(True)` to train the merged model further.
    """
    for name, module in model.named_children():
        if isinstance(module, LinearWithLoRA):
            linear, lora = module.linear, module.lora
            with torch.no_grad():
                # a new tensor, not an update in place: a head that shares its weight with the
                # token embedding (tied, as Qwen3-0.6B's) is untied, the embedding left as it was
                merged = linear.weight + (lora.alpha * (lora.A @ lora.B)).T.to(linear.weight.dtype)
            linear.weight = nn.Parameter(merged, requires_grad=linear.weight.requires_grad)
            setattr(model, name, linear)
        else:
            merge_lora(module)
    return model


#####################################
# Not in the book: one file name per combination of variants
#####################################

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
