"""The chapter's exercises: Phi-3 prompts (7.1), masked instructions (7.2), another dataset
(7.3) and LoRA (7.4).

The exercises' code on the real data and tokenizer, each switch through the command line in
test mode, and `exercise-solutions.ipynb` run top to bottom in smoke mode.
"""

import ast
import copy
import functools
import json
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import nbformat
import pytest
import torch
import torch.nn as nn
from cli_in_process import run_finetune
from conftest import ROOT
from notebook_runner import cell_outputs, run_notebook, smoke_workdir

import exercise_variants as ev
import fast_gpt
import gpt_download
import gpt_instruction_finetuning as gif
import previous_chapters as pc
from instructkit import answers
from instructkit.finetune_config import PROMPT_STYLE_NAMES
from instructkit.gpt2_sizes import TEST_MODE_CONFIG, gpt2_config
from instructkit.instruction_data import split_data
from instructkit.safe_files import save_state_dict

NOTEBOOK = "exercise-solutions.ipynb"
EOT = 50256


# Tiny models: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


########################################################################################
# 7.1 The Phi-3 prompt style
########################################################################################

def test_phi3_prompt_with_input(instruction_data):
    assert ev.format_input_phi(instruction_data[50]) == (
        "<|user|>\nIdentify the correct spelling of the following word.\nOcassion"
    )


def test_phi3_prompt_without_input(instruction_data):
    entry = instruction_data[999]
    assert entry["input"] == ""
    assert ev.format_input_phi(entry) == "<|user|>\nWhat is an antonym of 'complicated'?"


PHI3_TEXTS = [
    "<|user|>\nIdentify the correct spelling of the following word.\nOcassion"
    "\n<|assistant|>:\nThe correct spelling is 'Occasion.'",
    "<|user|>\nWhat is an antonym of 'complicated'?"
    "\n<|assistant|>:\nAn antonym of 'complicated' is 'simple'.",
]


def test_phi3_training_texts(instruction_data, tokenizer):
    entries = [instruction_data[50], instruction_data[999]]
    phi = ev.InstructionDatasetPhi(entries, tokenizer)
    assert [phi[0], phi[1]] == [tokenizer.encode(text) for text in PHI3_TEXTS]
    assert len(phi) == 2
    chapter = gif.InstructionDataset(entries, tokenizer)
    assert all(len(phi[i]) < len(chapter[i]) for i in range(2))  # the Phi-3 prompt is shorter
    # The style-taking dataset is the chapter's for Alpaca, exercise 7.1's for Phi-3.
    assert ev.InstructionDatasetWithStyle(entries, tokenizer, gif.ALPACA).encoded_texts == \
        chapter.encoded_texts
    assert ev.InstructionDatasetWithStyle(entries, tokenizer, ev.PHI3).encoded_texts == \
        phi.encoded_texts

    masked = ev.InstructionDatasetWithMasking(entries, tokenizer, ev.PHI3)
    for i, (entry, text) in enumerate(zip(entries, PHI3_TEXTS, strict=True)):
        instruction_length, token_ids = masked[i]
        assert token_ids == tokenizer.encode(text)
        assert instruction_length == len(tokenizer.encode(ev.format_input_phi(entry)))
        assert token_ids[:instruction_length] == tokenizer.encode(ev.format_input_phi(entry))


@pytest.mark.parametrize("index", [50, 999])
def test_phi3_extraction_strips_the_assistant_tag(instruction_data, index):
    entry = instruction_data[index]
    prompt = ev.format_input_phi(entry)
    generated = prompt + "\n<|assistant|>:\n" + entry["output"]
    assert ev.extract_response_phi(generated, prompt) == entry["output"]
    assert ev.PHI3.extract_response(generated, prompt) == entry["output"]
    # The chapter's extraction removes its own tag only: the style has to match the training.
    assert gif.extract_response(generated, prompt).startswith("<|assistant|>:")
    assert ev.extract_response_phi(prompt, prompt) == ""


