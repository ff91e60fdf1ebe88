"""The whole chapter as one command: data, GPT-2, finetuning, answers, saved files.

Not in the book. `python gpt_instruction_finetuning.py --help` (or this file) lists the
flags. Every default lives in one place, `FinetuneConfig`; the flags are built from its
fields. `main(config)` runs five named stages, which `exercise-solutions.ipynb` reuses:

    data = prepare_data(config)                        # 7.2-7.4: entries, split, loaders
    model = build_model(config, data.device)           # 7.5: GPT-2 with OpenAI's weights
    run = finetune(model, data, config)                # 7.6: losses before and during training
    results = answer_test_set(model, data, config)     # 7.7: greedy answers to the test set
    paths = save_outputs(model, run, results, data, config)  # plot, answers, weights

Training and answering use the fast paths of `fast_gpt.py` (same results as the book's
`train_model_simple` and `generate`, within float rounding). The exercises' switches
(`--prompt-style phi3`, `--mask-instructions`, `--lora-rank`, `--data`) compose the classes
of `exercise_variants.py`.

Long runs survive (not in the book): training runs in `resumable_training.TrainingRun`, which
checkpoints to OUTPUT_DIR/checkpoints every `--save-every` steps and on Ctrl-C (`--resume`
continues exactly, `--keep` prunes), appends each evaluation to `<stem>.metrics.jsonl` and
shows a progress bar; `--precision` picks the autocast (precision.py); beside the model goes
`<stem>.run.json` (run_record.py). `--weights-source` picks where GPT-2 comes from
(gpt_download.py; the hub sources need no TensorFlow), and the tokenizer is built from the
vocabulary files downloaded with the weights. The chapter's dataset is tried from its
sources in order and checked against its sha256. Data may be JSON or JSON Lines, split by
`--val-fraction`/`--test-fraction` (`--shuffle-split SEED`), answered up to
`--max-test-answers`.

Nothing lost, every bad input a clear error (not in the book): `main` checks everything cheap
first (`preflight.py`: flags, folders, data, hparams.json, disk space, before any download),
saves the weights, the plot and the run record as soon as training ends, before the slow
answers (`save_model`, then `save_answers`), and on Ctrl-C or SIGTERM at any stage says what
was saved, what was not and how to go on (`run_guard.py`).
"""

import random
import re
import sys
import time
import traceback
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from exercise_variants import (
    ALPACA,
    PROMPT_STYLES,
    InstructionDatasetWithMasking,
    InstructionDatasetWithStyle,
    custom_collate_with_masking_fn,
    generate_responses_with_style,
    lora_state_dict,
    merge_lora,
    output_suffix,
    prompt_style,
)
from gpt_download import WEIGHT_SOURCES
from gpt_instruction_finetuning import InstructionDataset, custom_collate_fn, get_device
from instructkit import CHAPTER_DIR as HERE  # noqa: E402
from instructkit.checkpoints import CheckpointError, list_checkpoints
from instructkit.distributed import DistributedError, SingleProcess, init_processes
from instructkit.errors import BadInputError, DownloadError
from instructkit.gpt2_sizes import (
    GPT2_SIZES,
    TEST_MODE_CONFIG,
    book_model_name,
    gpt2_config,
    model_folder,
    short_model_name,
)
from instructkit.instruction_data import CHAPTER_DATASET, DatasetError, load_instruction_file, split_data
from instructkit.precision import PRECISIONS, PrecisionError, resolve_precision
from instructkit.preflight import PreflightError, check_run, untrained_note, untrained_suffix
from instructkit.run_guard import RunProgress, exit_code, os_error_line, signals_interrupt
from instructkit.run_record import (
    dataset_fingerprint,
    metrics_path,
    plot_metrics,
    run_record_path,
    write_run_record,
)
from instructkit.safe_files import (
    ask_at_terminal,
    retry_while_disk_full,
    save_figure,
    save_state_dict,
    write_json,
)
from instructkit.training import RESUME_NEWEST, CheckpointPlan, TrainingInterrupted, TrainingRun

TEST_MODE_ENTRIES = 10  # entries per split in test mode


