"""The finetuning command on Qwen3 and Llama-architecture models, from a loopback hub.

A loopback hub (HF_ENDPOINT) serves tiny random repositories under the real ids: a Qwen3
(`Qwen/Qwen3-0.6B-Base`, tied embeddings, QK-norm) and a gated Llama 3.2
(`meta-llama/Llama-3.2-1B`, Llama 3's RoPE scaling, sharded weights), each complete as the hub
has it (config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
safetensors) with a tokenizer of the family (tests/tiny_hub_tokenizers.py). Checked, through
`gpt_instruction_finetuning.main` and the command line's `main(argv)`:
- one epoch on 40 of the chapter's entries: the chapter's printed lines, the saved model
  (the hub model's state dict), the answers file with the model's greedy answers (computed
  again here from the saved weights), the run record naming family, repository and folder;
- the collate pads with the model's EOS, and Llama's answers are decoded from the new ids
  only (no `<|begin_of_text|>` in them);
- `--prompt-style chat` (the repository's chat template) with masking, and its one-line
  error for models without a template (GPT-2, the tiny Llama);
- LoRA with --max-test-answers (the merged model of a tied Qwen3 keeps its embedding), and
  resume after --max-steps, and after a real Ctrl-C to the command (a subprocess), giving
  the same weights as the uninterrupted run; a GPT-2 checkpoint is refused;
- the gated repository: one line and exit code 1 without HF_TOKEN, a run with it;
- `python -m instructkit.chat` rebuilds the saved model from its run record and gives the
  answer the run wrote; so does the LoRA run's merged (untied) model, in batches;
- DPO (`python -m instructkit.dpo_train`) on the finetuned Qwen3: fast_dpo's packed
  log-probabilities (through fast_llm) equal the full logits' ones; a few steps print the
  losses, save a model whose answers are the book's greedy ones and which chat.py reloads;
- the command under 2-process torchrun (DDP, gloo) from the loopback hub into an empty
  models folder: one download, the one-process run's losses, weights and answers;
- the web chat's `load_models` and `respond`: the run's answer streamed through fast_llm,
  beside the pretrained hub model's.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from interrupting import run_and_act
from loopback_server import serving
from portable import send_interrupt
from tiny_hub_models import KINDS
from tiny_hub_tokenizers import write_tokenizer_folder

import gpt_instruction_finetuning as gif
from instructkit import finetune
from instructkit.errors import EXIT_FAILED, CheckpointError
from instructkit.finetune_config import FinetuneConfig
from instructkit.hf_tokenizer import load_hf_tokenizer
from instructkit.hub_model_files import load_hub_model
from instructkit.run_record import read_run_record
from instructkit.training import RESUME_NEWEST

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN, LLAMA = "Qwen/Qwen3-0.6B-Base", "meta-llama/Llama-3.2-1B"
TOKEN = "hf_TestTokenForTheTinyLlama0123456789"
NO_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HOME", "XDG_CACHE_HOME")
# repository id -> (tiny_hub_models kind, tiny_hub_tokenizers family)
REPOS = {QWEN: ("qwen3", "qwen3"), LLAMA: ("llama3-scaled", "llama3")}
MAX_NEW_TOKENS = 6


def make_repo(folder, kind, family):
    """A complete tiny hub repository in `folder`; {file name: bytes}."""
    import transformers

    write_tokenizer_folder(folder, family, merges=30)
    tokenizer = load_hf_tokenizer(folder)
    model_class, config_class, values, save_kwargs = KINDS[kind]
    values = {**values, "max_position_embeddings": 512, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    assert tokenizer.n_vocab <= values["vocab_size"]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**values))
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert files["config.json"] and ("model.safetensors" in files) != (KINDS[kind][3] != {})
    return files


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The loopback hub, serving both repositories; Llama only with the token."""
    made = tmp_path_factory.mktemp("made")
    files = {}
    for repo, (kind, family) in REPOS.items():
        for name, data in make_repo(made / repo.replace("/", "--"), kind, family).items():
            files[f"/{repo}/resolve/main/{name}"] = data

    def gate(path, headers):
        if path.startswith(f"/{LLAMA}/") and headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401
        return None

    with serving(files) as server:
        server.check = gate
        yield server


