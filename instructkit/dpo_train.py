"""DPO from the command line: start from a saved SFT model, write a DPO-tuned one.

Not in the book. After `python gpt_instruction_finetuning.py` has saved
`gpt2-medium355M-sft.pth`:

    python -m instructkit.dpo_train --sft-model gpt2-medium355M-sft.pth

downloads the book's preference data (instruction-data-with-preference.json) if it is not
there, trains one epoch of DPO (dpo.py, through fast_dpo's faster batch loss) and writes, next to
the SFT model (or in --output-dir):

    gpt2-medium355M-sft-dpo.pth             the DPO-tuned weights (same layout as the SFT file)
    gpt2-medium355M-sft-dpo.metrics.jsonl   losses and rewards, one line per evaluation (named
                                            .metrics.jsonl.partial until the model is saved)
    gpt2-medium355M-sft-dpo.run.json        the run record: config, model config, versions...
    gpt2-medium355M-sft-dpo-plot.pdf        losses and reward margins
    gpt2-medium355M-sft-dpo-responses.json  test entries answered by the SFT and the DPO model

The model's size comes from `<sft stem>.run.json` when it is there, else from the shapes
in the state dict; `--model gpt2-medium` overrides both. A finetuned hub model (Qwen3, Llama
3.2, SmolLM2: its run record names family, repository and hub folder) is rebuilt as chat.py
rebuilds it, and trained with its own tokenizer, padding id and the SFT run's prompt style,
through fast_llm's forward pass; its run record names the hub model again, so
`python -m instructkit.chat <stem>-dpo.pth` reloads it. The run is resumable like the
chapter's command (checkpoints.py): every `--save-every` steps it writes a checkpoint to
OUTPUT_DIR/checkpoints, and the same command with `--resume` continues from the one of the
highest step (same data order, same numbers); one saved with other settings is refused, naming
them.
`--max-steps N` stops after N steps with a checkpoint, to split a long run into sessions.
`--precision` works as in the finetuning command (auto: bf16 from compute capability 8.0, fp16
with a gradient scaler at 7.x, else fp32); the reference model's cached log-probabilities are
computed in the same precision, and the run record says which.
One run at a time per output folder: the run holds the folder's lock (output_lock.py), so a
second run into it is refused at once (exit 2), and temporary files that a killed write left
there are removed at the start.
`--test-mode` runs the whole stage in seconds on a tiny random GPT and 10 entries per split.
Every flag is checked before the data or the model is read (`check_config`): the numeric
ranges (`--beta` above 0: at 0 DPO learns nothing, below 0 it trains toward the rejected
answers), the SFT model file (missing, a folder, 0 bytes), `--data`, `--tokenizer-dir`, and
the checkpoint `--resume` names (a DPO checkpoint of these settings, not a finetuning one).
Exit codes: 0 done, 1 tiktoken's vocabulary could not be fetched (pass --tokenizer-dir), 2 bad
input (a flag out of range, a missing or empty file, mismatched sizes, bad data, a checkpoint
of another run), 130 Ctrl-C (training stops after the step and saves a checkpoint), 143 SIGTERM.
"""

import argparse
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from instructkit import CHAPTER_DIR as HERE  # noqa: E402
from instructkit import dpo, fast_dpo
from instructkit.checkpoints import CheckpointError
from instructkit.console import use_utf8_console
from instructkit.errors import BadInputError, ExpectedError
from instructkit.gpt2_sizes import GPT2_SIZES, TEST_MODE_CONFIG
from instructkit.instruction_data import (
    PREFERENCE_DATASET,
    PREFERENCE_KEYS,
    DatasetError,
    load_instruction_file,
    load_known_dataset,
    split_data,
)
from instructkit.model_files import check_model_path, load_sft_model
from instructkit.output_lock import hold_output_folder
from instructkit.precision import PRECISIONS, resolve_precision
from instructkit.preflight import Limit, check_ranges, check_resume, check_tokenizer_dir
from instructkit.run_guard import exit_code, signals_interrupt
from instructkit.run_record import (
    dataset_fingerprint,
    metrics_path,
    partial_metrics_path,
    publish_metrics,
    write_run_record,
)
from instructkit.safe_files import (
    ask_at_terminal,
    optional_output,
    retry_while_disk_full,
    save_state_dict,
    write_json,
)
from instructkit.training import RESUME_NEWEST, CheckpointPlan, TrainingInterrupted, TrainingRun


