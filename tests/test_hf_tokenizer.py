"""The hub models' tokenizer (instructkit/hf_tokenizer.py) encodes and decodes as transformers does.

Each family's tokenizer is trained here (tests/tiny_hub_tokenizers.py: a small byte-level BPE
with the family's pipeline and special tokens, beside tokenizer_config.json and
generation_config.json as the real repositories have them). The reference is
`transformers.PreTrainedTokenizerFast` and `AutoTokenizer` on the same folder: the same ids
for varied texts (unicode, special tokens written in the text, the empty string), the same
text back, the same BOS, EOS and pad ids, the same chat template text. transformers is a
test dependency only.
"""

import json
import sys

import pytest
import torch
from tiny_hub_tokenizers import write_tokenizer_folder

from instructkit.hf_tokenizer import HubTokenizerError, load_hf_tokenizer

TEXTS = [
    "",
    "Hello world",
    "Grüße aus München: café, naïve, 東京, 😀 and ✓.",
    "cafe\u0301 (a combining accent: NFC makes it one character for Qwen)",
    "a<|endoftext|>b<|im_start|>user\nhi<|im_end|>\n",
    "<|begin_of_text|>x<|end_of_text|><|eot_id|>",
    "<think>\nmaybe\n</think>\n\nyes",
    "  two spaces,\ttab\n\n\nnewlines   and 1234567 digits, it's   ",
    "### Instruction:\nConvert 45 kilometers to meters.\n\n### Response:\n45000 meters",
]
FAMILIES = {
    "qwen3": {},
    "llama3": {},
    "smollm2": {},
    # settings that disagree with tokenizer.json's post-processor: transformers 5 follows the file
    "smollm2-add-bos": {"config": {"add_bos_token": True}},
    "llama3-no-bos": {"config": {"add_bos_token": False, "add_eos_token": True}},
    # an instruct model: generation_config's list of end ids, a pad token of its own
    "llama3-instruct": {"config": {"pad_token": "<|reserved_special_token_0|>"}},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, changes in FAMILIES.items():
        family = name.split("-")[0]
        folder = tmp_path_factory.mktemp(name)
        tokenizer = write_tokenizer_folder(folder, family, **changes)
        if name == "llama3-instruct":  # the real ids of <|end_of_text|>, <|eom_id|>, <|eot_id|>
            ends = [tokenizer.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
            generation = json.loads((folder / "generation_config.json").read_text())
            (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": ends}))
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def chapter_texts(shared_data):
    from gpt_instruction_finetuning import format_input

    data = json.loads((shared_data / "instruction-data.json").read_text(encoding="utf-8"))
    return [format_input(entry) + f"\n\n### Response:\n{entry['output']}" for entry in data[:20]]


@pytest.mark.parametrize("name", FAMILIES)
def test_encodes_and_decodes_as_transformers(folders, chapter_texts, name):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ours = load_hf_tokenizer(folders[name])
    references = [PreTrainedTokenizerFast.from_pretrained(folders[name]),
                  AutoTokenizer.from_pretrained(folders[name])]
    for text in TEXTS + chapter_texts:
        ids = ours.encode(text, allowed_special={"<|endoftext|>"})
        bare = ours.encode(text, add_special_tokens=False)
        for reference in references:
            assert ids == reference.encode(text), (type(reference).__name__, text)
            assert bare == reference.encode(text, add_special_tokens=False)
            assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False)
    # ids of special tokens, and bytes cut inside a character (an answer that stops mid-emoji)
    emoji = ours.encode("😀", add_special_tokens=False)
    assert len(emoji) > 1
    odd = [ours.eos_token_id, *emoji[:-1], ours.pad_token_id, *ours.encode("ok", add_special_tokens=False)]
    for reference in references:
        assert ours.decode(odd) == reference.decode(odd)
        assert ours.bos_token_id == reference.bos_token_id
        assert ours.eos_token_id == reference.eos_token_id
        assert ours.n_vocab == len(reference)
        # the pad id is transformers' where the repository names one, else EOS (Llama 3.2)
        assert ours.pad_token_id == (reference.pad_token_id if reference.pad_token_id is not None
                                     else reference.eos_token_id)
    assert "\ufffd" in ours.decode(odd)


def test_special_ids_of_each_family(folders):
    """What each family's files say: Llama 3.2 adds <|begin_of_text|>, Qwen3 base ends with
    <|endoftext|>, and an instruct model stops at every id of generation_config."""
    qwen, llama, smol = (load_hf_tokenizer(folders[n]) for n in ("qwen3", "llama3", "smollm2"))
    endoftext = qwen.encode("<|endoftext|>")
    assert endoftext == [qwen.eos_token_id] == [qwen.pad_token_id] == [qwen.eot_token]
    assert (qwen.bos_token, qwen.eos_token, qwen.bos_token_id) == (None, "<|endoftext|>", None)
    assert qwen.stop_token_ids == (qwen.eos_token_id,)
    assert qwen.encode("") == []

    assert llama.encode("") == [llama.bos_token_id]
    assert llama.encode("hi")[1:] == llama.encode("hi", add_special_tokens=False)
    assert llama.encode("hi")[0] == llama.bos_token_id
    assert (llama.bos_token, llama.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert llama.pad_token_id == llama.eos_token_id == llama.eot_token  # no pad token: EOS
    assert smol.eos_token_id == smol.bos_token_id == 0  # SmolLM2's special tokens come first

    instruct = load_hf_tokenizer(folders["llama3-instruct"])
    ends = [instruct.encode_ordinary(t)[0] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    assert instruct.stop_token_ids == tuple(ends) and instruct.eos_token_id == ends[0]
    assert instruct.pad_token_id == instruct.encode_ordinary("<|reserved_special_token_0|>")[0]
    assert load_hf_tokenizer(folders["llama3-no-bos"]).encode("hi") == llama.encode("hi")


def test_drop_in_for_the_chapters_tiktoken_encoding(folders):
    """The book's text_to_token_ids / token_ids_to_text and custom_collate_fn take it as they take
    tiktoken's Encoding; the collate pads with the model's pad id (EOS for Llama 3.2)."""
    from gpt_instruction_finetuning import custom_collate_fn
    from previous_chapters import text_to_token_ids, token_ids_to_text

    tokenizer = load_hf_tokenizer(folders["llama3"])
    text = "Grüße, 東京 <|end_of_text|>"
    ids = text_to_token_ids(text, tokenizer)
    assert ids.shape == (1, len(tokenizer.encode(text))) and ids[0, 0].item() == tokenizer.bos_token_id
    assert token_ids_to_text(ids, tokenizer) == "<|begin_of_text|>" + text
    batch = [tokenizer.encode("short"), tokenizer.encode("a longer entry here")]
    inputs, targets = custom_collate_fn(batch, pad_token_id=tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    assert inputs[0, len(batch[0]):].tolist() == [pad] * (inputs.shape[1] - len(batch[0]))
    assert targets[0, len(batch[0]) - 1].item() == pad  # the first pad is learnt: the model's EOS
    assert (targets[0, len(batch[0]):] == -100).all()
    assert torch.equal(inputs[1, :len(batch[1])], torch.tensor(batch[1]))


@pytest.mark.parametrize("name", ["qwen3", "smollm2"])
def test_chat_template_as_transformers_renders_it(folders, name):
    from transformers import AutoTokenizer

    ours, reference = load_hf_tokenizer(folders[name]), AutoTokenizer.from_pretrained(folders[name])
    messages = [{"role": "user", "content": "Name a colour. "}, {"role": "assistant", "content": "Blue"},
                {"role": "user", "content": "Another, in 日本語?"}]
    for prompt in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == \
            reference.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    text = ours.apply_chat_template(messages[:1], enable_thinking=False)
    assert text == reference.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False,
                                                 enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ours.encode(text).count(ours.encode("<|im_start|>", add_special_tokens=False)[0]) == 3


def test_chat_template_absent_and_without_jinja2(folders, monkeypatch):
    llama = load_hf_tokenizer(folders["llama3"])
    assert llama.chat_template is None
    with pytest.raises(HubTokenizerError, match="no chat template"):
        llama.apply_chat_template([{"role": "user", "content": "hi"}])
    qwen = load_hf_tokenizer(folders["qwen3"])
    assert "<|im_start|>" in qwen.chat_template
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if jinja2 were not installed
    with pytest.raises(ImportError, match="needs jinja2: pip install jinja2"):
        qwen.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bad_tokenizer_folders_are_one_clear_error(tmp_path):
    folder = tmp_path / "model"
    write_tokenizer_folder(folder, "qwen3")
    text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    (folder / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")  # a cut download
    with pytest.raises(HubTokenizerError, match=r"tokenizer.json is not a JSON file .*download the model"):
        load_hf_tokenizer(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(HubTokenizerError, match="tokenizer.json is missing"):
        load_hf_tokenizer(folder)

    other = tmp_path / "other"  # tokenizer_config.json of another model
    write_tokenizer_folder(other, "qwen3", config={"eos_token": "<|end_of_text|>"})
    with pytest.raises(HubTokenizerError, match=r"names eos_token '<\|end_of_text\|>', which tokenizer.json"):
        load_hf_tokenizer(other)
