"""The tokenizer of a Hugging Face hub model (Qwen3, Llama 3.2, SmolLM2), in tiktoken's shape.

Not in the book, whose GPT-2 tokenizer is tiktoken's Encoding. The newer families ship a
`tokenizer.json` (a byte-level BPE with its pre-tokenizer, special tokens and post-processor)
that the `tokenizers` package reads as it is; `transformers` is not needed. `load_hf_tokenizer
(folder)` returns an HFTokenizer, which the chapter's code uses where it uses tiktoken's:
- `encode(text, allowed_special=...)` -> list of ids, `decode(ids)` -> text;
- `eot_token`: the end-of-text id, as tiktoken's attribute of that name (the id, not the
  text); `n_vocab`.
Beside those: `bos_token_id`, `eos_token_id`, `pad_token_id`, `stop_token_ids`, the tokens'
texts, and `chat_template` with `apply_chat_template(messages)`.

Special tokens are handled as `transformers.PreTrainedTokenizerFast` handles them on the same
files (the tests check it):
- `encode` adds what tokenizer.json's post-processor adds (Llama 3's `<|begin_of_text|>` at
  the start; nothing for Qwen3 and SmolLM2). `add_bos_token` / `add_eos_token` in
  tokenizer_config.json change nothing, as in transformers 5 where a tokenizer.json exists
  (the real repositories' settings agree with their tokenizer.json anyway);
- a special token written in the text becomes its id (tiktoken must be told with
  `allowed_special`; here every special token is always allowed);
- `decode` keeps the special tokens.
Which ids are which: BOS, EOS and pad are the tokens `tokenizer_config.json` names. EOS
falls back to `generation_config.json`'s `eos_token_id` (which may be a list: every id in it
ends generation, `stop_token_ids`), pad falls back to generation_config's `pad_token_id`,
then to EOS: Llama 3.2 has no pad token, and the chapter's collate pads with EOS.
"""

import json
from pathlib import Path

from instructkit.errors import BadInputError
from instructkit.file_checks import describe, file_problem, kind_of

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer repositories keep it instead


class HubTokenizerError(BadInputError):
    """A model folder whose tokenizer files are missing, damaged or do not fit together."""


def load_hf_tokenizer(folder):
    """The HFTokenizer of the hub model files in `folder` (tokenizer.json and
    tokenizer_config.json; generation_config.json where present). No network."""
    return HFTokenizer(folder)