def test_prompt_style_by_name():
    assert gif.PROMPT_STYLES["phi3"] is ev.PHI3 and gif.PROMPT_STYLES["alpaca"] is gif.ALPACA
    assert gif.ALPACA.format_input is gif.format_input  # the chapter's own function
    assert gif.ALPACA.extract_response is gif.extract_response
    # --prompt-style's choices: these, and a hub model's chat template (made from its tokenizer)
    from instructkit.chat_template_style import STYLE_NAME

    assert (*gif.PROMPT_STYLES, STYLE_NAME) == PROMPT_STYLE_NAMES


@pytest.mark.parametrize("style", [gif.ALPACA, ev.PHI3], ids=lambda s: s.name)
def test_generate_responses_with_style_equals_one_by_one(instruction_data, tokenizer, tiny_cfg,
                                                          style):
    """Batched answers in a style: the book's one-at-a-time loop, cut by the style's extract."""
    entries = [instruction_data[i] for i in (50, 999, 314)]
    torch.manual_seed(5)
    model = pc.GPTModel(tiny_cfg).eval()
    expected = []
    for entry in entries:
        input_text = style.format_input(entry)
        token_ids = pc.generate(model, pc.text_to_token_ids(input_text, tokenizer), 6,
                                tiny_cfg["context_length"], eos_id=EOT)
        expected.append(style.extract_response(pc.token_ids_to_text(token_ids, tokenizer),
                                               input_text))
    got = answers.generate_responses(model, entries, tokenizer, style, max_new_tokens=6,
                                     batch_size=2, progress=False)
    assert got == expected


########################################################################################
# 7.2 Masking the instructions
########################################################################################

HAND_MADE = [
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Translate the greeting into French.", "input": "Good morning, how are you?",
     "output": "Bonjour, comment allez-vous ?"},
]


# Exercise 7.2's collate function, made from the chapter's
MASKING_COLLATE = ev.with_instruction_masking(gif.custom_collate_fn)


def test_custom_collate_with_masking_fn_hand_made():
    # (instruction_length, token ids) items, as InstructionDatasetWithMasking gives them
    batch = [(3, [0, 1, 2, 3, 4]), (2, [5, 6]), (1, [7, 8, 9])]
    inputs, targets = MASKING_COLLATE(batch)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT, EOT, EOT], [7, 8, 9, EOT, EOT]]
    assert targets.tolist() == [
        [-100, -100, 3, 4, EOT],  # targets 1 and 2 are prompt tokens
        [-100, EOT, -100, -100, -100],  # target 6 is a prompt token; the end-of-text stays
        [8, 9, EOT, -100, -100],  # a one-token prompt predicts nothing of itself
    ]
    inputs, targets = MASKING_COLLATE(batch, allowed_max_length=2, ignore_index=-1)
    assert inputs.tolist() == [[0, 1], [5, 6], [7, 8]]
    assert targets.tolist() == [[-1, -1], [-1, EOT], [8, 9]]


@pytest.mark.parametrize("style", [gif.ALPACA, ev.PHI3], ids=lambda s: s.name)
def test_masked_targets_exactly(style, tokenizer):
    """Prompt targets -100, the response and the first end-of-text kept, later padding -100."""
    prompts = [tokenizer.encode(style.format_input(e)) for e in HAND_MADE]
    responses = [tokenizer.encode(style.response_prefix + e["output"]) for e in HAND_MADE]
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    longest = max(len(t) for t in texts)
    expected_inputs = [t + [EOT] * (longest - len(t)) for t in texts]
    expected_targets = [[-100] * (len(p) - 1) + r + [EOT] + [-100] * (longest - len(p) - len(r))
                        for p, r in zip(prompts, responses, strict=True)]

    dataset = ev.InstructionDatasetWithMasking(HAND_MADE, tokenizer, style)
    assert [dataset[i] for i in range(2)] == [(len(p), t) for p, t in zip(prompts, texts, strict=True)]
    inputs, targets = MASKING_COLLATE([dataset[0], dataset[1]])
    assert inputs.tolist() == expected_inputs
    assert targets.tolist() == expected_targets

    # Without masking: plain token lists, and only the padding is ignored.
    plain = ev.InstructionDatasetWithStyle(HAND_MADE, tokenizer, style)
    assert plain[0] == texts[0]
    _, plain_targets = gif.custom_collate_fn([plain[0], plain[1]])
    for row, text in enumerate(texts):
        assert plain_targets[row].tolist() == text[1:] + [EOT] + [-100] * (longest - len(text))


