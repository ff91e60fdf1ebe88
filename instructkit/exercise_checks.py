"""Checks for the student notebook (exercises.ipynb): run a student's function, say what is wrong.

Each check runs the student's code on the chapter's own examples (the spec's three-entry
collate batch, the dataset's spelling entry, LoRA on GPT-2 medium's shapes) and compares the
result with the chapter's function. A difference is told in plain words: a shape, the first
position that differs with the expected and the actual value, and, when the result is exactly
what a typical mistake produces, that mistake ("every padding token was masked; ..."). The
checks never show the solution's code. They need no weights, no data files and no network,
and run in seconds on a CPU (a tiny random GPT where a model is needed; GPT-2 medium only on
PyTorch's `meta` device, shapes without memory).

In a notebook:

    check_custom_collate_fn(custom_collate_fn)   # prints "custom_collate_fn: passed", or what differs

A stub that still raises NotImplementedError is "not done yet"; any other exception from the
student's code is reported with its type, message and the student's own traceback lines, and
never escapes, so the notebook runs on. When the environment variable RESULTS_ENV names a
file, each check also appends its result there as one JSON line (the grader reads it:
instructkit/grade_exercises.py).

`EXERCISES` lists the exercises in the notebook's order, each with the chapter's function it
is compared with (instructkit/student_notebook.py takes the stubs' signatures from it).
"""

import copy
import json
import os
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

import exercise_variants as ev
import gpt_instruction_finetuning as gif

RESULTS_ENV = "INSTRUCTKIT_EXERCISE_RESULTS"  # file to append JSON results to (the grader's)
PASSED, FAILED, NOT_DONE, CRASHED = "passed", "failed", "not done", "crashed"
EOT = 50256  # GPT-2's end-of-text token, the chapter's padding token

# The chapter's examples: the dataset's spelling entry (data[50]), an entry without input
# (data[999]) and a made-up one whose input spans two lines.
ENTRIES = [
    {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
     "output": "The correct spelling is 'Occasion.'"},
    {"instruction": "What is an antonym of 'complicated'?", "input": "",
     "output": "An antonym of 'complicated' is 'simple'."},
    {"instruction": "Sort these numbers in ascending order.", "input": "7, 2\n9, 4",
     "output": "2, 4, 7, 9"},
]
# The spec's collate batch (section 7.3), and its (instruction_length, token_ids) version.
BATCH = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
MASKED_BATCH = [(3, [0, 1, 2, 3, 4]), (2, [5, 6]), (1, [7, 8, 9])]
# A tiny GPT: the chapter's architecture at a size that runs in milliseconds.
TINY_GPT = {"vocab_size": 64, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
            "drop_rate": 0.0, "qkv_bias": True}
LORA_MEDIUM_TRAINABLE, MEDIUM_TOTAL = 7_898_384, 406_286_336  # rank 16 on gpt2-medium


@dataclass
class Result:
    exercise: str
    status: str  # PASSED, FAILED, NOT_DONE or CRASHED
    message: str = ""

    def text(self):
        """What the check cell prints."""
        if self.status == PASSED:
            return f"{self.exercise}: passed. {self.message}".rstrip()
        if self.status == NOT_DONE:
            return f"{self.exercise}: not done yet ({self.message})"
        head = "FAILED" if self.status == FAILED else "CRASHED (your code raised an exception)"
        body = "\n".join("    " + line for line in self.message.splitlines())
        return f"{self.exercise}: {head}\n{body}"


class Wrong(Exception):
    """A difference between the student's result and the chapter's (the message says which)."""


########################################################################################
# Saying what differs
########################################################################################

def _snippet(text, start, width=24):
    return repr(text[max(0, start - 4):start + width])


def compare_text(what, expected, actual, mistakes=()):
    """Raise Wrong naming the first differing character and the matching typical mistake.

    `mistakes`: (what that mistake would return, explanation) pairs."""
    if not isinstance(actual, str):
        raise Wrong(f"{what}: returned {type(actual).__name__} {actual!r:.60}, expected a str")
    if actual == expected:
        return
    index = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
                 min(len(expected), len(actual)))
    lines = [f"{what}: the texts differ at character {index}:",
             f"  expected {_snippet(expected, index)}",
             f"  got      {_snippet(actual, index)}"]
    if len(actual) != len(expected) and index == min(len(expected), len(actual)):
        lines.append(f"  (expected {len(expected)} characters, got {len(actual)})")
    lines += [f"Likely mistake: {why}" for would_be, why in mistakes if actual == would_be][:1]
    raise Wrong("\n".join(lines))


