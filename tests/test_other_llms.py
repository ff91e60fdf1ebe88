"""Qwen3 and Llama 3 from scratch (instructkit/qwen3.py, llama3.py, hub_model_files.py,
fast_llm.py) against Hugging Face `transformers`, an implementation they share no code with.

Tiny random models of each kind (tests/tiny_hub_models.py: Qwen3 with QK-norm and tied
embeddings; Llama tied with plain RoPE; Llama untied with Llama 3's RoPE scaling, saved
sharded) are saved with `save_pretrained` and loaded into the project's models. Checked:
- logits equal within 1e-5 in float32 (the plain model and the fast path), and identical in
  bfloat16 to transformers' own bfloat16 loading of the same files;
- greedy tokens identical to `generate(do_sample=False)`: batch 1 through the KV cache (and
  the book's uncached previous_chapters.generate), batched and left-padded; sampled tokens
  and tokens past the context length equal to previous_chapters.generate's;
- the chapter's loss (calc_loss_batch on a custom_collate_fn batch padded with the model's
  EOS id, -100 ignored) equal to the loss from transformers' logits within 1e-5, and the
  packed, chunked loss of fast_llm equal to it, gradients included (with LoRA layers too);
- the real configs of Qwen3-0.6B/1.7B, SmolLM2-135M/360M/1.7B and Llama-3.2-1B/3B map to the
  model's config, and the models built from them have the published parameter counts;
- bad files (a missing, unexpected or misshaped tensor, no weights, a damaged file, another
  model type) are one CheckpointError line, exit code 2 through run_command.
transformers is imported only inside fixtures and tests (a test dependency only).
"""

import json
import shutil

import pytest
import tiny_hub_models as thm
import torch

import previous_chapters as pc
from gpt_instruction_finetuning import custom_collate_fn
from instructkit import fast_llm
from instructkit.errors import EXIT_BAD_INPUT, CheckpointError, run_command
from instructkit.head_loss import LOSS_CHUNK_ROWS
from instructkit.hub_model_files import (
    INDEX_FILE,
    SINGLE_FILE,
    hub_weight_names,
    load_hub_model,
    model_class,
    model_config,
    model_family,
    read_config_json,
)

KINDS = tuple(thm.KINDS)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hub_folders(tmp_path_factory):
    """{kind: folder} of the three tiny models, saved once for the module."""
    root = tmp_path_factory.mktemp("tiny-hub")
    return {kind: thm.save_hub_model(kind, root / kind)[0] for kind in KINDS}


@pytest.fixture(scope="module")
def hf_models(hub_folders):
    """{kind: transformers' model read back from the saved files}, float32, eager attention."""
    import transformers

    return {kind: transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, attn_implementation="eager").eval()
            for kind, folder in hub_folders.items()}


@pytest.fixture(scope="module")
def our_models(hub_folders):
    return {kind: load_hub_model(folder, dtype=torch.float32) for kind, folder in hub_folders.items()}