class SetupError(BadInputError):
    """A problem with the inputs (model file, sizes, checkpoint): exit code 2."""


@dataclass
class DPOConfig:
    """Every setting of a DPO run; the defaults are the book's bonus notebook's."""

    sft_model: str | None = None
    data: str | None = None
    model: str | None = None
    epochs: int = 1
    batch_size: int = 8
    lr: float = 5e-6
    weight_decay: float = 0.01
    beta: float = 0.1
    max_length: int = 1024
    eval_freq: int = 5
    eval_iter: int = 5
    save_every: int = 20
    keep: int = 3
    max_steps: int | None = None
    resume: str | None = None
    seed: int = 123
    device: str | None = None
    precision: str = "auto"
    output_dir: str | None = None
    tokenizer_dir: str | None = None
    max_new_tokens: int = 256
    plain: bool = False
    test_mode: bool = False


#####################################
# Every flag, before any work
#####################################

# The ranges of DPOConfig's numeric settings (preflight.check_ranges).
LIMITS = {
    "epochs": Limit(1),  # 0 would save the SFT model unchanged as a "-dpo" model
    "batch_size": Limit(1),
    "lr": Limit(0),  # 0 keeps the policy equal to its reference: a check of the precision
    "weight_decay": Limit(0),
    # 0 learns nothing (the loss's gradient is 0), below 0 trains toward the rejected answers
    "beta": Limit(0, low_excluded=True),
    "max_length": Limit(1),
    "eval_freq": Limit(1),
    "eval_iter": Limit(1),
    "save_every": Limit(1),
    "keep": Limit(1),
    "max_steps": Limit(1),
    "seed": Limit(0, 2**64 - 1),  # what torch.manual_seed accepts
    "max_new_tokens": Limit(1),
}


def check_config(config):
    """Every setting, cheapest first, before any download or model load: the numeric ranges,
    the SFT model file (there, not a folder, not empty), --data, --tokenizer-dir, and the
    checkpoint --resume names (one of DPO's, with these settings). One line, exit code 2."""
    if config.sft_model is None and not config.test_mode:
        raise SetupError("pass --sft-model (the finetuned model, e.g. gpt2-medium355M-sft.pth)")
    check_ranges(config, LIMITS)
    if config.sft_model is not None:
        check_model_path(config.sft_model, "finetuned model file")
    if config.data is not None and not Path(config.data).is_file():
        raise DatasetError(f"--data {config.data} is not a file: pass the preference data JSON, "
                           f"or leave --data out for the book's file")
    check_tokenizer_dir(config.tokenizer_dir)
    paths = output_paths(config)
    check_resume(config.resume, paths["checkpoints"], paths["stem"],
                 {"config": identity_config(config)},
                 "finetuning, python gpt_instruction_finetuning.py")


#####################################
# Data
#####################################

def load_data(config):
    """The preference entries, split 85/10/5 like the chapter (10 per split in test mode).

    Without --data: the book's file next to this one, downloaded (and checked) if missing.
    """
    if config.data is None:
        path = HERE / PREFERENCE_DATASET.file_name
        data = load_known_dataset(PREFERENCE_DATASET, HERE)
    else:
        path = Path(config.data)
        data = load_instruction_file(path, keys=PREFERENCE_KEYS)
    train_data, test_data, val_data = split_data(data)
    if config.test_mode:
        from instructkit.finetune_config import TEST_MODE_ENTRIES as n

        train_data, test_data, val_data = train_data[:n], test_data[:n], val_data[:n]
    if len(train_data) < config.batch_size:
        raise DatasetError(f"The training split has {len(train_data)} entries, fewer than one "
                           f"batch of {config.batch_size}: use a smaller --batch-size")
    return path, train_data, test_data, val_data


#####################################
# Training, resumable
#####################################

