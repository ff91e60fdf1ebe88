"""Where a finetuning run reads and writes, and what it records about itself.

The chapter writes `gpt2-medium355M-sft.pth`, `loss-plot.pdf` and
`instruction-data-with-response.json` next to the script. Variants get their own names
(exercise_variants.output_suffix: `-phi3`, `-mask`, `-lora16`, `-test`, a dataset's stem), so
runs never overwrite each other, and a run that trains nothing (`--epochs 0`) adds
`-untrained`. Beside the model go `<stem>.metrics.jsonl` (one line per evaluation) and
`<stem>.run.json` (run_record.py); checkpoints go to OUTPUT_DIR/checkpoints.

A hub model (`--model Qwen/Qwen3-0.6B-Base`, `smollm2-360m`, ...) is kept in
`models/<owner>--<name>/` (hub_models.py) and its outputs take the repository's name:
`Qwen3-0.6B-Base-sft.pth`, `SmolLM2-360M-sft-phi3.pth`, ...; its run record names the family,
the repository and the folder, so that a later command can rebuild the model.
"""

import random
import re
from dataclasses import asdict
from pathlib import Path

from exercise_variants import output_suffix
from instructkit import CHAPTER_DIR
from instructkit.gpt2_sizes import TEST_MODE_CONFIG, book_model_name, gpt2_config, short_model_name
from instructkit.instruction_data import (
    CHAPTER_DATASET,
    DatasetError,
    load_instruction_file,
    split_data,
)
from instructkit.preflight import untrained_suffix
from instructkit.run_record import metrics_path, package_versions, run_record_path

# What each output is, in words, for the message an interruption prints.
OUTPUT_NAMES = {"model": "the finetuned model", "adapters": "the LoRA adapters",
                "plot": "the loss plot", "responses": "the test answers",
                "run_record": "the run record"}

# The settings that change what training computes: a checkpoint saved under others is
# refused. Left out on purpose: epochs (a run may be extended), eval_freq and eval_iter
# (the dropout-free GPT-2 trains the same whatever is evaluated), the device and precision
# (a run may move to other hardware), and the paths.
IDENTITY_FIELDS = ("model", "batch_size", "lr", "weight_decay", "max_length", "seed",
                   "prompt_style", "mask_instructions", "lora_rank", "lora_alpha",
                   "val_fraction", "test_fraction", "shuffle_split", "test_mode")


def hub_repo_id(config):
    """The hub repository id that --model names (a short name resolved), or None for GPT-2."""
    from instructkit.hub_models import resolve_model_name

    try:
        short_model_name(config.model)
        return None
    except ValueError:
        return resolve_model_name(config.model)


def model_config(config):
    """The GPTModel config of a run: the tiny test-mode GPT, or the GPT-2 size's; None for a
    hub model, whose config comes with its download (FinetuneRun.hub_model)."""
    if hub_repo_id(config) is not None:
        return None
    return dict(TEST_MODE_CONFIG) if config.test_mode else gpt2_config(config.model)


def json_model_config(cfg):
    """A hub model's config dict (hub_model_files.model_config) as JSON: the dtype by name."""
    return {key: str(value).removeprefix("torch.") if key == "dtype" else value
            for key, value in cfg.items()}


def dataset_path(config, file_name=CHAPTER_DATASET.file_name):
    """--data, or the chapter's dataset (`file_name`) beside the chapter's files."""
    return Path(config.data) if config.data is not None else CHAPTER_DIR / file_name


def data_name(config):
    """The stem of a dataset other than the chapter's (for the outputs' names), else None."""
    path = dataset_path(config)
    return None if path.name == CHAPTER_DATASET.file_name else path.stem


def load_entries(data_path, config):
    """The entries of `data_path` (a JSON list or JSON Lines: load_instruction_file).

    The chapter's dataset (no --data) is downloaded when missing from its sources in order
    (GitHub, then a CDN mirror; --data-url replaces them) and must match its known sha256.
    A file of one's own is downloaded from --data-url only, unchecked.
    """
    if config.data is None:
        sources = (config.data_url,) if config.data_url else CHAPTER_DATASET.urls
        return load_instruction_file(data_path, sources, CHAPTER_DATASET.sha256)
    if config.data_url is None and not Path(data_path).exists():
        raise DatasetError(f"{data_path} does not exist (pass --data-url to download it)")
    return load_instruction_file(data_path, [config.data_url] if config.data_url else None)


