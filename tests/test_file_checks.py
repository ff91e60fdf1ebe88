"""Downloads checked for what they are (issue 24, item 1): instructkit/file_checks.py on real
files of every kind the project downloads, downloads.download_file refusing HTML answers and
bad content before the rename, files on disk moved aside before reuse, and the issue's
captive-portal scenario with the real command in a subprocess against a loopback hub."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from hub_checkpoint import write_hub_model_folder, write_hub_tokenizer_files
from loopback_server import closed_port_url, serving

from instructkit import downloads, file_checks
from instructkit.downloads import BadContentError, HtmlPageError
from instructkit.errors import DownloadError
from instructkit.gpt2_tokenizer import TokenizerFilesError, tokenizer_from_folder
from instructkit.gpt2_weights import FILENAMES, download_gpt2_files
from instructkit.hub import OPENAI_HUB_REPOS

HTML = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Hotel Wi-Fi</body></html>"
HTML_LINE = ("answered with an HTML page (a captive portal, a login page or a proxy's error?) "
             "instead of {name}; open a browser to sign in to the network, or check {setting}")
REPO = OPENAI_HUB_REPOS["124M"]
HUB_NAMES = ("model.safetensors", "vocab.json", "merges.txt")


def safetensors_bytes():
    from safetensors.numpy import save

    return save({"wte.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
                 "ids": np.arange(5, dtype=np.int64)})


def with_header(header, data=b""):
    """A safetensors file with this header (a dict, or raw bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.fixture(scope="module")
def tf_files(tmp_path_factory):
    """OpenAI's seven files of a tiny checkpoint, written by TensorFlow: {name: bytes}."""
    from gpt2_checkpoint import write_gpt2_checkpoint

    folder = tmp_path_factory.mktemp("tf") / "124M"
    write_gpt2_checkpoint(folder)
    return {name: (folder / name).read_bytes() for name in FILENAMES}


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory, shared_data):
    """{url path: bytes} of a tiny "hub-openai" GPT-2 (real tokenizer files) on the hub."""
    folder = tmp_path_factory.mktemp("hub")
    write_hub_model_folder(folder, shared_data / "gpt2-tokenizer", n_ctx=8, n_embd=64, n_layer=1)
    return {f"/{REPO}/resolve/main/{name}": (folder / name).read_bytes() for name in HUB_NAMES}