def output_paths(config):
    sft = Path(config.sft_model) if config.sft_model else Path("gpt2-test-sft.pth")
    folder = Path(config.output_dir) if config.output_dir else (sft.parent if config.sft_model else HERE)
    stem = sft.stem + "-dpo"
    model = folder / f"{stem}.pth"
    return {"model": model, "metrics": metrics_path(model), "plot": folder / f"{stem}-plot.pdf",
            "responses": folder / f"{stem}-responses.json", "checkpoints": folder / "checkpoints",
            "stem": stem}


# The settings that change what training computes; a checkpoint saved under others is refused.
IDENTITY_FIELDS = ("sft_model", "model", "batch_size", "lr", "weight_decay", "beta", "max_length",
                   "seed", "plain", "test_mode")


def identity_config(config):
    """The settings a checkpoint of this run records (IDENTITY_FIELDS)."""
    return {name: getattr(config, name) for name in IDENTITY_FIELDS}


def checkpoint_identity(config, model_config, dataset_sha256):
    """What must match for a checkpoint to continue this run."""
    return {"model_config": model_config, "dataset_sha256": dataset_sha256,
            "config": identity_config(config)}


def tracking_from_rows(tracking, rows):
    """train_model_dpo_simple's tracking dict, rebuilt from metrics rows (a resumed run's)."""
    for row in rows:
        for split in ("train", "val"):
            tracking[f"{split}_losses"].append(row[f"{split}_loss"])
            tracking[f"{split}_chosen_rewards"].append(row[f"{split}_chosen_reward"])
            tracking[f"{split}_rejected_rewards"].append(row[f"{split}_rejected_reward"])
        tracking["tokens_seen"].append(row["tokens_seen"])
    return tracking


class DPOTrainingRun(TrainingRun):
    """training.TrainingRun's loop (batch order, checkpoints, Ctrl-C, progress bar,
    metrics file) with train_model_dpo_simple's step and evaluation; one process.

    `precision` (precision.Precision; float32 when None): the autocast that the loss, the
    policy's and the reference's log-probabilities alike, runs under, with fp16's scaler.
    """

    def __init__(self, policy, reference, beta, loss_fn, optimizer, train_loader, val_loader,
                 device, precision=None, **run_kwargs):
        super().__init__(policy, optimizer, train_loader, val_loader, device,
                         precision=precision or resolve_precision("fp32", device), **run_kwargs)
        self.reference, self.beta, self.loss_fn = reference, beta, loss_fn

    def _train_step(self, batch_indices):
        dataset, collate = self.train_loader.dataset, self.train_loader.collate_fn
        batch = collate([dataset[i] for i in batch_indices])
        self.optimizer.zero_grad()
        with self.precision.autocast():
            loss, _, _ = self.loss_fn(batch, self.model, self.reference, self.beta)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # fp16: scaled, so that small gradients do not underflow
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.state.tokens_seen += batch["chosen"].numel() + batch["rejected"].numel()

    def _evaluate(self, eval_iter):
        with self.precision.autocast():
            return dpo.evaluate_dpo_loss_loader(self.model, self.reference, self.train_loader,
                                                self.val_loader, self.beta, eval_iter, self.loss_fn)

    def _evaluation_line(self, row):
        return dpo.dpo_evaluation_line(row, row["epoch"] - 1, row["step"])


def train(policy, reference, config, datasets, collate, paths, identity, precision=None):
    """train_model_dpo_simple's loop as a DPOTrainingRun: the book's loaders (shuffled, the last
    partial batch dropped), checkpoints to resume from, Ctrl-C saves one.

    Returns the run (`run.finished` is False when --max-steps stopped it) and its tracking
    dict (train_model_dpo_simple's, including the evaluations before a resume).
    """
    from torch.utils.data import DataLoader

    from fast_gpt import make_optimizer

    loss_fn = (dpo.compute_dpo_loss_batch if config.plain
               else partial(fast_dpo.compute_dpo_loss_batch_fast, precision=precision))
    optimizer = make_optimizer(policy, config.lr, config.weight_decay)  # fused AdamW where available
    train_set, val_set = datasets
    train_loader = DataLoader(train_set, batch_size=config.batch_size, collate_fn=collate,
                              shuffle=True, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=config.batch_size, collate_fn=collate)
    plan = CheckpointPlan(paths["checkpoints"], paths["stem"], identity, config.save_every,
                          config.keep, wait_for_space=ask_at_terminal("The training state"))
    # seed: torch.manual_seed(config.seed) right before training, as the book's notebook does
    run = DPOTrainingRun(policy, reference, config.beta, loss_fn, optimizer, train_loader,
                         val_loader, policy.tok_emb.weight.device, precision=precision,
                         seed=config.seed,
                         checkpoints=plan, metrics_path=partial_metrics_path(paths["metrics"]))
    run.resume_or_start(config.resume)
    run.train(config.epochs, config.eval_freq, config.eval_iter, start_context=None,
              tokenizer=None, max_steps=config.max_steps)
    if not run.finished:
        print(f"Stopped after {run.state.step} steps (--max-steps); checkpoint saved as "
              f"{run.last_checkpoint}. Continue with the same command and --resume.")
    return run, tracking_from_rows(dpo.new_tracking(), run.state.metrics)


