"""Chapter 7 as one script: finetune GPT-2 on the instruction data and answer the test set.

The book's standalone script, definition by definition: the chapter's helpers
(`InstructionDataset`, `custom_collate_fn`, `download_and_load_file`, `format_input`,
`plot_losses`) and `main`, which prints the package versions, prepares the data, loads
GPT-2, finetunes it, and saves the plot, the answers and the model.

    python gpt_instruction_finetuning.py              # the chapter: gpt2-medium, 2 epochs
    python gpt_instruction_finetuning.py --test_mode  # a tiny random GPT, in seconds
    python gpt_instruction_finetuning.py --model qwen3-0.6b  # a hub model (Qwen3, Llama 3.2, SmolLM2)
    python gpt_instruction_finetuning.py --help       # every flag

`# Not in the book:` marks each change. The flags beyond `--test_mode` (other data and
models, the exercises, checkpoints and `--resume`, torchrun, ...) are parsed in
`instructkit/finetune_config.py`; the machinery behind them (the checks before any download,
checkpoints, the run record, what an interruption saved) is `instructkit/finetune_run.py`'s
`FinetuneRun`, which `main` calls where the book does the same step plainly. `get_device`
and `extract_response` come from the chapter notebook (sections 7.4 and 7.5).
"""

from functools import partial
import json
import os
import sys
import time

import matplotlib.pyplot as plt
import torch
from torch.utils.data import Dataset, DataLoader

# The GPT-2 download and model of the earlier chapters, from the files beside this one
from gpt_download import download_and_load_gpt2
from previous_chapters import (
    GPTModel,
    load_weights_into_gpt,
)

# Not in the book: the book also imports importlib's version, re, requests, tiktoken, tqdm,
# calc_loss_loader, generate, text_to_token_ids, train_model_simple and token_ids_to_text;
# here main reaches that work through FinetuneRun (fast_gpt's faster paths, the same numbers),
# and downloads go through instructkit. The exercises' variants come from exercise_variants.py.
from exercise_variants import (
    PHI3,
    InstructionDatasetWithMasking,
    InstructionDatasetWithStyle,
    PromptStyle,
    replace_linear_with_lora,
    with_instruction_masking,
)
from instructkit.downloads import download_first
from instructkit.finetune_config import FinetuneConfig, run_finetune_command
from instructkit.finetune_run import FinetuneRun
from instructkit.gpt2_sizes import TEST_MODE_CONFIG, book_model_name
from instructkit.instruction_data import validate_entries
from instructkit.run_record import package_version
from instructkit.safe_files import save_figure


class InstructionDataset(Dataset):
    def __init__(self, data, tokenizer):
        self.data = data

        # Tokenize every entry once, up front: prompt, then the response under its heading
        self.encoded_texts = []
        for entry in data:
            instruction_plus_input = format_input(entry)
            response_text = f"\n\n### Response:\n{entry['output']}"
            full_text = instruction_plus_input + response_text
            self.encoded_texts.append(
                tokenizer.encode(full_text)
            )

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(
    batch,
    pad_token_id=50256,
    ignore_index=-100,
    allowed_max_length=None,
    device="cpu"
):
    # One position more than the longest item, so that every item ends in a pad token
    batch_max_length = max(len(item)+1 for item in batch)

    # Each item padded, then turned into an input row and a target row
    inputs_lst, targets_lst = [], []

    for item in batch:
        new_item = item.copy()
        # The end-of-text token that closes the response
        new_item += [pad_token_id]
        # Fill up to the batch's length with the same token
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])  # all but the last position
        targets = torch.tensor(padded[1:])  # the next token at every position

        # New: the first pad token stays a target (the model learns to stop); the loss
        # ignores the ones after it
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index

        # New: cut rows that are longer than the model's context
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]

        inputs_lst.append(inputs)
        targets_lst.append(targets)

    # (batch, length) tensors, on the device the model trains on
    inputs_tensor = torch.stack(inputs_lst).to(device)
    targets_tensor = torch.stack(targets_lst).to(device)

    return inputs_tensor, targets_tensor