def option(default, help, **argparse_kwargs):
    """A config field with its command-line help (and e.g. `choices`, `aliases`)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class FinetuneConfig:
    """Every setting of a run, with the chapter's values as defaults."""

    model: str = option("gpt2-medium", "GPT-2 size (the chapter's: gpt2-medium)",
                        choices=list(GPT2_SIZES))
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
    models_dir: str | None = option(None, "where GPT-2 checkpoints are stored "
                                          "(default: gpt2/ next to this file)")
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
    prompt_style: str = option("alpaca", "exercise 7.1: the prompt style",
                               choices=list(PROMPT_STYLES))
    mask_instructions: bool = option(False, "exercise 7.2: compute the loss on the response "
                                            "tokens only")
    lora_rank: int | None = option(None, "exercise 7.4: train LoRA adapters of this rank "
                                         "instead of all weights")
    lora_alpha: float | None = option(None, "LoRA scaling (default: equal to the rank)")
    max_new_tokens: int = option(256, "the longest answer generated for a test entry")
    compile: bool = option(False, "torch.compile the transformer blocks (worth it on a GPU)")
    precision: str = option("auto", "auto: bf16 autocast on GPUs with bf16 hardware, fp16 with a "
                                    "gradient scaler on older CUDA GPUs, fp32 on the CPU and MPS",
                            choices=list(PRECISIONS))
    save_every: int | None = option(None, "write a checkpoint every N training steps (Ctrl-C "
                                          "always writes one)", metavar="N")
    keep: int = option(3, "checkpoints kept (the newest) in OUTPUT_DIR/checkpoints")
    resume: str | None = option(None, "continue from a checkpoint: PATH, or without PATH the "
                                      "newest of this run in OUTPUT_DIR/checkpoints",
                                nargs="?", const=RESUME_NEWEST, metavar="PATH")
    fsdp: bool = option(False, "under torchrun: shard the weights, gradients and optimizer state "
                               "over the processes (FSDP) instead of a whole copy on each (DDP)")
    max_steps: int | None = option(None, "stop after this many training steps in all, with a "
                                         "checkpoint (continue with --resume)", metavar="N")
    test_mode: bool = option(False, "a tiny random GPT and ~10 entries per split on the CPU: "
                                    "the whole pipeline in seconds, for checking the setup",
                             aliases=["--test-mode"], flag="--test_mode")

    def __post_init__(self):
        book_model_name(self.model)  # ValueError naming the choices
        prompt_style(self.prompt_style)


def build_arg_parser():
    """argparse from FinetuneConfig's fields: `--batch-size` for `batch_size`, and so on."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Finetune GPT-2 to follow instructions (chapter 7), end to end.")
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
            parser.add_argument(*names, dest=f.name, type=kind, default=f.default, **meta)
    return parser


#####################################
# Stage 1: the data (sections 7.2 to 7.4)
#####################################

@dataclass
class PreparedData:
    """What the later stages need from the data stage."""

    train_data: list
    val_data: list
    test_data: list
    train_loader: object
    val_loader: object
    tokenizer: object
    device: torch.device
    style: object  # an exercise_variants.PromptStyle
    data_name: str | None  # the stem of a dataset other than the chapter's, for file names
    dataset: dict | None = None  # run_record.dataset_fingerprint: path, sha256, bytes
    precision: object = None  # a precision.Precision for training on `device`
    # Not in the book: the processes torchrun started (distributed.py), or this one alone
    processes: object = field(default_factory=SingleProcess)


def load_entries(data_path, config):
    """The entries of `data_path` (JSON list or JSON Lines, instruction_data.load_instruction_file).

    The chapter's dataset (no --data) is downloaded when missing from its sources in order
    (GitHub, then a CDN mirror; --data-url replaces them) and must match its known sha256.
    A file of one's own is downloaded from --data-url only, unchecked.
    """
    if config.data is None:
        sources = (config.data_url,) if config.data_url else CHAPTER_DATASET.urls
        return load_instruction_file(data_path, sources, CHAPTER_DATASET.sha256)
    if config.data_url is None and not data_path.exists():
        raise DatasetError(f"{data_path} does not exist (pass --data-url to download it)")
    return load_instruction_file(data_path, [config.data_url] if config.data_url else None)


def split_entries(entries, config):
    """(train, test, validation): the chapter's split in order, with the config's fractions,
    after a seeded shuffle when `shuffle_split` is set."""
    val, test = config.val_fraction, config.test_fraction
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise DatasetError(f"--val-fraction {val} and --test-fraction {test} must each be above 0 "
                           f"and add up to less than 1 (the rest is for training).")
    if config.shuffle_split is not None:
        entries = list(entries)
        random.Random(config.shuffle_split).shuffle(entries)
    # rounded, so that 1 - 0.05 - 0.1 is the chapter's 0.85 and no fraction loses an entry to
    # floating point
    return split_data(entries, train_frac=round(1 - val - test, 12), test_frac=test)


def model_config(config):
    """The GPTModel config of this run: the tiny test-mode GPT, or the GPT-2 size's."""
    return TEST_MODE_CONFIG if config.test_mode else gpt2_config(config.model)