def load_sft(config, device):
    """The SFT model of --sft-model: {"model", "model_config", "hub_model", and for a hub model
    "tokenizer", "style"}.

    A GPT-2 is read as before (model_files.load_sft_model: --model, run record or shapes). A
    finetuned hub model (Qwen3, Llama: its run record has "hub_model") is rebuilt as chat.py
    rebuilds it (model_files.load_finetuned_model, from the record's hub folder), with the
    hub model's tokenizer and the SFT run's prompt style (the chat template's too).
    """
    from instructkit.model_files import read_run_record_if_any

    record = read_run_record_if_any(config.sft_model) or {}
    hub = record.get("hub_model")
    if hub is None:
        policy, model_config = load_sft_model(config.sft_model, config.model, device=device)
        return {"model": policy, "model_config": model_config, "hub_model": None}
    if config.model is not None:
        raise SetupError(f"--model {config.model} is a GPT-2 size, and {config.sft_model} is a "
                         f"finetuned {hub['repo_id']}: leave --model out")
    from gpt_instruction_finetuning import PROMPT_STYLES
    from instructkit.chat_template_style import chat_template_style
    from instructkit.finetune_files import json_model_config
    from instructkit.hf_tokenizer import load_hf_tokenizer
    from instructkit.model_files import load_finetuned_model

    policy, style_name, info = load_finetuned_model(config.sft_model, device)
    tokenizer = load_hf_tokenizer(info["hub_folder"])
    style = PROMPT_STYLES.get(style_name) or chat_template_style(tokenizer, hub["repo_id"])
    return {"model": policy, "model_config": json_model_config(info["model_config"]),
            "hub_model": {**hub, "folder": info["hub_folder"]}, "tokenizer": tokenizer,
            "style": style}


def main(config):
    """The DPO stage: data, SFT model and its frozen copy, training, answers, saved files.

    The output folder is locked for the whole run (output_lock.py): another run into it is
    refused before any work. The flags are checked first: a bad one creates no folder."""
    check_config(config)  # every flag, before any download or model load
    lock = hold_output_folder(output_paths(config)["model"].parent)
    try:
        return _run(config)
    finally:
        lock.release()