def random_ids(seed, shape, low=3):
    """Token ids above the special ids (0 pad, 1 BOS, 2 EOS)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, thm.VOCAB, shape, generator=generator)


#####################################
# The models and their files
#####################################

def test_the_kinds_cover_both_families_tied_untied_scaled_and_sharded(hub_folders, our_models):
    families = {kind: model_family(read_config_json(folder)) for kind, folder in hub_folders.items()}
    assert families == {"qwen3": "qwen3", "llama-tied": "llama", "llama3-scaled": "llama"}
    model, cfg = our_models["qwen3"]
    assert type(model).__name__ == "Qwen3Model" and cfg["qk_norm"] and cfg["head_dim"] == 32
    assert model.out_head.weight is model.tok_emb.weight  # tied: one matrix
    model, cfg = our_models["llama3-scaled"]
    assert type(model).__name__ == "Llama3Model" and not cfg["qk_norm"]
    assert cfg["rope_freq"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_context_length": 32}
    assert model.out_head.weight is not model.tok_emb.weight
    assert (hub_folders["llama3-scaled"] / INDEX_FILE).is_file()
    assert len(list(hub_folders["llama3-scaled"].glob("model-*.safetensors"))) > 1
    assert (hub_folders["qwen3"] / SINGLE_FILE).is_file()


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_transformers(kind, hf_models, our_models):
    model, _ = our_models[kind]
    idx = random_ids(1, (3, 50), low=0)
    with torch.no_grad():
        expected = hf_models[kind](idx).logits
        plain = model(idx)
        fast = model.out_head(fast_llm.hidden_states(model, idx))
    assert expected.std() > 1.0  # the logits spread out: a wrong weight shows
    assert (plain - expected).abs().max() < 1e-5
    assert (fast - expected).abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_logits_identical_to_transformers_bfloat16(kind, hub_folders):
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        hub_folders[kind], dtype=torch.bfloat16, attn_implementation="eager").eval()
    model, cfg = load_hub_model(hub_folders[kind], dtype="bfloat16")
    assert cfg["dtype"] == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    idx = random_ids(2, (2, 30), low=0)
    with torch.no_grad():
        assert torch.equal(model(idx), reference(idx).logits)


def test_the_config_dtype_is_the_default(hub_folders, tmp_path):
    folder = tmp_path / "bf16"
    shutil.copytree(hub_folders["llama-tied"], folder)
    config = read_config_json(folder)
    config.pop("dtype", None)
    config["torch_dtype"] = "bfloat16"  # the hub's files name it so
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    model, cfg = load_hub_model(folder)
    assert cfg["dtype"] == torch.bfloat16 and model.tok_emb.weight.dtype == torch.bfloat16


#####################################
# Generation
#####################################

@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_equal_transformers_batch_1(kind, hf_models, our_models):
    model, cfg = our_models[kind]
    prompt = random_ids(3, (1, 7))
    expected = hf_models[kind].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)
    cached = fast_llm.generate(model, prompt, 24, cfg["context_length"])  # KV cache
    with torch.no_grad():
        book = pc.generate(model, prompt, 24, cfg["context_length"])  # the book's loop, no cache
    assert torch.equal(cached, expected)
    assert torch.equal(book, expected)
    streamed = list(fast_llm.generate_stream(model, prompt, 24, cfg["context_length"]))
    assert streamed == expected[0, 7:].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_batched_left_padded_greedy_equal_transformers(kind, hf_models, our_models):
    model, cfg = our_models[kind]
    prompts = [random_ids(10 + i, (n,)).tolist() for i, n in enumerate((5, 11, 2, 8))]
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    expected = hf_models[kind].generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[:, longest:].tolist()
    eos_never = thm.VOCAB  # an id no step can produce: every answer has its 16 tokens
    assert fast_llm.generate_batch(model, prompts, 16, cfg["context_length"], eos_id=eos_never,
                                   pad_id=0) == expected
    # the answers in batches of 3, sorted by length, come back in the prompts' order
    assert fast_llm.generate_answer_ids(model, prompts, 16, cfg["context_length"], eos_id=eos_never,
                                        batch_size=3, pad_id=0) == expected


@pytest.mark.parametrize("mode", ["plain", "parallel", "native"])
@pytest.mark.parametrize("kind", KINDS)
def test_decode_matvec_paths_give_transformers_tokens(kind, mode, hf_models, our_models, monkeypatch):
    """The decode steps through instructkit/parallel_matvec.py, each path forced (the split one
    cuts every weight's rows into runs, even with one torch thread; native runs the batch-1
    steps in C, instructkit/native_decode.py): the greedy tokens of transformers, at batch 1
    and for a left-padded batch."""
    from instructkit import native_decode
    from instructkit import parallel_matvec as pm

    native_steps = []
    real_step = native_decode.NativeDecoder.step
    monkeypatch.setattr(native_decode.NativeDecoder, "step",
                        lambda self, token, cache: native_steps.append(1) or real_step(self, token, cache))

    model, cfg = our_models[kind]
    prompt = random_ids(7, (1, 6))
    expected = hf_models[kind].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)
    prompts = [random_ids(20 + i, (n,)).tolist() for i, n in enumerate((4, 9))]
    ids = torch.tensor([[0] * (9 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (9 - len(p)) + [1] * len(p) for p in prompts])
    batched = hf_models[kind].generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[:, 9:].tolist()
    pm.set_mode(mode)
    try:
        assert torch.equal(fast_llm.generate(model, prompt, 12, cfg["context_length"]), expected)
        assert fast_llm.generate_batch(model, prompts, 8, cfg["context_length"], eos_id=thm.VOCAB,
                                       pad_id=0) == batched
    finally:
        pm.set_mode(None)
    assert len(native_steps) == (11 if mode == "native" else 0)  # the batch-1 decode steps


@pytest.mark.parametrize("kind", ["qwen3", "llama3-scaled"])
def test_sampled_tokens_equal_the_books_for_the_same_seed(kind, our_models):
    model, cfg = our_models[kind]
    prompt = random_ids(60, (2, 5))
    torch.manual_seed(7)
    with torch.no_grad():
        book = pc.generate(model, prompt, 15, cfg["context_length"], temperature=1.3, top_k=40)
    torch.manual_seed(7)
    sampled = fast_llm.generate(model, prompt, 15, cfg["context_length"], temperature=1.3, top_k=40)
    assert torch.equal(sampled, book)
    torch.manual_seed(8)
    assert not torch.equal(fast_llm.generate(model, prompt, 15, cfg["context_length"], temperature=1.3,
                                             top_k=40), book)  # the seed matters: it samples


def test_generation_stops_at_eos_per_row_and_runs_past_the_context(hub_folders):
    model, cfg = load_hub_model(hub_folders["qwen3"], dtype=torch.float32, context_length=12)
    assert cfg["context_length"] == 12 and model.cos.shape[0] == 12
    prompts = [random_ids(20, (9,)).tolist(), random_ids(21, (4,)).tolist()]
    full = fast_llm.generate_batch(model, prompts, 10, 12, eos_id=thm.VOCAB, pad_id=0)
    eos = full[1][3]  # the fourth token of the second answer plays end-of-text
    answers = fast_llm.generate_batch(model, prompts, 10, 12, eos_id=eos, pad_id=0)
    assert answers == [row[:row.index(eos)] if eos in row else row for row in full]
    # past the 12-token context the window is cropped and recomputed, as the book's loop does
    prompt = torch.tensor([prompts[0]])
    with torch.no_grad():
        book = pc.generate(model, prompt, 10, 12)
    assert torch.equal(fast_llm.generate(model, prompt, 10, 12), book)


#####################################
# The chapter's loss
#####################################

def collated_batch(seed):
    """custom_collate_fn's batch of three entries, padded with the models' EOS id."""
    lengths = (6, 15, 10)
    entries = [random_ids(seed + i, (n,)).tolist() for i, n in enumerate(lengths)]
    inputs, targets = custom_collate_fn(entries, pad_token_id=thm.EOS_ID, ignore_index=-100)
    assert (targets == -100).any()  # the padding after each entry's first EOS is ignored
    return inputs, targets


@pytest.mark.parametrize("kind", KINDS)
def test_chapter_loss_equals_transformers(kind, hf_models, our_models):
    model, _ = our_models[kind]
    inputs, targets = collated_batch(30)
    with torch.no_grad():
        logits = hf_models[kind](inputs).logits
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                     ignore_index=-100)
        loss = pc.calc_loss_batch(inputs, targets, model, "cpu")
    assert abs(loss.item() - expected.item()) < 1e-5


def close_gradients(grad, expected):
    """Equal to float32 rounding: sums in another order (packed rows, fused attention) differ
    by a few millionths of the gradient's largest entry."""
    return (grad - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_packed_chunked_loss_and_gradients_equal_the_chapters(kind, our_models):
    model, _ = our_models[kind]
    inputs, targets = collated_batch(40)
    model.zero_grad()
    loss = pc.calc_loss_batch(inputs, targets, model, "cpu")
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    for chunk_rows in (LOSS_CHUNK_ROWS, 4):  # one chunk; several
        model.zero_grad()
        loss_sum, count = fast_llm.loss_sum_and_count(inputs, targets, model, "cpu", chunk_rows=chunk_rows)
        packed = loss_sum / count
        packed.backward()
        assert count == (targets != -100).sum()
        assert abs(packed.item() - loss.item()) < 1e-5
        for name, p in model.named_parameters():
            assert close_gradients(p.grad, expected[name]), name
    model.zero_grad(set_to_none=True)
    with torch.inference_mode():  # evaluation: no checkpointing, the same loss
        assert abs(fast_llm.calc_loss_batch_packed(inputs, targets, model, "cpu").item() - loss.item()) < 1e-5


def test_lora_model_fast_path_equals_its_plain_path(hub_folders):
    """LoRA layers (exercise 7.4's) on every linear layer, the tied head too: the fast path
    calls the wrapped modules, so its loss, gradients and greedy tokens are the plain path's."""
    import exercise_variants as ev

    model, cfg = load_hub_model(hub_folders["llama-tied"], dtype=torch.float32)
    model.requires_grad_(False)
    torch.manual_seed(5)
    ev.replace_linear_with_lora(model, rank=4, alpha=8)
    with torch.no_grad():  # B starts at zero: give the adapters a real effect
        for module in model.modules():
            if isinstance(module, ev.LoRALayer):
                module.B.normal_(0.0, 0.05)
    inputs, targets = collated_batch(50)
    loss = pc.calc_loss_batch(inputs, targets, model, "cpu")
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    packed = fast_llm.calc_loss_batch_packed(inputs, targets, model, "cpu")
    packed.backward()
    assert abs(packed.item() - loss.item()) < 1e-5
    assert len(expected) == 2 * (2 * 7 + 1)  # A and B of 7 linears a block, and the head's
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert close_gradients(p.grad, expected[name]), name
    prompt = random_ids(51, (1, 6))
    with torch.no_grad():
        book = pc.generate(model, prompt, 12, cfg["context_length"])
    assert torch.equal(fast_llm.generate(model, prompt, 12, cfg["context_length"]), book)


def test_fast_path_picks_the_module_by_model_and_refuses_decode_dtype(our_models):
    import fast_gpt

    model, _ = our_models["qwen3"]
    assert fast_llm.fast_path(model) is fast_llm
    assert fast_llm.context_size(model) == 128
    gpt = pc.GPTModel({"vocab_size": 50, "context_length": 16, "emb_dim": 8, "n_heads": 2,
                       "n_layers": 1, "drop_rate": 0.0, "qkv_bias": False})
    assert fast_llm.fast_path(gpt) is fast_gpt and fast_llm.context_size(gpt) == 16
    from instructkit.errors import BadInputError

    with pytest.raises(BadInputError, match="--decode-dtype is for GPT-2 models only"):
        fast_llm.generate_answer_ids(model, [[5, 6]], 3, 128, eos_id=2, decode_dtype=torch.bfloat16)


#####################################
# Configs of the real models
#####################################

def _qwen3(hidden, intermediate, max_positions=40960, eos=151645):
    return {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": eos, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": intermediate,
            "max_position_embeddings": max_positions, "max_window_layers": 28, "model_type": "qwen3",
            "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
            "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}


def _smollm2(hidden, intermediate, layers, heads, kv_heads, rope_theta):
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": hidden,
            "initializer_range": 0.02, "intermediate_size": intermediate, "is_llama_config": True,
            "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": heads,
            "num_hidden_layers": layers, "num_key_value_heads": kv_heads, "pretraining_tp": 1,
            "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
            "rope_theta": rope_theta, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152}


def _llama32(hidden, layers, heads, head_dim):
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": head_dim, "hidden_act": "silu",
            "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": 8192,
            "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
            "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": 8,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}


