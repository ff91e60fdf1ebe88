"""Tiny byte-level BPE tokenizers laid out as the hub's Qwen3, Llama 3.2 and SmolLM2 repositories.

`write_tokenizer_folder(folder, family)` trains a `tokenizer.json` of a few hundred merges with
the `tokenizers` trainer, in that family's pipeline (its pre-tokenizer regex, NFC for Qwen,
its special tokens, Llama 3's post-processor that adds `<|begin_of_text|>`), and writes the
`tokenizer_config.json` and `generation_config.json` as the real repositories have them,
with the ids of this small vocabulary. Training takes a few hundredths of a second.
"""

import json
from pathlib import Path

# The pre-tokenizer patterns of the real tokenizer.json files (Llama 3 groups up to 3 digits).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_PATTERN = QWEN_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}")
SPECIAL_TOKENS = {
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eom_id|>",
               "<|eot_id|>"],
    "smollm2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}
TRAINING_TEXT = """Below is an instruction that describes a task. Write a response that appropriately
completes the request. ### Instruction: Rewrite the sentence in passive voice. ### Input: The
chef cooks the meal every day. ### Response: The meal is cooked by the chef every day.
Convert 45 kilometers to meters: 45 kilometers is 45000 meters. What's the capital of France?
It's Paris. Don't forget: they'll say we've done it. Grüße aus München, café, naïve, 東京, 😀.
def forward(self, idx): return self.out_head(self.final_norm(self.trf_blocks(x)))
"""


def train_tokenizer(family, merges=300):
    """A `tokenizers.Tokenizer` of `family`'s pipeline, trained on TRAINING_TEXT."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    if family == "qwen3":
        tokenizer.normalizer = normalizers.NFC()
    if family == "smollm2":  # GPT-2's regex in ByteLevel, digits one by one
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        pattern = QWEN_PATTERN if family == "qwen3" else LLAMA_PATTERN
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[family]]
    trainer = trainers.BpeTrainer(vocab_size=256 + merges, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  # SmolLM2's special tokens come first (ids 0, 1, 2), the others' last
                                  special_tokens=specials if family == "smollm2" else [])
    tokenizer.train_from_iterator(TRAINING_TEXT.split("\n") * 3, trainer)
    if family != "smollm2":
        tokenizer.add_special_tokens(specials)
    if family == "qwen3":  # Qwen3's thinking tags are added tokens that are not special
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                              for t in ("<think>", "</think>")])
    byte_level = processors.ByteLevel(trim_offsets=False)
    if family == "llama3":
        bos = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single="<|begin_of_text|> $A:0", pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", bos)])])
    else:
        tokenizer.post_processor = byte_level
    return tokenizer


def write_tokenizer_folder(folder, family, config=None, generation=None, merges=300):
    """Write tokenizer.json, tokenizer_config.json and generation_config.json of `family`
    ("qwen3", "llama3", "smollm2") in `folder`, as the base models' repositories have them;
    `config` and `generation` update the two JSON files (a value None removes the key).
    Returns the trained Tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(family, merges)
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS[family]}
    if family == "qwen3":  # Qwen/Qwen3-0.6B-Base
        tokenizer_config = {
            "add_bos_token": False, "add_prefix_space": False, "bos_token": None,
            "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "errors": "replace", "clean_up_tokenization_spaces": False, "split_special_tokens": False,
            "model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHATML_TEMPLATE}
        generation_config = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
                             "max_new_tokens": 2048, "do_sample": False}
    elif family == "llama3":  # meta-llama/Llama-3.2-1B
        tokenizer_config = {
            "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
            "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
        generation_config = {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|end_of_text|>"],
                             "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    else:  # HuggingFaceTB/SmolLM2-360M
        tokenizer_config = {
            "add_prefix_space": False, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "model_max_length": 8192,
            "tokenizer_class": "GPT2Tokenizer", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "chat_template": CHATML_TEMPLATE}
        generation_config = {"bos_token_id": 0, "eos_token_id": 0}
    for target, changes in ((tokenizer_config, config), (generation_config, generation)):
        for key, value in (changes or {}).items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2), encoding="utf-8")
    return tokenizer
