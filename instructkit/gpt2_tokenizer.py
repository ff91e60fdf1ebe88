"""GPT-2's tokenizer from the vocabulary files that come with the weights, offline.

Not in the book, which calls `tiktoken.get_encoding("gpt2")`; tiktoken downloads its two
files on first use, from a host many readers cannot reach. Every weights source brings the
same vocabulary along: OpenAI's `encoder.json` + `vocab.bpe`, or the hub's `vocab.json` +
`merges.txt`. `tokenizer_from_folder(folder)` builds tiktoken's GPT-2 Encoding from either, after the
checks a download gets (file_checks.py): a damaged file is one TokenizerFilesError naming it.
"""

import json
from pathlib import Path

from instructkit.errors import BadInputError, DownloadError
from instructkit.file_checks import describe, file_problem, kind_of

TOKENIZER_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


class TokenizerError(DownloadError):
    """tiktoken could not fetch GPT-2's vocabulary (offline, or a proxy in the way)."""


class TokenizerFilesError(BadInputError):
    """A tokenizer folder without GPT-2's two vocabulary files, or with damaged ones."""


class TokenizerMismatchError(TokenizerFilesError, ValueError):
    """Two vocabulary files that do not belong together (a ValueError, as it always was)."""


def get_tokenizer(tokenizer_dir=None):
    """GPT-2's tokenizer: from `tokenizer_dir` when given (OpenAI's encoder.json + vocab.bpe, or
    the hub's vocab.json + merges.txt), else tiktoken's, which downloads its files once.

    Every weights download puts those files in e.g. gpt2/355M/, so a machine that has the
    weights builds the tokenizer offline too.
    """
    if tokenizer_dir is not None:
        return tokenizer_from_folder(tokenizer_dir)
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except OSError as e:  # tiktoken downloads its vocabulary on first use
        raise TokenizerError(
            f"tiktoken could not download GPT-2's vocabulary ({e}). Connect to the internet "
            "once, or pass a folder holding encoder.json and vocab.bpe (--tokenizer-dir)."
        ) from None


def tokenizer_from_folder(folder):
    """tiktoken's GPT-2 Encoding from the vocabulary files beside downloaded weights.

    The folder holds OpenAI's `encoder.json` + `vocab.bpe`, or the hub's `vocab.json` +
    `merges.txt` (the same two files under other names). No network is needed.
    """
    import tiktoken

    pair = tokenizer_files(folder)
    if pair is None:
        raise TokenizerFilesError(f"{folder} holds neither encoder.json + vocab.bpe nor vocab.json + "
                                "merges.txt (GPT-2's tokenizer files); download the weights first")
    for path in pair:  # the checks a download gets: an HTML page or a cut file is named here
        if problem := file_problem(path):
            raise TokenizerFilesError(f"{path} is not {describe(kind_of(path.name))} ({problem}); "
                                      "delete it and download the weights again")
    ranks = gpt2_bpe_ranks(*pair)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def tokenizer_files(folder):
    """(vocabulary, merges) paths of the first complete pair in `folder`, else None."""
    for encoder, merges in TOKENIZER_FILE_PAIRS:
        if (Path(folder) / encoder).is_file() and (Path(folder) / merges).is_file():
            return Path(folder) / encoder, Path(folder) / merges
    return None


# GPT-2's pre-tokenizer pattern, tiktoken's r50k_pat_str (used by its "gpt2" encoding).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+$|\s+(?!\S)|\s"""


def gpt2_bpe_ranks(encoder_path, merges_path):
    """{token bytes: rank} from GPT-2's vocabulary (JSON) and merges (text) files.

    Both files spell bytes as printable characters (GPT-2's byte-to-unicode table). The ranks
    are the 256 single bytes, then one per merge in file order; they must equal the ids in the
    vocabulary, which is checked.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    byte_order = printable + [b for b in range(256) if b not in printable]
    char_to_byte = {chr(b): b for b in printable}
    char_to_byte |= {chr(256 + n): b for n, b in enumerate(byte_order[len(printable):])}

    def to_bytes(text, path):
        try:
            return bytes(char_to_byte[c] for c in text)
        except KeyError as err:
            raise TokenizerFilesError(f"{path} holds {err.args[0]!r}, not a character of GPT-2's "
                                      "byte alphabet: not GPT-2's tokenizer file") from None

    ranks = {bytes([b]): rank for rank, b in enumerate(byte_order)}
    lines = Path(merges_path).read_text(encoding="utf-8").split("\n")
    merges = [line.split() for line in lines if line.strip() and not line.startswith("#version")]
    for rank, (first, second) in enumerate(merges, start=len(ranks)):
        ranks[to_bytes(first, merges_path) + to_bytes(second, merges_path)] = rank
    vocab = json.loads(Path(encoder_path).read_text(encoding="utf-8"))
    if not isinstance(vocab, dict):
        raise TokenizerFilesError(f"{encoder_path} is not a JSON object of tokens and ids")
    ids = {to_bytes(token, encoder_path): i for token, i in vocab.items() if token not in ("<|endoftext|>",)}
    if ids != ranks:
        raise TokenizerMismatchError(f"{encoder_path} and {merges_path} do not belong together "
                         "(the vocabulary's ids differ from the merge order)")
    return ranks