# The config.json of each repository (from the model cards' files) and its published
# parameter count. Every one of these ties its embeddings, so the count has the shared
# matrix once. (Qwen3-1.7B's safetensors also store a copy of it as lm_head.weight, which
# the hub's counter adds: 2,031,739,904 = 1,720,574,976 + 151,936 x 2,048.)
REAL_CONFIGS = {
    "Qwen/Qwen3-0.6B": (_qwen3(1024, 3072), 596_049_920),
    "Qwen/Qwen3-0.6B-Base": (_qwen3(1024, 3072, 32768, eos=151643), 596_049_920),
    "Qwen/Qwen3-1.7B": (_qwen3(2048, 6144), 1_720_574_976),
    "HuggingFaceTB/SmolLM2-135M": (_smollm2(576, 1536, 30, 9, 3, 100000), 134_515_008),
    "HuggingFaceTB/SmolLM2-360M": (_smollm2(960, 2560, 32, 15, 5, 100000), 361_821_120),
    "HuggingFaceTB/SmolLM2-1.7B": (_smollm2(2048, 8192, 24, 32, 32, 130000), 1_711_376_384),
    "meta-llama/Llama-3.2-1B": (_llama32(2048, 16, 32, 64), 1_235_814_400),
    "meta-llama/Llama-3.2-3B": (_llama32(3072, 28, 24, 128), 3_212_749_824),
}