@pytest.fixture(autouse=True)
def hub_env(hub, monkeypatch, tmp_path):
    """HF_ENDPOINT at the loopback hub, and no token anywhere."""
    for name in NO_TOKEN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def settings(data_file, models_dir, output_dir, model=QWEN, **changes):
    return FinetuneConfig(model=model, data=str(data_file), models_dir=str(models_dir),
                          output_dir=str(output_dir), device="cpu", epochs=1, batch_size=4,
                          eval_freq=4, eval_iter=1, max_new_tokens=MAX_NEW_TOKENS, **changes)


def run_main(config):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = gif.main(config=config)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def qwen_run(data_file, models_dir, tmp_path_factory, hub):
    """One uninterrupted Qwen3 run (the reference of the resume test)."""
    folder = tmp_path_factory.mktemp("qwen-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hub.url)
        result, printed = run_main(settings(data_file, models_dir, folder, model="qwen3-0.6b"))
    return {"folder": folder, "result": result, "printed": printed}


def assert_chapter_lines(printed, model_name, model_file):
    lines = printed.splitlines()
    book_lines = ["torch version:", "Training set length: 34", "Validation set length: 2",
                  "Test set length: 4", "Device: cpu", f"Loaded model: {model_name}",
                  "Initial losses", "   Training loss: ", "   Validation loss: ",
                  "Ep 1 (Step 000000): Train loss", "Ep 1 (Step 000004): Train loss",
                  "Training completed in", f"Model saved as {model_file}", "Plot saved as",
                  "Generating responses", "Model response:", "Responses saved as "]
    positions = [next((i for i, line in enumerate(lines) if line.startswith(start)), None)
                 for start in book_lines]
    assert None not in positions, [s for s, i in zip(book_lines, positions, strict=True) if i is None]
    assert positions == sorted(positions)


def greedy_answers(model_file, hub_folder, entries, style=gif.ALPACA):
    """The saved model rebuilt on its hub model, answering the book's way, one entry at a
    time: previous_chapters.generate on the plain model up to the end-of-text id, only the
    new ids decoded."""
    from previous_chapters import generate

    model, _ = load_hub_model(hub_folder, dtype=torch.float32)
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    if not torch.equal(state["tok_emb.weight"], state["out_head.weight"]):  # untied by LoRA
        model.out_head.weight = torch.nn.Parameter(state["out_head.weight"].clone())
    model.load_state_dict(state)
    model.eval()
    tokenizer = load_hf_tokenizer(hub_folder)
    answers = []
    for entry in entries:
        prompt = style.format_input(entry)
        ids = torch.tensor([tokenizer.encode(prompt)])
        out = generate(model, ids, MAX_NEW_TOKENS, context_size=model.cos.shape[0],
                       eos_id=tokenizer.eot_token)[0, ids.shape[1]:].tolist()
        answers.append(style.extract_response(prompt + tokenizer.decode(out), prompt))
    return answers


def test_qwen3_run_prints_the_chapter_and_saves_what_reloads(qwen_run, models_dir, data_file):
    folder, result = qwen_run["folder"], qwen_run["result"]
    stem = "Qwen3-0.6B-Base-sft-data"
    model_file = folder / f"{stem}.pth"
    assert_chapter_lines(qwen_run["printed"], f"{QWEN} (qwen3)", model_file)
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        f"{stem}.pth", f"{stem}.run.json", f"{stem}.metrics.jsonl", "loss-plot-data.pdf",
        "instruction-data-with-response-data.json"])
    assert result["train_losses"][-1] < result["initial_losses"][0]  # it learned

    hub_folder = models_dir / "Qwen--Qwen3-0.6B-Base"
    record = read_run_record(model_file)
    assert record["hub_model"] == {"family": "qwen3", "repo_id": QWEN, "folder": str(hub_folder)}
    assert record["config"]["model"] == QWEN and record["model_config"]["dtype"] == "float32"
    assert record["model_config"]["qk_norm"] is True

    # the saved weights load into the hub model rebuilt from the record; its greedy answers,
    # the book's way, are the saved ones
    saved = json.loads((folder / "instruction-data-with-response-data.json").read_text())
    test_entries = json.loads(data_file.read_text())[34:38]
    assert [e["instruction"] for e in saved] == [e["instruction"] for e in test_entries]
    assert [e["model_response"] for e in saved] == greedy_answers(
        model_file, record["hub_model"]["folder"], test_entries)