def split_entries(entries, config):
    """(train, test, validation): the chapter's split in the file's order, with the config's
    fractions (85/10/5 by default), after a seeded shuffle when `shuffle_split` is set."""
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


def models_dir(config):
    """--models-dir, or gpt2/ beside the chapter's files (as the book's models_dir="gpt2");
    for a hub model, models/ there (hub_models.DEFAULT_MODELS_DIR)."""
    from instructkit.hub_models import DEFAULT_MODELS_DIR

    if config.models_dir is not None:
        return Path(config.models_dir)
    return CHAPTER_DIR / ("gpt2" if hub_repo_id(config) is None else DEFAULT_MODELS_DIR)


def model_stem(config):
    """The model's part of the file names: the book's 'gpt2-medium355M', or a hub repository's
    name ('SmolLM2-360M' for HuggingFaceTB/SmolLM2-360M)."""
    repo_id = hub_repo_id(config)
    if repo_id is not None:
        return repo_id.split("/")[1]
    return re.sub(r"[ ()]", "", book_model_name(config.model))


def model_identity_name(config):
    """--model as runs record it: GPT-2's short name, or the hub repository id."""
    return hub_repo_id(config) or short_model_name(config.model)


def output_names(config):
    """(output folder, file-name suffix, model file stem) of a run, e.g. 'gpt2-medium355M-sft'."""
    output_dir = Path(config.output_dir) if config.output_dir is not None else CHAPTER_DIR
    suffix = output_suffix(config.prompt_style, config.mask_instructions, config.lora_rank,
                           config.test_mode, data_name(config)) + untrained_suffix(config.epochs)
    return output_dir, suffix, model_stem(config) + "-sft" + suffix


def output_paths(config):
    """Where a run writes: {"model", "plot", "responses", "metrics", "run_record" (and
    "adapters" for LoRA)}."""
    folder, suffix, file_stem = output_names(config)
    model = folder / f"{file_stem}.pth"
    paths = {"model": model, "plot": folder / f"loss-plot{suffix}.pdf",
             "responses": folder / f"instruction-data-with-response{suffix}.json",
             "metrics": metrics_path(model), "run_record": run_record_path(model)}
    if config.lora_rank:
        paths["adapters"] = folder / f"{file_stem}-adapters.pth"
    return paths


def checkpoint_identity(config, dataset_sha256):
    """What a checkpoint of this run records, and a resumed one must match."""
    repo_id = hub_repo_id(config)
    # a hub model: its repository (a GPT-2 checkpoint never resumes a Qwen run, nor one
    # repository's another's)
    identity = {"model_config": model_config(config) if repo_id is None else {"hub_repo": repo_id},
                "dataset_sha256": dataset_sha256,
                "config": {name: getattr(config, name) for name in IDENTITY_FIELDS}}
    identity["config"]["model"] = model_identity_name(config)
    return identity


def run_record(config, training, paths, *, device, processes, precision, dataset, hub=None):
    """What `<stem>.run.json` holds: how the model beside it was made (run_record.py).

    `training`: the TrainingRun that trained it; `paths`: the files written so far; `hub`: a
    hub model's {"family", "repo_id", "folder", "model_config"} (FinetuneRun.hub_model),
    recorded as "hub_model" (its model_config as the record's).
    """
    settings = {key: str(value) if isinstance(value, Path) else value
                for key, value in asdict(config).items()}
    train_losses, val_losses, tokens_seen = training.state.losses()
    final = {"train_loss": train_losses[-1], "val_loss": val_losses[-1]} if train_losses else None
    hub_model = None if hub is None else {
        "family": hub["family"], "repo_id": hub["repo_id"], "folder": str(hub["folder"])}
    return {
        "config": {**settings, "model": model_identity_name(config)},
        "model_config": model_config(config) if hub is None else json_model_config(hub["model_config"]),
        **({"hub_model": hub_model} if hub is not None else {}),
        "versions": package_versions(),
        "device": str(device), "processes": processes, "precision": precision,
        "dataset": dataset, "seed": config.seed, "wall_seconds": training.state.wall_seconds,
        "final_losses": final, "steps": training.state.step,
        "tokens_seen": tokens_seen[-1] if tokens_seen else 0,
        "resumed_from": str(training.resumed_from) if training.resumed_from else None,
        "files": {name: Path(path).name for name, path in paths.items()},
    }