@pytest.mark.parametrize("repo_id", REAL_CONFIGS)
def test_real_configs_build_models_of_the_published_size(repo_id):
    config_json, published = REAL_CONFIGS[repo_id]
    family = model_family(config_json)
    cfg = model_config(config_json)
    assert cfg["dtype"] == torch.bfloat16
    assert cfg["emb_dim"] == config_json["hidden_size"]
    assert cfg["n_layers"] == config_json["num_hidden_layers"]
    assert cfg["n_kv_groups"] == config_json["num_key_value_heads"]
    assert cfg["context_length"] == config_json["max_position_embeddings"]
    assert cfg["qk_norm"] == (family == "qwen3") and cfg["tie_embeddings"]
    with torch.device("meta"):  # the structure only: no memory
        model = model_class(family)(cfg)
    assert sum(p.numel() for p in model.parameters()) == published  # shared matrix counted once
    assert set(hub_weight_names(cfg)) == {name for name, _ in model.named_parameters()}


def test_real_configs_rope_and_head_sizes():
    smol = model_config(REAL_CONFIGS["HuggingFaceTB/SmolLM2-360M"][0])
    assert smol["head_dim"] == 64 and smol["rope_freq"] is None and smol["rope_base"] == 100000.0
    assert smol["norm_eps"] == 1e-5
    qwen = model_config(REAL_CONFIGS["Qwen/Qwen3-0.6B"][0], dtype=torch.float32, context_length=1024)
    assert qwen["head_dim"] == 128 and qwen["n_heads"] * qwen["head_dim"] == 2 * qwen["emb_dim"]
    assert qwen["dtype"] == torch.float32 and qwen["context_length"] == 1024 and qwen["norm_eps"] == 1e-6
    llama = model_config(REAL_CONFIGS["meta-llama/Llama-3.2-1B"][0])
    assert llama["rope_base"] == 500000.0 and llama["rope_freq"] == {
        "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 8192}


def test_llama3_rope_scaling_equals_transformers():
    """The scaled frequencies of Llama-3.2-1B's config, against transformers' own tables."""
    import transformers

    from instructkit.llama3 import rope_tables

    config_json = REAL_CONFIGS["meta-llama/Llama-3.2-1B"][0]
    cfg = model_config(config_json, context_length=9000)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config_json.items() if k != "torch_dtype"})
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    positions = torch.tensor([[0, 1, 17, 4000, 8191, 8999]])
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    our_cos, our_sin = rope_tables(cfg)
    assert torch.allclose(our_cos[positions[0]], cos[0], atol=1e-6)
    assert torch.allclose(our_sin[positions[0]], sin[0], atol=1e-6)
    plain_cos, _ = rope_tables({**cfg, "rope_freq": None})
    assert not torch.allclose(plain_cos[positions[0]], cos[0], atol=1e-3)  # the scaling matters