def _run(config):
    """main's work, once the flags are checked and the output folder is this run's."""
    from instructkit.devices import choose_device
    from instructkit.gpt2_tokenizer import get_tokenizer
    from instructkit.run_record import package_versions

    hub, style = None, None  # a hub model's run record entry and prompt style (GPT-2: Alpaca)
    device = choose_device(config.device, config.test_mode)
    precision = resolve_precision(config.precision, device)  # bf16 where the GPU has it
    # the data before the model: a bad file costs no model load
    data_path, train_data, test_data, val_data = load_data(config)
    if config.sft_model is None:  # test mode: a tiny random GPT stands in for the SFT model
        from previous_chapters import GPTModel

        torch.manual_seed(config.seed)
        policy, model_config = GPTModel(TEST_MODE_CONFIG).eval(), TEST_MODE_CONFIG
        policy.to(device)
    else:
        sft = load_sft(config, device)
        policy, model_config, hub = sft["model"], sft["model_config"], sft["hub_model"]
    print(f"Preference data: {len(train_data)} train, {len(val_data)} validation, "
          f"{len(test_data)} test entries")
    reference = dpo.make_reference_model(policy)
    sft_model = reference  # the SFT model, for the answers before DPO
    print(f"Device: {device}; model: {model_config['n_layers']} layers, "
          f"emb_dim {model_config['emb_dim']}, {model_config['n_heads']} heads")
    print(precision.describe())

    if hub is None:
        tokenizer = get_tokenizer(config.tokenizer_dir)
        pad = {}  # GPT-2's <|endoftext|>, the collate's default
    else:  # the hub model's own tokenizer, prompt style and padding id
        tokenizer, style = sft["tokenizer"], sft["style"]
        pad = {"pad_token_id": tokenizer.pad_token_id}
        print(f"Model: {hub['repo_id']} ({hub['family']}), prompt style {style.name}")
    allowed = min(config.max_length, model_config["context_length"])
    collate = partial(dpo.preference_collate_fn, allowed_max_length=allowed, device=device, **pad)
    train_set = dpo.PreferenceDataset(train_data, tokenizer, style=style)
    val_set = dpo.PreferenceDataset(val_data, tokenizer, style=style)
    if not config.plain:  # the reference model's log-probabilities, once per entry
        # in the policy's precision: a policy still equal to its reference must match it exactly
        train_set, val_set = (fast_dpo.cache_reference_logprobs(
            reference, dataset, config.batch_size, precision=precision,
            allowed_max_length=allowed, device=device, **pad)
            for dataset in (train_set, val_set))
        collate = partial(fast_dpo.collate_with_reference, allowed_max_length=allowed,
                          device=device, **pad)

    paths = output_paths(config)
    dataset = dataset_fingerprint(data_path)
    run, tracking = train(policy, reference, config, (train_set, val_set), collate, paths,
                          checkpoint_identity(config, model_config, dataset["sha256"]), precision)
    if not run.finished:  # stopped early by --max-steps: the checkpoint holds the run
        return {"tracking": None, "paths": paths}
    seconds = run.state.wall_seconds
    print(f"Training completed in {seconds / 60:.2f} minutes.")
    policy.eval()

    # A disk that filled up during training need not lose the model: at a terminal, wait for space.
    retry_while_disk_full(lambda: save_state_dict(policy.state_dict(), paths["model"]),
                          ask_at_terminal("The DPO-tuned model"))
    print(f"Model saved as {paths['model']}")
    publish_metrics(paths["metrics"])  # the model is whole: its metrics take their final name
    # A plot held open by another program (a PDF viewer, on Windows) must not cost the answers
    then = f"The answers follow; the losses are in {paths['metrics']}."
    with optional_output("the DPO plot", then):
        if tracking["train_losses"]:
            dpo.plot_dpo_metrics(tracking, config.epochs, save_path=paths["plot"], show=False)
    max_new = min(config.max_new_tokens, 16) if config.test_mode else config.max_new_tokens
    answered = dpo.compare_responses(test_data, {"sft": sft_model, "dpo": policy}, tokenizer, max_new,
                                     style=style)
    write_json(paths["responses"], answered)
    print(f"Answers of the SFT and the DPO model saved as {paths['responses']}")

    final = {key: tracking[key][-1] for key in ("train_losses", "val_losses") if tracking[key]}
    for split in ("train", "val"):
        if tracking[f"{split}_losses"]:
            final[f"{split}_reward_margin"] = dpo.reward_margins(tracking, split)[-1]
    record = {"config": asdict(config), "model_config": model_config,
              "versions": package_versions(), "device": str(device),
              "precision": precision.name, "reference_precision": precision.name,
              "dataset": dataset, "seed": config.seed, "wall_seconds": seconds,
              "final_losses": final, "sft_model": config.sft_model}
    if hub is not None:  # what chat.py rebuilds the model from: the hub folder, the prompt style
        record["hub_model"] = hub
        record["config"]["prompt_style"] = style.name
    paths["record"] = write_run_record(paths["model"], record)
    return {"tracking": tracking, "paths": paths, "responses": answered, "record": record}