def test_masked_loaders_on_the_real_data(instruction_data, tokenizer):
    """The loaders as gpt_instruction_finetuning.main builds them for --prompt-style phi3
    --mask-instructions: every row's prompt is masked, nothing else."""
    train, test, val = split_data(instruction_data[:60])
    collate = functools.partial(ev.with_instruction_masking(gif.custom_collate_fn), device="cpu",
                                allowed_max_length=1024)
    dataset = functools.partial(ev.InstructionDatasetWithMasking, style=ev.PHI3)(val, tokenizer)
    val_loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate)
    rows = [row for _, targets in val_loader for row in targets.tolist()]
    assert len(rows) == len(val) == 3
    for entry, row in zip(val, rows, strict=True):
        prompt_length = len(tokenizer.encode(ev.format_input_phi(entry)))
        response = tokenizer.encode("\n<|assistant|>:\n" + entry["output"])
        assert row[:prompt_length - 1] == [-100] * (prompt_length - 1)
        assert row[prompt_length - 1:prompt_length - 1 + len(response) + 1] == response + [EOT]
        assert set(row[prompt_length + len(response):]) <= {-100}


def test_masking_leaves_only_response_tokens_in_the_loss(tokenizer, tiny_cfg):
    """The loss on masked targets ignores the prompt: changing the instruction's logits
    changes nothing, changing a response position's logits does."""
    torch.manual_seed(3)
    model = pc.GPTModel(tiny_cfg).eval()
    dataset = ev.InstructionDatasetWithMasking(HAND_MADE, tokenizer, gif.ALPACA)
    inputs, targets = MASKING_COLLATE([dataset[0], dataset[1]])
    with torch.no_grad():
        logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    prompt_length = dataset[0][0]
    changed = logits.clone()
    changed[0, :prompt_length - 1] += torch.randn_like(changed[0, :prompt_length - 1])
    assert torch.nn.functional.cross_entropy(changed.flatten(0, 1), targets.flatten()) == loss
    changed[0, prompt_length - 1] += 5 * torch.randn_like(changed[0, prompt_length - 1])
    assert torch.nn.functional.cross_entropy(changed.flatten(0, 1), targets.flatten()) != loss


########################################################################################
# 7.4 LoRA
########################################################################################