def download_and_load_file(file_path, url):
    if not os.path.exists(file_path):
        # Not in the book: downloaded with instructkit/downloads.py instead of requests: the
        # file gets its name only when complete, and a failure is one line saying what to do
        download_first([url], file_path)

    with open(file_path, "r", encoding="utf-8") as file:
        data = json.load(file)

    # Not in the book: every entry must have the three text keys; the error names the first
    # that does not
    return validate_entries(data, source=str(file_path))


def format_input(entry):
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )

    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""

    return instruction_text + input_text


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, plot_name="loss-plot-standalone.pdf"):
    # Not in the book: `plot_name` (the book's name is the default; the command line names
    # the plot after its run), and the file is written whole or not at all (save_figure)
    fig, ax1 = plt.subplots(figsize=(12, 6))

    # Both losses over the epochs
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")

    # The tokens seen on a second x-axis, above the plot
    ax2 = ax1.twiny()  # shares the y-axis with the first
    ax2.plot(tokens_seen, train_losses, alpha=0)  # drawn invisibly, only to place the ticks
    ax2.set_xlabel("Tokens seen")

    fig.tight_layout()  # make room for both axes' labels
    print(f"Plot saved as {plot_name}")
    save_figure(fig, plot_name)  # Not in the book: the book's plt.savefig(plot_name), atomically
    plt.close(fig)  # Not in the book: a script that plots again must not keep every figure open
    # plt.show()


