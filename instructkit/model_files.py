"""Load a finetuned GPT-2 of any size from its .pth file, and answer instructions with it.

Not in the book: the book's chat app and load-finetuned-model.ipynb hard-code gpt2-medium.
A finetuned hub model (Qwen3, Llama 3.2, SmolLM2) is rebuilt from the hub folder its run
record names (`hub_model`: family, repository id, folder), and talks through its own
tokenizer, in its run's prompt style (the chat template's too), through fast_llm.
Here the model's config comes from the run record saved next to the weights
(`<stem>.run.json`, written by the command line), or else from the shapes in the state dict
itself; LoRA adapters (`<stem>-adapters.pth`) load on top of their base model: the pretrained
GPT-2 their run record names, or a given .pth. Whatever is wrong with a file (missing, a
folder, empty, not a state dict, another size, adapters of another model, a run record that
cannot build a model) becomes a `ModelFileError` whose message names the file and the
problem; the commands (chat.py, web_chat.py, dpo_train.py) print it and exit with code 2.

`ChatModel` is one turn of a chat, shared by the terminal and the web app: the prompt in the
model's own style (the chapter's Alpaca prompt or exercise 7.1's Phi-3 prompt, with an
optional `### Input:`), cut to fit the context with a note saying so, and the answer
streamed token by token through fast_gpt's KV cache, or answered in batches.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from instructkit import CHAPTER_DIR as HERE  # noqa: E402
from instructkit.errors import BadInputError
from instructkit.gpt2_sizes import GPT2_SIZES, TEST_MODE_CONFIG, gpt2_config, model_folder
from instructkit.run_record import run_record_path

DEFAULT_STYLE = "alpaca"

# emb_dim -> n_heads: the one thing the shapes of a state dict do not tell (the tiny test
# model's width included, so its files load without a run record too).
HEADS_BY_WIDTH = {emb_dim: n_heads for _, _, emb_dim, _, n_heads in GPT2_SIZES.values()}
HEADS_BY_WIDTH[TEST_MODE_CONFIG["emb_dim"]] = TEST_MODE_CONFIG["n_heads"]


class ModelFileError(BadInputError):
    """A model or adapter file that is missing, unreadable, or does not fit its model."""


#####################################
# Reading the files
#####################################

def find_run_record(weights_path):
    """The run record beside a weights file: `<stem>.run.json` (run_record.run_record_path), and
    for `<stem>-adapters.pth` also `<stem>.run.json`; None when there is none."""
    weights_path = Path(weights_path)
    candidates = [weights_path]
    if weights_path.name.endswith("-adapters.pth"):
        candidates.append(weights_path.with_name(weights_path.name.removesuffix("-adapters.pth") + ".pth"))
    for candidate in candidates:
        path = run_record_path(candidate)
        if path.is_file():
            return path
    return None


def read_run_record_if_any(weights_path):
    """The run record of a weights file as a dict, or None when there is none."""
    path = find_run_record(weights_path)
    if path is None:
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path} (the run record of {weights_path}) is not valid JSON: {e}. "
                             f"Fix or delete it; without it the model size is read from the "
                             f"weights.") from None
    if not isinstance(record, dict):
        raise ModelFileError(f"{path} is not a run record (a JSON object)")
    return record


def first_line(error, limit=200):
    """An exception as one short line: its type, and its message's first line when it has one
    (an EOFError from a 0-byte file has none)."""
    lines = str(error).strip().splitlines()
    return type(error).__name__ + (f": {lines[0][:limit]}" if lines else "")


def check_model_path(path, what="model file"):
    """ModelFileError unless `path` is a file with something in it: the cheap checks a command
    makes before any download or model load (read_state_dict makes them too)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pth"))
        hint = f" (it holds {', '.join(inside[:3])})" if inside else ""
        raise ModelFileError(f"The {what} {path} is a folder, not a .pth file: pass a file in "
                             f"it{hint}")
    if not path.is_file():
        hint = "" if path.parent.is_dir() else f" (the folder {path.parent} does not exist either)"
        raise ModelFileError(f"The {what} {path} does not exist{hint}. Finetune a model first "
                             f"(python gpt_instruction_finetuning.py) or check the path.")
    if path.stat().st_size == 0:
        raise ModelFileError(f"The {what} {path} is empty (0 bytes): a copy or a save that was "
                             f"cut off (a full disk, say) leaves such a file. Save or copy it again.")
    return path


