"""Talk to a finetuned model from a terminal.

    python -m instructkit.chat MODEL.pth "Rewrite the sentence using a simile." --input "The car is fast."
    python -m instructkit.chat MODEL.pth < instructions.txt      # one instruction a line, answered in batches
    python -m instructkit.chat MODEL.pth < entries.jsonl         # {"instruction": ..., "input": ...} a line
    python -m instructkit.chat MODEL.pth                         # an interactive prompt (Ctrl-D leaves;
                                                                 # Ctrl-Z then Enter on Windows)
    python -m instructkit.chat MODEL-adapters.pth "..."   # a LoRA run's adapters on the pretrained GPT-2
    python -m instructkit.chat BASE.pth --adapters MODEL-adapters.pth "..."   # ... or on a base .pth

Not in the book. Any GPT-2 size: the config comes from the run record beside the weights, or
from the weights' shapes (model_files.py). A finetuned hub model (Qwen3, Llama 3.2, SmolLM2)
is rebuilt from the hub folder its run record names, with its own tokenizer and prompt
style. Answers stream token by token through the KV cache (fast_gpt.generate_stream, or
fast_llm's); greedy is the default, and then an answer equals the one
`generate` gives for the prompt. Many instructions from stdin are answered in batches
(fast_gpt.generate_answer_ids), the same answers as one at a time, each printed as soon as its
batch is done (a pipe is read as it comes). JSONL in gives JSONL out (each entry with its
"model_response"); plain lines give the answers, a blank line between. Ctrl-C or SIGTERM
there keeps every finished answer, says how many were not answered, and exits 130 or 143.
A missing, empty or mismatched file is a message and exit code 2, and so is a flag out of
range (`--temperature` below 0 or not finite, `--top-k` below 0 or above the vocabulary,
`--batch-size` or `--max-new-tokens` below 1), checked before the model loads (the vocabulary
right after, before anything is generated).
"""

import argparse
import codecs
import contextlib
import io
import json
import os
import queue
import stat
import sys
import threading
import time

from instructkit.console import BOM, read_stdin, use_utf8_console
from instructkit.errors import BadInputError, ExpectedError
from instructkit.model_files import add_model_arguments, check_model_path, describe, load_chat_model
from instructkit.parallel_matvec import add_decode_arguments, apply_decode_arguments
from instructkit.preflight import Limit, PreflightError, check_ranges
from instructkit.run_guard import exit_code, interrupts_deferred, signals_interrupt

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


def parse_entry(number, line, jsonl):
    """One non-blank stdin line -> its entry: a JSON object with an "instruction" string when
    `jsonl`, else the line is the instruction."""
    if not jsonl:
        return {"instruction": line.strip(), "input": ""}
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"stdin line {number} is not JSON ({e}); give JSONL throughout, "
                         f"or plain instructions, one a line") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("instruction"), str):
        raise InputError(f"stdin line {number} has no \"instruction\" string: {line[:80]}")
    return {**entry, "input": entry.get("input") or ""}