def _as_list(value):
    return value.tolist() if isinstance(value, torch.Tensor) else value


def compare_rows(what, expected, actual, mistakes=()):
    """Raise Wrong naming the shape or the first differing [row, column] of two 2-D results.

    `expected` and the mistakes' results are lists of rows; `actual` a tensor."""
    exp_shape = (len(expected), len(expected[0]))
    if tuple(actual.shape) != exp_shape:
        message = f"{what} have shape {tuple(actual.shape)}, expected {exp_shape}"
    elif actual.tolist() == expected:
        return
    else:
        got = actual.tolist()
        row, col = next((r, c) for r in range(exp_shape[0]) for c in range(exp_shape[1])
                        if got[r][c] != expected[r][c])
        message = (f"{what} differ first at row {row}, position {col}: expected {expected[row][col]}, "
                   f"got {got[row][col]}\n  expected row {row}: {expected[row]}\n"
                   f"  got row {row}:      {got[row]}")
    why = [why for would_be, why in mistakes if _as_list(would_be) == actual.tolist()]
    raise Wrong(message + "".join(f"\nLikely mistake: {w}" for w in why[:1]))


def _pair_of_tensors(result, what):
    if not (isinstance(result, tuple | list) and len(result) == 2
            and all(isinstance(t, torch.Tensor) for t in result)):
        kind = type(result).__name__ + (f" of {len(result)}" if isinstance(result, tuple | list) else "")
        raise Wrong(f"{what} returned a {kind}; expected a tuple (inputs, targets) of two tensors")
    inputs, targets = result
    for name, tensor in (("inputs", inputs), ("targets", targets)):
        if tensor.dtype != torch.long:
            raise Wrong(f"the {name} are {tensor.dtype}; token IDs and targets must be integers "
                        "(torch.long), which the embedding layer and cross_entropy expect")
    return inputs, targets


########################################################################################
# The chapter's pieces: format_input, custom_collate_fn, extract_response
########################################################################################

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


def _format_input_problems(format_input):
    for number, entry in enumerate(ENTRIES):
        expected = gif.format_input(entry)
        actual = format_input(copy.deepcopy(entry))
        no_input = gif.format_input({**entry, "input": ""})
        compare_text(f"example {number + 1} ({'empty input' if not entry['input'] else 'with input'})",
                     expected, actual, [
            (expected + "\n\n### Input:\n", "the '### Input:' section is there for an empty input; "
                                            "leave it out when entry['input'] is empty"),
            (expected + "\n\n### Response:\n", "the prompt ends before '### Response:'; the dataset "
                                               "adds that heading together with the answer"),
            (expected.replace("\n\n", "\n"), "the sections are separated by one line break; the "
                                             "chapter uses an empty line between them ('\\n\\n')"),
            (expected.replace("task. Write", "task.Write"),
             "the two sentences of the preamble need a space between them ('...a task. Write...')"),
            *[(v, f"the preamble is missing: the prompt starts with {PREAMBLE[:40]!r}...")
              for v in (expected[len(PREAMBLE):], expected[len(PREAMBLE):].lstrip())],
            (no_input if entry["input"] else None, "the entry's input is missing: add "
                                                   "'### Input:' and the input when there is one"),
            *[(v, "extra whitespace at the start or the end of the prompt")
              for v in (expected + "\n", expected.strip() + " ", "\n" + expected)],
        ])
    return f"All {len(ENTRIES)} examples (with and without an input) give the chapter's prompt."


