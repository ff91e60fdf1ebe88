"""Check everything cheap before anything expensive: a bad flag or folder costs seconds, not a run.

Not in the book. Before any download, model build or training, the command line checks:
- every numeric flag's range (`NUMERIC_LIMITS`; the other commands pass their own `Limit`s
  to `check_ranges`);
- `--tokenizer-dir`: a folder with GPT-2's tokenizer files;
- `--resume`: the checkpoint exists, is one of this command's, and has this run's settings
  (`check_resume`, before the weights download);
- the output folder: created, and a file written into it and removed again;
- that no output file's name is taken by a folder;
- the data file, read and validated (a file still to be downloaded is validated on download);
- a GPT-2 checkpoint folder's hparams.json against the chosen model;
- free disk space against the files about to be written, with the estimate in the message;
- `--compile`, once the device is known (`check_compile`): torch.compile itself, and the
  compiler its backend needs on that device (Triton on a CUDA GPU, a C++ compiler on the CPU),
  which would otherwise fail only at the first training step.

Each failure is a `PreflightError`: one line, for `error: ...` and exit code 2.

`--epochs 0` trains nothing. So that such a run never replaces a finetuned model (or its answers
and plot) with an untrained one, its outputs carry `-untrained` in their names, and it says so
(`untrained_suffix`).
"""

import math
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from instructkit.errors import BadInputError, CheckpointError

MB = 1024 * 1024


class PreflightError(BadInputError):
    """A setting, a folder or the data would make the run fail: one line saying what to change."""


#####################################
# Numeric flags
#####################################