class HFTokenizer:
    """A hub model's tokenizer with the interface of tiktoken's Encoding (see the module)."""

    def __init__(self, folder):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError("Reading a hub model's tokenizer.json needs the tokenizers package: "
                              "pip install tokenizers") from err
        self.folder = Path(folder)
        path = self.folder / TOKENIZER_FILE
        _check_file(path)
        self.config = _read_json(self.folder / TOKENIZER_CONFIG)
        generation = _read_json(self.folder / GENERATION_CONFIG, required=False) or {}
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 (the Rust side raises a bare Exception)
            raise HubTokenizerError(f"cannot read {path} ({str(err).strip()[:200]}): delete it and "
                                    "download the model again") from None
        # transformers: split_special_tokens=True reads special tokens in text as plain text
        self._tokenizer.encode_special_tokens = bool(self.config.get("split_special_tokens", False))

        self.bos_token = self._named_token("bos_token")
        self.eos_token = self._named_token("eos_token")
        self.pad_token = self._named_token("pad_token")
        self.bos_token_id = self._id_of(self.bos_token, "bos_token")
        self.eos_token_id = self._id_of(self.eos_token, "eos_token")
        self.pad_token_id = self._id_of(self.pad_token, "pad_token")
        generation_eos = _ids(generation.get("eos_token_id"))
        if self.eos_token_id is None and generation_eos:
            self.eos_token_id = generation_eos[0]
            self.eos_token = self._tokenizer.id_to_token(self.eos_token_id)
        if self.eos_token_id is None:
            raise HubTokenizerError(f"neither {TOKENIZER_CONFIG} nor {GENERATION_CONFIG} in {self.folder} "
                                    "names an end-of-text token (eos_token, eos_token_id)")
        if self.pad_token_id is None:
            self.pad_token_id = next(iter(_ids(generation.get("pad_token_id"))), self.eos_token_id)
        # every id that ends generation: the tokenizer's EOS, then generation_config's, in order
        self.stop_token_ids = tuple(dict.fromkeys([self.eos_token_id, *generation_eos]))

        self.chat_template = self._read_chat_template()

    # --- tiktoken's interface -------------------------------------------------------------
    def encode(self, text, allowed_special="all", disallowed_special=(), add_special_tokens=True):
        """Token ids of `text`, with the BOS/EOS the tokenizer adds (add_special_tokens=False:
        none). Special tokens written in the text are read as their ids whatever
        `allowed_special` says (it is accepted for tiktoken's signature: the book passes
        `allowed_special={"<|endoftext|>"}`), as transformers reads them."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_ordinary(self, text):
        """Token ids of `text` alone: no BOS/EOS added (special tokens in it still count)."""
        return self.encode(text, add_special_tokens=False)

    def decode(self, tokens):
        """The text of token ids, special tokens included. Bytes that are not UTF-8 (an answer
        cut inside a character) become U+FFFD, as with tiktoken's default `errors="replace"`."""
        return self._tokenizer.decode([int(t) for t in tokens], skip_special_tokens=False)

    @property
    def eot_token(self):
        """The end-of-text id (tiktoken's name for it): the EOS id."""
        return self.eos_token_id

    @property
    def n_vocab(self):
        """How many token ids the tokenizer uses, added tokens included (the model's embedding
        may be larger: Qwen3's has 151,936 rows for 151,669 tokens)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def name(self):
        """The model folder's name (tiktoken's Encoding has a name too)."""
        return self.folder.name

    def __repr__(self):
        return f"<HFTokenizer {self.folder}: {self.n_vocab} tokens, eos {self.eos_token!r}>"

    # --- the chat template ---------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt=True, **variables):
        """The text of `messages` ([{"role": ..., "content": ...}, ...]) in the model's chat
        template, rendered as transformers renders it (jinja2, sandboxed). `variables` reach
        the template too (e.g. Qwen3's `enable_thinking`). Needs jinja2."""
        if self.chat_template is None:
            raise HubTokenizerError(f"the tokenizer in {self.folder} has no chat template; use "
                                    "another prompt style")
        try:
            template = _compile_template(self.chat_template)
        except ImportError as err:
            raise ImportError("Rendering a model's chat template needs jinja2: pip install jinja2") from err
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "unk_token": self._named_token("unk_token")}
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               tools=None, documents=None, **{**tokens, **variables})

    # --- reading the files ---------------------------------------------------------------
    def _named_token(self, key):
        """The text of a token tokenizer_config.json names (a string, or an AddedToken dict)."""
        value = self.config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) and value else None

    def _id_of(self, token, key):
        if token is None:
            return None
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise HubTokenizerError(f"{self.folder / TOKENIZER_CONFIG} names {key} {token!r}, which "
                                    f"{TOKENIZER_FILE} lacks: the two files are not of one model")
        return token_id

    def _read_chat_template(self):
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
        path = self.folder / CHAT_TEMPLATE_FILE
        return path.read_text(encoding="utf-8") if path.is_file() else None


def _compile_template(source):
    """A jinja2 template set up as transformers sets up chat templates."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _check_file(path):
    if not path.is_file():
        raise HubTokenizerError(f"{path} is missing: download the model's files again")
    if problem := file_problem(path):
        raise HubTokenizerError(f"{path} is not {describe(kind_of(path.name))} ({problem}): delete it "
                                "and download the model again")


def _read_json(path, required=True):
    """The JSON object in `path`; None for a missing optional file."""
    if not path.is_file() and not required:
        return None
    _check_file(path)
    value = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(value, dict):
        raise HubTokenizerError(f"{path} is not a JSON object")
    return value


def _ids(value):
    """generation_config's id or list of ids as a list of ints ([] for none)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []
