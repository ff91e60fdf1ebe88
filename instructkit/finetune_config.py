"""Every setting of a finetuning run, and the command line built from them.

`FinetuneConfig` holds each flag's default (the chapter's values) and its help text; the
flags of `python gpt_instruction_finetuning.py` (the same as `python -m instructkit.finetune`)
are built from its fields, so a new setting is one field here. `parse_finetune_args` reads
the command line.
"""

import typing
from dataclasses import dataclass, field, fields

from instructkit import parallel_matvec
from instructkit.chat_template_style import STYLE_NAME
from instructkit.errors import BadInputError
from instructkit.gpt2_sizes import GPT2_SIZES, book_model_name
from instructkit.gpt2_weights import WEIGHT_SOURCES
from instructkit.hub_models import SHORT_NAMES
from instructkit.precision import PRECISIONS
from instructkit.training import RESUME_NEWEST

TEST_MODE_ENTRIES = 10  # entries per split in test mode, as the book's script takes
# --prompt-style's choices: the chapter's style and exercise 7.1's (the styles themselves are
# gpt_instruction_finetuning.PROMPT_STYLES, which imports this module), and a hub model's own
# chat template (instructkit/chat_template_style.py)
PROMPT_STYLE_NAMES = ("alpaca", "phi3", STYLE_NAME)


def model_name(name, error=None):
    """`name` if --model may take it: a GPT-2 name (gpt2_sizes' three kinds), a hub short name
    or a repository id; else `error` (argparse's ArgumentTypeError when None) naming the
    choices."""
    import argparse

    from instructkit.hub_models import resolve_model_name

    try:
        book_model_name(name)
        return name
    except ValueError:
        pass
    try:
        resolve_model_name(name)
        return name
    except BadInputError:
        pass
    raise (error or argparse.ArgumentTypeError)(
        f"invalid choice: {name!r} (choose one of {', '.join(GPT2_SIZES)}, or the book's names, "
        f"e.g. 'gpt2-medium (355M)'; a hub model's short name: {', '.join(SHORT_NAMES)}; or a "
        f"hub repository id, owner/name)")