class StdinEntries:
    """The entries on stdin, taken a batch at a time as the lines arrive.

    A pipe (`producer | chat`) is read by a thread as it comes, so the first answers need not
    wait for the last line, and a pipe left open is answered line by line. A file, or a stream
    without a file descriptor, is read at once. The first non-blank line says JSONL or plain
    lines; each line is checked when it is read (a bad one is an InputError then).
    `read`: the entries read so far; `ended`: whether stdin has been read to its end.
    """

    WAIT_FOR_MORE = 0.2  # seconds a batch waits for more lines before it is answered short

    def __init__(self, stream=None):
        stream = sys.stdin if stream is None else stream
        self.jsonl, self.read, self.ended, self._number = None, 0, False, 0
        self._lines = queue.Queue()
        self._pending = []  # entries read and not yet handed out
        if _is_pipe(stream):
            threading.Thread(target=self._read_pipe, args=(stream,), daemon=True).start()
        else:
            for line in read_stdin(stream).split("\n"):  # UTF-8, without a leading BOM
                self._lines.put(line)
            self._lines.put(None)

    def _read_pipe(self, stream):
        """The thread: the pipe's lines into the queue as they arrive, then None (the end).
        It reads the file descriptor itself: a thread blocked in sys.stdin's own reader would
        hold its lock at the interpreter's exit."""
        decoder = codecs.getincrementaldecoder(getattr(stream, "encoding", None) or "utf-8")(
            getattr(stream, "errors", None) or "strict")
        text, first = "", True
        try:
            while True:
                data = os.read(stream.fileno(), 1 << 16)
                text += decoder.decode(data, final=not data)
                if first and text:
                    text, first = text.removeprefix(BOM), False
                *lines, text = text.split("\n")
                for line in lines:
                    self._lines.put(line)
                if not data:
                    break
            self._lines.put(text)
        except (OSError, UnicodeDecodeError) as e:
            self._lines.put(InputError(f"stdin could not be read: {e}"))
        self._lines.put(None)

    def _take(self, timeout):
        """Parse the next line into `_pending`; False once there is none within `timeout`
        (None: until one comes) or stdin has ended."""
        if self.ended:
            return False
        # in short waits: a lock that waits without a timeout is deaf to Ctrl-C on Windows
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.5 if deadline is None else deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(wait, 0))
                break
            except queue.Empty:
                if deadline is not None:
                    return False
        if line is None:
            self.ended = True
            return False
        if isinstance(line, Exception):
            raise line
        self._number += 1
        if line.strip():
            if self.jsonl is None:
                self.jsonl = line.lstrip().startswith("{")
            self._pending.append(parse_entry(self._number, line.rstrip("\r"), self.jsonl))
            self.read += 1
        return True

    def batches(self, size):
        """Lists of up to `size` entries, in stdin's order: a batch is handed out when it is
        full, when stdin ends, or when no line has come for WAIT_FOR_MORE seconds."""
        while True:
            while not self._pending and self._take(None):
                pass
            while self._take(0):  # every line already there is read and checked
                pass
            while len(self._pending) < size and self._take(self.WAIT_FOR_MORE):
                pass
            if not self._pending:
                return
            batch, self._pending = self._pending[:size], self._pending[size:]
            yield batch

    def count_waiting(self):
        """Read (and count) the lines that have arrived and not been handed out; a bad one is
        counted too."""
        with contextlib.suppress(InputError):
            while self._take(0):
                pass
        return self.read


def _is_pipe(stream):
    """Whether `stream` is a pipe, a FIFO, a socket or a device: read as it comes. A regular
    file, or a stream with no file descriptor (a test's), is read at once."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
    return not stat.S_ISREG(mode)


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
    """Answer stdin's instructions in batches, each answer printed as soon as its batch is done,
    in stdin's order. Ctrl-C or SIGTERM stops: every finished answer has been printed (a line
    being printed is finished first), stderr says how many were not answered, and the exit
    code is 130 or 143 (0 when all are answered)."""
    stdin, answered = None, 0
    try:
        with signals_interrupt():  # SIGTERM stops as Ctrl-C does
            stdin = StdinEntries()
            # sampling answers one at a time (batches are greedy)
            for batch in stdin.batches(1 if args.temperature > 0 else args.batch_size):
                answers = answer_batch(chat, batch, args)
                with interrupts_deferred():  # the finished answers come out whole
                    for entry, (text, note) in zip(batch, answers, strict=True):
                        if note:
                            print(f"Entry {answered + 1}: {note}", file=sys.stderr)
                        line = (json.dumps({**entry, "model_response": text}, ensure_ascii=False)
                                if stdin.jsonl else ("\n" if answered else "") + text)
                        sys.stdout.write(line + "\n")
                        sys.stdout.flush()
                        answered += 1
    except KeyboardInterrupt as e:
        read = 0 if stdin is None else stdin.count_waiting()
        unread = "" if stdin and stdin.ended else " (stdin had not ended: later lines were not read)"
        print(f"\nstopped: {answered} of {read} answered; {read - answered} not answered{unread}",
              file=sys.stderr)
        return exit_code(e)
    return 0


def answer_batch(chat, entries, args):
    """[(answer, note)] for `entries`: greedy ones as one batch, sampled ones one at a time."""
    if args.temperature <= 0:
        return chat.answer_all(entries, args.max_new_tokens, args.batch_size)
    answers = []
    for entry in entries:
        prompt, ids, note = chat.prepare(entry["instruction"], entry["input"], args.max_new_tokens)
        *_, text = chat.stream(prompt, ids, args.max_new_tokens, args.temperature,
                               args.top_k, args.seed)
        answers.append((text, note))
    return answers


def interactive(chat, args):
    from instructkit.console import end_of_input_keys

    print("Type an instruction, Enter, then an optional input (Enter for none). "
          f"Ctrl-C stops an answer; {end_of_input_keys()} leaves.", file=sys.stderr)
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
        # without --tokenizer-dir: GPT-2's default, or a hub model's own (load_chat_model)
        tokenizer = get_tokenizer(args.tokenizer_dir) if args.tokenizer_dir else None
        chat, info = load_chat_model(args.model, device, adapters=args.adapters, tokenizer=tokenizer)
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
            return answer_stdin(chat, args)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    else:
        interactive(chat, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
