"""The whole chapter as one command: data, GPT-2, finetuning, answers, saved files.

Not in the book. `python gpt_instruction_finetuning.py --help` (or this file) lists the
flags. Every default lives in one place, `FinetuneConfig`; the flags are built from its
fields. `main(config)` runs five named stages, which `exercise-solutions.ipynb` reuses:

    data = prepare_data(config)                        # 7.2-7.4: entries, split, loaders
    model = build_model(config, data.device)           # 7.5: GPT-2 with OpenAI's weights
    run = finetune(model, data, config)                # 7.6: losses before and during training
    results = answer_test_set(model, data, config)     # 7.7: greedy answers to the test set
    paths = save_outputs(model, run, results, data, config)  # plot, answers, weights

`main` itself checks everything cheap first (`preflight.py`: flags, folders, data, disk space,
before any download) and saves the weights and the plot as soon as training ends, before the
slow answers (`save_model`, then `save_answers`); Ctrl-C or SIGTERM at any stage says what was
saved and what was not (`run_guard.py`).

Training and answering use the fast paths of `fast_gpt.py` (same results as the book's
`train_model_simple` and `generate`, within float rounding). The exercises' switches
(`--prompt-style phi3`, `--mask-instructions`, `--lora-rank`, `--data`) compose the classes
of `exercise_variants.py`.
"""

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
from gpt2_sizes import (
    GPT2_SIZES,
    TEST_MODE_CONFIG,
    book_model_name,
    gpt2_config,
    model_folder,
    short_model_name,
)
from gpt_instruction_finetuning import (
    DATA_URL,
    InstructionDataset,
    custom_collate_fn,
    get_device,
)
from instruction_data import DatasetError, load_instruction_file, split_data
from preflight import PreflightError, check_run, untrained_note, untrained_suffix
from run_guard import RunProgress, exit_code, os_error_line, signals_interrupt
from safe_files import save_figure, save_state_dict, write_json

HERE = Path(__file__).resolve().parent
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
    tokenizer_dir: str | None = option(None, "a folder with GPT-2's encoder.json and vocab.bpe "
                                             "(offline use)")
    prompt_style: str = option("alpaca", "exercise 7.1: the prompt style",
                               choices=list(PROMPT_STYLES))
    mask_instructions: bool = option(False, "exercise 7.2: compute the loss on the response "
                                            "tokens only")
    lora_rank: int | None = option(None, "exercise 7.4: train LoRA adapters of this rank "
                                         "instead of all weights")
    lora_alpha: float | None = option(None, "LoRA scaling (default: equal to the rank)")
    max_new_tokens: int = option(256, "the longest answer generated for a test entry")
    compile: bool = option(False, "torch.compile the transformer blocks (worth it on a GPU)")
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


def prepare_data(config):
    """Load (or download) the entries, split them 85/10/5, and build the training loaders."""
    data_path = dataset_path(config)
    if config.data is not None and config.data_url is None and not data_path.exists():
        raise DatasetError(f"{data_path} does not exist (pass --data-url to download it)")
    # Not in the book's loader: a BOM is fine; a folder, bytes that are not UTF-8 or an HTML
    # page are clear errors, and a bad download is never saved.
    entries = load_instruction_file(data_path, [config.data_url or DATA_URL])
    print(f"Number of entries: {len(entries)}")
    train_data, test_data, val_data = split_data(entries)
    if config.test_mode:
        n = TEST_MODE_ENTRIES
        train_data, test_data, val_data = train_data[:n], test_data[:n], val_data[:n]
    print(f"Training set length: {len(train_data)}")
    print(f"Validation set length: {len(val_data)}")
    print(f"Test set length: {len(test_data)}")

    device = choose_device(config.device, config.test_mode)
    print(f"Device: {device}")
    tokenizer = get_tokenizer(config.tokenizer_dir)
    style = prompt_style(config.prompt_style)
    context_length = (TEST_MODE_CONFIG if config.test_mode else gpt2_config(config.model))[
        "context_length"]
    allowed_max_length = min(config.max_length, context_length)
    batch_size = min(config.batch_size, 2) if config.test_mode else config.batch_size
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
                        device, style, data_name(config))