def prepare_data(config, processes=None):
    """Load (or download) the entries, split them 85/10/5, and build the training loaders.

    `processes`: distributed.init_processes()'s, made here when not given (torchrun's
    processes, or this one alone on the chosen device).
    """
    processes = processes or init_processes(choose_device(config.device, config.test_mode))
    batch_size = min(config.batch_size, 2) if config.test_mode else config.batch_size
    processes.check_batch_size(batch_size)  # before any work
    if config.fsdp and config.lora_rank:
        raise DistributedError("--fsdp with --lora-rank is not supported: LoRA trains few weights, "
                               "so DDP (the default under torchrun) fits wherever the model does.")
    data_path = dataset_path(config)
    with processes.local_main_first():  # one download per machine
        entries = load_entries(data_path, config)
    print(f"Number of entries: {len(entries)}")
    train_data, test_data, val_data = split_entries(entries, config)
    if config.test_mode:
        n = TEST_MODE_ENTRIES
        train_data, test_data, val_data = train_data[:n], test_data[:n], val_data[:n]
    print(f"Training set length: {len(train_data)}")
    print(f"Validation set length: {len(val_data)}")
    print(f"Test set length: {len(test_data)}")

    device = processes.device
    print(f"Device: {device}")
    if processes.world_size > 1:
        print(f"Processes: {processes.world_size} ({'FSDP' if config.fsdp else 'DDP'}), "
              f"{batch_size // processes.world_size} of each batch of {batch_size} on each")
    precision = resolve_precision(config.precision, device)
    print(precision.describe())
    # Not in the book: the tokenizer comes after the weights, from the vocabulary files that
    # their download brings (no tiktoken download needed)
    with processes.local_main_first():  # one download per machine (tiktoken's too)
        tokenizer = get_tokenizer(config.tokenizer_dir or download_weights(config))
    style = prompt_style(config.prompt_style)
    allowed_max_length = min(config.max_length, model_config(config)["context_length"])
    train_loader, val_loader = build_loaders(
        train_data, val_data, tokenizer, device, batch_size, allowed_max_length, style,
        config.mask_instructions, config.seed)
    truncated = sum(len(ids) + 1 > allowed_max_length
                    for split in (train_data, val_data, test_data)
                    for ids in make_dataset(split, tokenizer, style).encoded_texts)
    if truncated:
        print(f"Warning: {truncated} entries are longer than {allowed_max_length} tokens "
              f"and were truncated.")
    return PreparedData(train_data, val_data, test_data, train_loader, val_loader, tokenizer,
                        device, style, data_name(config), dataset_fingerprint(data_path.resolve()),
                        precision, processes)


def dataset_path(config):
    """--data, or the chapter's dataset next to this file."""
    return Path(config.data) if config.data is not None else HERE / CHAPTER_DATASET.file_name


def data_name(config):
    """The stem of a dataset other than the chapter's (for the outputs' names), else None."""
    path = dataset_path(config)
    return None if path.name == CHAPTER_DATASET.file_name else path.stem


def make_dataset(data, tokenizer, style=ALPACA, mask_instructions=False):
    """The dataset and collate function for a prompt style, with or without masking.

    The chapter's own `InstructionDataset` and `custom_collate_fn` when neither exercise
    switch is on; the exercises' classes otherwise.
    """
    if mask_instructions:
        return InstructionDatasetWithMasking(data, tokenizer, style)
    if style is ALPACA:
        return InstructionDataset(data, tokenizer)
    return InstructionDatasetWithStyle(data, tokenizer, style)