def read_state_dict(path, what="model file"):
    """The tensors saved in `path` (map_location="cpu", weights_only=True)."""
    path = check_model_path(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds (pickle, zip, EOF, ...)
        named = "" if path.suffix == ".pth" else f" (it is named {path.name}, not *.pth)"
        raise ModelFileError(f"The {what} {path} could not be read by torch.load "
                             f"({first_line(e)}){named}. Is it a PyTorch .pth file, saved "
                             f"whole?") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelFileError(f"The {what} {path} holds {type(state).__name__}, not a state dict "
                             f"(names -> tensors) as model.state_dict() saves it")
    return state


def is_adapter_file(state):
    """True for a file of only LoRA matrices (`*.lora.A`, `*.lora.B`, `lora_alpha`)."""
    return all(".lora." in k or k == "lora_alpha" for k in state)


def infer_model_config(state, path="the weights"):
    """The GPTModel config that fits a state dict's shapes.

    Width, vocabulary and context length are tensor shapes, the depth is the number of
    `trf_blocks.N`; the number of heads does not show in any shape, so it comes from the GPT-2
    size (or the tiny test model) of that width.
    """
    if "tok_emb.weight" not in state or "pos_emb.weight" not in state:
        raise ModelFileError(f"{path} is not a GPTModel state dict: it has no tok_emb.weight or "
                             f"pos_emb.weight (its first keys: {list(state)[:3]})")
    vocab_size, emb_dim = state["tok_emb.weight"].shape
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("trf_blocks.")}
    if emb_dim not in HEADS_BY_WIDTH:
        raise ModelFileError(f"{path} has emb_dim {emb_dim}, which is no GPT-2 size, so the "
                             f"number of attention heads is unknown. Put its run record "
                             f"({Path(str(path)).stem}.run.json, with a model_config) beside it.")
    return {"vocab_size": vocab_size, "context_length": state["pos_emb.weight"].shape[0],
            "emb_dim": emb_dim, "n_heads": HEADS_BY_WIDTH[emb_dim], "n_layers": len(blocks),
            "drop_rate": 0.0, "qkv_bias": "trf_blocks.0.att.W_query.bias" in state}


MODEL_CONFIG_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")


def check_model_config(cfg, path):
    """ModelFileError unless `cfg` (a run record's model_config) can build a GPTModel: the
    sizes are positive whole numbers and the width splits into the heads. Else the model
    would fail to build with an AssertionError or a KeyError that names no file."""
    if not isinstance(cfg, dict):
        raise ModelFileError(f"The run record of {path} has a model_config that is no JSON "
                             f"object: fix or delete the record")
    bad = [key for key in MODEL_CONFIG_KEYS
           if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] < 1]
    if bad:
        raise ModelFileError(f"The run record of {path} has no usable {', '.join(bad)} in its "
                             f"model_config (positive whole numbers): fix or delete the record")
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ModelFileError(f"The run record of {path} says emb_dim {cfg['emb_dim']} and "
                             f"n_heads {cfg['n_heads']}, which do not divide: fix or delete it")
    return {"drop_rate": 0.0, "qkv_bias": False, **cfg}


def model_name_for(cfg):
    """'gpt2-medium' etc. for a GPT-2 size's config, else None (the tiny test model, say)."""
    for name in GPT2_SIZES:
        full = gpt2_config(name)
        if all(cfg.get(k) == full[k] for k in ("emb_dim", "n_layers", "n_heads")):
            return name
    return None


def split_lora_model(state):
    """A LoRA-wrapped model's state dict -> (the base model's state dict, the adapters)."""
    adapters = {k: v for k, v in state.items() if ".lora." in k}
    base = {k.replace(".linear.weight", ".weight").replace(".linear.bias", ".bias"): v
            for k, v in state.items() if ".lora." not in k}
    return base, adapters