def _collate_variant(batch, pad=EOT, ignore=-100, max_length=None, *, mask="first", shift=True,
                     plus_one=True):
    """(inputs, targets) as lists of rows, the chapter's way or with one typical mistake: the
    padding's targets masked "all" or "none" instead of all but the "first"; no shift; rows
    padded to the longest item without the extra end-of-text position (plus_one=False)."""
    size = max(len(item) for item in batch) + (1 if plus_one else 0)
    inputs, targets = [], []
    for item in batch:
        padded = item + [pad] * (size - len(item))
        row_in, row_t = padded[:-1], padded[1:] if shift else padded[:-1]
        pads = [i for i, t in enumerate(row_t) if t == pad]
        drop = {"first": pads[1:], "all": pads, "none": []}[mask]
        row_t = [ignore if i in drop else t for i, t in enumerate(row_t)]
        inputs.append(row_in[:max_length])
        targets.append(row_t[:max_length])
    return inputs, targets


COLLATE_MISTAKES = {
    "all": ({"mask": "all"}, "every padding token was masked; the first one must stay (as the "
                             "end-of-text target) so that the model learns to stop"),
    "none": ({"mask": "none"}, "the padding tokens after the first are not replaced by -100 "
                               "(ignore_index), so the loss would train the model to keep "
                               "predicting end-of-text"),
    "noshift": ({"shift": False}, "the targets are not shifted: the target at position i is the "
                                  "input token at i + 1"),
    "short": ({"plus_one": False}, "each row must be one longer than the longest item (room for "
                                   "its end-of-text token) before the last position is dropped "
                                   "for the inputs"),
}


def _collate_mistakes(batch, **kwargs):
    """((inputs, targets) a typical mistake gives, explanation) pairs for `batch`."""
    return [(_collate_variant(batch, **kwargs, **variant), why)
            for variant, why in COLLATE_MISTAKES.values()]


def _check_collate(collate, batch, expected, mistakes, label, **kwargs):
    """Call `collate(batch, **kwargs)`; compare with the `expected` (inputs, targets) rows and
    explain a difference by the matching ((inputs, targets), why) of `mistakes`."""
    before = copy.deepcopy(batch)
    inputs, targets = _pair_of_tensors(collate(batch, **kwargs), label)
    if batch != before:
        raise Wrong(f"{label}: the function changed the batch it was given (the items now have "
                    "the padding appended); copy each item before appending to it")
    ignore = kwargs.get("ignore_index", -100)
    if any(ignore in row for row in inputs.tolist()):
        raise Wrong(f"{label}: the inputs contain the ignore index {ignore}; only the targets get "
                    "it, the inputs keep the padding token")
    compare_rows(f"{label}: the inputs", expected[0], inputs, [(m[0], why) for m, why in mistakes])
    compare_rows(f"{label}: the targets", expected[1], targets, [(m[1], why) for m, why in mistakes])


def _options(kwargs):
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def _variant_args(kwargs):
    names = {"pad_token_id": "pad", "ignore_index": "ignore", "allowed_max_length": "max_length"}
    return {names[k]: v for k, v in kwargs.items()}


# Other arguments, and what ignoring each gives: the defaults' result.
COLLATE_OPTIONS = (
    ({"allowed_max_length": 3}, "allowed_max_length was ignored: cut inputs and targets to that "
                                "many positions"),
    ({"ignore_index": -1}, "the ignore_index argument was ignored: the targets use -100 where -1 "
                           "was asked for"),
    ({"pad_token_id": 99}, "the pad_token_id argument was ignored: pad with it, not with 50256"),
)


def _custom_collate_fn_problems(custom_collate_fn):
    ref = gif.custom_collate_fn
    for kwargs, ignored in ((), None), *COLLATE_OPTIONS:
        kwargs = dict(kwargs)
        expected = tuple(t.tolist() for t in ref(copy.deepcopy(BATCH), **kwargs))
        mistakes = _collate_mistakes(BATCH, **_variant_args(kwargs))
        if ignored:
            mistakes.append((_collate_variant(BATCH), ignored))
        label = "the spec's batch [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]" + (
            f" with {_options(kwargs)}" if kwargs else "")
        _check_collate(custom_collate_fn, copy.deepcopy(BATCH), expected, mistakes, label, **kwargs)
    return "The spec's batch gives the spec's inputs and targets, with and without the options."