def build_loaders(train_data, val_data, tokenizer, device, batch_size, allowed_max_length,
                  style=ALPACA, mask_instructions=False, seed=123):
    """The chapter's training and validation loaders (section 7.4)."""
    from functools import partial

    from torch.utils.data import DataLoader

    collate = custom_collate_with_masking_fn if mask_instructions else custom_collate_fn
    collate = partial(collate, device=device, allowed_max_length=allowed_max_length)
    torch.manual_seed(seed)
    train_loader = DataLoader(make_dataset(train_data, tokenizer, style, mask_instructions),
                              batch_size=batch_size, collate_fn=collate, shuffle=True,
                              drop_last=True, num_workers=0)
    val_loader = DataLoader(make_dataset(val_data, tokenizer, style, mask_instructions),
                            batch_size=batch_size, collate_fn=collate, shuffle=False,
                            drop_last=False, num_workers=0)
    if len(train_loader) == 0:
        raise DatasetError(f"The training split has {len(train_data)} entries, fewer than one "
                           f"batch of {batch_size}: use a smaller --batch-size or more data.")
    return train_loader, val_loader


class DeviceError(BadInputError):
    """The requested device is not available."""


class TokenizerError(DownloadError):
    """tiktoken could not fetch GPT-2's vocabulary (offline, or a proxy in the way)."""


def choose_device(name=None, test_mode=False):
    """--device checked for availability; the chapter's `get_device()` when not given."""
    if name is None:
        return torch.device("cpu") if test_mode else get_device()
    kind = torch.device(name).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but is not available: this PyTorch build or "
                          "machine has no CUDA GPU. Use --device cpu (or mps on a Mac).")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS was requested but is not available (it needs an Apple "
                          "silicon Mac). Use --device cpu.")
    return torch.device(name)


def get_tokenizer(tokenizer_dir=None):
    """tiktoken's GPT-2 tokenizer; from `tokenizer_dir` when given (OpenAI's encoder.json +
    vocab.bpe, or the hub's vocab.json + merges.txt: gpt2_tokenizer.tokenizer_from_folder).

    Every weights download puts those files in e.g. gpt2/355M/, so a machine that has the
    weights builds the tokenizer offline too.
    """
    if tokenizer_dir is not None:
        from instructkit.gpt2_tokenizer import tokenizer_from_folder

        return tokenizer_from_folder(tokenizer_dir)
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except OSError as e:  # tiktoken downloads its vocabulary on first use
        raise TokenizerError(
            f"tiktoken could not download GPT-2's vocabulary ({e}). Connect to the internet "
            "once, or pass a folder holding encoder.json and vocab.bpe (--tokenizer-dir)."
        ) from None


def download_weights(config):
    """Download GPT-2's files for the run (reusing complete ones) and return their folder, if
    it holds the tokenizer's files; None in test mode, which needs no weights."""
    if config.test_mode:
        return None
    from gpt_download import download_gpt2
    from instructkit.gpt2_tokenizer import tokenizer_files

    folder = models_dir(config) / model_folder(config.model)
    download_gpt2(model_folder(config.model), models_dir(config), config.weights_source)
    return folder if tokenizer_files(folder) else None


def models_dir(config):
    return Path(config.models_dir) if config.models_dir is not None else HERE / "gpt2"


#####################################
# Stage 2: the model (section 7.5)
#####################################

# The book's measured minutes for 2 epochs (section 7.6).
BOOK_MINUTES = {
    "gpt2-medium": {"cpu": (15.78, "M3 MacBook Air CPU"), "mps": (10.77, "M3 MacBook Air GPU"),
                    "cuda": (0.86, "A100; 1.83 on an L4")},
    "gpt2-small": {"cpu": (5.74, "M3 MacBook Air CPU"), "cuda": (0.39, "A100")},
}


