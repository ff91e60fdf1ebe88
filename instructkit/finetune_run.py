"""One finetuning run's machinery: what `main` of gpt_instruction_finetuning.py calls where the
book does the same step plainly.

`main` keeps the book's steps, order and printed lines; `FinetuneRun(config)` supplies, step
by step, what the command line adds:

- before any download: every check that takes seconds (preflight.py: the flags' ranges, the
  output folder, the data file, GPT-2's folder, the free disk space), then the output
  folder's lock (output_lock.py: one run per folder; under torchrun, process 0's), which also
  removes the temporary files that killed writes left there;
- the data: `--data`/`--data-url`, JSON Lines, the chapter's file checked by its sha256, the
  split's fractions (`load_data`, `split`), the tokenizer from the weights' own files;
- a hub model (`--model Qwen/Qwen3-0.6B-Base`, `smollm2-360m`, ...): its files downloaded
  through hub_models.py (`download_hub_model`), its tokenizer (hf_tokenizer.py), the model
  (`load_hub_model`: qwen3.py or llama3.py, float32), `--prompt-style chat` (`chat_style`);
  training, evaluation and answers then go through fast_llm (fast_llm.fast_path);
- the device (`--device`, or the chapter's get_device()) and torchrun's processes
  (distributed.py): one download per machine, only process 0 prints and writes;
- training as the book's `train_model_simple`, with checkpoints, `--resume`, `--max-steps`, a
  progress bar and a metrics file, `<stem>.metrics.jsonl.partial` until the model is saved
  (`train_model`, training.TrainingRun);
- the outputs, each written whole or not at all, the model before the slow answers
  (`save_model`, `generate_responses`, `save_answers`), with a run record beside the model;
- on Ctrl-C or SIGTERM, a message saying what was saved, what was not, and how to go on.
"""

import contextlib
import os
import sys
from dataclasses import asdict

import torch

