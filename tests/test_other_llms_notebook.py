"""ch07-with-other-llms.ipynb: the chapter on SmolLM2 / Qwen3, run top to bottom in smoke mode.

A loopback hub (`HF_ENDPOINT`, set for the kernel) serves a tiny random repository under the
real id HuggingFaceTB/SmolLM2-360M, the notebook's default `MODEL`: a Llama config.json shaped
like SmolLM2's (tied embeddings), bfloat16 safetensors written from the project's own model
with the hub's tensor names, and SmolLM2's tokenizer files (tests/tiny_hub_tokenizers.py). The
run downloads it, trains a few steps on the chapter's data and answers the test entries; the
test checks the printed lines, the padding id, the base model's answers (against what the same
weights give outside the notebook, with the book's generate) beside the finetuned model's, and
the saved file. Also here, for SmolLM2 and Qwen3 (a tiny Qwen/Qwen3-0.6B-Base the same way):
fast_llm.train_model_fast, the loop the notebook swaps in, gives the book's
train_model_simple's printed lines, losses and weights. (A second notebook run with
MODEL = "qwen3-0.6b" would add about 15 seconds to the suite; the model path it would take is
test_other_llms.py's.)"""

import contextlib
import io
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, SHARED_DATA
from loopback_server import serving
from notebook_runner import cell_outputs, repo_files, run_notebook
from tiny_hub_tokenizers import write_tokenizer_folder

from instructkit.hf_tokenizer import load_hf_tokenizer
from instructkit.hub_model_files import hub_weight_names, model_class, model_config

NOTEBOOK = "ch07-with-other-llms.ipynb"
SMOL, QWEN = "HuggingFaceTB/SmolLM2-360M", "Qwen/Qwen3-0.6B-Base"
SMOKE_SIZES = {"train": 16, "val": 8, "test": 4}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, here and in the kernel

# Tiny configs of the two families, shaped like the real ones (tied embeddings; Qwen3's
# head_dim is not hidden / heads and it has QK-norm).
TINY_CONFIGS = {
    SMOL: ("smollm2", {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                       "tie_word_embeddings": True, "torch_dtype": "bfloat16"}),
    QWEN: ("qwen3", {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "head_dim": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "tie_word_embeddings": True, "torch_dtype": "bfloat16"}),
}