def _extract_response_problems(extract_response):
    for number, entry in enumerate(ENTRIES):
        prompt = gif.format_input(entry)
        answers = [prompt + "\n\n### Response:\n" + entry["output"],  # as the model was trained
                   prompt + " " + entry["output"] + "\n"]  # a model that left out the heading
        for generated in answers:
            expected = gif.extract_response(generated, prompt)
            actual = extract_response(generated, prompt)
            cut = generated[len(prompt):]
            compare_text(f"example {number + 1}", expected, actual, [
                (cut.strip(), "'### Response:' was left in the answer: remove the heading too"),
                (generated.replace("### Response:", "").strip(),
                 "the answer still starts with the prompt: cut the first len(input_text) characters"),
                (cut.replace("### Response:", ""), "the line breaks around the answer were left "
                                                   "in: strip the whitespace at both ends"),
            ])
    return "It cuts the prompt and the '### Response:' heading from every generated text."


########################################################################################
# Exercise 7.1: the Phi-3 prompt; exercise 7.2: masking the instructions
########################################################################################

def _format_input_phi_problems(format_input_phi):
    for number, entry in enumerate(ENTRIES):
        expected = ev.format_input_phi(entry)
        actual = format_input_phi(copy.deepcopy(entry))
        compare_text(f"example {number + 1} ({'empty input' if not entry['input'] else 'with input'})",
                     expected, actual, [
            (gif.format_input(entry), "this is the chapter's Alpaca prompt; the Phi-3 prompt has no "
                                      "preamble and no '###' headings"),
            (expected + "\n<|assistant|>:\n", "the prompt ends before '<|assistant|>:'; the dataset "
                                              "adds that tag together with the answer"),
            (expected + "\n<|assistant|>:", "the prompt ends before '<|assistant|>:'; the dataset "
                                            "adds that tag together with the answer"),
            (expected + "\n", "a line for the input is added although the input is empty"),
            (expected.replace("\n", "\n\n"), "the parts are separated by an empty line; Phi-3 uses "
                                             "a single line break ('\\n')"),
            (expected.replace("<|user|>\n", "<|user|>", 1), "'<|user|>' needs a line break after it"),
            (expected.replace("<|user|>\n", "<|user|> ", 1), "'<|user|>' is followed by a line "
                                                             "break, not a space"),
            (ev.format_input_phi({**entry, "input": ""}) if entry["input"] else None,
             "the entry's input is missing: add it on its own line when there is one"),
        ])
    return "All examples (with and without an input) give the Phi-3 prompt."


MASK_MISTAKES = {
    1: "one target too many is masked: the target at position instruction_length - 1 is the "
       "first response token (targets are shifted by one), so mask targets[:instruction_length - 1]",
    -1: "one target too few is masked: the target at position instruction_length - 2 is still a "
        "prompt token, so mask targets[:instruction_length - 1]",
    None: "the prompt's targets were not masked: set targets[:instruction_length - 1] to "
          "ignore_index in each row",
}


def _masked_variant(shift_by=0, pad=EOT, ignore=-100, max_length=None, **collate_mistake):
    """(inputs, targets) of the masked collate, the right way (shift_by=0) or masking one prompt
    target too many (1), too few (-1) or none (None), over a collate with or without one of
    its own mistakes."""
    inputs, targets = _collate_variant([ids for _, ids in MASKED_BATCH], pad, ignore, None,
                                       **collate_mistake)
    for row, (length, _) in zip(targets, MASKED_BATCH, strict=True):
        if shift_by is not None:  # Python's slice, as targets[row, :stop] = ... has it
            stop = length - 1 + shift_by
            row[:stop] = [ignore] * len(row[:stop])
    return [row[:max_length] for row in inputs], [row[:max_length] for row in targets]


def _masking_problems(custom_collate_with_masking_fn):
    ref = ev.with_instruction_masking(gif.custom_collate_fn)
    for kwargs in ({}, {"allowed_max_length": 2, "ignore_index": -1}):
        expected = tuple(t.tolist() for t in ref(copy.deepcopy(MASKED_BATCH), **kwargs))
        args = _variant_args(kwargs)
        mistakes = [(_masked_variant(shift, **args), why) for shift, why in MASK_MISTAKES.items()]
        mistakes += [(_masked_variant(0, **args, **variant), why)
                     for variant, why in COLLATE_MISTAKES.values()]
        if kwargs:
            mistakes += [(_masked_variant(0, max_length=2), COLLATE_OPTIONS[1][1]),
                         (_masked_variant(0, ignore=-1), COLLATE_OPTIONS[0][1])]
        label = "the batch [(3, [0, 1, 2, 3, 4]), (2, [5, 6]), (1, [7, 8, 9])]" + (
            f" with {_options(kwargs)}" if kwargs else "")
        _check_collate(custom_collate_with_masking_fn, copy.deepcopy(MASKED_BATCH), expected,
                       mistakes, label, **kwargs)
    return "Each row's prompt targets are masked; the response and the first end-of-text are kept."