def build_model(config, device):
    """GPT-2 with OpenAI's weights (a tiny random GPT in test mode), LoRA layers if asked."""
    from exercise_variants import replace_linear_with_lora
    from previous_chapters import GPTModel, load_weights_into_gpt

    if config.test_mode:
        torch.manual_seed(config.seed)
        model = GPTModel(model_config(config))
        print("Test mode: a tiny random GPT, no weights downloaded.")
    else:
        from gpt_download import download_and_load_gpt2

        settings, params = download_and_load_gpt2(model_size=model_folder(config.model),
                                                  models_dir=models_dir(config),
                                                  source=config.weights_source)
        model = GPTModel(model_config(config))
        load_weights_into_gpt(model, params)
        del settings, params
    model.eval()

    if config.lora_rank:  # exercise 7.4: train low-rank adapters only
        model.requires_grad_(False)
        replace_linear_with_lora(model, rank=config.lora_rank,
                                 alpha=config.lora_alpha or config.lora_rank)
    model.to(device)
    describe_expected_cost(model, config.model, device, config.epochs, config.test_mode)
    return model


def describe_expected_cost(model, model_name, device, num_epochs, test_mode=False):
    """Print the estimated memory, and the book's runtime for this model and device."""
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # float32 weights, plus gradients and two AdamW moments for every trainable parameter
    gigabytes = (4 * n_params + 12 * n_trainable) / 1e9
    print(f"Parameters: {n_params:,} ({n_trainable:,} trainable); weights, gradients and "
          f"optimizer state need about {gigabytes:.1f} GB, plus activations.")
    book = BOOK_MINUTES.get(short_model_name(model_name), {}).get(torch.device(device).type)
    if test_mode:
        print("Test mode: training and answering take seconds.")
    elif book is not None:
        minutes, where = book
        print(f"Expect about {minutes * num_epochs / 2:.1f} min of training: the book's 2 epochs "
              f"of {book_model_name(model_name)} took {minutes} min ({where}).")


#####################################
# Stage 3: finetuning (section 7.6)
#####################################

# The settings that change what training computes: a checkpoint saved under others is
# refused. Left out on purpose: epochs (a run may be extended), eval_freq and eval_iter
# (the dropout-free GPT-2 trains the same whatever is evaluated), the device and precision
# (a run may move to other hardware), and the paths.
IDENTITY_FIELDS = ("model", "batch_size", "lr", "weight_decay", "max_length", "seed",
                   "prompt_style", "mask_instructions", "lora_rank", "lora_alpha",
                   "val_fraction", "test_fraction", "shuffle_split", "test_mode")


def output_names(config, data_name):
    """(output folder, file-name suffix, model file stem) of a run, e.g. 'gpt2-medium355M-sft'.

    A run that trains nothing (`--epochs 0`) adds '-untrained', so that it never replaces a
    finetuned model, its answers or its plot.
    """
    output_dir = Path(config.output_dir) if config.output_dir is not None else HERE
    suffix = output_suffix(config.prompt_style, config.mask_instructions, config.lora_rank,
                           config.test_mode, data_name) + untrained_suffix(config.epochs)
    return output_dir, suffix, re.sub(r"[ ()]", "", book_model_name(config.model)) + "-sft" + suffix


def checkpoint_plan(config, data):
    """Checkpoints in OUTPUT_DIR/checkpoints, named after the model file; what they must match."""
    output_dir, _, stem = output_names(config, data.data_name)
    identity = {"model_config": model_config(config), "dataset_sha256": data.dataset["sha256"],
                "config": {name: getattr(config, name) for name in IDENTITY_FIELDS}}
    identity["config"]["model"] = short_model_name(config.model)
    # Not in the book: at a terminal, a full disk waits for space instead of losing the run.
    return CheckpointPlan(output_dir / "checkpoints", stem, identity, config.save_every, config.keep,
                          wait_for_space=ask_at_terminal("The training state"))