def tiny_repo(folder, repo_id, seed=0):
    """Write a tiny random repository of `repo_id`'s family in `folder`; {file name: bytes}."""
    from safetensors.torch import save_file

    family, config_json = TINY_CONFIGS[repo_id]
    tokenizer = write_tokenizer_folder(folder, family)
    # A few embedding rows more than the tokenizer uses, as Qwen3's 151,936 for 151,669
    config_json = {**config_json, "vocab_size": -(-tokenizer.get_vocab_size() // 64) * 64}
    (folder / "config.json").write_text(json.dumps(config_json), encoding="utf-8")
    cfg = model_config(config_json, dtype=torch.float32)
    torch.manual_seed(seed)
    model = model_class(config_json["model_type"])(cfg)
    with torch.no_grad():  # the hub models' initialisation: N(0, 0.02), so losses start near ln(vocab)
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.02)
    state = model.state_dict()
    save_file({theirs: state[ours].to(torch.bfloat16).contiguous()
               for ours, theirs in hub_weight_names(cfg).items()}, str(folder / "model.safetensors"))
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """{url path: bytes} of both tiny repositories, and the folders they were made in."""
    made = tmp_path_factory.mktemp("made")
    files, folders = {}, {}
    for repo_id in TINY_CONFIGS:
        folders[repo_id] = made / repo_id.replace("/", "--")
        folders[repo_id].mkdir()
        for name, data in tiny_repo(folders[repo_id], repo_id).items():
            files[f"/{repo_id}/resolve/main/{name}"] = data
    return SimpleNamespace(files=files, folders=folders)


def workdir_with_data(dest):
    """The repository's files and the chapter's dataset (already 'downloaded')."""
    for rel in repo_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    shutil.copyfile(SHARED_DATA / "instruction-data.json", dest / "instruction-data.json")
    return dest


def execute(workdir, hub):
    with serving(hub.files) as server:
        nb = run_notebook(NOTEBOOK, workdir, env={"HF_ENDPOINT": server.url, "OMP_NUM_THREADS": "1"},
                          timeout=300)
        paths = server.paths()
    return SimpleNamespace(workdir=workdir, out=cell_outputs(nb), paths=paths)


@pytest.fixture(scope="module")
def executed(tmp_path_factory, hub):
    return execute(workdir_with_data(tmp_path_factory.mktemp("notebook")), hub)


def losses(out):
    """The (train, val) pairs of the training lines."""
    return re.findall(r"Ep 1 \(Step \d{6}\): Train loss (\d+\.\d{3}), Val loss (\d+\.\d{3})", out)


def expected_answers(folder, entries, max_new_tokens=16):
    """What the base weights answer to `entries`, outside the notebook (the book's generate)."""
    from gpt_instruction_finetuning import extract_response, format_input
    from instructkit.hub_model_files import load_hub_model
    from previous_chapters import generate, text_to_token_ids

    model, cfg = load_hub_model(folder, dtype=torch.float32)
    model.eval()
    tokenizer = load_hf_tokenizer(folder)
    answers = []
    for entry in entries:
        input_text = format_input(entry)
        idx = text_to_token_ids(input_text, tokenizer)
        ids = generate(model, idx, max_new_tokens, cfg["context_length"], eos_id=tokenizer.eot_token)
        answers.append(extract_response(input_text + tokenizer.decode(ids[0, idx.shape[1]:].tolist()),
                                        input_text))
    return answers


@pytest.mark.slow
def test_the_notebook_runs_the_chapter_on_a_hub_model(executed, hub):
    out, repo_id, family = executed.out, SMOL, "llama"
    folder = hub.folders[repo_id]
    tokenizer = load_hf_tokenizer(folder)
    # The repository downloaded from the hub under its real id, into models/
    assert f"Model: {repo_id}" in out and f"Family: {family}" in out
    assert f"/{repo_id}/resolve/main/model.safetensors" in executed.paths
    downloaded = executed.workdir / "models" / repo_id.replace("/", "--")
    assert (downloaded / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()

    for line in ("Number of entries: 1100", "Training set length: 935", "Validation set length: 55",
                 "Test set length: 110", "Device: cpu", f"Tokens in the vocabulary: {tokenizer.n_vocab}",
                 f"Padding and end-of-text id: {tokenizer.eot_token}",
                 f"Number of training batches: {SMOKE_SIZES['train'] // 8}"):
        assert line in out, line
    # The toy batch padded with the model's EOS id, not 50256
    eos = tokenizer.eot_token
    assert re.search(rf"\[\s*6,\s+7,\s+{eos},\s+{eos},\s+{eos}\]", out)  # the inputs
    assert re.search(rf"\[\s*7,\s+{eos},\s+-100,\s+-100,\s+-100\]", out)  # the targets

    # Memory: the counted targets are fewer than the positions (padding and ignored targets)
    counted, positions = (int(n.replace(",", "")) for n in re.search(
        r"Targets that count in the training batches: ([\d,]+) of ([\d,]+)", out).groups())
    assert 0 < counted < positions
    # The chapter's losses, then the training loop's lines
    assert re.search(r"Training loss: \d+\.\d+\nValidation loss: \d+\.\d+", out)
    assert len(losses(out)) == 1 and "Training completed in" in out and "Seconds per step" in out
    assert (executed.workdir / f"loss-plot-{repo_id.split('/')[1]}.pdf").read_bytes().startswith(b"%PDF")

    # The answers: base beside finetuned for three test entries, and the saved file
    data = json.loads((SHARED_DATA / "instruction-data.json").read_text(encoding="utf-8"))
    test_entries = data[935:935 + SMOKE_SIZES["test"]]
    base = expected_answers(folder, test_entries[:3])
    saved = json.loads((executed.workdir / f"instruction-data-with-response-{repo_id.split('/')[1]}.json")
                       .read_text(encoding="utf-8"))
    assert [e["instruction"] for e in saved] == [e["instruction"] for e in test_entries]
    assert f"Saved {SMOKE_SIZES['test']} answers to instruction-data-with-response-" in out
    blocks = out.split("-------------------------------------")[:3]
    assert len(blocks) == 3
    for block, entry, base_answer, saved_entry in zip(blocks, test_entries, base, saved, strict=False):
        assert f"Correct response:\n>> {entry['output']}\n" in block
        assert f"Base model response:\n>> {base_answer}\n" in block  # what the base weights answer
        assert f"Finetuned model response:\n>> {saved_entry['model_response']}\n" in block
    # The first validation instruction's base answer, with the book's generate (8 tokens)
    (val_answer,) = expected_answers(folder, data[935 + 110:][:1], max_new_tokens=8)
    assert f"Base model response:\n>> {val_answer}\n" in out


def tiny_loaders(tokenizer, data):
    from functools import partial

    from torch.utils.data import DataLoader

    from gpt_instruction_finetuning import InstructionDataset, custom_collate_fn

    collate = partial(custom_collate_fn, pad_token_id=tokenizer.eot_token, allowed_max_length=1024)
    torch.manual_seed(123)
    train = DataLoader(InstructionDataset(data[:12], tokenizer), batch_size=4, shuffle=True,
                       drop_last=True, collate_fn=collate)
    val = DataLoader(InstructionDataset(data[-6:], tokenizer), batch_size=4, collate_fn=collate)
    return train, val


@pytest.mark.parametrize("repo_id", [SMOL, QWEN])
def test_train_model_fast_gives_the_books_losses_and_lines(repo_id, hub, instruction_data):
    """The notebook's swapped-in loop: train_model_simple's printed lines and returned
    losses (to float rounding), and the same weights afterwards; its per-epoch sample is the
    book's greedy 50 tokens."""
    from instructkit import fast_llm
    from instructkit.hub_model_files import load_hub_model
    from previous_chapters import generate, text_to_token_ids, token_ids_to_text, train_model_simple

    folder = hub.folders[repo_id]
    tokenizer = load_hf_tokenizer(folder)
    results = {}
    for name, loop in (("book", train_model_simple), ("fast", fast_llm.train_model_fast)):
        model, _ = load_hub_model(folder, dtype=torch.float32)
        train_loader, val_loader = tiny_loaders(tokenizer, instruction_data)
        torch.manual_seed(123)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.001, weight_decay=0.1)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            history = loop(model, train_loader, val_loader, optimizer, "cpu", num_epochs=2, eval_freq=2,
                           eval_iter=2, start_context=None, tokenizer=tokenizer)
        results[name] = (model, history, printed.getvalue())

    (book_model, book, book_out), (fast_model, fast, fast_out) = results["book"], results["fast"]
    assert book[2] == fast[2] and len(book[0]) == 3  # tokens seen, at steps 0, 2 (epoch 2: 4 steps)
    for ours, theirs in zip(fast[:2], book[:2], strict=True):
        assert ours == pytest.approx(theirs, abs=1e-4)
    def shape(out):  # the lines without their numbers
        return [re.sub(r"\d+\.\d{3}", "x.xxx", line) for line in out.splitlines()]

    assert shape(fast_out) == shape(book_out) == ["Ep 1 (Step 000000): Train loss x.xxx, Val loss x.xxx",
                                                  "Ep 1 (Step 000002): Train loss x.xxx, Val loss x.xxx",
                                                  "Ep 2 (Step 000004): Train loss x.xxx, Val loss x.xxx"]
    for (name, p), q in zip(fast_model.named_parameters(), book_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=name)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        fast_llm.print_sample(fast_model, tokenizer, "cpu", "Below is an instruction")
    ids = generate(fast_model, text_to_token_ids("Below is an instruction", tokenizer), 50,
                   fast_llm.context_size(fast_model))
    assert printed.getvalue() == token_ids_to_text(ids, tokenizer).replace("\n", " ") + "\n"
    assert fast_model.training  # back in training mode, as the book's sample leaves it