def dataset_path(config):
    """--data, or the chapter's dataset next to this file."""
    return Path(config.data) if config.data is not None else HERE / "instruction-data.json"


def data_name(config):
    """The stem of a dataset other than the chapter's (for the outputs' names), else None."""
    path = dataset_path(config)
    return None if path.name == "instruction-data.json" else path.stem


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


class DeviceError(RuntimeError):
    """The requested device is not available."""


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
    from previous_chapters import GPTModel, load_weights_into_gpt, replace_linear_with_lora

    if config.test_mode:
        torch.manual_seed(config.seed)
        model = GPTModel(TEST_MODE_CONFIG)
        print("Test mode: a tiny random GPT, no weights downloaded.")
    else:
        from gpt_download import download_and_load_gpt2

        settings, params = download_and_load_gpt2(model_size=model_folder(config.model),
                                                  models_dir=models_dir(config))
        model = GPTModel(gpt2_config(config.model))
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


def models_dir(config):
    """--models-dir, or gpt2/ next to this file."""
    return Path(config.models_dir) if config.models_dir is not None else HERE / "gpt2"


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

def finetune(model, data, config):
    """The losses before training, then `config.epochs` epochs of AdamW (fast_gpt's trainer).

    Returns the losses, the tokens seen and the minutes taken.
    """
    from fast_gpt import calc_loss_loader_fast, compile_blocks, make_optimizer, train_model_fast

    device = data.device
    if device.type == "cuda":  # Not in the book: TensorFloat-32 matrix products on the GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with torch.no_grad():
        train_loss = calc_loss_loader_fast(data.train_loader, model, device, num_batches=5)
        val_loss = calc_loss_loader_fast(data.val_loader, model, device, num_batches=5)
    print(f"Initial training loss: {train_loss:.3f}")
    print(f"Initial validation loss: {val_loss:.3f}")

    if config.compile:
        compile_blocks(model, dynamic=True)  # batch lengths vary from batch to batch
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    start_time = time.time()
    torch.manual_seed(config.seed)
    train_losses, val_losses, tokens_seen = train_model_fast(
        model, data.train_loader, data.val_loader, optimizer, device,
        num_epochs=config.epochs, eval_freq=config.eval_freq, eval_iter=config.eval_iter,
        start_context=data.style.format_input(data.val_data[0]), tokenizer=data.tokenizer)
    minutes = (time.time() - start_time) / 60
    print(f"Training completed in {minutes:.2f} minutes.")
    return {"train_losses": train_losses, "val_losses": val_losses, "tokens_seen": tokens_seen,
            "initial_losses": (train_loss, val_loss), "minutes": minutes}


#####################################
# Stage 4: answering the test set (section 7.7)
#####################################

def answer_test_set(model, data, config, n_shown=3):
    """Greedy answers to the test entries (fast_gpt, batched); prints the first `n_shown`.

    Returns the test entries, each with its answer under "model_response".
    """
    responses = generate_responses_with_style(model, data.test_data, data.tokenizer, data.style,
                                              config.max_new_tokens, progress=True)
    results = [dict(entry, model_response=response)
               for entry, response in zip(data.test_data, responses, strict=True)]
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
                "plot": "the loss plot", "responses": "the test answers"}


def output_dir(config):
    """--output-dir, or the folder of this file."""
    return Path(config.output_dir) if config.output_dir is not None else HERE


def output_paths(config):
    """Where a run writes: {"model", "plot", "responses" (and "adapters")} in --output-dir.

    The names carry the variant (output_suffix); a run that trains nothing (`--epochs 0`)
    adds '-untrained', so it never replaces a finetuned model.
    """
    suffix = output_suffix(config.prompt_style, config.mask_instructions, config.lora_rank,
                           config.test_mode, data_name(config)) + untrained_suffix(config.epochs)
    folder = output_dir(config)
    file_stem = re.sub(r"[ ()]", "", book_model_name(config.model)) + "-sft" + suffix
    paths = {"model": folder / f"{file_stem}.pth", "plot": folder / f"loss-plot{suffix}.pdf",
             "responses": folder / f"instruction-data-with-response{suffix}.json"}
    if config.lora_rank:
        paths["adapters"] = folder / f"{file_stem}-adapters.pth"
    return paths


