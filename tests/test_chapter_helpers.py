"""gpt_instruction_finetuning.py's helpers, on the chapter's real data and the real tokenizer."""

import functools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from torch.utils.data import DataLoader

import previous_chapters as pc
from gpt_instruction_finetuning import (
    ALPACA,
    InstructionDataset,
    custom_collate_fn,
    download_and_load_file,
    extract_response,
    format_input,
    get_device,
)
from instructkit.answers import generate_responses
from instructkit.errors import BadInputError, DownloadError
from instructkit.instruction_data import DatasetError, split_data, validate_entries
from instructkit.safe_files import write_json

EOT = 50256
PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


# Tiny models: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


########################################################################################
# 7.2 Prompts and the split
########################################################################################

def test_format_input_alpaca(instruction_data):
    assert format_input(instruction_data[50]) == (
        PREAMBLE + "\n\n### Instruction:\nIdentify the correct spelling of the following word."
        "\n\n### Input:\nOcassion"
    )
    assert instruction_data[999]["input"] == ""
    assert format_input(instruction_data[999]) == (
        PREAMBLE + "\n\n### Instruction:\nWhat is an antonym of 'complicated'?"
    )


def test_extract_response(instruction_data):
    entry = instruction_data[50]
    prompt = format_input(entry)
    generated = prompt + "\n\n### Response:\nThe correct spelling is 'Occasion.'\n"
    assert extract_response(generated, prompt) == "The correct spelling is 'Occasion.'"
    # the prompt itself is never part of the answer, even when the answer is empty
    assert extract_response(prompt, prompt) == ""


def test_split_data_sizes_and_order(instruction_data):
    train, test, val = split_data(instruction_data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[0] == instruction_data[0] and train[-1] == instruction_data[934]
    assert test[0] == instruction_data[935] and test[-1] == instruction_data[1044]
    assert val[0] == instruction_data[1045] and val[-1] == instruction_data[1099]
    assert val[0]["instruction"] == (
        "Convert the active sentence to passive: 'The chef cooks the meal every day.'")


def test_split_data_too_few_entries(instruction_data):
    with pytest.raises(DatasetError, match="too few"):
        split_data(instruction_data[:9])  # int(9 * 0.1) == 0 test entries
    with pytest.raises(DatasetError):
        split_data([])
    train, test, val = split_data(instruction_data[:10])  # the smallest data that splits
    assert (len(train), len(test), len(val)) == (8, 1, 1)


########################################################################################
# 7.3 Batching
########################################################################################

def test_instruction_dataset_tokenizes_prompt_and_response(instruction_data, tokenizer):
    entries = instruction_data[49:52]
    ds = InstructionDataset(entries, tokenizer)
    assert len(ds) == 3
    text = format_input(entries[1]) + "\n\n### Response:\n" + entries[1]["output"]
    assert ds[1] == tokenizer.encode(text)
    assert tokenizer.decode(ds[1]) == text


def test_end_of_text_token(tokenizer):
    assert tokenizer.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [EOT]


def test_custom_collate_fn_the_chapters_batch():
    batch = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    inputs, targets = custom_collate_fn(batch)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT, EOT, EOT], [7, 8, 9, EOT, EOT]]
    assert targets.tolist() == [[1, 2, 3, 4, EOT], [6, EOT, -100, -100, -100], [8, 9, EOT, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long
    assert inputs.device.type == targets.device.type == "cpu"
    assert batch == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]  # the items are not modified


def test_custom_collate_fn_truncates_and_places():
    batch = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    inputs, targets = custom_collate_fn(batch, allowed_max_length=3, device=torch.device("cpu"))
    assert inputs.tolist() == [[0, 1, 2], [5, 6, EOT], [7, 8, 9]]
    assert targets.tolist() == [[1, 2, 3], [6, EOT, -100], [8, 9, EOT]]
    inputs, _ = custom_collate_fn(batch, allowed_max_length=1024, device="cpu")
    assert inputs.shape == (3, 5) and inputs.device == torch.device("cpu")
    inputs, targets = custom_collate_fn([[3, 4], [5]], pad_token_id=0, ignore_index=-1)
    assert inputs.tolist() == [[3, 4], [5, 0]] and targets.tolist() == [[4, 0], [0, -1]]


def test_why_minus_100_is_ignored():
    ce = torch.nn.functional.cross_entropy
    logits_1 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5]])
    loss_1 = ce(logits_1, torch.tensor([0, 1]))
    assert round(loss_1.item(), 4) == 1.1269
    logits_2 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
    assert round(ce(logits_2, torch.tensor([0, 1, 1])).item(), 4) == 0.7936
    loss_3 = ce(logits_2, torch.tensor([0, 1, -100]))
    assert round(loss_3.item(), 4) == 1.1269
    assert loss_3.item() == loss_1.item()