def test_chat_reloads_the_saved_model_and_answers_as_the_run_did(qwen_run, data_file, capsys):
    from instructkit import chat

    folder = qwen_run["folder"]
    saved = json.loads((folder / "instruction-data-with-response-data.json").read_text())
    entry = saved[0]
    capsys.readouterr()
    assert chat.main([str(folder / "Qwen3-0.6B-Base-sft-data.pth"), entry["instruction"], "--input",
                      entry["input"], "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    out, err = capsys.readouterr()
    assert out == entry["model_response"] + "\n"
    assert f"Qwen3-0.6B-Base-sft-data.pth: {QWEN}, " in err and "prompt style alpaca" in err


def test_collate_pads_with_the_models_end_of_text(models_dir, qwen_run):
    tokenizer = load_hf_tokenizer(models_dir / "Qwen--Qwen3-0.6B-Base")
    eos = tokenizer.eot_token
    assert eos == tokenizer.encode("<|endoftext|>")[0] != 50256
    inputs, targets = gif.custom_collate_fn([[5, 6, 7], [8]], pad_token_id=eos)
    assert inputs.tolist() == [[5, 6, 7], [8, eos, eos]]
    assert targets.tolist() == [[6, 7, eos], [eos, -100, -100]]


def test_gated_llama_needs_the_token_then_runs(hub, data_file, models_dir, tmp_path, monkeypatch, capsys):
    argv = ["--model", "llama3.2-1b", "--data", str(data_file), "--models-dir", str(models_dir),
            "--output-dir", str(tmp_path), "--device", "cpu", "--epochs", "1", "--batch-size", "4",
            "--eval-freq", "4", "--eval-iter", "1", "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--prompt-style", "phi3", "--mask-instructions"]
    assert finetune.cli(argv) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: the hub at {hub.url} ")
    assert f"refused {LLAMA} (HTTP 401)" in err and "set HF_TOKEN" in err
    assert not list(tmp_path.glob("*.pth"))

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert finetune.cli(argv) == 0
    out = capsys.readouterr().out
    stem = "Llama-3.2-1B-sft-data-phi3-mask"
    assert_chapter_lines(out, f"{LLAMA} (llama)", tmp_path / f"{stem}.pth")
    record = read_run_record(tmp_path / f"{stem}.pth")
    assert record["hub_model"] == {"family": "llama", "repo_id": LLAMA,
                                   "folder": str(models_dir / "meta-llama--Llama-3.2-1B")}
    assert record["model_config"]["rope_freq"]["factor"] == 8.0
    # the answers are the new ids decoded (Llama's prompt decodes with <|begin_of_text|> in
    # front, so cutting the decoded text at the prompt's length would be wrong)
    saved = json.loads((tmp_path / "instruction-data-with-response-data-phi3-mask.json").read_text())
    test_entries = json.loads(data_file.read_text())[34:38]
    assert [e["model_response"] for e in saved] == greedy_answers(
        tmp_path / f"{stem}.pth", record["hub_model"]["folder"], test_entries, gif.PHI3)

    # its tokenizer has no chat template: --prompt-style chat is one line, exit code 2
    capsys.readouterr()
    assert finetune.cli([*argv[:-3], "--prompt-style", "chat"]) == 2
    assert capsys.readouterr().err == (f"error: --prompt-style chat uses the model's own chat "
                                       f"template, and {LLAMA} has none: use --prompt-style "
                                       "alpaca or phi3\n")


def test_chat_template_prompt_style(data_file, models_dir, tmp_path, capsys):
    from instructkit.chat_template_style import chat_template_style

    result, printed = run_main(settings(data_file, models_dir, tmp_path, prompt_style="chat",
                                        mask_instructions=True))
    stem = "Qwen3-0.6B-Base-sft-data-chat-mask"
    hub_folder = models_dir / "Qwen--Qwen3-0.6B-Base"
    style = chat_template_style(load_hf_tokenizer(hub_folder))
    entry = {"instruction": "Name a color.", "input": "Not red."}
    # the tiny repository's ChatML template, the assistant's turn opened
    assert style.format_input(entry) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nName a color.\n\n"
        "Not red.<|im_end|>\n<|im_start|>assistant\n")
    entry = json.loads(data_file.read_text())[34]
    assert f"<|im_start|>user\n{entry['instruction']}" in printed  # the shown answers' prompts
    saved = json.loads((tmp_path / "instruction-data-with-response-data-chat-mask.json").read_text())
    assert [e["model_response"] for e in saved] == greedy_answers(
        tmp_path / f"{stem}.pth", hub_folder, json.loads(data_file.read_text())[34:38], style)

    # GPT-2 has no chat template: one line, exit code 2, before anything is downloaded
    capsys.readouterr()
    assert finetune.cli(["--test-mode", "--prompt-style", "chat", "--data", str(data_file),
                         "--output-dir", str(tmp_path / "gpt2")]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --prompt-style chat uses a hub model's own chat template, and GPT-2 has "
                   "none: use --prompt-style alpaca or phi3, or a hub model (--model qwen3-0.6b, "
                   "smollm2-360m, ...)\n")


@pytest.mark.parametrize(("flag", "message"), [
    (["--decode-dtype", "bf16"], "--decode-dtype bf16 is for GPT-2 models: Qwen3 and Llama models "
                                 "answer with their own weights (fp32 here)"),
    (["--tokenizer-dir", "gpt2-tokenizer"], "--tokenizer-dir names GPT-2's tokenizer files; a hub "
                                            "model brings its own tokenizer.json: leave "
                                            "--tokenizer-dir out"),
    (["--weights-source", "hub-openai"], "--weights-source hub-openai chooses where GPT-2's weights "
                                         "come from; a hub model comes from its repository "
                                         "(HF_ENDPOINT names a mirror): leave --weights-source out"),
])
def test_gpt2_only_flags_are_one_line_before_any_download(data_file, tmp_path, capsys, hub, flag,
                                                          message):
    seen = len(hub.requests)
    assert finetune.cli(["--model", QWEN, *flag, "--data", str(data_file),
                         "--models-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert len(hub.requests) == seen


def test_lora_on_tied_qwen3(data_file, models_dir, tmp_path):
    result, printed = run_main(settings(data_file, models_dir, tmp_path, lora_rank=2, lora_alpha=4,
                                        max_test_answers=2))
    assert "Answering 2 of the 4 test entries (--max-test-answers 2)." in printed
    stem = "Qwen3-0.6B-Base-sft-data-lora2"
    assert "LoRA adapters saved as" in printed
    weights = torch.load(tmp_path / f"{stem}.pth", map_location="cpu", weights_only=True)
    adapters = torch.load(tmp_path / f"{stem}-adapters.pth", map_location="cpu", weights_only=True)
    assert any(".lora.A" in k for k in adapters) and not any(".lora." in k for k in weights)
    base, _ = load_hub_model(models_dir / "Qwen--Qwen3-0.6B-Base", dtype=torch.float32)
    # the embedding was frozen: merging the (tied) output head's update left it as it was
    assert torch.equal(weights["tok_emb.weight"], base.tok_emb.weight)
    assert not torch.equal(weights["out_head.weight"], base.out_head.weight)
    # the merged model answered the first two test entries: as the saved weights do, the book's way
    saved = json.loads((tmp_path / "instruction-data-with-response-data-lora2.json").read_text())
    assert [e["model_response"] for e in saved] == greedy_answers(
        tmp_path / f"{stem}.pth", models_dir / "Qwen--Qwen3-0.6B-Base",
        json.loads(data_file.read_text())[34:36])
    # and as the chat's ChatModel does, rebuilt from the run record, in a batch
    from instructkit.model_files import load_chat_model

    for model_file in (f"{stem}.pth", f"{stem}-adapters.pth"):  # merged; adapters on the hub model
        chat_model, info = load_chat_model(tmp_path / model_file)
        assert info["hub_folder"] == str(models_dir / "Qwen--Qwen3-0.6B-Base")
        assert [a for a, _ in chat_model.answer_all(saved, MAX_NEW_TOKENS)] == [
            e["model_response"] for e in saved]


def test_resume_after_max_steps_equals_the_uninterrupted_run(qwen_run, data_file, models_dir, tmp_path,
                                                             capsys):
    stopped = gif.main(config=settings(data_file, models_dir, tmp_path, save_every=3, max_steps=4))
    assert not stopped["finished"] and stopped["steps"] == 4
    resumed = gif.main(config=settings(data_file, models_dir, tmp_path, resume=RESUME_NEWEST))
    assert "Resuming from" in capsys.readouterr().out
    stem = "Qwen3-0.6B-Base-sft-data"
    ours = torch.load(tmp_path / f"{stem}.pth", weights_only=True)
    theirs = torch.load(qwen_run["folder"] / f"{stem}.pth", weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert resumed["train_losses"] == qwen_run["result"]["train_losses"]


@pytest.mark.slow
def test_real_sigint_then_resume_equals_the_uninterrupted_run(qwen_run, data_file, models_dir, tmp_path):
    """Ctrl-C to the command (a subprocess, one thread) during training saves a checkpoint;
    --resume (in process) then ends with the weights of the run never interrupted."""
    stem = "Qwen3-0.6B-Base-sft-data"
    flags = ["--model", QWEN, "--data", str(data_file), "--models-dir", str(models_dir),
             "--output-dir", str(tmp_path), "--device", "cpu", "--epochs", "1", "--batch-size", "4",
             "--eval-freq", "4", "--eval-iter", "1", "--max-new-tokens", str(MAX_NEW_TOKENS),
             "--max-test-answers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code, stderr = run_and_act([sys.executable, "-u", str(ROOT / "gpt_instruction_finetuning.py"), *flags],
                               tmp_path.with_suffix(".stderr"), ["Ep 1 (Step 000000)"], send_interrupt,
                               timeout=120, cwd=tmp_path, env=env)
    assert code == 130, stderr
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    assert f"--resume {checkpoint}" in stderr and "Traceback" not in stderr
    assert 1 <= int(checkpoint.stem.rsplit("step", 1)[1]) < 8  # after a whole step, before the end
    assert not (tmp_path / f"{stem}.pth").exists()

    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert finetune.cli([*flags, "--resume"]) == 0
    assert f"Resuming from {checkpoint}" in out.getvalue()
    ours = torch.load(tmp_path / f"{stem}.pth", weights_only=True)
    theirs = torch.load(qwen_run["folder"] / f"{stem}.pth", weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_gpt2_checkpoint_never_resumes_a_qwen_run(data_file, models_dir, tmp_path):
    gpt2 = gif.main(config=FinetuneConfig(test_mode=True, data=str(data_file), output_dir=str(tmp_path),
                                          max_steps=1, max_new_tokens=2))
    with pytest.raises(CheckpointError, match="belongs to a different run"):
        gif.main(config=settings(data_file, models_dir, tmp_path, resume=str(gpt2["checkpoint"])))


# ---------------------------------------------------------------------------------------
# DPO on the finetuned Qwen3 (python -m instructkit.dpo_train)
# ---------------------------------------------------------------------------------------


def test_fast_dpo_logprobs_of_a_qwen3_equal_the_full_logits_ones(models_dir, qwen_run, shared_data):
    """fast_dpo's packed log-probabilities go through fast_llm for a hub model: equal to
    dpo.compute_logprobs on the model's full logits, for the pairs the hub tokenizer makes."""
    from instructkit import dpo, fast_dpo

    folder = models_dir / "Qwen--Qwen3-0.6B-Base"
    model, _ = load_hub_model(folder, dtype=torch.float32)
    tokenizer = load_hf_tokenizer(folder)
    pairs = json.loads((shared_data / "instruction-data-with-preference.json").read_text())[:4]
    dataset = dpo.PreferenceDataset(pairs, tokenizer, style=gif.PHI3)
    entry = pairs[0]
    assert dataset[0]["chosen"] == tokenizer.encode(gif.PHI3.format_input(entry) + "\n<|assistant|>:\n"
                                                    + entry["chosen"])
    batch = dpo.preference_collate_fn([dataset[i] for i in range(4)], allowed_max_length=300,
                                      pad_token_id=tokenizer.pad_token_id)
    for key in ("chosen", "rejected"):
        ids, mask = batch[key], batch[f"{key}_mask"]
        assert mask.sum(1).min() > 0 and (~mask[:, -1]).any()  # padded rows, each with a response
        with torch.no_grad():
            plain = dpo.compute_logprobs(model(ids), ids, mask)
            fast = fast_dpo.packed_logprobs(model, ids, mask)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_dpo_on_the_finetuned_qwen3_saves_what_chat_reloads(qwen_run, models_dir, shared_data,
                                                            tmp_path, capsys):
    from instructkit import chat, dpo_train

    sft_file = qwen_run["folder"] / "Qwen3-0.6B-Base-sft-data.pth"
    capsys.readouterr()
    assert dpo_train.cli(["--test-mode", "--sft-model", str(sft_file), "--data",
                          str(shared_data / "instruction-data-with-preference.json"), "--lr", "1e-3",
                          "--batch-size", "4", "--eval-freq", "1", "--eval-iter", "1",
                          "--max-new-tokens", str(MAX_NEW_TOKENS), "--output-dir", str(tmp_path),
                          "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"Model: {QWEN} (qwen3), prompt style alpaca" in out
    # a policy equal to its reference: the first evaluation's validation loss is ln 2
    assert re.search(r"^Ep 1 \(Step 000000\): Train loss 0\.\d+, Val loss 0\.69\d, "
                     r"Train reward margins -?\d\.\d\d\d, Val reward margins", out, re.M)
    assert "Ep 1 (Step 000001)" in out

    stem = "Qwen3-0.6B-Base-sft-data-dpo"
    sft = torch.load(sft_file, weights_only=True)
    tuned = torch.load(tmp_path / f"{stem}.pth", weights_only=True)
    assert tuned.keys() == sft.keys() and not torch.equal(sft["out_head.weight"], tuned["out_head.weight"])
    record = read_run_record(tmp_path / f"{stem}.pth")
    assert record["hub_model"] == {"family": "qwen3", "repo_id": QWEN,
                                   "folder": str(models_dir / "Qwen--Qwen3-0.6B-Base")}
    assert record["config"]["prompt_style"] == "alpaca" and record["model_config"]["qk_norm"] is True

    # the DPO model's answers, written by the run, are the book's greedy ones of the saved
    # weights; chat.py reloads the model from its run record and gives the same answer
    answers = json.loads((tmp_path / f"{stem}-responses.json").read_text())
    assert len(answers) == 10
    assert [a["dpo_response"] for a in answers[:2]] == greedy_answers(
        tmp_path / f"{stem}.pth", record["hub_model"]["folder"], answers[:2])
    assert [a["sft_response"] for a in answers[:2]] == greedy_answers(
        sft_file, record["hub_model"]["folder"], answers[:2])
    entry = answers[0]
    assert chat.main([str(tmp_path / f"{stem}.pth"), entry["instruction"], "--input", entry["input"],
                      "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    out, err = capsys.readouterr()
    assert out == entry["dpo_response"] + "\n" and f"{stem}.pth: {QWEN}, " in err

    # --model names a GPT-2 size: a finetuned hub model refuses it in one line
    assert dpo_train.cli(["--test-mode", "--sft-model", str(sft_file), "--model", "gpt2-small",
                          "--data", str(shared_data / "instruction-data-with-preference.json"),
                          "--output-dir", str(tmp_path / "refused"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model gpt2-small is a GPT-2 size") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------
# torchrun: two processes (DDP, gloo) give the one-process run
# ---------------------------------------------------------------------------------------


def test_two_processes_under_torchrun_equal_the_one_process_run(qwen_run, data_file, hub, tmp_path):
    """The command under `torchrun --nproc_per_node=2` (a subprocess, one thread each), from
    the loopback hub into an empty models folder: process 0 downloads, the other waits; the
    per-step losses, tokens seen, weights and answers are the one-process run's (qwen_run,
    batches of 4: 2 rows per process)."""
    from portable import TORCHRUN_ENV

    stem = "Qwen3-0.6B-Base-sft-data"
    models, out = tmp_path / "models", tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_ENDPOINT": hub.url,
           **TORCHRUN_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(ROOT / "gpt_instruction_finetuning.py"), "--model", QWEN, "--data", str(data_file),
         "--models-dir", str(models), "--output-dir", str(out), "--device", "cpu", "--epochs", "1",
         "--batch-size", "4", "--eval-freq", "4", "--eval-iter", "1", "--max-new-tokens",
         str(MAX_NEW_TOKENS)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Processes: 2 (DDP), 2 of each batch of 4 on each" in output
    for line in ("Training set length: 34", "Ep 1 (Step 000004)", "Model saved as"):
        assert output.count(line) == 1, line  # printed by process 0 only
    # one download, whole: the hub's files once, nothing half-written
    hub_folder = models / "Qwen--Qwen3-0.6B-Base"
    served = sorted(path.split("/")[-1] for path in hub.files if path.startswith(f"/{QWEN}/"))
    assert sorted(p.name for p in hub_folder.iterdir() if not p.name.startswith(".")) == served
    assert not [p for p in models.rglob("*") if p.suffix in (".tmp", ".part", ".incomplete")]
    record = read_run_record(out / f"{stem}.pth")
    one = read_run_record(qwen_run["folder"] / f"{stem}.pth")
    assert record["processes"] == 2 and one["processes"] == 1
    assert record["hub_model"]["folder"] == str(hub_folder)

    rows = [json.loads(line) for line in (out / f"{stem}.metrics.jsonl").open()]
    expected = [json.loads(line) for line in (qwen_run["folder"] / f"{stem}.metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [r["step"] for r in expected] and len(rows) >= 2
    for row, want in zip(rows, expected, strict=True):
        assert row["tokens_seen"] == want["tokens_seen"]
        assert row["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)
        assert row["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)
    weights = torch.load(out / f"{stem}.pth", weights_only=True)
    reference = torch.load(qwen_run["folder"] / f"{stem}.pth", weights_only=True)
    assert weights.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-5, atol=1e-6)
    answers = "instruction-data-with-response-data.json"
    assert json.loads((out / answers).read_text()) == json.loads((qwen_run["folder"] / answers).read_text())


# ---------------------------------------------------------------------------------------
# The web chat (python -m instructkit.web_chat) on the finetuned Qwen3, without a browser
# ---------------------------------------------------------------------------------------


def test_web_chat_streams_the_runs_answer_beside_the_pretrained_hub_model(qwen_run, models_dir,
                                                                           tmp_path, monkeypatch):
    """load_models reads the family from the run record (no flag says Qwen3) and, with
    --compare-pretrained, puts the hub model before finetuning beside it; `respond` streams
    both answers through fast_llm's KV cache, and they are the run's answer and the
    pretrained model's greedy one, the book's way."""
    from instructkit import fast_llm
    from instructkit.web_chat import load_models, respond

    folder = qwen_run["folder"]
    entry = json.loads((folder / "instruction-data-with-response-data.json").read_text())[0]
    models = load_models(folder / "Qwen3-0.6B-Base-sft-data.pth", "cpu", compare_pretrained=True)
    hub_folder = str(models_dir / "Qwen--Qwen3-0.6B-Base")
    assert [info["hub_folder"] for _, info in models] == [hub_folder, hub_folder]
    assert models[1][1]["model"] == f"{QWEN} (pretrained)" and models[0][1]["prompt_style"] == "alpaca"

    streamed = []  # the fast_llm streams the answers come from
    real_stream = fast_llm.generate_stream
    monkeypatch.setattr(fast_llm, "generate_stream",
                        lambda *args, **kwargs: streamed.append(args[0]) or real_stream(*args, **kwargs))
    updates = [[h[-1]["content"] for h in histories] for histories, _ in respond(
        [chat for chat, _ in models], entry["instruction"], entry["input"], [[], []],
        (MAX_NEW_TOKENS, 0.0, None, None))]
    assert streamed == [chat.model for chat, _ in models]
    final = updates[-1]
    assert len(updates) > 2 and all(final[0].startswith(u[0]) for u in updates)  # it grew
    assert final[0] == entry["model_response"]
    pretrained = tmp_path / "pretrained.pth"
    torch.save(models[1][0].model.state_dict(), pretrained)
    assert final[1] == greedy_answers(pretrained, hub_folder, [entry])[0]