def finetune(model, data, config):
    """The losses before training, then `config.epochs` epochs of AdamW (the chapter's loop in
    resumable_training.TrainingRun, on fast_gpt's packed loss).

    Writes the metrics file as it goes and checkpoints every `save_every` steps and on
    Ctrl-C (which then raises TrainingInterrupted); `resume` continues a checkpoint and
    `max_steps` stops early with one. Returns the losses, the tokens seen, the minutes taken
    and where the run stands ("finished", "steps", "checkpoint", ...).
    """
    from fast_gpt import compile_blocks, make_optimizer

    device = data.device
    if device.type == "cuda":  # Not in the book: TensorFloat-32 matrix products on the GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    plan = checkpoint_plan(config, data)
    initial_losses = None
    if config.resume is None:
        torch.manual_seed(config.seed)  # as the chapter does: the shuffled loader draws from it
        with torch.no_grad():
            initial_losses = (data.processes.calc_loss_loader(data.train_loader, model, device, 5),
                              data.processes.calc_loss_loader(data.val_loader, model, device, 5))
        print(f"Initial training loss: {initial_losses[0]:.3f}")
        print(f"Initial validation loss: {initial_losses[1]:.3f}")

    if config.compile:
        compile_blocks(model, dynamic=True)  # batch lengths vary from batch to batch
    data.processes.prepare_model(model, "fsdp" if config.fsdp else "ddp")  # before the optimizer
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    output_dir, _, stem = output_names(config, data.data_name)
    metrics_file = metrics_path(output_dir / f"{stem}.pth")  # written by process 0 only
    # seed: torch.manual_seed(config.seed), as the chapter does right before training
    run = TrainingRun(model, optimizer, data.train_loader, data.val_loader, device, config.seed,
                      data.precision, plan, metrics_file,
                      distributed=data.processes)
    run.resume_or_start(config.resume)
    start_time = time.time()
    train_losses, val_losses, tokens_seen = run.train(
        config.epochs, config.eval_freq, config.eval_iter,
        start_context=data.style.format_input(data.val_data[0]), tokenizer=data.tokenizer,
        max_steps=config.max_steps)
    minutes = (time.time() - start_time) / 60
    if run.finished:
        print(f"Training completed in {minutes:.2f} minutes.")
    else:
        print(f"Stopped after {run.state.step} steps (--max-steps); checkpoint saved as "
              f"{run.last_checkpoint}. Continue with --resume.")
    return {"train_losses": train_losses, "val_losses": val_losses, "tokens_seen": tokens_seen,
            "initial_losses": initial_losses, "minutes": minutes, "finished": run.finished,
            "steps": run.state.step, "wall_seconds": run.state.wall_seconds,
            "checkpoint": run.last_checkpoint, "resumed_from": run.resumed_from,
            "metrics_path": metrics_file, "precision": run.precision.name}


#####################################
# Stage 4: answering the test set (section 7.7)
#####################################

def answer_test_set(model, data, config, n_shown=3):
    """Greedy answers to the test entries (fast_gpt, batched); prints the first `n_shown`.

    Only the first `config.max_test_answers` entries when that is set (0: none). Returns the
    answered entries, each with its answer under "model_response".
    """
    entries = data.test_data
    if config.max_test_answers is not None:
        entries = entries[:max(config.max_test_answers, 0)]
        print(f"Answering {len(entries)} of the {len(data.test_data)} test entries "
              f"(--max-test-answers {config.max_test_answers}).")
    if not entries:
        return []
    processes = data.processes  # under torchrun, each answers its share of the entries
    with processes.full_weights(model):
        responses = processes.map_in_order(
            lambda shard: generate_responses_with_style(model, shard, data.tokenizer, data.style,
                                                        config.max_new_tokens, progress=processes.is_main),
            entries)
    results = [dict(entry, model_response=response)
               for entry, response in zip(entries, responses, strict=True)]
    for entry in results[:n_shown]:
        print(data.style.format_input(entry))
        print(f"\nCorrect response:\n>> {entry['output']}")
        print(f"\nModel response:\n>> {entry['model_response']}")
        print("-------------------------------------")
    return results


#####################################
# Stage 5: the outputs
#####################################

# What each output is, in words, for the message an interruption prints.
OUTPUT_NAMES = {"model": "the finetuned model", "adapters": "the LoRA adapters",
                "plot": "the loss plot", "responses": "the test answers",
                "run_record": "the run record"}


def output_paths(config):
    """Where a run writes: {"model", "plot", "responses", "metrics", "run_record" (and
    "adapters")}, named by output_names."""
    folder, suffix, file_stem = output_names(config, data_name(config))
    model = folder / f"{file_stem}.pth"
    paths = {"model": model, "plot": folder / f"loss-plot{suffix}.pdf",
             "responses": folder / f"instruction-data-with-response{suffix}.json",
             "metrics": metrics_path(model), "run_record": run_record_path(model)}
    if config.lora_rank:
        paths["adapters"] = folder / f"{file_stem}-adapters.pth"
    return paths


