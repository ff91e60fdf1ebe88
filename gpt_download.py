"""Download OpenAI's pretrained GPT-2 and read its weights into NumPy arrays (chapter 7,
section 7.5, with the code of chapter 5).

`download_and_load_gpt2(model_size="355M", models_dir="gpt2")` fetches the seven files OpenAI
publishes for one GPT-2 size into `gpt2/355M` and returns `(settings, params)`: the model's
settings from `hparams.json`, and every weight as a NumPy array in nested dicts laid out as in
OpenAI's checkpoint, which the book's `load_weights_into_gpt(gpt, params)` (previous_chapters.py)
copies into a GPTModel. `download_file` fetches one file, from a backup URL when the first
fails; `load_gpt2_params_from_tf_ckpt` reads the TensorFlow checkpoint.

Not in the book (each change is marked `# Not in the book:` where it is made):
- `source=` picks where the weights come from: "openai" (the default, the book's checkpoint,
  which needs TensorFlow), "hub-openai" or "hub-book" (copies on the Hugging Face hub, read
  without TensorFlow; `HF_ENDPOINT` names a mirror of the hub), or "auto", what the project's
  commands and notebook pass: whatever is complete on disk, else "hub-openai";
- downloads go through urllib, not `requests`: resumed after a cut, checked against the known
  sizes of OpenAI's files, named only once whole; files already complete are used without
  any network access; a mirror can go first (`GPT2_MIRROR_URL` or `mirror_url=`);
- problems are one clear error (DownloadError, CheckpointError) instead of a printed message
  or TensorFlow's traceback.
That machinery lives in the package: instructkit/gpt2_weights.py (the sources, OpenAI's hosts
and file sizes, the checks), instructkit/hub.py and instructkit/downloads.py.
"""

import os

import numpy as np

# Not in the book: no `json`, `requests`, `tqdm` or `tensorflow` imported here: the package
# reads hparams.json and does the downloads (with their progress bars), and TensorFlow is
# imported only to read a checkpoint.
from instructkit.gpt2_weights import (  # Not in the book: the machinery behind these functions
    checked_tf_checkpoint,
    choose_weights_source,
    download_gpt2_file,
    import_tensorflow,
    openai_base_urls,
    openai_file_sizes,
    read_hparams,
)
from instructkit.hub import download_and_load_from_hub  # Not in the book: the hub sources


def download_and_load_gpt2(model_size, models_dir, mirror_url=None, *, base_urls=None, source="openai",
                           hub_endpoint=None, expected_sizes=None):
    """Download GPT-2 `model_size` into `models_dir/model_size` and return `(settings, params)`.

    `model_size` is the name of OpenAI's folder: "124M", "355M", "774M" or "1558M". Files
    already complete there are used as they are, with no network access.

    Not in the book: the arguments after `models_dir`. `source` is one of
    instructkit.gpt2_weights.WEIGHT_SOURCES ("openai" by default, as in the book); the hub
    sources use `hub_endpoint` (else HF_ENDPOINT, else huggingface.co). For "openai",
    `mirror_url` (else GPT2_MIRROR_URL) is tried first, `base_urls` replaces OpenAI's host and
    the book's backup, and each file is checked against `expected_sizes` (default: the known
    sizes). Every source returns `(settings, params)` in OpenAI's layout.
    """
    # Refuse a size OpenAI never published before touching the disk or the network
    allowed_sizes = ("124M", "355M", "774M", "1558M")
    if model_size not in allowed_sizes:
        # Not in the book: the message also names the size that was asked for
        raise ValueError(f"Model size not in {allowed_sizes}; got {model_size!r}")

    # Not in the book: another source than OpenAI's checkpoint (which "auto" may choose) is
    # downloaded and read by the package, without TensorFlow
    source = choose_weights_source(source, model_size, models_dir)
    if source != "openai":
        return download_and_load_from_hub(model_size, models_dir, source, hub_endpoint)

    # Where the files go, the two hosts that serve them (OpenAI's, then the book's copy), and
    # the seven files of one model size
    model_dir = os.path.join(models_dir, model_size)
    base_url = "https://openaipublic.blob.core.windows.net/gpt-2/models"
    backup_base_url = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
    filenames = [
        "checkpoint", "encoder.json", "hparams.json",
        "model.ckpt.data-00000-of-00001", "model.ckpt.index",
        "model.ckpt.meta", "vocab.bpe"
    ]

    # Not in the book: a mirror (mirror_url, else GPT2_MIRROR_URL) goes before the hosts,
    # base_urls replaces the two hosts above (the tests point it at a local server), and every
    # file must have its size in expected_sizes (by default the known sizes of OpenAI's files)
    base_url, *backup_base_urls = openai_base_urls((base_url, backup_base_url), mirror_url, base_urls)
    expected_sizes = openai_file_sizes(model_size, expected_sizes)

    # Fetch every file; when the main host fails, the backup serves it
    os.makedirs(model_dir, exist_ok=True)
    for filename in filenames:
        # Not in the book: URLs joined with "/" (os.path.join would write "\" on Windows), and
        # the backup is the list of the remaining hosts
        file_url = f"{base_url}/{model_size}/{filename}"
        backup_url = [f"{url}/{model_size}/{filename}" for url in backup_base_urls]
        file_path = os.path.join(model_dir, filename)
        # Not in the book: expected_size, the size the file must have
        download_file(file_url, file_path, backup_url, expected_size=expected_sizes.get(filename))

    # Read the settings, then the weights, from the files now on disk.
    # Not in the book: the folder is passed on, and load_gpt2_params_from_tf_ckpt finds the
    # checkpoint in it with tf.train.latest_checkpoint (with a clear error when it cannot);
    # a missing or damaged hparams.json is a CheckpointError, and the file gets closed
    tf_ckpt_path = model_dir
    settings = read_hparams(model_dir)
    params = load_gpt2_params_from_tf_ckpt(tf_ckpt_path, settings)

    return settings, params