def get_device():
    """Not in the book's script: section 7.4's choice of device (the notebook's).

    CUDA when there is a GPU, else Apple's GPU (MPS) on PyTorch 2.9 and newer, whose earlier
    versions computed this chapter's losses wrong, else the CPU.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        # MPS only where PyTorch computes its losses right (2.9 and later); the commands'
        # --device mps checks the same minimum (instructkit.devices.MPS_MIN_TORCH, a test
        # keeps the two equal)
        major, minor = map(int, torch.__version__.split(".")[:2])
        if (major, minor) >= (2, 9):
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        device = torch.device("cpu")
    return device


def extract_response(response_text, input_text):
    """Not in the book's script: section 7.5's answer, without the prompt and its heading."""
    return response_text[len(input_text):].replace("### Response:", "").strip()


# Not in the book: the chapter's prompt style as one value, beside exercise 7.1's Phi-3 style,
# so that --prompt-style can pick either by name (exercise_variants.PromptStyle)
ALPACA = PromptStyle("alpaca", format_input, "\n\n### Response:\n", extract_response)
PROMPT_STYLES = {"alpaca": ALPACA, "phi3": PHI3}


def main(test_mode=False, config=None):
    # Not in the book: `config` holds every flag of the command line (python
    # gpt_instruction_finetuning.py --help); main(test_mode) runs the chapter's settings as the
    # book's main does. `run` (instructkit/finetune_run.py) checks first what takes seconds
    # (the flags, folders, the data, the disk space), runs on torchrun's processes, saves
    # checkpoints, and says on Ctrl-C what was saved. main returns what it made.
    config = FinetuneConfig(test_mode=test_mode) if config is None else config
    test_mode = config.test_mode
    run = FinetuneRun(config, default_device=get_device)

    #######################################
    # Print package versions
    #######################################
    print()
    pkgs = [
        "matplotlib",  # the loss plot
        "tiktoken",    # GPT-2's tokenizer
        "torch",       # the model and its training
        "tqdm",        # progress bars
        "tensorflow",  # reads OpenAI's original checkpoint files
    ]
    for p in pkgs:
        print(f"{p} version: {package_version(p)}")  # Not in the book: "not installed" is no error
    print(50*"-")

    #######################################
    # Download and prepare dataset
    #######################################
    file_path = "instruction-data.json"
    url = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
    # Not in the book: --data and --data-url; JSON Lines too; the chapter's file from a mirror
    # as well, checked by its sha256, beside this script; one download per machine (torchrun)
    data = run.load_data(file_path, url)

    # Not in the book: the split by --val-fraction, --test-fraction and --shuffle-split (the
    # book's 85% training, 10% test, 5% validation, in the file's order, by default)
    train_data, test_data, val_data = run.split(data)

    # A handful of entries per split is enough to check the pipeline
    if test_mode:
        train_data = train_data[:10]
        val_data = val_data[:10]
        test_data = test_data[:10]

    print("Training set length:", len(train_data))
    print("Validation set length:", len(val_data))
    print("Test set length:", len(test_data))
    print(50*"-")

    # Not in the book: GPT-2's tokenizer built from --tokenizer-dir, or from the vocabulary files
    # that come with the weights (downloaded here), else tiktoken's own download; a hub
    # model's (--model Qwen/Qwen3-0.6B-Base) from its repository's tokenizer.json
    tokenizer = run.tokenizer()
    # Not in the book: --device, or section 7.4's get_device(); under torchrun this process's GPU
    device = run.device
    print("Device:", device)
    print(50*"-")

    # Not in the book: exercise 7.1's prompt style and 7.2's masked instructions as flags
    # (--prompt-style phi3, --mask-instructions), with the classes of exercise_variants.py;
    # --prompt-style chat: a hub model's own chat template, from its tokenizer
    style = PROMPT_STYLES.get(config.prompt_style) or run.chat_style(tokenizer)
    CustomDataset, collate_fn = InstructionDataset, custom_collate_fn
    if style is not ALPACA:
        CustomDataset = partial(InstructionDatasetWithStyle, style=style)
    if config.mask_instructions:
        CustomDataset = partial(InstructionDatasetWithMasking, style=style)
        collate_fn = with_instruction_masking(custom_collate_fn)

    # Not in the book: `collate_fn` (the chapter's, or exercise 7.2's), --max-length cut to the
    # model's context, and the model's end-of-text id as the padding (GPT-2's 50256, the
    # default; a hub model's EOS)
    customized_collate_fn = partial(collate_fn, device=device, allowed_max_length=run.max_length,
                                    pad_token_id=tokenizer.eot_token)

    num_workers = 0
    batch_size = run.batch_size  # Not in the book: --batch-size (the book's 8; 2 in test mode)

    torch.manual_seed(config.seed)  # Not in the book: --seed (the book's 123)

    train_dataset = CustomDataset(train_data, tokenizer)
    train_loader = DataLoader(
        train_dataset,
        batch_size=batch_size,
        collate_fn=customized_collate_fn,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers
    )

    val_dataset = CustomDataset(val_data, tokenizer)
    val_loader = DataLoader(
        val_dataset,
        batch_size=batch_size,
        collate_fn=customized_collate_fn,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers
    )
    # Not in the book: too little data for one batch, and texts longer than the context, are
    # reported here
    run.check_loaders(train_loader, [train_dataset, val_dataset, CustomDataset(test_data, tokenizer)])

    #######################################
    # Load pretrained model
    #######################################

    # Not in the book: --model names a Qwen3 or Llama-architecture model of the hub, downloaded
    # and loaded into the project's from-scratch model (instructkit/qwen3.py, llama3.py)
    if run.repo_id is not None:
        model, CHOOSE_MODEL = run.load_hub_model()

    # A tiny random GPT: the whole script runs in seconds, without downloading weights
    elif test_mode:
        # Not in the book: the project's test-mode GPT (instructkit/gpt2_sizes.py), which the
        # chat and DPO commands load back; the book's is smaller still
        BASE_CONFIG = dict(TEST_MODE_CONFIG)
        model = GPTModel(BASE_CONFIG)
        model.eval()
        CHOOSE_MODEL = "Small test model"

    # The chapter's model, with OpenAI's pretrained weights
    else:
        BASE_CONFIG = {
            "vocab_size": 50257,     # GPT-2's vocabulary
            "context_length": 1024,  # the longest text the model reads
            "drop_rate": 0.0,        # no dropout while finetuning
            "qkv_bias": True         # GPT-2's query, key and value projections have biases
        }

        model_configs = {
            "gpt2-small (124M)": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
            "gpt2-medium (355M)": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
            "gpt2-large (774M)": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
            "gpt2-xl (1558M)": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
        }

        CHOOSE_MODEL = book_model_name(config.model)  # Not in the book: --model (the book's gpt2-medium)

        BASE_CONFIG.update(model_configs[CHOOSE_MODEL])

        model_size = CHOOSE_MODEL.split(" ")[-1].lstrip("(").rstrip(")")
        # Not in the book: --models-dir and --weights-source (the hub's copies need no TensorFlow)
        settings, params = download_and_load_gpt2(model_size=model_size, models_dir=run.models_dir,
                                                  source=config.weights_source)

        model = GPTModel(BASE_CONFIG)
        load_weights_into_gpt(model, params)
        model.eval()

    # Not in the book: exercise 7.4 as a flag (--lora-rank): the pretrained weights frozen,
    # then every linear layer given a trainable low-rank update (exercise_variants.py)
    if config.lora_rank:
        for param in model.parameters():
            param.requires_grad = False
        replace_linear_with_lora(model, rank=config.lora_rank, alpha=config.lora_alpha or config.lora_rank)
    model.to(device)  # Not in the book: in test mode too (the book's tiny model stays on the CPU)

    print("Loaded model:", CHOOSE_MODEL)
    run.describe_cost(model)  # Not in the book: the memory it needs, the time the book measured
    print(50*"-")

    #######################################
    # Finetuning the model
    #######################################
    print("Initial losses")
    with torch.no_grad():
        # Not in the book: fast_gpt's loss (the same numbers); under torchrun, each process
        # computes a share of every batch
        train_loss = run.calc_loss_loader(train_loader, model, device, num_batches=5)
        val_loss = run.calc_loss_loader(val_loader, model, device, num_batches=5)

    print("   Training loss:", train_loss)
    print("   Validation loss:", val_loss)

    start_time = time.time()
    # Not in the book: --compile, and DDP or FSDP under torchrun, before the optimizer
    model = run.prepare_model(model)
    # Not in the book: --lr and --weight-decay (the book's 0.00005 and 0.1), a fused AdamW over
    # the trainable weights only (fast_gpt.make_optimizer)
    optimizer = run.make_optimizer(model)

    num_epochs = config.epochs  # Not in the book: --epochs (the book's 2)

    torch.manual_seed(config.seed)  # Not in the book: --seed (the book's 123)
    # Not in the book: train_model_simple's loop and printed lines, with fast_gpt's step,
    # checkpoints (--save-every, and on Ctrl-C), --resume, --max-steps, --eval-freq,
    # --eval-iter, a progress bar and a metrics file (instructkit/training.py)
    train_losses, val_losses, tokens_seen = run.train_model(
        model, train_loader, val_loader, optimizer, device,
        num_epochs=num_epochs, eval_freq=config.eval_freq, eval_iter=config.eval_iter,
        start_context=style.format_input(val_data[0]), tokenizer=tokenizer
    )
    if not run.finished:  # Not in the book: --max-steps stopped early; the checkpoint is the output
        return run.finish(train_losses, val_losses, tokens_seen, (train_loss, val_loss), model=model)

    end_time = time.time()
    execution_time_minutes = (end_time - start_time) / 60
    print(f"Training completed in {execution_time_minutes:.2f} minutes.")

    # Not in the book: the model is saved here, before the slow answers (the book saves it
    # last), with a run record beside it; a LoRA model as its adapters, then merged
    file_name = run.save_model(model)
    print(f"Model saved as {file_name}")

    # Not in the book: --epochs 0 trains nothing to plot; under torchrun, process 0 plots
    if train_losses and run.is_main:
        epochs_tensor = torch.linspace(0, num_epochs, len(train_losses))
        # Not in the book: the run record names the plot; a plot that another program holds
        # open (a PDF viewer, on Windows) is a warning, and the answers still follow
        with run.plot_file():
            plot_losses(epochs_tensor, tokens_seen, train_losses, val_losses, plot_name=run.paths["plot"])
    print(50*"-")

    #######################################
    # Saving results
    #######################################
    print("Generating responses")
    # Not in the book: the book answers one entry at a time with `generate`; here all at once,
    # batched, through fast_gpt's key/value cache (the same greedy answers), in the run's
    # prompt style, shared out over torchrun's processes, up to --max-test-answers
    test_data = run.generate_responses(model, test_data, tokenizer, style)

    # Not in the book: the answers are written whole or not at all, under the run's name
    test_data_path = run.save_answers(test_data)
    print(f"Responses saved as {test_data_path}")

    # Not in the book: the model was saved right after training, above. main returns what it
    # made, for the notebooks and tests
    return run.finish(train_losses, val_losses, tokens_seen, (train_loss, val_loss), test_data, model)


if __name__ == "__main__":
    # Not in the book: every flag of the command line (instructkit/finetune_config.py), and
    # problems a user can fix as one line with an exit code (instructkit/errors.py)
    sys.exit(run_finetune_command(main))