def save_model(model, run, data, config, paths, progress):
    """The finetuned weights, the loss plot and the run record, each written atomically and
    recorded in `progress`.

    A LoRA model is saved twice: its adapters alone, then merged (in place) into a plain
    GPTModel. The plot is drawn from the metrics file alone; no training, no plot.
    """
    weights = data.processes.full_state_dict(model)  # FSDP gathers its shards on every process
    if not data.processes.is_main:  # under torchrun, process 0 writes the files
        return
    # Not in the book: a disk that filled up during training need not lose the trained model;
    # at a terminal the user frees space and presses Enter (elsewhere: a one-line error).
    wait_for_space = ask_at_terminal("The trained model")
    if "adapters" in paths:
        adapters = lora_state_dict(model)
        retry_while_disk_full(lambda: save_state_dict(adapters, paths["adapters"]), wait_for_space)
        progress.record(OUTPUT_NAMES["adapters"], paths["adapters"])
        print(f"LoRA adapters saved as {paths['adapters']}")
        merge_lora(model)
        weights = model.state_dict()
    retry_while_disk_full(lambda: save_state_dict(weights, paths["model"]), wait_for_space)
    progress.record(OUTPUT_NAMES["model"], paths["model"])
    print(f"Model saved as {paths['model']}")
    if run["train_losses"]:
        save_figure(plot_metrics(run["metrics_path"], show=False), paths["plot"])
        progress.record(OUTPUT_NAMES["plot"], paths["plot"])
        print(f"Loss plot saved as {paths['plot']}")
    save_record(run, data, config, paths, progress)


def save_answers(results, run, data, config, paths, progress):
    """The answered test entries as JSON (none: no file), then the run record naming them."""
    if not data.processes.is_main:  # under torchrun, process 0 writes the files
        return
    if results:
        write_json(paths["responses"], results)
        progress.record(OUTPUT_NAMES["responses"], paths["responses"])
        print(f"Responses saved as {paths['responses']}")
    save_record(run, data, config, paths, progress)


def saved_paths(paths, progress):
    """The outputs written so far, the metrics file (written during training) included."""
    return {key: path for key, path in paths.items()
            if path in progress.saved.values() or key == "metrics"}


def save_record(run, data, config, paths, progress):
    """`<stem>.run.json` beside the model, naming the files written so far."""
    written = saved_paths(paths, progress)
    record = run_record(run, {**written, "run_record": paths["run_record"]}, data, config)
    write_run_record(paths["model"], record)
    first = OUTPUT_NAMES["run_record"] not in progress.saved
    progress.record(OUTPUT_NAMES["run_record"], paths["run_record"])
    if first:
        print(f"Run record saved as {paths['run_record']}")


def save_outputs(model, run, results, data, config):
    """The finetuned weights, the loss plot, the answers and the run record, each written
    atomically. Beside `<stem>.pth` go `<stem>.metrics.jsonl` (written during training) and
    `<stem>.run.json`. Returns {"model", "plot", "responses", "metrics", "run_record" (and
    "adapters")}: the paths written; no "responses" when no test entry was answered.
    """
    paths = output_paths(config)
    progress = RunProgress([])
    save_model(model, run, data, config, paths, progress)
    save_answers(results, run, data, config, paths, progress)
    return saved_paths(paths, progress)


def run_record(run, paths, data, config):
    """What `<stem>.run.json` holds: how the model beside it was made (run_record.py)."""
    settings = {key: str(value) if isinstance(value, Path) else value
                for key, value in asdict(config).items()}
    final = None
    if run["train_losses"]:
        final = {"train_loss": run["train_losses"][-1], "val_loss": run["val_losses"][-1]}
    return {
        "config": {**settings, "model": short_model_name(config.model)},
        "model_config": model_config(config), "versions": package_versions(),
        "device": str(data.device), "processes": data.processes.world_size,
        "precision": run["precision"], "dataset": data.dataset,
        "seed": config.seed, "wall_seconds": run["wall_seconds"], "final_losses": final,
        "steps": run["steps"], "tokens_seen": run["tokens_seen"][-1] if run["tokens_seen"] else 0,
        "resumed_from": str(run["resumed_from"]) if run["resumed_from"] else None,
        "files": {name: path.name for name, path in paths.items()},
    }


#####################################
# The stages in order, and the command line
#####################################