def test_lora_starts_as_the_base_model_and_trains_only_a_and_b(tiny_cfg):
    torch.manual_seed(11)
    base = pc.GPTModel(tiny_cfg).eval()
    model = copy.deepcopy(base)
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    model.requires_grad_(False)
    ev.replace_linear_with_lora(model, rank=4, alpha=8)

    x = torch.randint(0, tiny_cfg["vocab_size"], (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # B is zero: exactly the base model

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(linears)
    assert all(n.endswith((".lora.A", ".lora.B")) for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == sum(
        4 * (m.in_features + m.out_features) for m in linears)


def test_lora_counts_on_gpt2_medium_meta_device():
    with torch.device("meta"):
        model = pc.GPTModel(gpt2_config("gpt2-medium"))
        model.requires_grad_(False)
        ev.replace_linear_with_lora(model, rank=16, alpha=16)
    assert all(p.is_meta for p in model.parameters())  # shapes only, no memory
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert trainable == 7_898_384
    assert frozen == 406_286_336


@pytest.fixture
def finetuned_lora(tiny_cfg, instruction_data, tokenizer):
    """A tiny GPT with rank-4 LoRA layers, trained a few steps (so B is no longer zero);
    returns the base model's state dict and the LoRA model."""
    torch.manual_seed(7)
    model = pc.GPTModel(tiny_cfg).eval()
    base_state = copy.deepcopy(model.state_dict())
    model.requires_grad_(False)
    ev.replace_linear_with_lora(model, rank=4, alpha=8)

    dataset = gif.InstructionDataset(instruction_data[:8], tokenizer)
    inputs, targets = gif.custom_collate_fn([dataset[i] for i in range(8)],
                                            allowed_max_length=tiny_cfg["context_length"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        pc.calc_loss_batch(inputs, targets, model, "cpu").backward()
        optimizer.step()
    model.eval()
    assert all(m.B.abs().sum() > 0 for m in model.modules() if isinstance(m, ev.LoRALayer))
    assert torch.equal(model.out_head.linear.weight, base_state["out_head.weight"])  # frozen
    return base_state, model


def test_lora_adapters_save_reload_and_generate_the_same(tmp_path, finetuned_lora, tiny_cfg,
                                                         instruction_data, tokenizer):
    base_state, model = finetuned_lora
    adapters = ev.lora_state_dict(model)
    assert set(adapters) == {k for k in model.state_dict() if ".lora." in k} | {"lora_alpha"}
    assert adapters["lora_alpha"].item() == 8.0
    path = tmp_path / "adapters.pth"
    save_state_dict(adapters, path)

    fresh = pc.GPTModel(tiny_cfg)
    fresh.load_state_dict(base_state)
    ev.load_lora_adapters(fresh, torch.load(path, weights_only=True))
    fresh.eval()
    assert all(n.endswith((".lora.A", ".lora.B"))
               for n, p in fresh.named_parameters() if p.requires_grad)
    assert fresh.out_head.lora.alpha == 8.0 and fresh.out_head.lora.A.shape[1] == 4

    prompt = pc.text_to_token_ids(ev.format_input_phi(instruction_data[999]), tokenizer)
    with torch.no_grad():
        assert torch.equal(fresh(prompt), model(prompt))
    context = tiny_cfg["context_length"]
    expected = pc.generate(model, prompt, 10, context)
    assert torch.equal(expected, fast_gpt.generate(model, prompt, 10, context))
    got = fast_gpt.generate(fresh, prompt, 10, context)
    assert got.shape[1] == prompt.shape[1] + 10
    assert torch.equal(got, expected)


def test_lora_helpers_reject_the_wrong_input(tiny_cfg):
    plain = pc.GPTModel(tiny_cfg)
    with pytest.raises(ValueError, match="no LoRA layers"):
        ev.lora_state_dict(plain)
    with pytest.raises(ValueError, match="not LoRA adapters"):
        ev.load_lora_adapters(plain, plain.state_dict())


def test_merge_lora_gives_a_plain_gpt_model_with_the_same_logits(tmp_path, finetuned_lora,
                                                                tiny_cfg):
    _, model = finetuned_lora
    x = torch.randint(0, tiny_cfg["vocab_size"], (2, 20))
    with torch.no_grad():
        lora_logits = model(x)

    assert ev.merge_lora(model) is model
    assert not any(isinstance(m, (ev.LinearWithLoRA, ev.LoRALayer)) for m in model.modules())
    assert set(model.state_dict()) == set(pc.GPTModel(tiny_cfg).state_dict())
    path = tmp_path / "merged.pth"
    save_state_dict(model.state_dict(), path)

    plain = pc.GPTModel(tiny_cfg)
    plain.load_state_dict(torch.load(path, weights_only=True))  # strict: the plain keys
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), lora_logits, rtol=1e-4, atol=1e-5)
    # A plain GPTModel again: cached generation works and matches the book's loop.
    cached = fast_gpt.generate(plain, x[:1, :6], 6, tiny_cfg["context_length"])
    assert torch.equal(cached, pc.generate(plain, x[:1, :6], 6, tiny_cfg["context_length"]))


########################################################################################
# Each switch through the command line (test mode: a tiny random GPT, ~10 entries)
########################################################################################

def run_cli(*args, cwd):
    """`python gpt_instruction_finetuning.py *args` in `cwd`, run in this process
    (cli_in_process.py: a subprocess would spend seconds on imports alone)."""
    return run_finetune(*args, cwd=cwd, one_thread=True)


def run_variant(out_dir, *switches, data, cwd):
    return run_cli("--test_mode", "--data", str(data), "--output-dir", str(out_dir),
                   "--max-new-tokens", "8", *switches, cwd=cwd)


def initial_training_loss(stdout):
    return float(re.search(r"   Training loss: ([0-9.]+)", stdout).group(1))


def variant_files(suffix):
    return {f"gpt2-medium355M-sft{suffix}.pth", f"gpt2-medium355M-sft{suffix}.metrics.jsonl",
            f"gpt2-medium355M-sft{suffix}.run.json", f"instruction-data-with-response{suffix}.json",
            f"loss-plot{suffix}.pdf"}


@pytest.mark.slow
def test_cli_prompt_style_and_masking_variants_share_a_folder(tmp_path, shared_data):
    """phi3, mask, and both: each run works and writes its own files into the same folder."""
    data = shared_data / "instruction-data.json"
    out_dir = tmp_path / "out"
    runs = {}
    for suffix, switches in (("-phi3-test", ["--prompt-style", "phi3"]),
                             ("-mask-test", ["--mask-instructions"]),
                             ("-phi3-mask-test", ["--prompt-style", "phi3", "--mask-instructions"])):
        proc = run_variant(out_dir, *switches, data=data, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"Model saved as {out_dir / f'gpt2-medium355M-sft{suffix}.pth'}" in proc.stdout
        runs[suffix] = proc.stdout

    assert {p.name for p in out_dir.iterdir()} == (
        variant_files("-phi3-test") | variant_files("-mask-test") | variant_files("-phi3-mask-test"))

    # The prompts printed with the first answers are in each run's style.
    assert "<|user|>\n" in runs["-phi3-test"] and "### Instruction:" not in runs["-phi3-test"]
    assert "### Instruction:" in runs["-mask-test"] and "<|user|>" not in runs["-mask-test"]
    assert "<|user|>\n" in runs["-phi3-mask-test"]
    # Same prompts, same model: masking changes which targets the loss averages.
    assert initial_training_loss(runs["-phi3-test"]) != initial_training_loss(runs["-phi3-mask-test"])

    saved = json.loads((out_dir / "instruction-data-with-response-phi3-mask-test.json").read_text())
    assert len(saved) == 10 and all(isinstance(e["model_response"], str) for e in saved)
    state = torch.load(out_dir / "gpt2-medium355M-sft-phi3-mask-test.pth", weights_only=True)
    pc.GPTModel(TEST_MODE_CONFIG).load_state_dict(state)  # strict


@pytest.mark.slow
def test_cli_lora_writes_adapters_and_merged_model(tmp_path, shared_data):
    out_dir = tmp_path / "out"
    proc = run_variant(out_dir, "--lora-rank", "4", "--lora-alpha", "8",
                       data=shared_data / "instruction-data.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    suffix = "-lora4-test"
    assert {p.name for p in out_dir.iterdir()} == (
        variant_files(suffix) | {f"gpt2-medium355M-sft{suffix}-adapters.pth"})
    assert "LoRA adapters saved as" in proc.stdout

    with torch.device("meta"):
        counted = pc.GPTModel(TEST_MODE_CONFIG)
        counted.requires_grad_(False)
        ev.replace_linear_with_lora(counted, rank=4, alpha=8)
    n_trainable = sum(p.numel() for p in counted.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in counted.parameters())
    assert f"Parameters: {n_total:,} ({n_trainable:,} trainable)" in proc.stdout

    adapters = torch.load(out_dir / f"gpt2-medium355M-sft{suffix}-adapters.pth", weights_only=True)
    assert adapters["lora_alpha"].item() == 8.0
    assert all(v.shape[1] == 4 for k, v in adapters.items() if k.endswith(".lora.A"))
    merged = torch.load(out_dir / f"gpt2-medium355M-sft{suffix}.pth", weights_only=True)
    pc.GPTModel(TEST_MODE_CONFIG).load_state_dict(merged)  # strict: a plain GPTModel

    # Test mode's base model is GPTModel(TEST_MODE_CONFIG) right after torch.manual_seed(123):
    # that base plus the saved adapters, merged, is the saved merged model.
    torch.manual_seed(123)
    base = pc.GPTModel(TEST_MODE_CONFIG)
    base_head = base.out_head.weight.detach().clone()
    rebuilt = ev.merge_lora(ev.load_lora_adapters(base, adapters))
    for name, tensor in rebuilt.state_dict().items():
        assert torch.allclose(tensor, merged[name], atol=1e-6), name
    assert not torch.allclose(merged["out_head.weight"], base_head, atol=1e-6)  # it trained


@pytest.mark.slow
def test_cli_data_url_downloads_the_dataset(tmp_path, instruction_data, monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):  # the loopback server, never through a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    served_dir = tmp_path / "served"
    served_dir.mkdir()
    entries = instruction_data[:40]
    (served_dir / "small.json").write_text(json.dumps(entries), encoding="utf-8")
    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(Handler, directory=str(served_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/small.json"
        target = tmp_path / "data" / "downloaded.json"
        proc = run_cli("--test_mode", "--data", str(target), "--data-url", url,
                       "--output-dir", str(tmp_path / "out"), "--max-new-tokens", "8", cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert requests == ["/small.json"]
    assert json.loads(target.read_text(encoding="utf-8")) == entries
    assert "Test set length: 4" in proc.stdout  # 10% of the 40 entries
    assert (tmp_path / "out" / "gpt2-medium355M-sft-downloaded-test.pth").exists()


########################################################################################
# The exercise notebook
########################################################################################

def test_notebook_sections_and_helpers():
    """(Stored without outputs, with the smoke switch first: test_notebooks.py checks that.)"""
    nb = nbformat.read(ROOT / NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for n in range(1, 5):
        assert f"## Exercise 7.{n}:" in markdown

    # The notebook imports the modules' functions; its own helpers have new names.
    module_names = set().union(*(dir(m) for m in (gif, ev, pc, fast_gpt, gpt_download)))
    defined = {node.name for c in code for node in ast.walk(ast.parse(c.source))
               if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    assert defined and not defined & module_names


@pytest.mark.slow
def test_exercise_notebook_runs_in_smoke_mode(tmp_path):
    workdir = smoke_workdir(tmp_path / "repo")
    nb = run_notebook(NOTEBOOK, workdir, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    out = cell_outputs(nb)

    for line in (
        "Training / test / validation: 935 / 110 / 55",
        "The Phi-3 style processes 26% fewer tokens per epoch.",
        "instruction-data-with-response-phi3-test.json",
        "Row 0: 47 prompt targets are -100",
        "Number of entries: 200",  # exercise 7.3: the stand-in for Alpaca's 52,002
        "Training / test / validation: 170 / 20 / 10",
        "Same outputs as the pretrained model (B is zero): True",
        "gpt2-medium (355M), rank 16: 7,898,384 trainable LoRA parameters of 406,286,336 (1.94%)",
        "By hand: 24 x 294,912 + 820,496 = 7,898,384",
        "Reloaded adapters, same outputs: True",
        "Loads into a plain GPTModel, same outputs: True",
    ):
        assert line in out, line
    assert "\"The correct spelling is 'Occasion.'\"" in out  # extracted Phi-3 answer
    # The check cells (the student notebook's) pass on the solutions
    for name in ("format_input", "custom_collate_fn", "extract_response", "format_input_phi",
                 "custom_collate_with_masking_fn", "LoRALayer", "LinearWithLoRA"):
        assert f"{name}: passed." in out, name
    assert out.count("Training completed in") == 4  # 7.1, 7.2, 7.3 (smoke) and 7.4

    for name in ("instruction-data-with-response-phi3-test.json",
                 "instruction-data-with-response-mask-test.json",
                 "instruction-data-with-response-lora16-test.json",
                 "instruction-data-with-response-alpaca_data-test.json"):
        saved = json.loads((workdir / name).read_text(encoding="utf-8"))
        assert len(saved) == 10 and all(isinstance(e["model_response"], str) for e in saved)
    adapters = torch.load(workdir / "gpt2-medium355M-sft-lora16-test-adapters.pth", weights_only=True)
    assert adapters["lora_alpha"].item() == 16.0
    merged = torch.load(workdir / "gpt2-medium355M-sft-lora16-test.pth", weights_only=True)
    pc.GPTModel(TEST_MODE_CONFIG).load_state_dict(merged)
