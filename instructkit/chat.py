"""Talk to a finetuned model from a terminal.

    python -m instructkit.chat MODEL.pth "Rewrite the sentence using a simile." --input "The car is fast."
    python -m instructkit.chat MODEL.pth < instructions.txt      # one instruction a line, answered in batches
    python -m instructkit.chat MODEL.pth < entries.jsonl         # {"instruction": ..., "input": ...} a line
    python -m instructkit.chat MODEL.pth                         # an interactive prompt (Ctrl-D to leave)
    python -m instructkit.chat MODEL-adapters.pth "..."   # a LoRA run's adapters on the pretrained GPT-2
    python -m instructkit.chat BASE.pth --adapters MODEL-adapters.pth "..."   # ... or on a base .pth

Not in the book. Any GPT-2 size: the config comes from the run record beside the weights, or
from the weights' shapes (model_files.py). Answers stream token by token through the KV
cache (fast_gpt.generate_stream); greedy is the default, and then an answer equals the one
`generate` gives for the prompt. Many instructions from stdin are answered in batches
(fast_gpt.generate_answer_ids), the same answers as one at a time. JSONL in gives JSONL out
(each entry with its "model_response"); plain lines give the answers, a blank line between.
A missing, empty or mismatched file is a message and exit code 2, and so is a flag out of
range (`--temperature` below 0 or not finite, `--top-k` below 0 or above the vocabulary,
`--batch-size` or `--max-new-tokens` below 1), checked before the model loads (the vocabulary
right after, before anything is generated).
"""

import argparse
import json
import sys

from instructkit.console import read_stdin, use_utf8_console
from instructkit.errors import BadInputError, ExpectedError
from instructkit.model_files import add_model_arguments, check_model_path, describe, load_chat_model
from instructkit.parallel_matvec import add_decode_arguments, apply_decode_arguments
from instructkit.preflight import Limit, PreflightError, check_ranges

EXIT_BAD_INPUT = 2
# The ranges of the numeric flags, checked before the model loads (--top-k's upper bound, the
# vocabulary, once it has).
LIMITS = {"max_new_tokens": Limit(1), "temperature": Limit(0),  # 0: greedy
          "top_k": Limit(0),  # 0: every token, as leaving it out
          "seed": Limit(0, 2**64 - 1),  # what torch.manual_seed accepts
          "batch_size": Limit(1)}


class InputError(BadInputError):
    """Instructions on stdin that cannot be read."""


def build_arg_parser():
    parser = argparse.ArgumentParser(
        description="Talk to a finetuned GPT-2: one instruction, many from stdin, or a prompt.")
    add_model_arguments(parser)
    parser.add_argument("instruction", nargs="?", help="answer this one instruction and exit")
    parser.add_argument("--input", default="", help="the optional input (### Input:) for the instruction")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling, per answer")
    parser.add_argument("--batch-size", type=int, default=16, help="stdin: prompts per batch")
    add_decode_arguments(parser)
    return parser


def check_arguments(args):
    """PreflightError or ModelFileError (one line, exit code 2) for a flag out of range or a
    model file that cannot be one, before anything loads."""
    check_ranges(args, LIMITS)
    check_model_path(args.model)
    if args.adapters is not None:
        check_model_path(args.adapters, "adapter file")


def check_top_k(top_k, chat):
    """--top-k above the model's vocabulary would fail at the first token: refused, naming it."""
    vocab_size = chat.model.tok_emb.weight.shape[0]
    if top_k is not None and top_k > vocab_size:
        raise PreflightError(f"--top-k {top_k} is more than the model's vocabulary of "
                             f"{vocab_size} tokens: use at most {vocab_size} (0 samples from all)")


def read_entries(text):
    """stdin's text -> entries: JSONL when every line is a JSON object, else one instruction a line."""
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines or not lines[0][1].lstrip().startswith("{"):
        return [{"instruction": line.strip(), "input": ""} for _, line in lines], False
    entries = []
    for number, line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"stdin line {number} is not JSON ({e}); give JSONL throughout, "
                             f"or plain instructions, one a line") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("instruction"), str):
            raise InputError(f"stdin line {number} has no \"instruction\" string: {line[:80]}")
        entries.append({**entry, "input": entry.get("input") or ""})
    return entries, True


def stream_to(out, chat, instruction, input_text, args):
    """Print one answer as it is generated; returns its final text."""
    prompt, ids, note = chat.prepare(instruction, input_text, args.max_new_tokens)
    if note:
        print(note, file=sys.stderr)
    shown = answer = ""
    for answer in chat.stream(prompt, ids, args.max_new_tokens, args.temperature, args.top_k,
                              args.seed):
        if answer.startswith(shown):  # else the text changed (a tag completed): wait
            out.write(answer[len(shown):])
            out.flush()
            shown = answer
    if not answer.startswith(shown):
        out.write("\n" + answer)  # rare: the final text does not continue what was shown
    out.write("\n")
    out.flush()
    return answer


def answer_stdin(chat, args):
    entries, jsonl = read_entries(read_stdin())  # UTF-8, without a leading BOM
    if args.temperature > 0:  # sampling: one at a time (batches are greedy)
        answers = []
        for entry in entries:
            prompt, ids, note = chat.prepare(entry["instruction"], entry["input"], args.max_new_tokens)
            *_, text = chat.stream(prompt, ids, args.max_new_tokens, args.temperature,
                                   args.top_k, args.seed)
            answers.append((text, note))
    else:
        answers = chat.answer_all(entries, args.max_new_tokens, args.batch_size)
    for i, (entry, (text, note)) in enumerate(zip(entries, answers, strict=True)):
        if note:
            print(f"Entry {i + 1}: {note}", file=sys.stderr)
        if jsonl:
            print(json.dumps({**entry, "model_response": text}, ensure_ascii=False))
        else:
            print(("\n" if i else "") + text)


def interactive(chat, args):
    print("Type an instruction, Enter, then an optional input (Enter for none). "
          "Ctrl-C stops an answer; Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            instruction = input("\nInstruction> ").strip()
            if not instruction:
                print("(empty: type an instruction)", file=sys.stderr)
                continue
            input_text = input("Input> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        try:
            stream_to(sys.stdout, chat, instruction, input_text, args)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)


def main(argv=None):
    use_utf8_console()  # answers in any script, even into a file or a pipe on Windows
    args = build_arg_parser().parse_args(argv)
    from instructkit.devices import choose_device
    from instructkit.gpt2_tokenizer import get_tokenizer

    # A RuntimeError here is a bug, not a user's problem: it keeps its traceback (a file that
    # does not fit its model is a ModelFileError, found where the file is read).
    try:
        check_arguments(args)
        device = choose_device(args.device)
        chat, info = load_chat_model(args.model, device, adapters=args.adapters,
                                     tokenizer=get_tokenizer(args.tokenizer_dir))
        check_top_k(args.top_k, chat)
        chat.decode_dtype = apply_decode_arguments(args)
    except ExpectedError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"Loaded {describe(info)} on {device}", file=sys.stderr)

    if args.instruction is not None:
        stream_to(sys.stdout, chat, args.instruction, args.input, args)
    elif not sys.stdin.isatty():
        try:
            answer_stdin(chat, args)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    else:
        interactive(chat, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