########################################################################################
# Exercise 7.4: LoRA
########################################################################################

def _close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def _lora_parts(module, what, in_dim, out_dim, rank):
    """The A and B parameters of a LoRA layer, checked for shape."""
    for name in ("A", "B"):
        if not isinstance(getattr(module, name, None), nn.Parameter):
            raise Wrong(f"{what} has no nn.Parameter named {name} (the chapter's names A and B "
                        "are what lora_state_dict and merge_lora look for)")
    a, b = module.A, module.B
    if tuple(a.shape) == (rank, in_dim) and tuple(b.shape) == (out_dim, rank):
        raise Wrong(f"{what}: A and B are transposed: A must be in_dim x rank = ({in_dim}, {rank}) "
                    f"and B rank x out_dim = ({rank}, {out_dim}), so that x @ A @ B works")
    for name, tensor, shape in (("A", a, (in_dim, rank)), ("B", b, (rank, out_dim))):
        if tuple(tensor.shape) != shape:
            raise Wrong(f"{what}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    return a, b


def _lora_layer_problems(LoRALayer):
    in_dim, out_dim, rank, alpha = 8, 6, 3, 2.0
    torch.manual_seed(0)
    layer = LoRALayer(in_dim, out_dim, rank, alpha)
    if not isinstance(layer, nn.Module):
        raise Wrong("LoRALayer must be a torch.nn.Module subclass, so that its parameters are "
                    "found, saved and trained")
    a, b = _lora_parts(layer, "LoRALayer(8, 6, rank=3, alpha=2)", in_dim, out_dim, rank)
    if b.detach().abs().sum() != 0:
        raise Wrong("B does not start at zero: it must, so that before training the layer adds "
                    "nothing and the model computes exactly what the pretrained one computes")
    if a.detach().abs().sum() == 0 or a.detach().std() == 0:
        raise Wrong("A starts at zero (or as one constant): with A like that and B zero, the "
                    "gradients cannot move the layer away from its start. Initialise A randomly, "
                    "as nn.Linear initialises its weights (Kaiming-uniform)")
    extra = [name for name, p in layer.named_parameters() if name not in ("A", "B")]
    if extra:
        raise Wrong(f"the layer has parameters besides A and B: {extra}; alpha is a fixed "
                    "number, not trained")
    x = torch.randn(2, 4, in_dim)
    with torch.no_grad():
        b.copy_(torch.randn(rank, out_dim))  # a trained B, so that the output is not zero
        actual = layer(x)
        product = x @ a @ b
    if not isinstance(actual, torch.Tensor):
        raise Wrong(f"forward returned {type(actual).__name__}, expected a tensor")
    if actual.shape != (2, 4, out_dim):
        raise Wrong(f"forward on x of shape (2, 4, 8) gives shape {tuple(actual.shape)}, "
                    f"expected (2, 4, {out_dim})")
    if not _close(actual, alpha * product):
        why = ("alpha is not applied: the update is alpha * (x @ A @ B)" if _close(actual, product)
               else "the update is scaled by alpha / rank; the chapter's LoRALayer multiplies by "
                    "alpha alone" if _close(actual, alpha / rank * product)
               else "forward must return alpha * (x @ A @ B)")
        raise Wrong(f"forward gives {actual.flatten()[0].item():.4f} at the first position, "
                    f"expected {alpha * product.flatten()[0].item():.4f}\nLikely mistake: {why}")
    return "A and B have the right shapes and start values, and forward computes alpha * (x @ A @ B)."


def _swap_linears(model, LinearWithLoRA, rank, alpha):
    """Replace every nn.Linear of `model` by the student's LinearWithLoRA (as the chapter does)."""
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            _swap_linears(module, LinearWithLoRA, rank, alpha)


def _count(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _linear_with_lora_problems(LinearWithLoRA):
    from instructkit.gpt2_sizes import gpt2_config
    from previous_chapters import GPTModel

    torch.manual_seed(0)
    linear, rank, alpha = nn.Linear(8, 6), 3, 2.0
    layer = LinearWithLoRA(linear, rank, alpha)
    what = "LinearWithLoRA(nn.Linear(8, 6), rank=3, alpha=2)"
    if getattr(layer, "linear", None) is not linear:
        raise Wrong(f"{what} must keep the layer it is given as self.linear (the pretrained "
                    "weights), not a new or copied one")
    if not isinstance(getattr(layer, "lora", None), nn.Module):
        raise Wrong(f"{what} must keep its LoRALayer as self.lora (the name the saved adapters' "
                    "keys, '....lora.A' and '....lora.B', use)")
    a, b = _lora_parts(layer.lora, f"{what}.lora", 8, 6, rank)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        base, start = linear(x), layer(x)
        if b.abs().sum() != 0:
            raise Wrong("its LoRA layer's B does not start at zero: it must, so that the wrapped "
                        "model computes exactly what the pretrained one computes before training")
        if not _close(start, base):
            why = ("the wrapped layer's output is missing: add linear(x)" if start.abs().sum() == 0
                   else "forward must return linear(x) + lora(x)")
            raise Wrong("before training the output differs from the wrapped layer's "
                        f"(first value {start.flatten()[0].item():.4f}, expected "
                        f"{base.flatten()[0].item():.4f})\nLikely mistake: {why}")
        b.copy_(torch.randn(rank, 6))  # a trained B
        actual, update = layer(x), alpha * (x @ a @ b)
    if not _close(actual, base + update):
        why = ("the wrapped layer's output is missing: add linear(x)" if _close(actual, update)
               else "the LoRA update is not added" if _close(actual, base)
               else "forward must return linear(x) + lora(x)")
        raise Wrong(f"with a trained B, forward gives {actual.flatten()[0].item():.4f} at the first "
                    f"position, expected {(base + update).flatten()[0].item():.4f}\nLikely mistake: {why}")

    torch.manual_seed(1)
    model = GPTModel(TINY_GPT).eval()  # a tiny random GPT
    tokens = torch.randint(0, TINY_GPT["vocab_size"], (2, 8))
    with torch.no_grad():
        before = model(tokens)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    model.requires_grad_(False)
    _swap_linears(model, LinearWithLoRA, 4, 8)
    with torch.no_grad():
        if not _close(model(tokens), before):
            raise Wrong("a tiny GPT with every nn.Linear wrapped computes other logits than before: "
                        "a fresh LinearWithLoRA must not change the model's output")
    trainable = _count(model)[0]
    expected = sum(4 * (m.in_features + m.out_features) for m in linears)
    if trainable != expected:
        raise Wrong(f"a tiny GPT, frozen, then wrapped with rank 4 has {trainable:,} trainable "
                    f"parameters, expected {expected:,} (rank x (in + out) per layer, A and B only)")

    with torch.device("meta"):  # GPT-2 medium's shapes, without memory or weights
        medium = GPTModel(gpt2_config("gpt2-medium"))
        medium.requires_grad_(False)
        _swap_linears(medium, LinearWithLoRA, 16, 16)
    trainable, total = _count(medium)
    if (trainable, total - trainable) != (LORA_MEDIUM_TRAINABLE, MEDIUM_TOTAL):
        raise Wrong(f"GPT-2 medium with rank 16: {trainable:,} trainable of {total - trainable:,} "
                    f"frozen parameters, expected {LORA_MEDIUM_TRAINABLE:,} of {MEDIUM_TOTAL:,}")
    return (f"forward is linear(x) + lora(x); on GPT-2 medium, rank 16 trains "
            f"{LORA_MEDIUM_TRAINABLE:,} of {MEDIUM_TOTAL:,} parameters, as in the book.")


########################################################################################
# The table of exercises, running a check, and reporting it
########################################################################################

@dataclass(frozen=True)
class Exercise:
    name: str  # what the student defines
    reference: object  # the chapter's function or class: the stub's signature, the right answer
    problems: object  # student's function -> a success note, or raises Wrong


EXERCISES = {e.name: e for e in (
    Exercise("format_input", gif.format_input, _format_input_problems),
    Exercise("custom_collate_fn", gif.custom_collate_fn, _custom_collate_fn_problems),
    Exercise("extract_response", gif.extract_response, _extract_response_problems),
    Exercise("format_input_phi", ev.format_input_phi, _format_input_phi_problems),
    Exercise("custom_collate_with_masking_fn", ev.with_instruction_masking(gif.custom_collate_fn),
             _masking_problems),
    Exercise("LoRALayer", ev.LoRALayer, _lora_layer_problems),
    Exercise("LinearWithLoRA", ev.LinearWithLoRA, _linear_with_lora_problems),
)}


def _student_frames(tb):
    """The traceback lines of the student's own code (not this file's, not a library's)."""
    libraries = {Path(p).resolve() for p in (torch.__file__, os.__file__)}
    lines = []
    for frame in traceback.extract_tb(tb):
        path = Path(frame.filename)
        if path.resolve() == Path(__file__).resolve() or any(
                lib.parent in path.resolve().parents for lib in libraries):
            continue
        where = "your cell" if not path.is_file() or "ipykernel" in frame.filename else path.name
        lines.append(f"{where}, line {frame.lineno}, in {frame.name}: {(frame.line or '').strip()}")
    return lines


def _unfinished(error, name):
    """Which of the student's functions raised `error` (a NotImplementedError) with a `raise
    NotImplementedError` line, named for the message: `name` itself, or a helper it calls.
    None when PyTorch raised it (an operation a device does not implement is a crash)."""
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    (frame,) = traceback.extract_tb(tb, limit=1)
    if not _student_frames(tb) or not (frame.line or "").startswith("raise NotImplementedError"):
        return None
    code = tb.tb_frame.f_code
    where = getattr(code, "co_qualname", code.co_name).rsplit("<locals>.", 1)[-1]
    if where in ("<module>", name) or where.startswith(name + "."):
        return name
    return f"{where}, which it calls,"


def check(name, function):
    """Run exercise `name`'s check on the student's `function` (or class); return a Result."""
    exercise = EXERCISES[name]
    try:
        note = exercise.problems(function)
    except Wrong as wrong:
        return Result(name, FAILED, str(wrong))
    except NotImplementedError as error:
        waiting = _unfinished(error, name)
        if waiting:
            return Result(name, NOT_DONE, f"{waiting} still raises NotImplementedError: replace "
                                          "that line with your code")
        return Result(name, CRASHED, "\n".join([f"NotImplementedError: {error}",
                                                *_student_frames(error.__traceback__)]))
    except Exception as error:  # noqa: BLE001 (the student's code: reported with its traceback)
        lines = [f"{type(error).__name__}: {error}"] + _student_frames(error.__traceback__)
        return Result(name, CRASHED, "\n".join(lines))
    return Result(name, PASSED, note or "")


def report(result):
    """Print the result; append it to the grader's results file when one is named."""
    print(result.text())
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(result)) + "\n")
    return result


def check_format_input(format_input):
    """Check the chapter's Alpaca prompt, `format_input(entry)`."""
    report(check("format_input", format_input))


def check_custom_collate_fn(custom_collate_fn):
    """Check the chapter's collate function: padding, the shift, the -100 mask, the options."""
    report(check("custom_collate_fn", custom_collate_fn))


def check_extract_response(extract_response):
    """Check `extract_response(response_text, input_text)`: the answer alone."""
    report(check("extract_response", extract_response))


def check_format_input_phi(format_input_phi):
    """Check exercise 7.1's Phi-3 prompt."""
    report(check("format_input_phi", format_input_phi))


def check_custom_collate_with_masking_fn(custom_collate_with_masking_fn):
    """Check exercise 7.2's collate function, which masks each prompt's targets."""
    report(check("custom_collate_with_masking_fn", custom_collate_with_masking_fn))


def check_lora_layer(LoRALayer):
    """Check exercise 7.4's LoRALayer."""
    report(check("LoRALayer", LoRALayer))


def check_linear_with_lora(LinearWithLoRA):
    """Check exercise 7.4's LinearWithLoRA (it needs a working LoRALayer)."""
    report(check("LinearWithLoRA", LinearWithLoRA))