def save_model(model, run, config, paths, progress):
    """The finetuned weights and the loss plot, each written atomically, recorded in `progress`.

    A LoRA model is saved twice: its adapters alone, then merged (in place) into a plain
    GPTModel. Without training (no losses), there is no plot.
    """
    from previous_chapters import plot_losses

    if "adapters" in paths:
        save_state_dict(lora_state_dict(model), paths["adapters"])
        progress.record(OUTPUT_NAMES["adapters"], paths["adapters"])
        print(f"LoRA adapters saved as {paths['adapters']}")
        merge_lora(model)
    save_state_dict(model.state_dict(), paths["model"])
    progress.record(OUTPUT_NAMES["model"], paths["model"])
    print(f"Model saved as {paths['model']}")
    if run["train_losses"]:
        epochs_tensor = torch.linspace(0, config.epochs, len(run["train_losses"]))
        fig = plot_losses(epochs_tensor, run["tokens_seen"], run["train_losses"],
                          run["val_losses"], show=False)
        save_figure(fig, paths["plot"])
        progress.record(OUTPUT_NAMES["plot"], paths["plot"])
        print(f"Loss plot saved as {paths['plot']}")


def save_answers(results, paths, progress):
    """The test entries with their answers, as JSON written atomically, recorded in `progress`."""
    write_json(paths["responses"], results)
    progress.record(OUTPUT_NAMES["responses"], paths["responses"])
    print(f"Responses saved as {paths['responses']}")


def save_outputs(model, run, results, data, config):
    """The finetuned weights, the loss plot and the answers, each written atomically.

    Returns {"model", "plot", "responses" (and "adapters")}: the paths written.
    """
    paths = output_paths(config)
    progress = RunProgress([])
    save_model(model, run, config, paths, progress)
    save_answers(results, paths, progress)
    return {key: path for key, path in paths.items() if path in progress.saved.values()}


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
    for name, value in package_versions().items():
        print(f"{name} version: {value}")
    paths = output_paths(config)
    # Not in the book: each output is saved as soon as it exists, the model before the slow
    # answers; an interruption says what was saved and what was not.
    progress = RunProgress(OUTPUT_NAMES[key] for key in paths
                           if key != "plot" or config.epochs > 0)
    try:
        progress.start("checking the settings")
        check_before_run(config, paths)  # bad settings fail here, in seconds
        if config.epochs == 0:
            print(untrained_note(paths["model"]))
        progress.start("preparing the data")
        data = prepare_data(config)
        progress.start("building the model")
        model = build_model(config, data.device)
        progress.start("training")
        run = finetune(model, data, config)
        progress.start("saving the model")
        save_model(model, run, config, paths, progress)
        progress.start("answering the test set", hint=(
            "The saved model is complete (load-finetuned-model.ipynb shows how to load it); "
            "run the same command again to train and answer anew."))
        results = answer_test_set(model, data, config)
        progress.start("saving the answers")
        save_answers(results, paths, progress)
    except KeyboardInterrupt:
        print(f"\n{progress.interrupted_message()}", file=sys.stderr)
        raise
    written = {key: path for key, path in paths.items() if path in progress.saved.values()}
    return {**run, "responses": results, "paths": written, "config": asdict(config)}


def check_before_run(config, paths):
    """preflight.check_run for this config: before any download, model build or training."""
    data_url = config.data_url or (DATA_URL if config.data is None else None)
    model_cfg = TEST_MODE_CONFIG if config.test_mode else gpt2_config(config.model)
    return check_run(config, output_dir(config), paths.values(), dataset_path(config), data_url,
                     model_cfg, None if config.test_mode else models_dir(config))


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
    except (PreflightError, DatasetError, DeviceError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DownloadError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return exit_code(e)  # 130 for Ctrl-C, 143 for SIGTERM
    except OSError as e:  # Not in the book: one line, not a traceback from deep in a library
        if debug:
            traceback.print_exc()
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