def problem(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(body)
    return file_checks.file_problem(path)


# ---- each kind: the real file passes, a damaged one is named ----

def test_safetensors_header(tmp_path):
    good = safetensors_bytes()
    assert problem(tmp_path, "model.safetensors", good) is None
    entry = {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}
    cases = [
        (good[:-5], "outside the file's"),  # cut: the last tensor does not fit
        (good[:6], "too short for a safetensors header"),
        ((10 ** 9).to_bytes(8, "little") + good[8:], "header length 1,000,000,000 does not fit"),
        (with_header(b"{not json", b"x" * 48), "its header is not JSON"),
        (with_header([1, 2]), "not a JSON object"),
        (with_header({"w": {**entry, "dtype": "F33"}}, bytes(48)), "unknown dtype 'F33'"),
        (with_header({"w": {**entry, "shape": [3, -4]}}, bytes(48)), "bad shape"),
        (with_header({"w": {**entry, "shape": [3, 5]}}, bytes(48)), "48 bytes for shape [3, 5] of F32"),
        (with_header({"w": entry}, bytes(60)), "take 48 bytes but 60 follow the header"),
        (good + b"junk", "take 88 bytes but 92 follow the header"),
    ]
    for body, phrase in cases:
        assert phrase in (problem(tmp_path, "model.safetensors", body) or ""), (body[:40], phrase)
    from safetensors.numpy import load

    for body, _ in cases:  # the library refuses each file the check refuses
        with pytest.raises(Exception):  # noqa: B017 (safetensors raises several types)
            load(body)


def test_json_files(tmp_path, shared_data):
    encoder = (shared_data / "gpt2-tokenizer" / "encoder.json").read_bytes()
    for name in ("encoder.json", "vocab.json", "config.json", "hparams.json"):
        assert problem(tmp_path, name, encoder) is None
        assert "not valid JSON" in problem(tmp_path, name, encoder[: len(encoder) // 2])
    assert "not UTF-8 text (byte 0xff at offset 1)" in problem(tmp_path, "hparams.json", b"{\xff}")
    dataset = (shared_data / "instruction-data.json").read_bytes()
    assert problem(tmp_path, "instruction-data.json", dataset) is None
    path = tmp_path / "data.json.download"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n')  # JSON Lines: a dataset, not a JSON file
    assert file_checks.file_problem(path, "dataset") is None
    path.write_bytes(b'{"a": 1}\n{"b": \n')
    assert "not valid JSON" in file_checks.file_problem(path, "dataset")
    assert "line 2 is not valid JSON" in problem(tmp_path, "d.jsonl", b'{"a": 1}\n{"b": \n')


def test_bpe_merges(tmp_path, shared_data):
    vocab_bpe = (shared_data / "gpt2-tokenizer" / "vocab.bpe").read_bytes()
    write_hub_tokenizer_files(shared_data / "gpt2-tokenizer", tmp_path / "hub")
    assert problem(tmp_path, "vocab.bpe", vocab_bpe) is None
    assert file_checks.file_problem(tmp_path / "hub" / "merges.txt") is None  # no newline at its end
    assert problem(tmp_path, "merges.txt", b"t o\r\nto k\r\n") is None  # Windows line ends
    assert problem(tmp_path, "merges.txt", b"#version: 0.2\n") == "no merges in it"
    assert problem(tmp_path, "merges.txt", b"#version: 0.2\nt o\nto k x\n") == (
        "line 3 is not two tokens separated by a space: 'to k x'")
    assert "line 2 is not two tokens" in problem(tmp_path, "vocab.bpe", b"t o\nlonely\n")
    assert "line 1 is not two tokens" in problem(tmp_path, "merges.txt", b'{"Hello":0,"x":1}')


def test_tensorflow_checkpoint_files(tmp_path, tf_files):
    for name, body in tf_files.items():
        assert problem(tmp_path, name, body) is None, name
    index, meta = tf_files["model.ckpt.index"], tf_files["model.ckpt.meta"]
    assert "no table magic number" in problem(tmp_path, "model.ckpt.index", index[: len(index) // 2])
    assert "shorter than a table's footer" in problem(tmp_path, "model.ckpt.index", index[:20])
    bad_footer = index[:-48] + b"\xff\xff\xff\x7f" + index[-44:]  # a block at 2**28 - 1
    assert problem(tmp_path, "model.ckpt.index", bad_footer) == "its footer points past the end of the file"
    assert problem(tmp_path, "model.ckpt.meta", meta[:-10]).startswith("cut: its last field ends at")
    assert "not a protobuf message" in problem(tmp_path, "model.ckpt.meta", b"\x07" + meta)
    assert problem(tmp_path, "model.ckpt.meta", b"\x08\x01") == "no graph in it"
    assert problem(tmp_path, "checkpoint", b"all_model_checkpoint_paths: 'x'\n") == (
        "no 'model_checkpoint_path:' line")


def test_pth(tmp_path):
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "a.pth")
    assert file_checks.file_problem(tmp_path / "a.pth") is None
    assert "neither a zip archive" in problem(tmp_path, "b.pth", b"hello")


@pytest.mark.parametrize("start", [HTML, b"\n  <html lang='en'><body>x</body></html>",
                                   b"\xef\xbb\xbf<!doctype HTML>\n<html></html>"])
@pytest.mark.parametrize("name", ["model.safetensors", "vocab.json", "merges.txt", "model.ckpt.index",
                                  "model.ckpt.data-00000-of-00001", "something.bin"])
def test_an_html_page_is_named_whatever_the_kind(tmp_path, start, name):
    assert problem(tmp_path, name, start) == "an HTML page"


# ---- downloads: nothing gets its final name before it passes ----

@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_an_html_answer_is_refused_and_leaves_nothing(tmp_path, content_type):
    with serving({"/model.safetensors": HTML}) as httpd:
        httpd.content_types["/model.safetensors"] = content_type
        with pytest.raises(HtmlPageError) as excinfo:
            downloads.download_first([f"{httpd.url}/model.safetensors"], tmp_path / "model.safetensors",
                                     mirror_setting="HF_ENDPOINT")
    assert str(excinfo.value) == (f"{httpd.url}/model.safetensors "
                                  + HTML_LINE.format(name="model.safetensors", setting="HF_ENDPOINT"))
    assert list(tmp_path.iterdir()) == []


def test_an_html_content_type_is_refused_before_the_body_is_read(tmp_path):
    body = safetensors_bytes()  # the real file, but announced as a web page: not trusted
    part = tmp_path / "model.safetensors.part"
    part.write_bytes(body[:40])  # a partial download that must survive
    with serving({"/m": body}) as httpd:
        httpd.content_types["/m"] = "text/html"
        with pytest.raises(HtmlPageError, match="answered with an HTML page"):
            downloads.download_file(f"{httpd.url}/m", tmp_path / "model.safetensors")
        assert httpd.requests == [("/m", "bytes=40-")]
        assert part.read_bytes() == body[:40]  # left as it was, for the next attempt
        del httpd.content_types["/m"]
        downloads.download_file(f"{httpd.url}/m", tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors").read_bytes() == body


@pytest.mark.parametrize(("name", "body", "phrase"), [
    ("model.safetensors", with_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"x"),
     "model.safetensors is not a safetensors file ('w' has data_offsets [0, 8] outside"),
    ("vocab.json", b'{"a": 1,', "vocab.json is not a JSON file (not valid JSON"),
    ("merges.txt", b"#version: 0.2\na b c\n", "merges.txt is not a file of BPE merges (line 2 is not two"),
    ("model.ckpt.index", b"\x00" * 100, "model.ckpt.index is not a TensorFlow checkpoint index (no table"),
    ("model.ckpt.meta", b"\x12\x20short",
     "model.ckpt.meta is not a TensorFlow meta graph (cut: its last field ends at byte 34, past its 7"),
])
def test_a_download_that_is_not_what_its_name_says_is_never_renamed(tmp_path, name, body, phrase):
    with serving({f"/{name}": body}) as httpd, pytest.raises(BadContentError) as excinfo:
        downloads.download_file(f"{httpd.url}/{name}", tmp_path / name)
    assert phrase in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a .part to resume


def test_html_from_one_source_of_several_is_listed_with_the_others(tmp_path):
    with serving({"/mirror/vocab.bpe": HTML}) as httpd, pytest.raises(DownloadError) as excinfo:
        downloads.download_first([f"{httpd.url}/mirror/vocab.bpe", f"{httpd.url}/primary/vocab.bpe"],
                                 tmp_path / "vocab.bpe", mirror_setting="GPT2_MIRROR_URL")
    assert not isinstance(excinfo.value, HtmlPageError)  # one of two causes: the list of both
    assert (f"  {httpd.url}/mirror/vocab.bpe: answered with an HTML page (a captive portal, a login "
            f"page or a proxy's error?)\n  {httpd.url}/primary/vocab.bpe: HTTP 404") in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_source_moves_on_to_the_next_one(tmp_path, tf_files):
    """A mirror serving a cut .meta whose length it announces consistently: the next host serves it."""
    meta = tf_files["model.ckpt.meta"]
    with serving({"/mirror/124M/model.ckpt.meta": meta, "/primary/124M/model.ckpt.meta": meta}) as httpd:
        httpd.fail("/mirror/124M/model.ckpt.meta", ("short", len(meta) - 100))
        downloads.download_first([f"{httpd.url}/mirror/124M/model.ckpt.meta",
                                  f"{httpd.url}/primary/124M/model.ckpt.meta"], tmp_path / "model.ckpt.meta")
    assert (tmp_path / "model.ckpt.meta").read_bytes() == meta


# ---- files on disk: checked before reuse, a bad one moved aside and downloaded again ----

def test_bad_openai_files_on_disk_are_moved_aside_and_replaced(tmp_path, tf_files, capsys):
    model_dir = tmp_path / "124M"
    model_dir.mkdir()
    for name, body in tf_files.items():
        (model_dir / name).write_bytes(body)
    broken = {"model.ckpt.index": tf_files["model.ckpt.index"][:-1],
              "model.ckpt.meta": tf_files["model.ckpt.meta"][:1000], "hparams.json": HTML,
              "vocab.bpe": b"notmerges\n", "checkpoint": b""}
    for name, body in broken.items():
        (model_dir / name).write_bytes(body)
    (model_dir / "vocab.bpe.bad").write_bytes(b"an older one")  # the next free name is taken
    with serving({f"/primary/124M/{name}": body for name, body in tf_files.items()}) as httpd:
        download_gpt2_files("124M", tmp_path, base_urls=[f"{httpd.url}/primary"], expected_sizes={})
    assert sorted(httpd.paths()) == sorted(f"/primary/124M/{name}" for name in broken)
    for name, body in tf_files.items():
        assert (model_dir / name).read_bytes() == body, name
    aside = {name: name + ".bad" for name in broken} | {"vocab.bpe": "vocab.bpe.bad-1"}
    for name, bad_name in aside.items():
        assert (model_dir / bad_name).read_bytes() == broken[name]
    err = capsys.readouterr().err
    assert (f"{model_dir / 'hparams.json'} is not a JSON file (an HTML page): moved it aside to "
            "hparams.json.bad and downloading it again") in err
    assert f"{model_dir / 'model.ckpt.index'} is not a TensorFlow checkpoint index (" in err
    assert "moved it aside to vocab.bpe.bad-1" in err

    # now whole: reused with no request, nothing moved
    download_gpt2_files("124M", tmp_path, base_urls=[closed_port_url()], expected_sizes={})
    assert "moved it aside" not in capsys.readouterr().err


def test_html_tokenizer_files_are_a_clear_error_not_a_traceback(tmp_path, shared_data):
    write_hub_tokenizer_files(shared_data / "gpt2-tokenizer", tmp_path)
    (tmp_path / "merges.txt").write_bytes(HTML)
    with pytest.raises(TokenizerFilesError) as excinfo:
        tokenizer_from_folder(tmp_path)
    assert str(excinfo.value) == (f"{tmp_path / 'merges.txt'} is not a file of BPE merges (an HTML page); "
                                  "delete it and download the weights again")
    write_hub_tokenizer_files(shared_data / "gpt2-tokenizer", tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"\u3042": 0}), encoding="utf-8")  # JSON, not GPT-2's
    with pytest.raises(TokenizerFilesError, match="not a character of GPT-2's byte alphabet"):
        tokenizer_from_folder(tmp_path)


# ---- the scenario, with the real command in a subprocess ----

def finetune_command(tmp_path, data):
    return [sys.executable, "-m", "instructkit.finetune", "--model", "gpt2-small", "--weights-source",
            "hub-openai", "--models-dir", str(tmp_path / "gpt2"), "--data", str(data), "--device", "cpu",
            "--output-dir", str(tmp_path / "out")]


DOWNLOAD_AND_TOKENIZE = (
    "import sys; from instructkit.gpt2_weights import download_gpt2; "
    "from instructkit.gpt2_tokenizer import tokenizer_from_folder; "
    "source, path = download_gpt2('124M', sys.argv[1], 'hub-openai'); "
    "print(source, path.name, tokenizer_from_folder(path.parent).encode('Hello, world'))")


def run(argv, hub_url, timeout=300):
    env = {**os.environ, "HF_ENDPOINT": hub_url}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("content_type", ["text/html", "application/octet-stream"])
def test_a_hub_answering_html_poisons_nothing_and_the_next_run_downloads(tmp_path, shared_data, hub_model,
                                                                         content_type):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads((shared_data / "instruction-data.json").read_bytes())[:40]))
    portal = {path: HTML for path in hub_model}  # a hotel's Wi-Fi answering every URL
    with serving(portal) as httpd:
        httpd.content_types |= {path: content_type for path in portal}
        proc = run(finetune_command(tmp_path, data), httpd.url)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: {httpd.url}/{REPO}/resolve/main/model.safetensors "
                    + HTML_LINE.format(name="model.safetensors", setting="HF_ENDPOINT"))
    model_dir = tmp_path / "gpt2" / "124M"
    assert not model_dir.exists() or list(model_dir.iterdir()) == []  # no final name, no .part

    with serving(hub_model) as httpd:  # back on a network that works
        proc = run([sys.executable, "-c", DOWNLOAD_AND_TOKENIZE, str(tmp_path / "gpt2")], httpd.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hub-openai model.safetensors [15496, 11, 995]"
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(HUB_NAMES)
    for path, body in hub_model.items():
        assert (model_dir / path.rsplit("/", 1)[1]).read_bytes() == body


def test_html_tokenizer_files_from_an_older_version_are_downloaded_again(tmp_path, hub_model):
    """What the issue found: HTML under the tokenizer's final names and model.safetensors deleted.
    Offline, a clear error (the page moved aside); online, a proper download."""
    model_dir = tmp_path / "gpt2" / "124M"
    model_dir.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (model_dir / name).write_bytes(HTML)
    (model_dir / "model.safetensors").write_bytes(hub_model[f"/{REPO}/resolve/main/model.safetensors"])
    proc = run([sys.executable, "-c", DOWNLOAD_AND_TOKENIZE, str(tmp_path / "gpt2")], closed_port_url())
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # (python -c: no run_command here)
    assert "DownloadError: could not download 'vocab.json' from any source" in proc.stderr
    assert (f"{model_dir / 'vocab.json'} is not a JSON file (an HTML page): moved it aside to "
            "vocab.json.bad and downloading it again") in proc.stderr
    assert (model_dir / "vocab.json.bad").read_bytes() == HTML

    with serving(hub_model) as httpd:
        proc = run([sys.executable, "-c", DOWNLOAD_AND_TOKENIZE, str(tmp_path / "gpt2")], httpd.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hub-openai model.safetensors [15496, 11, 995]"
    assert httpd.paths() == [f"/{REPO}/resolve/main/{name}" for name in ("vocab.json", "merges.txt")]
    assert "moved it aside to merges.txt.bad" in proc.stderr
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        [*HUB_NAMES, "vocab.json.bad", "merges.txt.bad"])


def test_the_command_offline_with_a_bad_file_on_disk_is_one_line(tmp_path, shared_data, hub_model):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads((shared_data / "instruction-data.json").read_bytes())[:40]))
    model_dir = tmp_path / "gpt2" / "124M"
    model_dir.mkdir(parents=True)
    for path, body in hub_model.items():
        (model_dir / path.rsplit("/", 1)[1]).write_bytes(body)
    (model_dir / "merges.txt").write_bytes(HTML)
    proc = run(finetune_command(tmp_path, data), closed_port_url())
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "moved it aside to merges.txt.bad and downloading it again" in proc.stderr
    assert "error: could not download 'merges.txt' from any source" in proc.stderr
    assert not (model_dir / "merges.txt").exists()