########################################################################################
# 7.4 Data loaders
########################################################################################

def test_train_loader_batches_like_the_book(instruction_data, tokenizer):
    train_data, _, val_data = split_data(instruction_data)
    collate = functools.partial(custom_collate_fn, device="cpu", allowed_max_length=1024)
    torch.manual_seed(123)
    train_loader = DataLoader(InstructionDataset(train_data, tokenizer), batch_size=8, collate_fn=collate,
                              shuffle=True, drop_last=True, num_workers=0)
    val_loader = DataLoader(InstructionDataset(val_data, tokenizer), batch_size=8, collate_fn=collate,
                            shuffle=False, drop_last=False, num_workers=0)
    assert len(train_loader) == 116
    assert len(val_loader) == 7  # 55 entries: the last batch has 7

    batches = list(train_loader)
    assert len(batches) == 116
    shapes = [tuple(inputs.shape) for inputs, _ in batches]
    assert shapes[:4] == [(8, 61), (8, 76), (8, 73), (8, 68)]
    assert shapes[-1] == (8, 69)
    assert all(tuple(t.shape) == s for (_, t), s in zip(batches, shapes, strict=True))

    start = [21106, 318, 281, 12064, 326, 8477, 257, 4876, 13, 19430, 257, 2882]
    assert tokenizer.decode(start) == "Below is an instruction that describes a task. Write a response"
    inputs, targets = batches[0]
    assert inputs[0, :12].tolist() == start
    assert (inputs[:, :12] == torch.tensor(start)).all()
    padded_rows = 0
    for inp, tgt in zip(inputs.tolist(), targets.tolist(), strict=True):
        n_pad = len(inp) - len(list(filter(lambda t: t != EOT, inp)))  # no EOT in the real text
        core = tgt[:len(tgt) - n_pad] if n_pad else tgt
        assert core[-1] == EOT and EOT not in core[:-1]  # one end-of-text target...
        assert tgt[len(core):] == [-100] * n_pad  # ...then -100 for every padding position
        padded_rows += n_pad > 0
    assert padded_rows > 0


########################################################################################
# 7.2 Loading and checking the data
########################################################################################

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"instruction": "x"}, "expected a JSON list"),
        ([], "empty"),
        ([GOOD, GOOD, "text"], r"entry 2\b.*\bstr\b"),
        ([GOOD, {"instruction": "a", "input": ""}], r"entry 1\b.*'output'"),
        ([{"instruction": "a", "input": None, "output": "b"}], r"entry 0\b.*'input'.*string.*NoneType"),
        ([GOOD, {"instruction": 3, "input": "", "output": "b"}], r"entry 1\b.*'instruction'.*string.*int"),
    ],
    ids=["not-a-list", "empty", "not-a-dict", "missing-key", "none-value", "number-value"],
)
def test_validate_entries_names_the_problem(data, pattern):
    with pytest.raises(DatasetError, match=pattern):
        validate_entries(data)


def test_validate_entries_accepts_the_real_data(instruction_data):
    assert validate_entries(instruction_data) is instruction_data
    assert issubclass(DatasetError, BadInputError)  # one line and exit code 2 in a command


def test_download_and_load_file_uses_an_existing_file(instruction_data, shared_data, tmp_path):
    # an unreachable URL: loading must not touch the network
    data = download_and_load_file(shared_data / "instruction-data.json", "http://127.0.0.1:9/x")
    assert data == instruction_data and len(data) == 1100

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([GOOD, {"instruction": "a", "output": "b"}]), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad\.json.*entry 1\b.*'input'"):
        download_and_load_file(bad, "http://127.0.0.1:9/x")
    bad.write_text("[{", encoding="utf-8")
    with pytest.raises(json.JSONDecodeError):  # the book's json.load (the command line says it in one line)
        download_and_load_file(str(bad), "http://127.0.0.1:9/x")