def package_versions(names=("matplotlib", "tiktoken", "torch", "tensorflow", "tqdm", "psutil")):
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def main(config=None):
    """Run the chapter with `config` (a FinetuneConfig; the chapter's defaults when None).

    Returns a dict with the losses, the responses, the paths written and the config.
    """
    config = FinetuneConfig() if config is None else config
    # Not in the book: under torchrun, one of several processes (distributed.py); only the
    # first prints and writes files.
    processes = init_processes(choose_device(config.device, config.test_mode))
    with processes.main_prints_only():
        result = run_stages(config, processes)
    processes.close()
    return result


def run_stages(config, processes):
    """main's stages, in `processes` (distributed.py)."""
    for name, value in package_versions().items():
        print(f"{name} version: {value}")
    paths = output_paths(config)
    # Not in the book: each output is saved as soon as it exists, the model before the slow
    # answers; an interruption says what was saved and what was not.
    progress = RunProgress(OUTPUT_NAMES[key] for key in paths if key in OUTPUT_NAMES
                           and (key != "plot" or config.epochs > 0))
    try:
        progress.start("checking the settings")
        check_before_run(config, paths)  # bad settings fail here, in seconds
        if config.epochs == 0:
            print(untrained_note(paths["model"]))
        progress.start("preparing the data")
        data = prepare_data(config, processes)
        progress.start("building the model")
        model = build_model(config, data.device)
        progress.start("training", hint=resume_hint(config, data))
        run = finetune(model, data, config)
        if not run["finished"]:  # --max-steps: the checkpoint is the output
            return {**run, "responses": None, "paths": {"checkpoint": run["checkpoint"]},
                    "config": asdict(config)}
        progress.start("saving the model")
        save_model(model, run, data, config, paths, progress)
        progress.start("answering the test set", hint=(
            "The saved model is complete (load-finetuned-model.ipynb shows how to load it); "
            "run the same command again to train and answer anew."))
        results = answer_test_set(model, data, config)
        progress.start("saving the answers")
        save_answers(results, run, data, config, paths, progress)
    except KeyboardInterrupt as e:
        if isinstance(e, TrainingInterrupted) and e.checkpoint is not None:
            progress.record("a checkpoint", e.checkpoint)
            progress.hint = resume_hint(config, data, e.checkpoint)
        print(f"\n{progress.interrupted_message()}", file=sys.stderr)
        raise
    return {**run, "responses": results, "paths": saved_paths(paths, progress),
            "config": asdict(config)}


def resume_hint(config, data, checkpoint=None):
    """How to go on after training stopped: from a checkpoint when there is one, else afresh."""
    plan = checkpoint_plan(config, data)
    if checkpoint is None and not list_checkpoints(plan.folder, plan.stem):
        return None  # nothing to resume: RunProgress says "start over"
    newest = f" or with --resume {checkpoint}" if checkpoint is not None else ""
    return (f"To continue, run the same command with --resume (it takes the newest checkpoint "
            f"in {plan.folder}){newest}.")


def check_before_run(config, paths):
    """preflight.check_run for this config: before any download, model build or training."""
    data_url = config.data_url or (CHAPTER_DATASET.urls[0] if config.data is None else None)
    return check_run(config, paths["model"].parent, paths.values(), dataset_path(config),
                     data_url, model_config(config),
                     None if config.test_mode else models_dir(config),
                     split=lambda entries: split_entries(entries, config))


def cli(argv=None):
    """The command line: parse, run `main`, turn known problems into a message and an exit code."""
    parser = build_arg_parser()
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an unexpected error (a full disk, ...)")
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")
    config = FinetuneConfig(**args)
    import matplotlib

    matplotlib.use("Agg")  # save plots to files; no window
    from gpt_download import DownloadError

    try:
        with signals_interrupt():  # SIGTERM stops the run as Ctrl-C does, with the same message
            main(config)
    except (PreflightError, DatasetError, DeviceError, FileNotFoundError, CheckpointError,
            PrecisionError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DownloadError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # main said what was saved and how to go on
        return exit_code(e)  # 130 for Ctrl-C, 143 for SIGTERM
    except OSError as e:  # Not in the book: one line, not a traceback from deep in a library
        if debug:
            traceback.print_exc()
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