from instructkit import answers, parallel_matvec
from instructkit.chat_template_style import STYLE_NAME
from instructkit.checkpoints import list_checkpoints
from instructkit.console import print_text
from instructkit.devices import choose_device
from instructkit.distributed import DistributedError, init_processes
from instructkit.errors import BadInputError
from instructkit.finetune_files import (
    OUTPUT_NAMES,
    checkpoint_identity,
    dataset_path,
    hub_repo_id,
    load_entries,
    model_config,
    models_dir,
    output_names,
    output_paths,
    run_record,
    split_entries,
)
from instructkit.gpt2_sizes import book_model_name, model_folder, short_model_name
from instructkit.gpt2_tokenizer import get_tokenizer, tokenizer_files
from instructkit.instruction_data import CHAPTER_DATASET, DatasetError
from instructkit.output_lock import hold_output_folder
from instructkit.precision import enable_tf32, resolve_precision
from instructkit.preflight import check_compile, check_run, untrained_note
from instructkit.run_guard import RunProgress
from instructkit.run_record import (
    dataset_fingerprint,
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
from instructkit.training import CheckpointPlan, TrainingInterrupted, TrainingRun

# The book's measured minutes for 2 epochs (section 7.6).
BOOK_MINUTES = {
    "gpt2-medium": {"cpu": (15.78, "M3 MacBook Air CPU"), "mps": (10.77, "M3 MacBook Air GPU"),
                    "cuda": (0.86, "A100; 1.83 on an L4")},
    "gpt2-small": {"cpu": (5.74, "M3 MacBook Air CPU"), "cuda": (0.39, "A100")},
}
ANSWERS_HINT = ("The saved model is complete (load-finetuned-model.ipynb shows how to load it); "
                "run the same command again to train and answer anew.")


def describe_expected_cost(model, model_name, device, num_epochs, test_mode=False):
    """Print the estimated memory, and the book's runtime for this model and device."""
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # float32 weights, plus gradients and two AdamW moments for every trainable parameter
    gigabytes = (4 * n_params + 12 * n_trainable) / 1e9
    print(f"Parameters: {n_params:,} ({n_trainable:,} trainable); weights, gradients and "
          f"optimizer state need about {gigabytes:.1f} GB, plus activations.")
    try:
        short = short_model_name(model_name)
    except ValueError:  # a hub model: the book measured GPT-2 only
        short = None
    book = BOOK_MINUTES.get(short, {}).get(torch.device(device).type)
    if test_mode:
        print("Test mode: training and answering take seconds.")
    elif book is not None:
        minutes, where = book
        print(f"Expect about {minutes * num_epochs / 2:.1f} min of training: the book's 2 epochs "
              f"of {book_model_name(model_name)} took {minutes} min ({where}).")


class FinetuneRun:
    """The run of one FinetuneConfig; see the module docstring. `default_device`: the chapter's
    get_device, used when --device is not given."""

    def __init__(self, config, default_device=None):
        self.config = config
        self.paths = output_paths(config)
        self.progress = RunProgress(OUTPUT_NAMES[key] for key in self.paths if key in OUTPUT_NAMES
                                    and (key != "plot" or config.epochs > 0))
        self.processes = None
        self.lock = None  # the output folder's (output_lock.py), from the end of __init__ on
        self.metrics_published = False  # whether the metrics have their final name yet
        # --model names a hub model: its repository id; {"family", "repo_id", "folder",
        # "model_config"} once its files are downloaded (download_hub_model)
        self.repo_id = hub_repo_id(config)
        self.hub_model = None
        with self._stage("checking the settings"):
            self._check_before_run()
        if config.epochs == 0:
            print(untrained_note(self.paths["model"]))
        # Not in the book: under torchrun, one of several processes; only the first prints
        self.processes = init_processes(choose_device(config.device, config.test_mode, default_device))
        self._quiet = contextlib.ExitStack()
        if not self.processes.is_main:
            self._quiet.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))  # noqa: SIM115
        self.batch_size = min(config.batch_size, 2) if config.test_mode else config.batch_size
        self.processes.check_batch_size(self.batch_size)
        if config.fsdp and config.lora_rank:
            raise DistributedError("--fsdp with --lora-rank is not supported: LoRA trains few "
                                   "weights, so DDP (the default under torchrun) fits wherever "
                                   "the model does.")
        self.precision = resolve_precision(config.precision, self.device)
        if config.compile:  # before any download: a missing compiler would fail at step 1
            note = check_compile(self.device)
            if note:
                print(note)
        self.dataset = None  # the data file's fingerprint (run_record.dataset_fingerprint)
        self.training = None  # the TrainingRun, once training starts
        self.finished = False
        if self.is_main:  # before any download: a folder another run writes into is refused
            self.lock = hold_output_folder(self.paths["model"].parent)

    @property
    def device(self):
        return self.processes.device

    @property
    def is_main(self):
        """Whether this process writes files (always, without torchrun)."""
        return self.processes.is_main

    @property
    def models_dir(self):
        return models_dir(self.config)

    @property
    def metrics_file(self):
        """Where the metrics are: `<stem>.metrics.jsonl.partial` until the model is saved."""
        metrics = self.paths["metrics"]
        return metrics if self.metrics_published else partial_metrics_path(metrics)

    @property
    def max_length(self):
        """--max-length, cut to the model's context (a hub model's: once downloaded)."""
        if self.repo_id is not None:
            context = self.download_hub_model()["model_config"]["context_length"]
        else:
            context = model_config(self.config)["context_length"]
        return min(self.config.max_length, context)

    #####################################
    # Checks and interruptions
    #####################################

    def _refuse_gpt2_only_flags(self):
        """A flag that only GPT-2 has would be ignored for a hub model: say so instead."""
        config = self.config
        if config.decode_dtype != "fp32":
            raise BadInputError("--decode-dtype bf16 is for GPT-2 models: Qwen3 and Llama models "
                                "answer with their own weights (fp32 here)")
        if config.tokenizer_dir is not None:
            raise BadInputError("--tokenizer-dir names GPT-2's tokenizer files; a hub model "
                                "brings its own tokenizer.json: leave --tokenizer-dir out")
        if config.weights_source != "auto":
            raise BadInputError(f"--weights-source {config.weights_source} chooses where GPT-2's "
                                "weights come from; a hub model comes from its repository "
                                "(HF_ENDPOINT names a mirror): leave --weights-source out")

    def _check_before_run(self):
        config = self.config
        data_url = config.data_url or (CHAPTER_DATASET.urls[0] if config.data is None else None)
        output_dir, _, stem = output_names(config)
        identity = checkpoint_identity(config, None)
        del identity["dataset_sha256"]  # the data may be still to download: checked on resume
        gpt2_dir = None if config.test_mode or self.repo_id is not None else models_dir(config)
        if config.prompt_style == STYLE_NAME and self.repo_id is None:
            raise BadInputError("--prompt-style chat uses a hub model's own chat template, and "
                                "GPT-2 has none: use --prompt-style alpaca or phi3, or a hub "
                                "model (--model qwen3-0.6b, smollm2-360m, ...)")
        parallel_matvec.check_mode(config.decode_matvec)  # not only when the answers begin
        if self.repo_id is not None:  # a hub model's folder must be writable before any download
            self._refuse_gpt2_only_flags()
            from instructkit.preflight import check_output_dir

            check_output_dir(models_dir(config), flag="--models-dir")
        check_run(config, self.paths["model"].parent, self.paths.values(), dataset_path(config),
                  data_url, model_config(config), gpt2_dir,
                  split=lambda entries: split_entries(entries, config),
                  resume=(output_dir / "checkpoints", stem, identity,
                          "DPO, python -m instructkit.dpo_train"))

    @contextlib.contextmanager
    def _stage(self, name, hint=None):
        """Inside the block the run is in stage `name`; Ctrl-C there says what was saved."""
        self.progress.start(name, hint)
        try:
            yield
        except KeyboardInterrupt as e:
            if isinstance(e, TrainingInterrupted):
                # After a second Ctrl-C (`cut`), the checkpoint is the latest saved before it
                if e.checkpoint is not None:
                    what = "a checkpoint" if e.cut is None else f"the checkpoint of step {e.checkpoint_step}"
                    self.progress.record(what, e.checkpoint)
                self.progress.hint = self._resume_hint(e.checkpoint)  # the checkpoints there now
            if self.processes is None or self.is_main:
                print(f"\n{self.progress.interrupted_message()}", file=sys.stderr)
            self.release()
            raise
        except BaseException:
            self.release()  # the run ends here: the next one may use the folder
            raise

    def release(self):
        """Let go of the output folder's lock (the run has ended)."""
        if self.lock is not None:
            self.lock.release()

    def _checkpoint_plan(self):
        output_dir, _, stem = output_names(self.config)
        sha256 = self.dataset["sha256"] if self.dataset else None
        # At a terminal, a full disk waits for space instead of losing the run
        return CheckpointPlan(output_dir / "checkpoints", stem, checkpoint_identity(self.config, sha256),
                              self.config.save_every, self.config.keep,
                              wait_for_space=ask_at_terminal("The training state"))

    def _resume_hint(self, checkpoint=None):
        """How to go on after training stopped: from a checkpoint when there is one, else afresh."""
        plan = self._checkpoint_plan()
        if checkpoint is None and not list_checkpoints(plan.folder, plan.stem):
            return None  # nothing to resume: RunProgress says "start over"
        newest = f" or with --resume {checkpoint}" if checkpoint is not None else ""
        return (f"To continue, run the same command with --resume (it takes this run's checkpoint "
                f"of the highest step in {plan.folder}){newest}.")

    #####################################
    # The data and the tokenizer
    #####################################

    def load_data(self, file_path, url):
        """The entries: --data, else the chapter's `file_path` beside the chapter's files,
        downloaded once per machine (from `url`, then a mirror) and checked by its sha256."""
        with self._stage("preparing the data"):
            path = dataset_path(self.config, file_path)
            with self.processes.local_main_first():
                entries = load_entries(path, self.config)
            self.dataset = dataset_fingerprint(path.resolve())
            return entries

    def split(self, data):
        """(train, test, validation) by the run's fractions (the book's 85/10/5 by default);
        with --check-data, checked before anything is downloaded or trained (check_data)."""
        train, test, val = split_entries(data, self.config)
        if self.config.check_data is not None:
            with self._stage("checking the data"):
                self.check_data(train, test, val)
        return train, test, val

    def check_data(self, train, test, val):
        """--check-data: duplicates, leakage, empty outputs and over-long entries of the run's
        split, reported (process 0) and saved beside the model as <stem>.data-check.json.
        Empty outputs stop the run (DatasetError); the rest are warnings."""
        from instructkit.check_data import check_run_data
        from instructkit.gpt2_tokenizer import TokenizerError

        try:  # the run's tokenizer: --tokenizer-dir, the weights' files if there, else tiktoken's
            if self.repo_id is not None:  # a hub model's own (downloaded here)
                tokenizer = self.tokenizer()
            else:
                folder = None if self.config.test_mode else self.models_dir / model_folder(self.config.model)
                tokenizer = get_tokenizer(self.config.tokenizer_dir or (
                    folder if folder is not None and tokenizer_files(folder) else None))
        except TokenizerError:
            tokenizer = None
            print_text("Data check: no tokenizer yet (offline), so lengths are not checked here; "
                  "the run warns about truncated entries after loading it.")
        report_path = self.paths["model"].with_name(self.paths["model"].stem + ".data-check.json")
        check_run_data(train, test, val, self.config.check_data, tokenizer, self.max_length,
                       report_path if self.is_main else None, quiet=not self.is_main)

    def tokenizer(self):
        """GPT-2's tokenizer: from --tokenizer-dir, else from the vocabulary files that come with
        the weights (downloaded here, once per machine), else tiktoken's download. A hub
        model's: its repository's tokenizer.json (hf_tokenizer.py), downloaded with the model."""
        if self.repo_id is not None:
            from instructkit.hf_tokenizer import load_hf_tokenizer

            return load_hf_tokenizer(self.download_hub_model()["folder"])
        with self._stage("preparing the data"), self.processes.local_main_first():
            return get_tokenizer(self.config.tokenizer_dir or self.download_weights())

    def chat_style(self, tokenizer):
        """--prompt-style chat: the PromptStyle of the hub model's chat template
        (chat_template_style.py); a one-line error for a model without one."""
        from instructkit.chat_template_style import chat_template_style

        with self._stage("preparing the data"):
            return chat_template_style(tokenizer, self.repo_id or self.config.model)

    def download_hub_model(self):
        """A hub model's files, downloaded once per machine (hub_models.py: HF_ENDPOINT, resume,
        gated repositories' token); returns self.hub_model: {"family", "repo_id", "folder",
        "model_config"}."""
        if self.hub_model is None:
            from instructkit import hub_model_files
            from instructkit.hub_models import download_hub_model

            with self._stage("downloading the model"), self.processes.local_main_first():
                folder = download_hub_model(self.repo_id, self.models_dir)
            config_json = hub_model_files.read_config_json(folder)
            family = hub_model_files.model_family(config_json)
            if family == "gpt2":
                raise BadInputError(f"{self.repo_id} is a GPT-2 model: pass --model gpt2-small, "
                                    f"gpt2-medium, gpt2-large or gpt2-xl (the book's loaders)")
            self.hub_model = {"family": family, "repo_id": self.repo_id, "folder": folder,
                              "model_config": hub_model_files.model_config(config_json, torch.float32)}
        return self.hub_model

    def load_hub_model(self):
        """(model, name to print): the hub model's from-scratch Qwen3Model or Llama3Model with
        its weights, in float32 (--precision decides the compute, as for GPT-2), in eval mode."""
        from instructkit.hub_model_files import load_hub_model

        hub = self.download_hub_model()
        with self._stage("loading the model"):
            model, _ = load_hub_model(hub["folder"], dtype=torch.float32)
        model.eval()
        return model, f"{hub['repo_id']} ({hub['family']})"

    def download_weights(self):
        """Download GPT-2's files (complete ones are kept) and return their folder, if it holds
        the tokenizer's files; None in test mode, which needs no weights."""
        if self.config.test_mode:
            return None
        from instructkit.gpt2_weights import download_gpt2

        folder = self.models_dir / model_folder(self.config.model)
        download_gpt2(model_folder(self.config.model), self.models_dir, self.config.weights_source)
        return folder if tokenizer_files(folder) else None

    def check_loaders(self, train_loader, datasets):
        """Too little data for one training batch is an error; texts longer than the
        collate function's cut are counted in a warning."""
        if len(train_loader) == 0:
            raise DatasetError(f"The training split has {len(train_loader.dataset)} entries, fewer "
                               f"than one batch of {self.batch_size}: use a smaller --batch-size "
                               f"or more data.")
        truncated = sum(len(ids) + 1 > self.max_length
                        for dataset in datasets for ids in dataset.encoded_texts)
        if truncated:
            print(f"Warning: {truncated} entries are longer than {self.max_length} tokens "
                  f"and were truncated.")

    #####################################
    # The model and its training
    #####################################

    def describe_cost(self, model):
        """Print the processes (under torchrun), the precision, the memory the model needs,
        and the book's time for it."""
        world = self.processes.world_size
        if world > 1:
            print(f"Processes: {world} ({'FSDP' if self.config.fsdp else 'DDP'}), "
                  f"{self.batch_size // world} of each batch of {self.batch_size} on each")
        print(self.precision.describe())
        describe_expected_cost(model, self.config.model, self.device, self.config.epochs,
                               self.config.test_mode and self.repo_id is None)

    def calc_loss_loader(self, data_loader, model, device, num_batches=None):
        """The book's calc_loss_loader, with fast_gpt's loss (fast_llm's for a hub model: packed
        and chunked); shared over torchrun's processes."""
        return self.processes.calc_loss_loader(data_loader, model, device, num_batches)

    def prepare_model(self, model):
        """--compile, and DDP or FSDP under torchrun; build the optimizer after this."""
        from fast_gpt import compile_blocks

        if self.device.type == "cuda":  # TensorFloat-32 matrix products on the GPU
            enable_tf32()
        if self.config.compile and self.repo_id is not None:
            print("Note: --compile compiles GPT-2's blocks only; this model runs eagerly.")
        elif self.config.compile:
            compile_blocks(model, dynamic=True)  # batch lengths vary from batch to batch
        return self.processes.prepare_model(model, "fsdp" if self.config.fsdp else "ddp")

    def make_optimizer(self, model):
        """AdamW with --lr and --weight-decay over the trainable weights, fused where torch can."""
        from fast_gpt import make_optimizer

        return make_optimizer(model, self.config.lr, self.config.weight_decay)

    def train_model(self, model, train_loader, val_loader, optimizer, device, num_epochs,
                    eval_freq, eval_iter, start_context, tokenizer):
        """train_model_simple's arguments and result: (train_losses, val_losses, tokens_seen),
        those before a resume included. Sets `finished` (False after --max-steps)."""
        self.training = TrainingRun(model, optimizer, train_loader, val_loader, device,
                                    precision=self.precision, checkpoints=self._checkpoint_plan(),
                                    metrics_path=self.metrics_file, distributed=self.processes)
        with self._stage("training", hint=self._resume_hint()):
            self.training.resume_or_start(self.config.resume)
            losses = self.training.train(num_epochs, eval_freq, eval_iter, start_context, tokenizer,
                                         max_steps=self.config.max_steps)
        self.finished = self.training.finished
        if not self.finished:
            print(f"Stopped after {self.training.state.step} steps (--max-steps); checkpoint saved "
                  f"as {self.training.last_checkpoint}. Continue with --resume.")
        return losses

    #####################################
    # The outputs
    #####################################

    def save_model(self, model):
        """The finetuned weights (a LoRA model: its adapters, then merged in place into a plain
        GPTModel) and the run record; returns the model's path."""
        with self._stage("saving the model"):
            weights = self.processes.full_state_dict(model)  # FSDP gathers its shards
            if not self.is_main:  # under torchrun, process 0 writes the files
                return self.paths["model"]
            # A disk that filled up during training need not lose the model: at a terminal,
            # free space and press Enter (elsewhere: a one-line error)
            wait_for_space = ask_at_terminal("The trained model")
            if "adapters" in self.paths:
                from exercise_variants import lora_state_dict, merge_lora

                adapters = lora_state_dict(model)
                retry_while_disk_full(lambda: save_state_dict(adapters, self.paths["adapters"]),
                                      wait_for_space)
                # recorded, but the run record is written only with the model below: until
                # then an earlier model's record stays as it was
                self.progress.record(OUTPUT_NAMES["adapters"], self.paths["adapters"])
                print(f"LoRA adapters saved as {self.paths['adapters']}")
                merge_lora(model)
                weights = model.state_dict()
            retry_while_disk_full(lambda: save_state_dict(weights, self.paths["model"]), wait_for_space)
            # the model is whole: its metrics take their final name (an earlier model's
            # metrics stayed until now)
            publish_metrics(self.paths["metrics"])
            self.metrics_published = True
            self.saved("model")
            return self.paths["model"]

    @contextlib.contextmanager
    def plot_file(self):
        """Around the loss plot's drawing: once it is written, the run record names it. A plot
        that another program holds (a PDF viewer showing the last run's, on Windows) is not
        worth the answers still to come: one warning line on stderr, and the run goes on."""
        then = (f"The run goes on to the answers; the losses are in {self.paths['metrics']} "
                f"(run_record.plot_metrics draws the plot from it).")
        with optional_output("the loss plot", then) as plot:
            yield
        if plot.written:
            self.saved("plot")

    def saved(self, key):
        """Record that the output `key` ("plot", ...) is written, in the run record too."""
        self.progress.record(OUTPUT_NAMES[key], self.paths[key])
        if self.is_main:
            self._write_record()

    def _written_paths(self):
        """{key: path} of the outputs written so far, the metrics file (written during
        training) included."""
        written = {key: path for key, path in self.paths.items()
                   if path in self.progress.saved.values()}
        return {**written, "metrics": self.metrics_file}

    def _write_record(self):
        written = {**self._written_paths(), "run_record": self.paths["run_record"]}
        write_run_record(self.paths["model"], run_record(
            self.config, self.training, written, device=self.device,
            processes=self.processes.world_size, precision=self.training.precision.name,
            dataset=self.dataset, hub=self.hub_model))
        self.progress.record(OUTPUT_NAMES["run_record"], self.paths["run_record"])

    def generate_responses(self, model, entries, tokenizer, style, n_shown=3):
        """The entries, each with its greedy answer under "model_response" (only the first
        --max-test-answers of them); the first `n_shown` are printed."""
        with self._stage("answering the test set", hint=ANSWERS_HINT):
            limit = self.config.max_test_answers
            if limit is not None:
                print(f"Answering {max(limit, 0)} of the {len(entries)} test entries "
                      f"(--max-test-answers {limit}).")
                entries = entries[:max(limit, 0)]
            if self.config.decode_matvec is not None:  # --decode-matvec over the env variable
                parallel_matvec.set_mode(self.config.decode_matvec)
            decode_dtype = parallel_matvec.DECODE_DTYPES[self.config.decode_dtype]
            with self.processes.full_weights(model):  # under torchrun, a share each
                responses = self.processes.map_in_order(
                    lambda shard: answers.generate_responses(
                        model, shard, tokenizer, style, self.config.max_new_tokens,
                        progress=self.is_main, decode_dtype=decode_dtype),
                    entries) if entries else []
            results = [dict(entry, model_response=response)
                       for entry, response in zip(entries, responses, strict=True)]
            for entry in results[:n_shown]:  # print_text: never a crash before they are saved
                print_text(style.format_input(entry))
                print_text(f"\nCorrect response:\n>> {entry['output']}")
                print_text(f"\nModel response:\n>> {entry['model_response']}")
                print("-------------------------------------")
            return results

    def save_answers(self, entries):
        """The answered entries as indented JSON; returns the file's path."""
        with self._stage("saving the answers"):
            if self.is_main:
                write_json(self.paths["responses"], entries)
                self.saved("responses")
            return self.paths["responses"]

    def finish(self, train_losses, val_losses, tokens_seen, initial_losses, responses=None,
               model=None):
        """What main returns: the losses, the answers, the files written, and the model; this
        process leaves torchrun's group."""
        state = self.training.state
        # a run stopped by --max-steps leaves a checkpoint, not the outputs
        written = (self._written_paths() if self.finished
                   else {"checkpoint": self.training.last_checkpoint})
        self._quiet.close()
        self.processes.close()
        self.release()
        return {"train_losses": train_losses, "val_losses": val_losses, "tokens_seen": tokens_seen,
                "initial_losses": initial_losses, "finished": self.finished, "steps": state.step,
                "wall_seconds": state.wall_seconds, "minutes": state.wall_seconds / 60,
                "checkpoint": self.training.last_checkpoint,
                "resumed_from": self.training.resumed_from, "metrics_path": self.metrics_file,
                "precision": self.training.precision.name, "responses": responses,
                "paths": written, "config": asdict(self.config), "model": model}