def download_file(url, destination, backup_url=None, *, expected_size=None):
    """Download `url` to `destination`, from `backup_url` when `url` fails.

    Not in the book: `backup_url` may also be a list of URLs, tried in order, and
    `expected_size` is the number of bytes the file must have.
    """
    # Not in the book: urllib through the package instead of `requests`. A file already at
    # `destination` is complete (a download gets its name only once whole), so it is kept
    # without asking any server (the book compares its size with the server's). A download
    # goes through `<destination>.part`, resumes after a cut, even from the backup, and is
    # checked against the announced length and `expected_size`. When every URL fails, a
    # DownloadError lists them all and what to do (the book prints a message and returns).
    download_gpt2_file(url, destination, backup_url, expected_size=expected_size)


def load_gpt2_params_from_tf_ckpt(ckpt_path, settings):
    """Read every weight of a GPT-2 TensorFlow checkpoint into nested dicts of NumPy arrays.

    `ckpt_path` is the checkpoint's prefix, e.g. "gpt2/355M/model.ckpt", as
    `tf.train.latest_checkpoint` returns it; `settings` are the model's hparams, whose
    `n_layer` is the number of transformer blocks. Returns `{"wte", "wpe", "g", "b",
    "blocks": [one dict per block]}`, each array without its dimensions of size one.

    Not in the book: `ckpt_path` may also be the folder holding the checkpoint.
    """
    # Not in the book: TensorFlow is imported when a checkpoint is read, not with the module,
    # so that the hub sources work without it; without it, the error says how to install it
    tf = import_tensorflow()

    # One empty dict per transformer block, for the loop below to fill
    params = {"blocks": [{} for _ in range(settings["n_layer"])]}

    # Not in the book: a folder becomes its checkpoint's prefix; names of another model or
    # depth, a cut or damaged file, and a checkpoint that leaves a part of params empty are
    # one CheckpointError saying what to do, not TensorFlow's traceback
    with checked_tf_checkpoint(ckpt_path, settings, params) as ckpt_path:
        # Visit every variable stored in the checkpoint, by name
        for name, _ in tf.train.list_variables(ckpt_path):
            # Its values as a NumPy array; a matrix stored as (1, d_in, d_out) becomes (d_in, d_out)
            variable_array = np.squeeze(tf.train.load_variable(ckpt_path, name))

            # "model/h3/attn/c_attn/w" -> ["h3", "attn", "c_attn", "w"]: drop the "model" scope
            variable_name_parts = name.split("/")[1:]

            # A block's weights ("h0", "h1", ...) go into that block's dict; the embeddings and
            # the final norm ("wte", "wpe", "ln_f/g", "ln_f/b") stay at the top level
            target_dict = params
            if variable_name_parts[0].startswith("h"):
                layer_number = int(variable_name_parts[0][1:])
                target_dict = params["blocks"][layer_number]

            # Go down one nested dict per name part between the first and the last, making the
            # dicts that do not exist yet ("attn" -> "c_attn"); "ln_f" itself is left out
            for key in variable_name_parts[1:-1]:
                target_dict = target_dict.setdefault(key, {})

            # The last part names the array: "w" or "b" (weight, bias), "g" (a norm's scale)
            last_key = variable_name_parts[-1]
            target_dict[last_key] = variable_array

    return params
