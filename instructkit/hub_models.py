"""Today's open models from the Hugging Face hub, by repository id: the files a run needs.

Not in the book, which downloads GPT-2 only. `download_hub_model("Qwen/Qwen3-0.6B-Base",
models_dir)` (or a short name, `qwen3-0.6b`) makes sure `models_dir/Qwen--Qwen3-0.6B-Base/`
holds the repository's
- `config.json` (the family: `model_type` qwen3 or llama, and the sizes),
- `generation_config.json` where the repository has one (the end-of-text ids),
- `tokenizer.json` and `tokenizer_config.json` (hf_tokenizer.py reads them),
- the weights: `model.safetensors`, or `model.safetensors.index.json` and every shard it names.

The downloads are hub.py's and downloads.py's: `<endpoint>/<repo>/resolve/main/<file>`, the
endpoint from `hub_endpoint`, else `HF_ENDPOINT` (a mirror), else huggingface.co; a cut file
resumes from its `.part`; the size the server announces is checked, and what each file is
(file_checks.py). Once every file is there and passes those checks, nothing touches the
network (no token is read either).

Gated repositories (Llama 3.2): the token is `HF_TOKEN`, else the file the hub's own tools
write at login (`HF_TOKEN_PATH`, else `$HF_HOME/token`, default
`~/.cache/huggingface/token`). It goes to the hub endpoint only, as `Authorization: Bearer`,
never to a server the hub redirects to, and is never printed or written. Without a token, a
refusal is one line that says how to get access; a refused token is one line that says so.

Run `python -m instructkit.hub_models <repo id or short name> [--models-dir DIR]` to
download one ahead of a run; it prints the folder.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

from instructkit.downloads import DownloadError, download_first
from instructkit.errors import BadInputError, CheckpointError
from instructkit.file_checks import check_reusable
from instructkit.hub import HF_DEFAULT_ENDPOINT, HF_ENDPOINT_ENV_VAR, MIRROR_ADVICE, endpoint_url

# The tested models, by the short names the command line accepts (any repository id works too).
SHORT_NAMES = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B-Base",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B-Base",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
}
CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("generation_config.json",)  # not every repository has one
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # the second is the hub's older name
TOKEN_PAGE = "https://huggingface.co/settings/tokens"
DEFAULT_MODELS_DIR = "models"  # beside gpt2/ (GPT-2's), ignored by git as that is
# The hub's rules for a repository id: owner/name of letters, digits, '-', '_' and '.'.
REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


class GatedRepoError(DownloadError):
    """The hub refused a repository's file: gated (a license to accept), private, or a token
    it does not take. One line that says what to do."""


def resolve_model_name(name):
    """The hub repository id for `name`: a short name of SHORT_NAMES (any case), or an id
    `owner/name` as it is. Anything else is a BadInputError listing the short names."""
    name = str(name).strip()
    if name.lower() in SHORT_NAMES:
        return SHORT_NAMES[name.lower()]
    if REPO_ID_PATTERN.fullmatch(name) and ".." not in name and "--" not in name:
        return name
    raise BadInputError(f"{name!r} is neither a hub repository id (owner/name, e.g. "
                        f"Qwen/Qwen3-0.6B-Base) nor a short name ({', '.join(SHORT_NAMES)})")


def repo_folder(models_dir, repo_id):
    """`models_dir/<owner>--<name>`: where a repository's files are kept (the hub cache's
    spelling, without its layers of snapshots)."""
    return Path(models_dir) / repo_id.replace("/", "--")


def download_hub_model(repo_id_or_short_name, models_dir, hub_endpoint=None):
    """Make sure the hub repository's model files are complete in `models_dir/<owner>--<name>/`
    (e.g. models/Qwen--Qwen3-0.6B-Base/) and return that folder.

    `repo_id_or_short_name` is an id (`Qwen/Qwen3-0.6B-Base`) or a short name (`qwen3-0.6b`,
    see SHORT_NAMES). The files are config.json, generation_config.json where the repository
    has one, tokenizer.json, tokenizer_config.json and the weights (model.safetensors, or
    model.safetensors.index.json and its shards). A folder that holds them all, each passing
    file_checks.py's checks, is used without network access; a damaged file is moved aside
    and downloaded again, a cut one resumes. `hub_endpoint` overrides HF_ENDPOINT.

    Raises GatedRepoError (one line) when the hub refuses access, DownloadError when a file
    cannot be downloaded, CheckpointError for an index that names no usable shards.
    """
    repo_id = resolve_model_name(repo_id_or_short_name)
    folder = repo_folder(models_dir, repo_id)
    if _complete(folder):
        return folder
    endpoint = endpoint_url(hub_endpoint)
    token, token_source = hub_token()
    fetcher = _Fetcher(repo_id, folder, endpoint, token, token_source)
    for name in CONFIG_FILES[:1] + OPTIONAL_FILES + CONFIG_FILES[1:]:
        # the optional files before the weights: complete weights mean they were tried
        fetcher.get(name, optional=name in OPTIONAL_FILES)
    if check_reusable(folder / SINGLE_WEIGHTS):
        return folder
    if not check_reusable(folder / WEIGHTS_INDEX) and fetcher.get(SINGLE_WEIGHTS, optional=True):
        return folder
    fetcher.get(WEIGHTS_INDEX)  # no single file: a sharded repository
    for shard in shard_names(folder / WEIGHTS_INDEX):
        fetcher.get(shard)
    return folder


def _complete(folder):
    """Whether `folder` holds every file a run needs, each passing its checks (a damaged one is
    moved aside), and no cut download of an optional file."""
    if not all(check_reusable(folder / name) for name in CONFIG_FILES):
        return False
    if any((folder / f"{name}.part").exists() for name in OPTIONAL_FILES):
        return False
    if check_reusable(folder / SINGLE_WEIGHTS):
        return True
    if not check_reusable(folder / WEIGHTS_INDEX):
        return False
    return all(check_reusable(folder / shard) for shard in shard_names(folder / WEIGHTS_INDEX))


def shard_names(index_path):
    """The shard files `model.safetensors.index.json` names (its weight_map's values), sorted.

    A CheckpointError when the index has no weight map or names a file outside its folder.
    """
    try:
        weight_map = json.loads(Path(index_path).read_text(encoding="utf-8")).get("weight_map")
    except (AttributeError, UnicodeDecodeError, json.JSONDecodeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no weight_map of tensor names and files: delete it "
                              "and run the download again")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if (not isinstance(shard, str) or Path(shard).name != shard or shard.startswith(".")
                or "\\" in shard or not shard.endswith(".safetensors")):
            raise CheckpointError(f"{index_path} names {shard!r}, which is not a safetensors file "
                                  "beside it: delete it and run the download again")
    return shards


def hub_token(environ=None):
    """(token, where it came from) for gated repositories, or (None, None).

    `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the file the hub's tools write at
    login: `HF_TOKEN_PATH`, else `$HF_HOME/token`, where HF_HOME defaults to
    `$XDG_CACHE_HOME/huggingface`, i.e. `~/.cache/huggingface`. An empty one counts as none.
    """
    environ = os.environ if environ is None else environ
    for name in TOKEN_ENV_VARS:
        if token := environ.get(name, "").strip():
            return token, name
    path = token_file(environ)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, None
    return (token, str(path)) if token else (None, None)


def token_file(environ=None):
    """Where the hub's tools keep the login token (see hub_token)."""
    environ = os.environ if environ is None else environ
    if environ.get("HF_TOKEN_PATH"):
        return Path(environ["HF_TOKEN_PATH"]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "token"
    cache = Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache.expanduser() / "huggingface" / "token"


class _Fetcher:
    """Downloads a repository's files into its folder, one at a time."""

    def __init__(self, repo_id, folder, endpoint, token, token_source):
        self.repo_id, self.folder, self.endpoint = repo_id, folder, endpoint
        self.token, self.token_source = token, token_source
        self.where = "" if endpoint == HF_DEFAULT_ENDPOINT else f" at {endpoint}"

    def get(self, name, optional=False):
        """Download `name` unless it is there and passes its checks. Returns False for an
        optional file the repository does not have (404), else True."""
        if check_reusable(self.folder / name):
            return True
        url = f"{self.endpoint}/{self.repo_id}/resolve/main/{name}"
        try:
            download_first([url], self.folder / name, advice=MIRROR_ADVICE,
                           mirror_setting=HF_ENDPOINT_ENV_VAR, auth_token=self.token)
        except DownloadError as err:
            if getattr(err, "http_status", None) in (401, 403):
                raise self.refused(err.http_status) from None
            if optional and err.not_found:
                return False
            if err.not_found and name == CONFIG_FILES[0]:  # the first file asked for
                raise DownloadError(f"the hub{self.where} has no {self.repo_id} (HTTP 404 for {name}): "
                                    "check the repository id") from None
            raise
        return True

    def refused(self, status):
        """The one-line GatedRepoError for an HTTP 401 or 403 (the token is never in it)."""
        page, where = f"{HF_DEFAULT_ENDPOINT}/{self.repo_id}", self.where
        if self.token is None:
            return GatedRepoError(
                f"the hub{where} refused {self.repo_id} (HTTP {status}): it is gated or private, or "
                f"no such repository. To get access, accept its license on {page} while logged in, "
                f"then run 'huggingface-cli login' (or 'hf auth login') or set HF_TOKEN to a token "
                f"from {TOKEN_PAGE}")
        if status == 401:
            return GatedRepoError(
                f"the hub{where} refused the token from {self.token_source} (HTTP 401: not a valid "
                f"token): create a new one on {TOKEN_PAGE}, then run 'huggingface-cli login' or set "
                f"HF_TOKEN to it")
        return GatedRepoError(
            f"the token from {self.token_source} has no access to {self.repo_id} (HTTP 403): accept "
            f"its license on {page} with that account and wait for the approval; a fine-grained "
            f"token also needs read access to public gated repositories ({TOKEN_PAGE})")


def main(argv=None):
    """Download a hub model's files; print the folder. Exit codes as errors.py says."""
    from instructkit.errors import run_command

    parser = argparse.ArgumentParser(description="Download a Hugging Face hub model's files for the "
                                     "chapter's commands (config, tokenizer, safetensors weights).")
    parser.add_argument("model", help=f"a hub repository id (owner/name) or a short name: "
                        f"{', '.join(SHORT_NAMES)}")
    parser.add_argument("--models-dir", default=DEFAULT_MODELS_DIR,
                        help=f"where to keep it, as <models-dir>/<owner>--<name>/ "
                        f"(default: {DEFAULT_MODELS_DIR})")
    parser.add_argument("--hub-endpoint", default=None,
                        help=f"the hub or a mirror (default: ${HF_ENDPOINT_ENV_VAR}, else "
                        f"{HF_DEFAULT_ENDPOINT})")
    parser.add_argument("--debug", action="store_true", help="tracebacks for OS errors")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2

    def run():
        print(download_hub_model(args.model, args.models_dir, args.hub_endpoint))

    return run_command(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