def option(default, help, **argparse_kwargs):
    """A config field with its command-line help (and e.g. `choices`, `aliases`)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class FinetuneConfig:
    """Every setting of a run, with the chapter's values as defaults."""

    model: str = option("gpt2-medium", "a GPT-2 size (the chapter's: gpt2-medium; "
                                       f"{', '.join(GPT2_SIZES)}), or a Qwen3 or Llama-architecture "
                                       "model from the Hugging Face hub: a short name "
                                       f"({', '.join(SHORT_NAMES)}) or a repository id "
                                       "(Qwen/Qwen3-0.6B-Base); gated ones (Llama 3.2) take "
                                       "HF_TOKEN or the hub's login", type=model_name)
    data: str | None = option(None, "instruction JSON: a list of {instruction, input, output} "
                                    "(default: the chapter's dataset, downloaded on first run)")
    data_url: str | None = option(None, "download --data from this URL when the file is missing "
                                        "(default: the chapter's dataset URL without --data)")
    val_fraction: float = option(0.05, "share of the entries for validation: the last ones, as "
                                       "in the chapter's 85/10/5 split")
    test_fraction: float = option(0.1, "share of the entries for the test split, which follows "
                                       "the training split")
    shuffle_split: int | None = option(None, "shuffle the entries with this seed before splitting "
                                             "(default: the file's order, as in the chapter)",
                                       metavar="SEED")
    check_data: float | None = option(None, "before training, check the run's data and split "
                                            "(python -m instructkit.check_data): duplicates and "
                                            "test entries leaking into training at this TF-IDF "
                                            "similarity (0.9 without a value) warn, empty "
                                            "outputs stop the run", nargs="?", const=0.9,
                                      metavar="THRESHOLD")
    max_test_answers: int | None = option(None, "answer only the first N test entries, 0 for "
                                                "none (default: all)", metavar="N")
    epochs: int = option(2, "training epochs")
    batch_size: int = option(8, "entries per training batch")
    lr: float = option(5e-5, "AdamW learning rate")
    weight_decay: float = option(0.1, "AdamW weight decay")
    max_length: int = option(1024, "truncate training sequences to this many tokens")
    seed: int = option(123, "random seed for the model (test mode), shuffling and training")
    eval_freq: int = option(5, "print the training and validation losses every this many steps")
    eval_iter: int = option(5, "batches each of those losses averages over")
    device: str | None = option(None, "cuda, mps or cpu (default: the best available)")
    models_dir: str | None = option(None, "where GPT-2 checkpoints are stored (default: gpt2/ "
                                          "next to this file), and hub models as "
                                          "<owner>--<name>/ (default: models/ next to this file)")
    output_dir: str | None = option(None, "where responses, model and plot go "
                                          "(default: next to this file)")
    weights_source: str = option("auto", "where GPT-2's weights come from: openai (TensorFlow "
                                         "checkpoint, needs tensorflow), hub-book or hub-openai "
                                         "(Hugging Face hub; HF_ENDPOINT names a mirror); auto: "
                                         "what is complete on disk, else hub-openai",
                                 choices=list(WEIGHT_SOURCES))
    tokenizer_dir: str | None = option(None, "a folder with GPT-2's encoder.json and vocab.bpe, "
                                             "or vocab.json and merges.txt (default: those beside "
                                             "the weights, else tiktoken's download)")
    prompt_style: str = option("alpaca", "exercise 7.1: the prompt style; chat: a hub model's "
                                         "own chat template (Qwen3, SmolLM2)",
                               choices=list(PROMPT_STYLE_NAMES))
    mask_instructions: bool = option(False, "exercise 7.2: compute the loss on the response "
                                            "tokens only")
    lora_rank: int | None = option(None, "exercise 7.4: train LoRA adapters of this rank "
                                         "instead of all weights")
    lora_alpha: float | None = option(None, "LoRA scaling (default: equal to the rank)")
    max_new_tokens: int = option(256, "the longest answer generated for a test entry")
    decode_dtype: str = option("fp32", "weights for answering the test entries: fp32, or bf16 "
                                       "copies read at half the bytes (answers may differ)",
                               choices=list(parallel_matvec.DECODE_DTYPES))
    decode_matvec: str | None = option(None, "decode steps: products split over the CPU's cores "
                                             "(parallel), not (plain), the whole step in C "
                                             "(native: fp32, batch 1), or chosen by a short "
                                             f"measurement (auto; also {parallel_matvec.ENV_VAR})",
                                       choices=list(parallel_matvec.MODES))
    compile: bool = option(False, "torch.compile the transformer blocks (worth it on a GPU)")
    precision: str = option("auto", "auto: bf16 autocast on GPUs of compute capability 8.0 and "
                                    "above, fp16 with a gradient scaler at 7.x, fp32 below 7.0 "
                                    "and on the CPU and MPS",
                            choices=list(PRECISIONS))
    save_every: int | None = option(None, "write a checkpoint every N training steps (Ctrl-C "
                                          "always writes one)", metavar="N")
    keep: int = option(3, "checkpoints of this run kept (the highest steps) in "
                          "OUTPUT_DIR/checkpoints; other runs' are never deleted")
    resume: str | None = option(None, "continue from a checkpoint: PATH, or without PATH this "
                                      "run's of the highest step in OUTPUT_DIR/checkpoints",
                                nargs="?", const=RESUME_NEWEST, metavar="PATH")
    fsdp: bool = option(False, "under torchrun: shard the weights, gradients and optimizer state "
                               "over the processes (FSDP) instead of a whole copy on each (DDP)")
    max_steps: int | None = option(None, "stop after this many training steps in all, with a "
                                         "checkpoint (continue with --resume)", metavar="N")
    test_mode: bool = option(False, "a tiny random GPT and ~10 entries per split on the CPU: "
                                    "the whole pipeline in seconds, for checking the setup",
                             aliases=["--test-mode"], flag="--test_mode")

    def __post_init__(self):
        model_name(self.model, ValueError)  # naming the choices
        if self.prompt_style not in PROMPT_STYLE_NAMES:
            raise ValueError(f"Unknown prompt style {self.prompt_style!r}; choose one of "
                             f"{', '.join(PROMPT_STYLE_NAMES)}")


def build_arg_parser():
    """argparse from FinetuneConfig's fields: `--batch-size` for `batch_size`, and so on."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="gpt_instruction_finetuning.py",
        description="Finetune GPT-2 (or a Qwen3 or Llama-architecture model of the Hugging Face "
                    "hub) to follow instructions (chapter 7), end to end.")
    hints = typing.get_type_hints(FinetuneConfig)
    for f in fields(FinetuneConfig):
        meta = dict(f.metadata)
        if f.default not in (None, False) and "default" not in meta["help"]:
            meta["help"] += f" (default: {f.default})"
        names = [meta.pop("flag", "--" + f.name.replace("_", "-")), *meta.pop("aliases", [])]
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", **meta)
        else:
            kind = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            kind = meta.pop("type", kind)  # a check of its own (--model)
            parser.add_argument(*names, dest=f.name, type=kind, default=f.default, **meta)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an OSError (a permission, a failing disk, ...)")
    return parser


def parse_finetune_args(argv=None):
    """(FinetuneConfig, debug) from the command line (sys.argv when `argv` is None)."""
    args = vars(build_arg_parser().parse_args(argv))
    debug = args.pop("debug")
    return FinetuneConfig(**args), debug


def run_finetune_command(main, argv=None):
    """The finetuning command line: parse `argv` (sys.argv when None), call `main(config=...)`
    (gpt_instruction_finetuning.main), and return the exit code (instructkit/errors.py)."""
    from instructkit.console import use_utf8_console

    use_utf8_console()  # UTF-8 out and in, even into a file or a pipe on Windows
    import matplotlib

    from instructkit.errors import run_command

    matplotlib.use("Agg")  # plots go to files; no window
    config, debug = parse_finetune_args(argv)
    return run_command(lambda: main(config=config), debug=debug)
