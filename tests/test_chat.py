"""The terminal chat (chat.py) and the model loader behind it (model_files.py).

Real files in a temporary folder, the real tokenizer, chat.py run as a real subprocess; the
reference answers come from the book's `generate` (previous_chapters.py), not from the code
under test.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from portable import import_or_skip

from exercise_variants import replace_linear_with_lora
from instructkit.gpt2_sizes import TEST_MODE_CONFIG, gpt2_config
from instructkit.model_files import ChatModel, ModelFileError, infer_model_config, load_finetuned_model
from instructkit.safe_files import save_state_dict, write_json
from previous_chapters import GPTModel, generate

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 24
ENTRIES = [
    {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast."},
    {"instruction": "Name a primary color.", "input": ""},
    {"instruction": "What is the capital of France?", "input": ""},
    {"instruction": "Translate to German.", "input": "Good morning, my friend. How are you today?"},
    {"instruction": "Give a synonym for 'happy'.", "input": ""},
]


def save_model(folder, stem, model, style="alpaca", record=True):
    path = Path(folder) / f"{stem}.pth"
    save_state_dict(model.state_dict(), path)
    if record:
        write_json(path.with_suffix(".run.json"), {
            "config": {"model": None, "prompt_style": style, "lora_rank": None, "lora_alpha": None},
            "model_config": TEST_MODE_CONFIG})
    return path


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(123)
    return GPTModel(TEST_MODE_CONFIG).eval()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_model):
    return save_model(tmp_path_factory.mktemp("chat"), "tiny-sft", tiny_model)


def book_answer(model, tokenizer, entry, max_new_tokens=MAX_NEW, prompt_fn=None):
    """The chapter's way: format_input, the book's generate (eos stop), extract_response."""
    from gpt_instruction_finetuning import extract_response, format_input

    prompt = (prompt_fn or format_input)(entry)
    idx = torch.tensor([tokenizer.encode(prompt)])
    out = generate(model, idx, max_new_tokens, model.pos_emb.weight.shape[0], eos_id=50256)
    return extract_response(tokenizer.decode(out[0].tolist()), prompt)


def run_chat(*args, stdin=None):
    """chat.py in a real subprocess (as a reader runs it), on the CPU (--device cpu): the
    answers are compared token for token with the book's generate on the CPU, and without the
    flag a Mac would run the chat on its GPU (MPS)."""
    return subprocess.run([sys.executable, "-m", "instructkit.chat", *map(str, args), "--device", "cpu"],
                          input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT)


def chat_main(capsys, monkeypatch, *args, stdin=""):
    """chat.main in this process (each subprocess costs seconds of imports): (code, out, err).
    On the CPU, as run_chat."""
    from instructkit import chat
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = chat.main([str(a) for a in args] + ["--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_streamed_answer_equals_generate(model_file, tiny_model, tokenizer, one_thread):
    entry = ENTRIES[0]
    expected = book_answer(tiny_model, tokenizer, entry)
    assert len(expected) > 20  # a random model's answer: long enough to be a real check

    result = run_chat(model_file, entry["instruction"], "--input", entry["input"],
                      "--max-new-tokens", MAX_NEW)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "tiny-sft.pth" in result.stderr and "from tiny-sft.run.json" in result.stderr

    # In-process: the same text arrives as a stream of growing answers, token by token.
    model, style, _ = load_finetuned_model(model_file)
    chat = ChatModel(model, tokenizer, style)
    prompt, ids, note = chat.prepare(entry["instruction"], entry["input"], MAX_NEW)
    updates = list(chat.stream(prompt, ids, MAX_NEW))
    assert note is None
    assert updates[-1] == expected
    assert len(set(updates)) > MAX_NEW // 2
    assert all(expected.startswith(u) for u in updates)


def test_stdin_batches_equal_one_at_a_time(model_file, tiny_model, tokenizer, one_thread,
                                           capsys, monkeypatch):
    expected = [book_answer(tiny_model, tokenizer, e) for e in ENTRIES]
    assert len(set(expected)) == len(ENTRIES)

    jsonl = "".join(json.dumps(e) + "\n" for e in ENTRIES)
    result = run_chat(model_file, "--max-new-tokens", MAX_NEW, "--batch-size", 2, stdin=jsonl)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["model_response"] for r in rows] == expected
    assert [{k: r[k] for k in ("instruction", "input")} for r in rows] == ENTRIES

    # Plain lines: one instruction a line (no inputs), answers separated by blank lines.
    plain = [e for e in ENTRIES if not e["input"]]
    code, out, err = chat_main(capsys, monkeypatch, model_file, "--max-new-tokens", MAX_NEW,
                               "--batch-size", 2,
                               stdin="\n".join(e["instruction"] for e in plain) + "\n\n")
    assert code == 0, err
    assert out == "\n\n".join(book_answer(tiny_model, tokenizer, e) for e in plain) + "\n"


def test_bad_jsonl_on_stdin_exits_2(model_file, capsys, monkeypatch):
    code, _, err = chat_main(capsys, monkeypatch, model_file,
                             stdin='{"instruction": "Hi"}\n{"input": "no instruction"}\n')
    assert code == 2
    assert 'stdin line 2 has no "instruction" string' in err


def test_lora_adapters_load_on_their_base(tmp_path, tiny_model, tokenizer, one_thread, capsys,
                                          monkeypatch):
    from exercise_variants import lora_state_dict

    base_path = save_model(tmp_path, "base", tiny_model)
    torch.manual_seed(7)
    lora_model = GPTModel(TEST_MODE_CONFIG).eval()
    lora_model.load_state_dict(tiny_model.state_dict())
    replace_linear_with_lora(lora_model, rank=4, alpha=8)
    with torch.no_grad():  # B starts at zero (a no-op); trained adapters are not
        for name, param in lora_model.named_parameters():
            if name.endswith(".lora.B"):
                param.normal_(0, 0.05)
    adapters_path = tmp_path / "tiny-lora4-adapters.pth"
    save_state_dict(lora_state_dict(lora_model), adapters_path)
    entry = ENTRIES[1]
    expected = book_answer(lora_model, tokenizer, entry)
    assert expected != book_answer(tiny_model, tokenizer, entry)  # the adapters change answers

    result = run_chat(base_path, entry["instruction"], "--adapters", adapters_path,
                      "--max-new-tokens", MAX_NEW)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "LoRA adapters tiny-lora4-adapters.pth" in result.stderr

    # In-process, the adapter file named as the model with its base beside it: the same model.
    model, _, info = load_finetuned_model(adapters_path, base=base_path)
    assert info["adapters"] == str(adapters_path)
    assert book_answer(model, tokenizer, entry) == expected

    # Adapters alone, without their base: a clear error, exit 2.
    code, _, err = chat_main(capsys, monkeypatch, adapters_path, "Hi")
    assert code == 2
    assert f"{adapters_path} holds only LoRA adapters" in err and "--adapters" in err

    # Adapters of another model (another width) do not fit this base.
    other = GPTModel({**TEST_MODE_CONFIG, "emb_dim": 32, "n_heads": 4})
    other.requires_grad_(False)
    replace_linear_with_lora(other, rank=4, alpha=8)
    wrong = tmp_path / "other-adapters.pth"
    save_state_dict(lora_state_dict(other), wrong)
    code, _, err = chat_main(capsys, monkeypatch, base_path, "Hi", "--adapters", wrong)
    assert code == 2
    assert f"The adapters {wrong} do not fit the model {base_path}" in err


def test_missing_and_mismatched_files_exit_2(tmp_path, tiny_model, capsys, monkeypatch):
    missing = tmp_path / "nowhere" / "model.pth"
    result = run_chat(missing, "Hi")  # a real process: the exit code and no traceback
    assert result.returncode == 2
    assert f"The model file {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr

    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a model")
    code, _, err = chat_main(capsys, monkeypatch, garbage, "Hi")
    assert code == 2
    assert f"The model file {garbage} could not be read by torch.load" in err

    save_state_dict({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    code, _, err = chat_main(capsys, monkeypatch, tmp_path / "other.pth", "Hi")
    assert code == 2
    assert "other.pth is not a GPTModel state dict: it has no tok_emb.weight" in err

    # Weights of the tiny model, with a run record saying gpt2-small: the shapes disagree.
    mismatched = save_model(tmp_path, "mislabelled", tiny_model)
    write_json(mismatched.with_suffix(".run.json"),
               {"config": {"model": "gpt2-small"}, "model_config": gpt2_config("gpt2-small")})
    code, _, err = chat_main(capsys, monkeypatch, mismatched, "Hi")
    assert code == 2
    assert f"{mismatched} does not fit a GPTModel with emb_dim 768, 12 layers" in err
    assert "wrong shape: tok_emb.weight (50257, 64) (the model has (50257, 768))" in err


def test_config_inferred_from_the_weights(tmp_path, tiny_model):
    path = save_model(tmp_path, "no-record", tiny_model, record=False)
    model, style, info = load_finetuned_model(path)
    assert info["model_config"] == TEST_MODE_CONFIG
    assert info["config_source"] == "inferred from the weights" and style == "alpaca"
    for name, size in (("gpt2-small", (768, 12, 12)), ("gpt2-medium", (1024, 24, 16))):
        cfg = gpt2_config(name)
        shapes = {"tok_emb.weight": torch.empty(cfg["vocab_size"], cfg["emb_dim"]),
                  "pos_emb.weight": torch.empty(cfg["context_length"], cfg["emb_dim"]),
                  "trf_blocks.0.att.W_query.bias": torch.empty(cfg["emb_dim"]),
                  **{f"trf_blocks.{i}.norm1.scale": torch.empty(1) for i in range(cfg["n_layers"])}}
        assert infer_model_config(shapes) == cfg
        assert (cfg["emb_dim"], cfg["n_layers"], cfg["n_heads"]) == size
    with pytest.raises(ModelFileError, match="emb_dim 100, which is no GPT-2 size"):
        infer_model_config({"tok_emb.weight": torch.empty(10, 100), "pos_emb.weight": torch.empty(8, 100)})


def test_phi3_style_from_the_run_record(tmp_path, tiny_model, tokenizer, one_thread):
    from exercise_variants import format_input_phi

    path = save_model(tmp_path, "tiny-phi3", tiny_model, style="phi3")
    model, style, _ = load_finetuned_model(path)
    chat = ChatModel(model, tokenizer, style)
    prompt, ids, _ = chat.prepare("Name a primary color.", "", MAX_NEW)
    assert prompt == "<|user|>\nName a primary color." and style == "phi3"
    *_, answer = chat.stream(prompt, ids, MAX_NEW)
    assert answer == book_answer(tiny_model, tokenizer, ENTRIES[1], prompt_fn=format_input_phi)


def test_long_text_is_cut_to_fit_with_a_note(tiny_model, tokenizer):
    chat = ChatModel(tiny_model, tokenizer)
    prompt, ids, note = chat.prepare("Summarize.", "word " * 400, max_new_tokens=100)
    assert len(ids) == 156 == len(tokenizer.encode(prompt))  # 256-token context - 100
    assert prompt.startswith(chat.style.format_input({"instruction": "Summarize.", "input": "word"}))
    assert note.startswith("Note: your text was cut to fit: the prompt would have been 435 tokens")
    assert chat.prepare("Summarize.", "word " * 10, max_new_tokens=100)[2] is None
    # An answer longer than the context still leaves half the context for the prompt.
    assert len(chat.prepare("word " * 400, "", max_new_tokens=1000)[1]) == 128


def test_visible_answer_hides_the_response_tag_while_it_forms(tiny_model, tokenizer):
    chat = ChatModel(tiny_model, tokenizer)
    steps = ["\n\n", "\n\n###", "\n\n### Response", "\n\n### Response:", "\n\n### Response:\n",
             "\n\n### Response:\nThe", "\n\n### Response:\nThe car"]
    assert [chat.visible_answer("P", s) for s in steps] == ["", "", "", "", "", "The", "The car"]


def test_sampling_follows_temperature_top_k_and_seed(model_file, capsys, monkeypatch, one_thread):
    args = (model_file, "Name a primary color.", "--max-new-tokens", MAX_NEW)
    greedy = chat_main(capsys, monkeypatch, *args)[1]
    sampled = [chat_main(capsys, monkeypatch, *args, "--temperature", 1.5, "--top-k", 50,
                         "--seed", seed)[1] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # the same seed, the same answer
    assert len({greedy, sampled[0], sampled[2]}) == 3


def test_a_model_saved_with_its_lora_layers(tmp_path, tiny_model, tokenizer, one_thread):
    lora_model = GPTModel(TEST_MODE_CONFIG).eval()
    lora_model.load_state_dict(tiny_model.state_dict())
    replace_linear_with_lora(lora_model, rank=2, alpha=16)
    with torch.no_grad():
        for name, param in lora_model.named_parameters():
            if name.endswith(".lora.B"):
                param.normal_(0, 0.05)
    path = tmp_path / "tiny-lora2.pth"
    save_state_dict(lora_model.state_dict(), path)
    with pytest.raises(ModelFileError, match="LoRA layers but no lora_alpha"):
        load_finetuned_model(path)
    write_json(path.with_suffix(".run.json"), {"config": {"lora_rank": 2, "lora_alpha": 16},
                                               "model_config": TEST_MODE_CONFIG})
    model, _, _ = load_finetuned_model(path)
    assert book_answer(model, tokenizer, ENTRIES[0]) == book_answer(lora_model, tokenizer, ENTRIES[0])


def test_interactive_prompt_on_a_terminal(model_file, tiny_model, tokenizer):
    """No instruction and a terminal on stdin (a real pseudo-terminal): the chat prompt."""
    import os

    pty = import_or_skip("pty")
    expected = book_answer(tiny_model, tokenizer, ENTRIES[0])
    main_fd, terminal_fd = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "instructkit.chat", str(model_file),
                                "--max-new-tokens", str(MAX_NEW), "--device", "cpu"], stdin=terminal_fd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    os.close(terminal_fd)
    # Typed ahead: an empty line, an instruction and its input, then Ctrl-D to leave.
    os.write(main_fd, f"\n{ENTRIES[0]['instruction']}\n{ENTRIES[0]['input']}\n\x04".encode())
    out, err = process.communicate(timeout=120)
    os.close(main_fd)
    assert process.returncode == 0, err
    assert f"Instruction> Input> {expected}\n" in out.decode()
    assert "(empty: type an instruction)" in err.decode()


@pytest.mark.slow  # TensorFlow writes and reads a GPT-2 checkpoint
def test_adapters_alone_go_on_the_pretrained_gpt2_of_their_run(tmp_path, tokenizer, capsys,
                                                              monkeypatch, one_thread):
    """A LoRA run's `<stem>-adapters.pth` with its run record: the base is OpenAI's GPT-2
    (here a tiny random checkpoint in OpenAI's layout, in the folder of the recorded size)."""
    pytest.importorskip("tensorflow", reason="reading GPT-2 checkpoints needs TensorFlow")
    from gpt2_checkpoint import write_gpt2_checkpoint

    from exercise_variants import lora_state_dict
    from gpt_download import download_and_load_gpt2
    from previous_chapters import load_weights_into_gpt

    cfg = TEST_MODE_CONFIG
    write_gpt2_checkpoint(tmp_path / "gpt2" / "124M", n_vocab=cfg["vocab_size"], n_embd=cfg["emb_dim"],
                          n_ctx=cfg["context_length"], n_head=cfg["n_heads"], n_layer=cfg["n_layers"])
    reference = GPTModel(cfg).eval()
    _, params = download_and_load_gpt2("124M", tmp_path / "gpt2")  # complete on disk: no network
    load_weights_into_gpt(reference, params)
    reference.requires_grad_(False)
    replace_linear_with_lora(reference, rank=4, alpha=8)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith(".lora.B"):
                param.normal_(0, 0.05)
    adapters_path = tmp_path / "gpt2-small124M-sft-lora4-adapters.pth"
    save_state_dict(lora_state_dict(reference), adapters_path)
    record = {"config": {"model": "gpt2-small", "prompt_style": "alpaca", "lora_rank": 4,
                         "lora_alpha": 8, "test_mode": False, "models_dir": str(tmp_path / "gpt2")},
              "model_config": cfg}
    write_json(tmp_path / "gpt2-small124M-sft-lora4.run.json", record)
    expected = book_answer(reference, tokenizer, ENTRIES[2])

    code, out, err = chat_main(capsys, monkeypatch, adapters_path, ENTRIES[2]["instruction"],
                               "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    assert out == expected + "\n"
    assert "124M + LoRA adapters gpt2-small124M-sft-lora4-adapters.pth: gpt2-small" in err

    # The LoRA run's merged model is no base for its adapters (they would count twice).
    merged = save_model(tmp_path, "gpt2-small124M-sft-lora4", GPTModel(cfg))
    write_json(merged.with_suffix(".run.json"), record)
    code, _, err = chat_main(capsys, monkeypatch, merged, "Hi", "--adapters", adapters_path)
    assert code == 2 and "with its adapters merged in already" in err

    write_json(tmp_path / "gpt2-small124M-sft-lora4.run.json",
               {**record, "config": {**record["config"], "test_mode": True}})
    code, _, err = chat_main(capsys, monkeypatch, adapters_path, "Hi")
    assert code == 2 and "comes from a test-mode run" in err