#####################################
# Bad files: one line
#####################################

def _copy(hub_folders, kind, tmp_path):
    folder = tmp_path / kind
    shutil.copytree(hub_folders[kind], folder)
    return folder


def _rewrite_single(folder, change):
    """Rewrite the folder's model.safetensors with change(tensors) applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / SINGLE_FILE)
    change(tensors)
    save_file(tensors, folder / SINGLE_FILE)


def one_line_error(folder, match):
    """load_hub_model's CheckpointError: one line, `match` in it, exit code 2 through run_command."""
    with pytest.raises(CheckpointError, match=match) as caught:
        load_hub_model(folder)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_tensor_is_one_line(hub_folders, tmp_path, capsys):
    folder = _copy(hub_folders, "qwen3", tmp_path)
    _rewrite_single(folder, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    one_line_error(folder, r"missing 1 tensors \(model\.layers\.1\.self_attn\.k_norm\.weight\)")
    assert run_command(lambda: load_hub_model(folder)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: the weights in ") and err.count("\n") == 1


def test_unexpected_and_misshaped_tensors(hub_folders, tmp_path):
    folder = _copy(hub_folders, "llama-tied", tmp_path)
    _rewrite_single(folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(2, 2)}))
    one_line_error(folder, r"1 unexpected \(model\.layers\.2\.mlp\.up_proj\.weight\)")

    folder = _copy(hub_folders, "qwen3", tmp_path / "shape")
    _rewrite_single(folder, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    one_line_error(folder, r"model\.norm\.weight has shape \(63,\), the config\.json asks for \(64,\)")


def test_untied_model_needs_its_head_and_a_tied_one_ignores_a_stored_copy(hub_folders, tmp_path):
    # llama3-scaled is sharded and untied: take lm_head out of the index
    folder = _copy(hub_folders, "llama3-scaled", tmp_path)
    index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    del index["weight_map"]["lm_head.weight"]
    (folder / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")
    one_line_error(folder, r"missing 1 tensors \(lm_head\.weight\)")

    # a tied Qwen3 whose file also stores lm_head.weight (as Qwen3-1.7B's does) loads, tied
    folder = _copy(hub_folders, "qwen3", tmp_path / "tied")
    _rewrite_single(folder, lambda t: t.update(
        {"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])}))
    model, _ = load_hub_model(folder)
    assert model.out_head.weight is model.tok_emb.weight and model.out_head.weight.abs().sum() > 0


def test_missing_damaged_or_foreign_files(hub_folders, tmp_path):
    folder = _copy(hub_folders, "qwen3", tmp_path)
    data = (folder / SINGLE_FILE).read_bytes()
    (folder / SINGLE_FILE).write_bytes(data[: len(data) // 2])  # a cut download
    one_line_error(folder, "cannot be read as safetensors")
    (folder / SINGLE_FILE).unlink()
    one_line_error(folder, f"has no weights: expected {SINGLE_FILE} or {INDEX_FILE}")

    sharded = _copy(hub_folders, "llama3-scaled", tmp_path / "sharded")
    shard = next(sharded.glob("model-00002-*.safetensors"))
    shard.write_bytes(b"\0" * 16)  # not safetensors at all
    one_line_error(sharded, "cannot be read as safetensors")
    shard.unlink()
    one_line_error(sharded, f"{shard.name} is missing: {INDEX_FILE} lists it")

    config = read_config_json(folder)
    for model_type, match in (("gpt2", "GPT-2 loads through"), ("mistral", "model_type 'mistral'")):
        foreign = {**config, "model_type": model_type}
        (folder / "config.json").write_text(json.dumps(foreign), encoding="utf-8")
        one_line_error(folder, match)
    yarn = {**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}
    (folder / "config.json").write_text(json.dumps(yarn), encoding="utf-8")
    one_line_error(folder, "RoPE scaling 'yarn' in config.json is not supported")
    (folder / "config.json").unlink()
    one_line_error(folder, "config.json is missing")


def test_configs_the_models_cannot_honour_are_one_line():
    qwen = REAL_CONFIGS["Qwen/Qwen3-0.6B"][0]
    cases = [
        ({k: v for k, v in qwen.items() if k != "hidden_size"}, "has no 'hidden_size'"),
        ({**qwen, "attention_bias": True}, "asks for attention_bias: true"),
        ({**qwen, "hidden_act": "gelu"}, "asks for hidden_act 'gelu'"),
        ({**qwen, "rope_scaling": REAL_CONFIGS["meta-llama/Llama-3.2-1B"][0]["rope_scaling"]},
         "Llama 3's RoPE scaling, which Qwen3 does not have"),
        ({**qwen, "torch_dtype": "int8"}, "not a floating-point torch dtype"),
    ]
    for config_json, match in cases:
        with pytest.raises(CheckpointError, match=match) as caught:
            model_config(config_json)
        assert "\n" not in str(caught.value)