def build_arg_parser():
    defaults = DPOConfig()
    parser = argparse.ArgumentParser(
        description="DPO preference tuning of a finetuned GPT-2, Qwen3 or Llama model (after "
                    "chapter 7).")
    add = parser.add_argument
    add("--sft-model", help="the finetuned model, e.g. gpt2-medium355M-sft.pth")
    add("--data", help=f"preference JSON with instruction, input, output, chosen, rejected "
                       f"(default: the book's {PREFERENCE_DATASET.file_name} next to this "
                       f"file, downloaded when missing)")
    add("--model", choices=list(GPT2_SIZES),
        help="GPT-2 size of the SFT model (default: from its run record or its shapes; a "
             "finetuned hub model's comes from its run record)")
    for name, kind, text in (("epochs", int, "training epochs"),
                             ("batch-size", int, "preference pairs per batch"),
                             ("lr", float, "AdamW learning rate"),
                             ("weight-decay", float, "AdamW weight decay"),
                             ("beta", float, "DPO's beta: how far the policy may move"),
                             ("max-length", int, "truncate sequences to this many tokens"),
                             ("eval-freq", int, "evaluate every this many steps"),
                             ("eval-iter", int, "batches per evaluation"),
                             ("save-every", int, "write a checkpoint every this many steps"),
                             ("keep", int, "checkpoints of this run kept (the highest steps)"),
                             ("max-steps", int, "stop after this many steps in all, keeping a "
                                                "checkpoint to continue from"),
                             ("seed", int, "random seed"),
                             ("max-new-tokens", int, "longest answer to a test entry")):
        default = getattr(defaults, name.replace("-", "_"))
        add(f"--{name}", type=kind, default=default, help=f"{text} (default: {default})")
    add("--device", help="cuda, mps or cpu (default: the best available)")
    add("--precision", choices=list(PRECISIONS), default=defaults.precision,
        help="auto: bf16 autocast on GPUs of compute capability 8.0 and above, fp16 with a "
             "gradient scaler at 7.x, fp32 below 7.0 and on the CPU and MPS; the reference "
             "model's log-probabilities are computed in the same precision")
    add("--output-dir", help="where the outputs go (default: next to the SFT model)")
    add("--tokenizer-dir", help="a folder with GPT-2's encoder.json and vocab.bpe (offline use)")
    add("--plain", action="store_true", help="the plain loss of dpo.py instead of fast_dpo's")
    add("--resume", nargs="?", const=RESUME_NEWEST, default=None, metavar="PATH",
        help="continue from a checkpoint: PATH, or without PATH this run's of the highest step in "
             "OUTPUT_DIR/checkpoints")
    add("--test-mode", "--test_mode", dest="test_mode", action="store_true",
        help="a tiny GPT (random, unless --sft-model) and 10 entries per split, in seconds")
    return parser


def cli(argv=None):
    """Parse, run `main`, turn known problems into a message and an exit code."""
    use_utf8_console()  # UTF-8 out and in, even into a file or a pipe on Windows
    config = DPOConfig(**vars(build_arg_parser().parse_args(argv)))
    import matplotlib

    matplotlib.use("Agg")  # plots go to files
    from instructkit.devices import DeviceError
    from instructkit.gpt2_tokenizer import TokenizerError
    from instructkit.model_files import ModelFileError

    try:
        with signals_interrupt():  # SIGTERM stops the run as Ctrl-C does
            main(config)
    except (SetupError, DatasetError, DeviceError, CheckpointError, ModelFileError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TokenizerError as e:  # the network, as a failed download in the finetuning command
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ExpectedError as e:  # any other problem the user can fix (a file another program holds)
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        # Ctrl-C during training: TrainingInterrupted names the checkpoint to resume from (the
        # one it saved, or after a second Ctrl-C the latest saved before); later (the
        # answers), the model is saved already.
        told = f"{e} " if isinstance(e, TrainingInterrupted) else ""
        if getattr(e, "cut", None) is None:  # else `told` says it all
            told += (f"The same command with --resume continues from this run's checkpoint of "
                     f"the highest step in "
                     f"{output_paths(config)['checkpoints']}, if one was saved.")
        print(f"\nInterrupted. {told.strip()}", file=sys.stderr)
        return exit_code(e)  # 130 for Ctrl-C, 143 for SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(cli())