@dataclass(frozen=True)
class Limit:
    """The allowed range of one numeric setting; `None` (a setting left unset) always passes."""

    low: float
    high: float | None = None
    low_excluded: bool = False  # True: the value must be greater than `low`, not equal

    def problem(self, value):
        """A phrase like 'must be at least 1', or None when `value` is in range."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if self.low_excluded and not value > self.low:
            return f"must be greater than {self.low}"
        if value < self.low:
            return f"must be at least {self.low}" if self.high is None else self._between()
        if self.high is not None and value > self.high:
            return self._between()
        return None

    def _between(self):
        return f"must be between {self.low} and {self.high}"


# Every numeric setting of the command line (FinetuneConfig's int and float fields).
NUMERIC_LIMITS = {
    "epochs": Limit(0),  # 0 trains nothing; its outputs are named "-untrained"
    "batch_size": Limit(1),
    "lr": Limit(0, low_excluded=True),
    "weight_decay": Limit(0),
    "max_length": Limit(1),
    "seed": Limit(0, 2**64 - 1),  # what torch.manual_seed accepts
    "eval_freq": Limit(1),
    "eval_iter": Limit(1),
    "lora_rank": Limit(1),
    "lora_alpha": Limit(0, low_excluded=True),
    "max_new_tokens": Limit(1),
    "val_fraction": Limit(0, 1, low_excluded=True),  # their sum below 1: split_entries checks
    "test_fraction": Limit(0, 1, low_excluded=True),
    "shuffle_split": Limit(0, 2**64 - 1),
    "max_test_answers": Limit(0),  # 0: no answers
    "check_data": Limit(0, 1, low_excluded=True),  # a cosine similarity threshold
    "save_every": Limit(1),
    "keep": Limit(1),
    "max_steps": Limit(1),
}


def flag_name(field):
    return "--" + field.replace("_", "-")


def check_ranges(config, limits=NUMERIC_LIMITS):
    """PreflightError for the first setting of `config` (any object with attributes) out of range."""
    for field, limit in limits.items():
        value = getattr(config, field, None)
        if value is None:
            continue
        problem = limit.problem(value)
        if problem:
            raise PreflightError(f"{flag_name(field)} {problem} (got {value})")


#####################################
# Folders and files
#####################################

def check_output_dir(folder, flag="--output-dir"):
    """Create `folder` if needed and write a file into it; PreflightError saying why not."""
    from instructkit.safe_files import remove_file, write_atomically

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PreflightError(f"{flag} {folder} is a file, not a folder: choose another {flag}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreflightError(f"{flag} {folder} cannot be created ({e.strerror}): "
                             f"choose another {flag}") from None
    # A name of this process's own: under torchrun every process (on every machine, when the
    # folder is shared) checks the same folder at once.
    probe = folder / f".write-test-{secrets.token_hex(8)}"
    try:
        write_atomically(probe, lambda tmp: Path(tmp).write_bytes(b"ok"))  # as the outputs will be
        remove_file(probe)  # a probe held by a virus scan: FileInUseError, naming it
    except OSError as e:
        raise PreflightError(f"{flag} {folder} is not writable ({e.strerror}): "
                             f"choose another {flag} or fix its permissions") from None
    return folder


def check_output_files(paths):
    """PreflightError when a folder sits where an output file will be written."""
    for path in paths:
        if Path(path).is_dir():
            raise PreflightError(f"{path} is a folder, but the run writes a file of that name: "
                                 f"move the folder away or choose another --output-dir")


def check_output_file(path, flag, what=None):
    """PreflightError when an output file cannot be written: a folder sits at its path, or a
    file where one of its folders would be made. `flag` chooses the file; `what`: how the
    message names it (default: the flag)."""
    path = Path(path)
    what = what or flag
    if path.is_dir():
        raise PreflightError(f"{what} {path} is a folder, where a file is to be written: move "
                             f"it away or choose another {flag}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PreflightError(f"{what} {path} cannot be written: {parent} is a file, "
                                     f"not a folder")
            break
    return path


def check_data_file(path, data_url=None, split=None):
    """Read and validate the instruction data at `path`, and check that `split` (the run's
    split; default: the chapter's 85/10/5) leaves no part empty; return its entries.

    A file that is missing is fine when it will be downloaded (`data_url`, or the chapter's
    dataset): the download validates it. Returns None then.
    """
    from instructkit.instruction_data import DatasetError, load_instruction_file, split_data

    path = Path(path)
    if not path.exists():
        if data_url is None:
            raise PreflightError(f"{path} does not exist (pass --data-url to download it)")
        return None
    try:
        data = load_instruction_file(path)  # a folder, a BOM, bytes that are not UTF-8: handled
        (split or split_data)(data)
    except DatasetError as e:
        raise PreflightError(str(e)) from None
    return data


def untrained_suffix(epochs):
    """'-untrained' for a run that trains nothing (`--epochs 0`), so it never replaces a
    finetuned model, its answers or its plot; '' otherwise."""
    return "-untrained" if epochs == 0 else ""


def untrained_note(model_path):
    return (f"Note: --epochs 0 trains nothing, so the outputs carry '-untrained' in their names "
            f"({Path(model_path).name}, ...) and replace no finetuned model.")


def check_tokenizer_dir(folder, flag="--tokenizer-dir"):
    """PreflightError unless `folder` (None: tiktoken's own files) holds a pair of GPT-2's
    tokenizer files; checked before any download, as the tokenizer is built after them."""
    from instructkit.gpt2_tokenizer import tokenizer_files

    if folder is None:
        return
    if not Path(folder).is_dir():
        raise PreflightError(f"{flag} {folder} is not a folder: pass the folder that holds "
                             f"encoder.json and vocab.bpe (or vocab.json and merges.txt)")
    if tokenizer_files(folder) is None:
        raise PreflightError(f"{flag} {folder} holds neither encoder.json + vocab.bpe nor "
                             f"vocab.json + merges.txt (GPT-2's tokenizer files)")


def check_resume(resume, folder, stem, identity, other_command):
    """What `--resume` names, checked before any download or model load: the checkpoint (PATH,
    or the newest of `stem` in `folder` for a bare --resume) exists, is a checkpoint of this
    command, and its settings equal `identity`'s (the parts of the run's identity known before
    anything loads; the whole identity is checked again when training resumes).

    `other_command`: the command whose checkpoints a checkpoint of other settings' names
    would be, for the message. Returns the checkpoint's path, or None without --resume.
    A CheckpointError (exit code 2) says what is wrong.
    """
    from instructkit.checkpoints import check_identity, identity_part, load_checkpoint, newest_checkpoint
    from instructkit.training import RESUME_NEWEST

    if resume is None:
        return None
    # a bare --resume: this run's checkpoint (by the settings known here) of the highest step
    path = newest_checkpoint(folder, stem, identity) if resume == RESUME_NEWEST else Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such checkpoint. Pass a file of "
                              f"{folder} ({stem}-step*.pth), or --resume alone for the newest")
    if path.is_dir():
        raise CheckpointError(f"--resume {path} is a folder: pass a checkpoint file in it "
                              f"({stem}-step*.pth), or --resume alone for the newest one")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"--resume {path} is empty (0 bytes): a save that was cut off "
                              f"leaves such a file. Pass another checkpoint, or delete it.")
    # mmap: the tensors stay on disk, so even a 5 GB checkpoint is read in a moment
    checkpoint = load_checkpoint(path, mmap=True)
    saved = checkpoint.get("identity")
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise CheckpointError(f"{path} is a checkpoint without the settings it was saved with: "
                              f"start a fresh run without --resume")
    if set(saved["config"]) != set(identity["config"]):
        raise CheckpointError(f"{path} is a checkpoint of another command ({other_command}, "
                              f"by its settings), not of this one: resume it with that "
                              f"command, or pass one of this command's checkpoints")
    check_identity({"identity": identity_part(saved, identity)}, identity, path)
    return path


#####################################
# Disk space
#####################################

def _meta_model(model_cfg, lora_rank=None):
    """A GPTModel on PyTorch's meta device: shapes without memory, built in no time."""
    import torch

    from exercise_variants import replace_linear_with_lora
    from previous_chapters import GPTModel

    with torch.device("meta"):
        model = GPTModel(model_cfg)
        if lora_rank:
            replace_linear_with_lora(model, rank=lora_rank, alpha=lora_rank)
    return model


def _tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def model_file_bytes(model_cfg, lora_rank=None):
    """Bytes of the files a finetuned GPTModel of `model_cfg` is saved as (float32 state dicts).

    Exact: counted on a model built on the meta device (the attention masks included). With
    `lora_rank`, the LoRA adapters file comes on top of the merged model.
    """
    model = _meta_model(model_cfg)
    model_bytes = _tensor_bytes(model.state_dict().values())
    if not lora_rank:
        return model_bytes
    model = _meta_model(model_cfg, lora_rank)
    adapter_bytes = _tensor_bytes(t for k, t in model.state_dict().items() if ".lora." in k)
    return model_bytes + adapter_bytes


def checkpoint_bytes(model_cfg, lora_rank=None):
    """An upper bound for one training checkpoint (checkpoints.save_checkpoint): the model's
    state dict, AdamW's two float32 moments for each trained weight (all of them; with LoRA the
    adapters only), and 1 MB for the RNG states, the losses and the file's structure."""
    model = _meta_model(model_cfg, lora_rank)
    weights = _tensor_bytes(model.state_dict().values())
    trained = sum(p.numel() for name, p in model.named_parameters()
                  if not lora_rank or ".lora." in name)
    return weights + 2 * 4 * trained + MB


def gpt2_download_bytes(model_cfg):
    """An upper bound for a GPT-2 download of `model_cfg`, from any source.

    OpenAI's TensorFlow checkpoint holds every weight once in float32 (the output head shares
    the token embedding); the hub's model.safetensors holds the attention masks too, in
    float32. So: the model's state dict without the output head, and 2 MB of tokenizer files.
    """
    model = _meta_model(model_cfg)
    return model_file_bytes(model_cfg) - _tensor_bytes([model.out_head.weight]) + 2 * MB


def answers_bytes(data_file_bytes, n_entries, max_new_tokens):
    """An upper bound for the answers JSON and the plot: the test split's text is at most the
    data file; each new token is a few characters (16 bytes allowed), and 1 MB for the plot."""
    return data_file_bytes + n_entries * max_new_tokens * 16 + MB


def format_bytes(n):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _existing_ancestor(folder):
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return folder


def check_disk_space(needs, flag="--output-dir"):
    """`needs`: (folder, bytes, what) for each file about to be written.

    Folders on the same disk add up. PreflightError when a disk has less free space than its
    files need, plus 1% and 1 MB for the files' own structure.
    """
    disks = {}  # device id -> (folder, total bytes, [what, ...])
    for folder, n_bytes, what in needs:
        folder = _existing_ancestor(folder)
        device = folder.stat().st_dev
        first, total, whats = disks.get(device, (folder, 0, []))
        disks[device] = (first, total + n_bytes, [*whats, f"{what} ({format_bytes(n_bytes)})"])
    for folder, total, whats in disks.values():
        needed = total + total // 100 + MB
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise PreflightError(
                f"not enough free disk space in {folder}: {', '.join(whats)} need about "
                f"{format_bytes(needed)}, {format_bytes(free)} is free; free some space "
                f"or choose another {flag}")


#####################################
# All of it, before a run
#####################################

def gpt2_download_needed(models_dir, model, source="auto"):
    """True when the files of GPT-2 `model` from `source` ("auto": from any source) are not
    complete in `models_dir`."""
    from instructkit.gpt2_sizes import model_folder
    from instructkit.gpt2_weights import FILENAMES, WEIGHT_SOURCES
    from instructkit.hub import files_present, hub_files

    folder = model_folder(model)
    model_dir = Path(models_dir) / folder
    for candidate in [source] if source != "auto" else WEIGHT_SOURCES[1:]:
        files = [(name,) for name in FILENAMES] if candidate == "openai" else hub_files(candidate, folder)
        if all(files_present(model_dir, names) for names in files):
            return False
    return True


def check_checkpoint(models_dir, model):
    """PreflightError when the checkpoint folder's hparams.json is another GPT-2 size."""
    from instructkit.gpt2_sizes import model_folder
    from instructkit.gpt2_weights import check_checkpoint_folder

    try:
        check_checkpoint_folder(Path(models_dir) / model_folder(model), model)
    except CheckpointError as e:
        raise PreflightError(str(e)) from None


#####################################
# --compile
#####################################

def _dynamo_supported():
    """Whether torch.compile runs on this Python and torch at all."""
    import torch

    if not hasattr(torch, "compile"):
        return False
    try:
        import torch._dynamo
    except ImportError:
        return False
    return bool(torch._dynamo.is_dynamo_supported())


def _triton_installed():
    """Whether the Triton package (inductor's GPU code generator) can be imported."""
    try:
        from torch.utils._triton import has_triton_package
    except ImportError:  # a torch that moved it: look for the package itself
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return has_triton_package()


def _cpp_compiler_candidates():
    """The C++ compilers inductor would try for CPU code, in its order."""
    if sys.platform == "win32":
        return [os.environ.get("CXX", "cl")]  # MSVC's cl.exe, from a Developer Command Prompt
    try:
        from torch._inductor import config as inductor_config

        cxx = inductor_config.cpp.cxx
    except ImportError:
        cxx = (os.environ.get("CXX", "g++"),)
    return [name for name in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if name]


def _cpp_compiler():
    """The path of the first C++ compiler inductor would find, or None."""
    for name in _cpp_compiler_candidates():
        if found := shutil.which(name):
            return found
    return None


def check_compile(device):
    """PreflightError (one line) when `--compile` cannot work on `device`; else a note or None.

    torch.compile's default backend, inductor, generates code at the first step: Triton kernels
    on a CUDA GPU (Triton needs compute capability 7.0 or newer), C++ on the CPU, built with the
    machine's C++ compiler. Without them the run would fail after the downloads and the model
    build, at its first training step. On Apple's MPS, inductor writes Metal shaders that the
    OS compiles itself (no extra install), but that backend is younger: the note says so.
    """
    import torch

    from instructkit.precision import cuda_capability

    device = torch.device(device)
    drop = "or run without --compile"
    if not _dynamo_supported():
        raise PreflightError(f"--compile: torch.compile does not run on this Python "
                             f"{sys.version_info.major}.{sys.version_info.minor} with torch "
                             f"{torch.__version__}; install a newer torch {drop}")
    if device.type == "cuda":
        if not _triton_installed():
            package = "triton-windows" if sys.platform == "win32" else "triton"
            raise PreflightError(f"--compile on a CUDA GPU needs Triton, which is not installed: "
                                 f"pip install {package}, {drop}")
        major, minor = cuda_capability(device)
        if major < 7:
            raise PreflightError(f"--compile: Triton needs a GPU of compute capability 7.0 or "
                                 f"newer, this one has {major}.{minor}; run without --compile")
    elif device.type == "cpu":
        if _cpp_compiler() is None:
            names = " or ".join(_cpp_compiler_candidates()) or "a C++ compiler"
            how = ("install Visual Studio's Build Tools (C++) and run from a Developer Command "
                   "Prompt" if sys.platform == "win32" else
                   "install the Xcode command line tools (xcode-select --install)"
                   if sys.platform == "darwin" else "install g++ (e.g. apt install g++)")
            raise PreflightError(f"--compile on the CPU needs a C++ compiler ({names}), none "
                                 f"was found: {how}, {drop}")
    elif device.type == "mps":
        return ("Note: --compile on MPS uses torch's newer Metal backend; if the first step "
                "fails, run without --compile.")
    return None


def check_run(config, output_dir, output_files, data_path, data_url, model_cfg, models_dir=None,
              extra_needs=(), split=None, resume=None):
    """Every check, cheapest first; returns the validated entries (None when still to download).

    `config`: the run's settings (FinetuneConfig); `output_files`: the paths the run writes;
    `model_cfg`: the GPTModel config (None for a hub model: no size checks); `models_dir`:
    where the GPT-2 checkpoints are kept (None when no GPT-2 is loaded, as in test mode);
    `extra_needs`: more (folder, bytes, what) to find disk space for; `split`: how the run
    splits the entries (see check_data_file); `resume`:
    (folder, stem, identity, other command) of the checkpoints, for `check_resume`.
    """
    check_ranges(config)
    check_tokenizer_dir(getattr(config, "tokenizer_dir", None))
    check_output_dir(output_dir)
    check_output_files(output_files)
    if resume is not None:
        check_resume(getattr(config, "resume", None), *resume)
    data = check_data_file(data_path, data_url, split)
    source = getattr(config, "weights_source", "auto")
    download = models_dir is not None and gpt2_download_needed(models_dir, config.model, source)
    if models_dir is not None:
        check_checkpoint(models_dir, config.model)

    lora_rank = getattr(config, "lora_rank", None)
    data_bytes = Path(data_path).stat().st_size if data is not None else MB
    n_entries = len(data) if data is not None else 0
    needs = [(output_dir, answers_bytes(data_bytes, n_entries, config.max_new_tokens),
              "the answers and the plot")]
    if model_cfg is not None:  # None: a hub model, whose size is known once downloaded
        needs.insert(0, (output_dir, model_file_bytes(model_cfg, lora_rank), "the finetuned model"))
    save_every, keep = getattr(config, "save_every", None), getattr(config, "keep", None)
    if save_every is not None and keep is not None and model_cfg is not None:
        # `keep` old ones while a new one is written
        needs.append((output_dir, (keep + 1) * checkpoint_bytes(model_cfg, lora_rank),
                      f"{keep + 1} checkpoints (--save-every, --keep {keep})"))
    if download:
        check_output_dir(models_dir, flag="--models-dir")
        needs.append((models_dir, gpt2_download_bytes(model_cfg), "the GPT-2 download"))
    flags = "--output-dir or --models-dir" if download else "--output-dir"
    check_disk_space([*needs, *extra_needs], flag=flags)
    return data