class _JSONHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.paths.append(self.path)
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def json_server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JSONHandler)
    server.daemon_threads = True
    server.paths = []
    server.body = b""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_download_and_load_file_downloads_once(json_server, instruction_data, tmp_path):
    entries = instruction_data[:5] + [{"instruction": "Ünïcode — ok?", "input": "", "output": "ja"}]
    json_server.body = json.dumps(entries, ensure_ascii=False).encode("utf-8")
    url = f"http://127.0.0.1:{json_server.server_address[1]}/data/instruction-data.json"
    target = tmp_path / "sub" / "instruction-data.json"

    assert download_and_load_file(target, url) == entries
    assert json_server.paths == ["/data/instruction-data.json"]
    assert target.read_bytes() == json_server.body
    assert [p.name for p in target.parent.iterdir()] == ["instruction-data.json"]  # no temp files

    assert download_and_load_file(target, url) == entries
    assert len(json_server.paths) == 1  # the second call reads the local file


def test_download_and_load_file_unreachable(tmp_path):
    target = tmp_path / "instruction-data.json"
    url = "http://127.0.0.1:9/x"
    with pytest.raises(DownloadError) as err:
        download_and_load_file(target, url)
    assert url in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, [{"k": "v" * 1000}] * 20)
    write_json(path, {"a": 1})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1}  # replaced wholly
    assert path.read_text(encoding="utf-8") == json.dumps({"a": 1}, indent=4)
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]

    with pytest.raises(TypeError):
        write_json(path, {"b": object()})  # fails halfway through writing
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1}  # the old file survives
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]

    # The new file replaces the old one in one step: a reader that opened the old file
    # still reads all of it, never a truncated or half-new file.
    with open(path, encoding="utf-8") as reader:
        write_json(path, ["new"] * 100)
        assert json.loads(reader.read()) == {"a": 1}
    assert json.loads(path.read_text(encoding="utf-8")) == ["new"] * 100


########################################################################################
# Device
########################################################################################

def test_get_device():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this test checks the CPU fallback")
    assert get_device() == torch.device("cpu")


########################################################################################
# 7.7 Responses
########################################################################################

@pytest.mark.parametrize("batch_size", [1, 4])
def test_generate_responses_equal_one_by_one(instruction_data, tokenizer, tiny_cfg, batch_size):
    entries = [instruction_data[i] for i in (999, 50, 314, 1045, 114)]  # 314: a 59-token prompt
    long = instruction_data[114]
    entries.append({**long, "input": " ".join([long["input"]] * 4)})  # a prompt past the context
    torch.manual_seed(321)
    model = pc.GPTModel(tiny_cfg).eval()
    max_new = 8

    # Make the end-of-text token the greedy choice wherever token t would be: copy t's output
    # row, slightly enlarged, so some answers stop early.
    prompt = pc.text_to_token_ids(format_input(entries[0]), tokenizer)
    t = pc.generate(model, prompt, 3, tiny_cfg["context_length"])[0, -1].item()
    with torch.no_grad():
        model.out_head.weight[EOT] = 1.05 * model.out_head.weight[t]

    expected, lengths = [], []
    for entry in entries:
        input_text = format_input(entry)
        out = pc.generate(model, pc.text_to_token_ids(input_text, tokenizer), max_new,
                          tiny_cfg["context_length"], eos_id=EOT)
        lengths.append(out.shape[1] - len(tokenizer.encode(input_text)))
        expected.append(extract_response(pc.token_ids_to_text(out, tokenizer), input_text))
    assert min(lengths) < max_new  # some answers stop at the end-of-text token...
    assert max(lengths) == max_new  # ...and some run to the limit
    prompt_lengths = [len(tokenizer.encode(format_input(e))) for e in entries]
    assert prompt_lengths[2] + max_new > tiny_cfg["context_length"]  # generation crosses the context
    assert prompt_lengths[-1] > tiny_cfg["context_length"]  # the prompt alone is too long

    responses = generate_responses(model, entries, tokenizer, ALPACA, max_new_tokens=max_new,
                                   batch_size=batch_size, progress=False)
    assert responses == expected
