"""Typical wrong answers to the student notebook's exercises (fixtures for test_exercise_checks.py).

`MISTAKES[exercise]` lists (wrong function or class, the words its check must say).
"""

import math

import torch
import torch.nn as nn

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


# format_input ---------------------------------------------------------------------------

def format_input_always_input(entry):
    return PREAMBLE + f"\n\n### Instruction:\n{entry['instruction']}\n\n### Input:\n{entry['input']}"


def format_input_single_newlines(entry):
    text = PREAMBLE + f"\n### Instruction:\n{entry['instruction']}"
    return text + (f"\n### Input:\n{entry['input']}" if entry["input"] else "")


def format_input_no_space(entry):
    text = ("Below is an instruction that describes a task."
            "Write a response that appropriately completes the request."
            f"\n\n### Instruction:\n{entry['instruction']}")
    return text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")


def format_input_with_response(entry):
    text = PREAMBLE + f"\n\n### Instruction:\n{entry['instruction']}"
    return text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "") + "\n\n### Response:\n"


# custom_collate_fn ----------------------------------------------------------------------

def collate(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, device="cpu",
            mask="first", shift=True, copy_items=True, plus_one=True):
    """A collate function with one chosen mistake (the right one with the defaults)."""
    size = max(len(item) for item in batch) + (1 if plus_one else 0)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy() if copy_items else item
        new_item += [pad_token_id] * (size - len(item))
        inputs = torch.tensor(new_item[:-1])
        targets = torch.tensor(new_item[1:] if shift else new_item[:-1])
        pads = torch.nonzero(targets == pad_token_id).squeeze(1)
        if mask == "all":
            targets[pads] = ignore_index
        elif mask == "first" and pads.numel() > 1:
            targets[pads[1:]] = ignore_index
        inputs_lst.append(inputs[:allowed_max_length])
        targets_lst.append(targets[:allowed_max_length])
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


def collate_masks_every_pad(batch, *args, **kwargs):
    return collate(batch, *args, **kwargs, mask="all")


def collate_forgets_the_shift(batch, *args, **kwargs):
    return collate(batch, *args, **kwargs, shift=False)


def collate_no_mask(batch, *args, **kwargs):
    return collate(batch, *args, **kwargs, mask="none")


def collate_changes_the_batch(batch, *args, **kwargs):
    return collate(batch, *args, **kwargs, copy_items=False)


def collate_ignores_max_length(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None,
                               device="cpu"):
    return collate(batch, pad_token_id, ignore_index, None, device)


# extract_response -----------------------------------------------------------------------

def extract_keeps_heading(response_text, input_text):
    return response_text[len(input_text):].strip()


def extract_keeps_prompt(response_text, input_text):
    return response_text.replace("### Response:", "").strip()


def extract_no_strip(response_text, input_text):
    return response_text[len(input_text):].replace("### Response:", "")


# format_input_phi -----------------------------------------------------------------------

def phi_with_assistant_tag(entry):
    text = f"<|user|>\n{entry['instruction']}"
    return text + (f"\n{entry['input']}" if entry["input"] else "") + "\n<|assistant|>:\n"


def phi_blank_lines(entry):
    text = f"<|user|>\n\n{entry['instruction']}"
    return text + (f"\n\n{entry['input']}" if entry["input"] else "")


def phi_as_alpaca(entry):
    text = PREAMBLE + f"\n\n### Instruction:\n{entry['instruction']}"
    return text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")


def phi_always_input(entry):
    return f"<|user|>\n{entry['instruction']}\n{entry['input']}"


# custom_collate_with_masking_fn ---------------------------------------------------------

def masking(shift_by=0):
    def custom_collate_with_masking_fn(batch, pad_token_id=50256, ignore_index=-100,
                                       allowed_max_length=None, device="cpu"):
        inputs, targets = collate([ids for _, ids in batch], pad_token_id, ignore_index,
                                  allowed_max_length, device)
        for row, (instruction_length, _) in enumerate(batch):
            targets[row, :instruction_length - 1 + shift_by] = ignore_index
        return inputs, targets
    return custom_collate_with_masking_fn


def masking_the_inputs(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None,
                       device="cpu"):
    inputs, targets = collate([ids for _, ids in batch], pad_token_id, ignore_index,
                              allowed_max_length, device)
    for row, (instruction_length, _) in enumerate(batch):
        inputs[row, :instruction_length - 1] = ignore_index
    return inputs, targets


def masking_without_masking(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None,
                            device="cpu"):
    return collate([ids for _, ids in batch], pad_token_id, ignore_index, allowed_max_length, device)


# LoRALayer, LinearWithLoRA --------------------------------------------------------------

class LoRALayer(nn.Module):
    """A LoRA layer with one chosen mistake (the right one with the defaults)."""

    b_init = "zeros"
    a_init = "kaiming"
    scale = "alpha"

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        if self.a_init == "kaiming":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.A)
        self.B = nn.Parameter(torch.randn(rank, out_dim) if self.b_init == "random"
                              else torch.zeros(rank, out_dim))
        self.alpha, self.rank = alpha, rank

    def forward(self, x):
        scale = {"alpha": self.alpha, "none": 1.0, "alpha/rank": self.alpha / self.rank}[self.scale]
        return scale * (x @ self.A @ self.B)


class LoRARandomB(LoRALayer):
    b_init = "random"


class LoRAZeroA(LoRALayer):
    a_init = "zeros"


class LoRANoAlpha(LoRALayer):
    scale = "none"


class LoRAOverRank(LoRALayer):
    scale = "alpha/rank"


class LoRATransposed(nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_dim))
        self.B = nn.Parameter(torch.zeros(out_dim, rank))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A.T @ self.B.T)


class LinearWithLoRA(nn.Module):
    """LinearWithLoRA with one chosen mistake (the right one with the defaults)."""

    lora_class = LoRALayer
    output = "both"

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = self.lora_class(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return {"both": lambda: self.linear(x) + self.lora(x), "lora": lambda: self.lora(x),
                "linear": lambda: self.linear(x)}[self.output]()


class LinearLoRAOnly(LinearWithLoRA):
    output = "lora"


class LinearWithoutLoRA(LinearWithLoRA):
    output = "linear"


class LinearRandomB(LinearWithLoRA):
    lora_class = LoRARandomB


class LinearNewLinear(LinearWithLoRA):
    def __init__(self, linear, rank, alpha):
        super().__init__(nn.Linear(linear.in_features, linear.out_features), rank, alpha)