def load_weights(model, cfg, state, path):
    """Load `state` into `model` (built from `cfg`) strictly, with a message naming what does not fit."""
    expected = model.state_dict()
    # The causal-mask buffers are no weights: files saved without them load too.
    missing = [k for k in expected if k not in state and not k.endswith(".att.mask")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (the model has {tuple(expected[k].shape)})"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("wrong shape", wrong)) if keys]
        raise ModelFileError(f"{path} does not fit a GPTModel with emb_dim {cfg['emb_dim']}, "
                             f"{cfg['n_layers']} layers, context {cfg['context_length']}"
                             f": {'; '.join(problems)}. Is its run record from another model?")
    model.load_state_dict(state, strict=False)


def add_adapters(model, adapters, path, base_path):
    """LoRA layers on `model`, loaded from `adapters` (exercise 7.4's load_lora_adapters)."""
    from exercise_variants import load_lora_adapters

    try:
        load_lora_adapters(model, adapters)
    except (ValueError, RuntimeError) as e:
        raise ModelFileError(f"The adapters {path} do not fit the model {base_path}: "
                             f"{first_line(e, 300)}") from None


def record_style(*records):
    """The prompt style of the first run record that names one, else the chapter's Alpaca."""
    from gpt_instruction_finetuning import PROMPT_STYLES
    from instructkit.chat_template_style import STYLE_NAME

    for path, record in records:
        style = (record or {}).get("config", {}).get("prompt_style")
        if style is not None:
            if style not in PROMPT_STYLES and style != STYLE_NAME:
                raise ModelFileError(f"The run record of {path} names the prompt style {style!r}; "
                                     f"this version knows {[*PROMPT_STYLES, STYLE_NAME]}")
            return style
    return DEFAULT_STYLE


def load_finetuned_model(path, device="cpu", adapters=None, base=None):
    """Build the GPTModel of any size that `path` holds and load its weights.

    path: a model's .pth (finetuned, merged or pretrained), or a LoRA run's adapter file
        (`<stem>-adapters.pth`): that goes on `base` (a .pth) when given, else on OpenAI's
        pretrained GPT-2 that its run record names, as the LoRA run trained it.
    adapters: an adapter file to load on top of the model `path`.
    Returns (model in eval mode on `device`, prompt style name, info dict).
    """
    path = Path(path)
    state = read_state_dict(path)
    if is_adapter_file(state):
        if adapters is not None:
            raise ModelFileError(f"{path} holds adapters, and {adapters} too: pass one of them")
        if base is None:
            return load_adapters_on_pretrained(path, state, device)
        path, adapters = Path(base), path
        state = read_state_dict(path, "base model file")
    record = read_run_record_if_any(path)
    if (record or {}).get("hub_model") is not None:  # a Qwen3 or Llama model of the hub
        if adapters is not None:
            raise ModelFileError(f"{path} is a finetuned hub model: --adapters is for GPT-2 "
                                 f"models; load the run's merged model alone")
        return load_finetuned_hub_model(path, state, record, device)
    config = (record or {}).get("config", {})
    if adapters is not None and config.get("lora_rank"):
        raise ModelFileError(f"{path} is a LoRA run's model with its adapters merged in "
                             f"already: use it alone, or put the adapters on the pretrained "
                             f"GPT-2 they were trained on: python -m instructkit.chat {adapters}")

    inline_adapters = None
    if any(".lora." in k for k in state):  # saved with its LoRA layers in place
        state, inline_adapters = split_lora_model(state)
        if config.get("lora_alpha") is None:
            raise ModelFileError(f"{path} holds a model with LoRA layers but no lora_alpha: put "
                                 f"its run record beside it, or merge the adapters first")
        inline_adapters["lora_alpha"] = torch.tensor(float(config["lora_alpha"]))

    source = "inferred from the weights"
    cfg = infer_model_config(state, path)
    if record is not None and "model_config" in record:
        cfg = check_model_config(record["model_config"], path)
        source = f"from {find_run_record(path).name}"
    model = new_model(cfg)
    load_weights(model, cfg, state, path)
    if inline_adapters is not None:
        add_adapters(model, inline_adapters, path, path)
    adapter_record = None
    if adapters is not None:
        add_adapters(model, read_state_dict(adapters, "adapter file"), adapters, path)
        adapter_record = read_run_record_if_any(adapters)

    style = record_style((adapters, adapter_record), (path, record))
    name = ((adapter_record or record or {}).get("config", {}).get("model")
            or model_name_for(cfg) or f"GPT (emb_dim {cfg['emb_dim']})")
    return finish(model, device, style, path, adapters, name, cfg, source)


def hub_model_folder(record):
    """The hub model folder a run record names; downloaded again (hub_models) when it is
    gone, into the same models folder."""
    from instructkit.hub_models import download_hub_model

    hub = record["hub_model"]
    folder = Path(hub["folder"])
    return download_hub_model(hub["repo_id"], folder.parent)


def load_finetuned_hub_model(path, state, record, device="cpu"):
    """A finetuned Qwen3 or Llama model: the run record's hub model rebuilt (its folder's
    config.json), then the finetuned weights `state` loaded. A LoRA run's merged output head
    no longer shares the token embedding's matrix: it gets its own. Returns
    load_finetuned_model's (model, style, info), info["hub_folder"] the model's folder."""
    from instructkit.hub_model_files import empty_hub_model

    folder = hub_model_folder(record)
    # the structure alone: every parameter comes from `state`, so the hub's weights are not read
    model, cfg, _ = empty_hub_model(folder, dtype=torch.float32)
    if ("out_head.weight" in state and "tok_emb.weight" in state
            and model.out_head.weight is model.tok_emb.weight
            and not torch.equal(state["out_head.weight"], state["tok_emb.weight"])):
        model.out_head.weight = torch.nn.Parameter(model.out_head.weight.detach().clone())
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # the message lists what is missing, unexpected or misshaped
        raise ModelFileError(f"{path} does not fit the {record['hub_model']['repo_id']} model in "
                             f"{folder}: {first_line(e, 300)}") from None
    style = record_style((path, record))
    model, style, info = finish(model, device, style, path, None, record["hub_model"]["repo_id"],
                                cfg, f"from {find_run_record(path).name} and {folder / 'config.json'}")
    info["hub_folder"] = str(folder)
    return model, style, info


def load_pretrained_hub_model(folder, repo_id, style, device="cpu", adapters=None,
                              source="config.json"):
    """The pretrained hub model (Qwen3, Llama) in `folder`, asked in `style`; `adapters`: a
    LoRA run's (state dict, its path) put on it. Returns load_finetuned_model's (model,
    style, info), info["hub_folder"] the folder."""
    from instructkit.hub_model_files import load_hub_model

    model, cfg = load_hub_model(folder, dtype=torch.float32)
    adapters_path = None
    if adapters is not None:
        state, adapters_path = adapters
        add_adapters(model, state, adapters_path, folder)
    model, style, info = finish(model, device, style, folder, adapters_path,
                                f"{repo_id} (pretrained)", cfg, source)
    info["hub_folder"] = str(folder)
    return model, style, info


def load_adapters_on_pretrained(path, adapters, device="cpu"):
    """A LoRA run's adapters on the pretrained GPT-2 its run record names (and models_dir), or
    on the hub model it names."""
    record = read_run_record_if_any(path)
    if (record or {}).get("hub_model") is not None:
        folder = hub_model_folder(record)
        return load_pretrained_hub_model(
            folder, record["hub_model"]["repo_id"], record_style((path, record)), device,
            adapters=(adapters, path),
            source=f"from {find_run_record(path).name} and {folder / 'config.json'}")
    config = (record or {}).get("config", {})
    if config.get("model") is None:
        raise ModelFileError(f"{path} holds only LoRA adapters, and no run record beside it "
                             f"names their base model. Load them on it: python -m instructkit.chat "
                             f"BASE.pth --adapters {path}")
    if config.get("test_mode"):
        raise ModelFileError(f"{path} comes from a test-mode run, trained on a tiny random GPT "
                             f"that no file holds: use that run's merged model instead")
    models_dir = Path(config.get("models_dir") or HERE / "gpt2")
    cfg = record.get("model_config")
    model, info = load_pretrained_model(config["model"], "cpu", models_dir,
                                        None if cfg is None else check_model_config(cfg, path))
    add_adapters(model, adapters, path, info["path"])
    return finish(model, device, record_style((path, record)), info["path"], path,
                  config["model"], info["model_config"], f"from {find_run_record(path).name}")


def new_model(cfg):
    from previous_chapters import GPTModel

    return GPTModel(cfg)


def finish(model, device, style, path, adapters, name, cfg, source):
    """The model on `device` in eval mode, its style, and the info dict that describes it."""
    model.to(device).eval()
    info = {"path": str(path), "adapters": None if adapters is None else str(adapters),
            "model": name, "model_config": cfg, "config_source": source, "prompt_style": style,
            "parameters": sum(p.numel() for p in model.parameters())}
    return model, style, info


def load_pretrained_model(model_name, device="cpu", models_dir=HERE / "gpt2", cfg=None):
    """OpenAI's GPT-2 of a size (downloaded once into `models_dir`): a side-by-side chat's
    second model, or the base of LoRA adapters. `cfg`: the GPTModel config, if not the size's."""
    from gpt_download import download_and_load_gpt2
    from previous_chapters import load_weights_into_gpt

    cfg = dict(cfg or gpt2_config(model_name))
    _, params = download_and_load_gpt2(model_folder(model_name), models_dir, source="auto")
    model = new_model(cfg)
    try:
        load_weights_into_gpt(model, params)
    except ValueError as e:
        raise ModelFileError(f"The GPT-2 checkpoint in {Path(models_dir) / model_folder(model_name)} "
                             f"does not fit {model_name}: {e}") from None
    _, _, info = finish(model, device, None, Path(models_dir) / model_folder(model_name), None,
                        f"{model_name} (pretrained)", cfg, "GPT-2 sizes")
    return model, info


def load_sft_model(path, model=None, model_config=None, device="cpu"):
    """The finetuned GPTModel saved at `path`, and its config.

    The config: `model_config` when given, else the GPT-2 size `model` (e.g. "gpt2-medium"),
    else the run record `<stem>.run.json` beside the file, else the state dict's shapes. The
    files are read and checked as for the chat.
    """
    state_dict = read_state_dict(path, "finetuned model file")
    if model_config is None and model is not None:
        model_config = gpt2_config(model)
    if model_config is None:
        model_config = (read_run_record_if_any(path) or {}).get("model_config")
        model_config = (infer_model_config(state_dict, path) if model_config is None
                        else check_model_config(model_config, path))
    gpt = new_model(model_config)
    load_weights(gpt, model_config, state_dict, path)
    return gpt.to(device).eval(), model_config


#####################################
# One turn of a chat
#####################################

@dataclass
class ChatModel:
    """A loaded model with what a chat turn needs: its tokenizer, prompt style and name."""

    model: torch.nn.Module
    tokenizer: object
    style_name: str = DEFAULT_STYLE
    label: str = "model"
    # --decode-dtype: None decodes with the model's own weights; torch.bfloat16 with bf16 copies
    decode_dtype: object = None

    @property
    def style(self):
        from gpt_instruction_finetuning import PROMPT_STYLES
        from instructkit.chat_template_style import STYLE_NAME, chat_template_style

        if self.style_name == STYLE_NAME:  # a hub model's own chat template
            return chat_template_style(self.tokenizer)
        return PROMPT_STYLES[self.style_name]

    @property
    def context_size(self):
        from instructkit.fast_llm import context_size

        return context_size(self.model)

    @property
    def eos_id(self):
        return self.tokenizer.eot_token

    def prompt_budget(self, max_new_tokens):
        """Most prompt tokens that leave room for the answer (at least half the context)."""
        return max(self.context_size - max_new_tokens, self.context_size // 2)

    def prepare(self, instruction, input_text="", max_new_tokens=256):
        """(prompt text, prompt token ids, note): the note says when the text was cut to fit.

        The input is cut first, then the instruction, keeping their beginnings.
        """
        entry = {"instruction": instruction, "input": input_text or ""}
        budget = self.prompt_budget(max_new_tokens)
        before = len(self.tokenizer.encode(self.style.format_input(entry)))
        for _ in range(8):  # cutting re-tokenizes at the cut, so it can take a second pass
            prompt = self.style.format_input(entry)
            ids = self.tokenizer.encode(prompt)
            excess = len(ids) - budget
            if excess <= 0:
                break
            key = "input" if entry["input"] else "instruction"
            tokens = self.tokenizer.encode(entry[key])
            entry[key] = self.tokenizer.decode(tokens[:max(len(tokens) - excess, 0)])
        else:
            raise ValueError(f"Could not fit the prompt into {budget} tokens")
        note = None
        if len(ids) < before:
            note = (f"Note: your text was cut to fit: the prompt would have been {before} "
                    f"tokens, now {len(ids)}, so that it and a {max_new_tokens}-token answer "
                    f"fit the model's {self.context_size}-token context.")
        return prompt, ids, note

    def visible_answer(self, prompt, generated):
        """The answer as the chapter extracts it, empty while the response tag is being made."""
        tag = self.style.response_prefix.strip()
        start = generated.strip()
        if start and len(start) < len(tag) and tag.startswith(start):
            return ""
        return self.style.extract_response(prompt + generated, prompt)

    def stream(self, prompt, prompt_ids, max_new_tokens=256, temperature=0.0, top_k=None,
               seed=None):
        """Yield the answer so far (text) after each new token; greedy unless temperature > 0."""
        from instructkit.fast_llm import fast_path

        if seed is not None:
            torch.manual_seed(seed)
        idx = torch.tensor([prompt_ids], device=self.model.tok_emb.weight.device)
        ids = []
        # fast_gpt's KV cache, or fast_llm's for Qwen3 and Llama models
        steps = fast_path(self.model).generate_stream(
            self.model, idx, max_new_tokens, self.context_size, temperature=temperature,
            top_k=top_k or None, eos_id=self.eos_id, decode_dtype=self.decode_dtype)
        for token in steps:
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if not text.endswith("\ufffd"):  # not halfway through a multi-byte character
                yield self.visible_answer(prompt, text)
        yield self.visible_answer(prompt, self.tokenizer.decode(ids))

    def answer_all(self, entries, max_new_tokens=256, batch_size=16):
        """Greedy answers to many {"instruction", "input"} entries, in batches.

        Returns [(answer, note)]: each answer equals the last text `stream` gives for it.
        """
        from instructkit.fast_llm import fast_path

        prepared = [self.prepare(e["instruction"], e.get("input", ""), max_new_tokens)
                    for e in entries]
        answers = fast_path(self.model).generate_answer_ids(
            self.model, [ids for _, ids, _ in prepared], max_new_tokens, self.context_size,
            self.eos_id, batch_size=batch_size, decode_dtype=self.decode_dtype)
        return [(self.visible_answer(prompt, self.tokenizer.decode(ids)), note)
                for (prompt, _, note), ids in zip(prepared, answers, strict=True)]


def load_chat_model(path, device="cpu", adapters=None, base=None, tokenizer=None):
    """load_finetuned_model wrapped as a ChatModel; returns (ChatModel, info)."""
    from instructkit.gpt2_tokenizer import get_tokenizer

    model, style, info = load_finetuned_model(path, device, adapters=adapters, base=base)
    label = Path(adapters).name if adapters is not None else Path(path).name
    if "hub_folder" in info:  # a hub model talks through its own tokenizer
        from instructkit.hf_tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(info["hub_folder"])
    return ChatModel(model, tokenizer or get_tokenizer(), style, label), info


def add_model_arguments(parser):
    """The command-line arguments that pick a model, shared by chat.py and web_chat.py."""
    parser.add_argument("model", help="the finetuned model's .pth (or its base model's, with --adapters)")
    parser.add_argument("--adapters", help="LoRA adapter file (<stem>-adapters.pth) to load on MODEL")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--tokenizer-dir",
                        help="folder with GPT-2's encoder.json and vocab.bpe (offline use)")


def describe(info):
    """One line about a loaded model, for the terminal and the app's header."""
    adapters = f" + LoRA adapters {Path(info['adapters']).name}" if info["adapters"] else ""
    cfg = info["model_config"]
    return (f"{Path(info['path']).name}{adapters}: {info['model']}, "
            f"{info['parameters'] / 1e6:.1f}M parameters, {cfg['n_layers']} layers, context "
            f"{cfg['context_length']} (config {info['config_source']}), prompt style "
            f"{info['prompt_style'] or '-'}")
