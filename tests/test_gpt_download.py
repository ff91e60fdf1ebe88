"""gpt_download.py against a real HTTP server on 127.0.0.1 serving a small GPT-2 checkpoint.

The server serves the same files under three prefixes, /primary, /backup and /mirror, so
one server stands in for every source. It honours `Range: bytes=N-` and can be told to fail
a path: answer an HTTP error, cut the connection after some bytes (having announced the full
length), ignore the Range header, answer a Range request from the wrong offset, or serve a
short body (with a matching Content-Length).
"""

import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from gpt2_checkpoint import write_gpt2_checkpoint

import gpt_download
from gpt_download import (
    FILENAMES,
    CheckpointError,
    DownloadError,
    download_and_load_gpt2,
    download_file,
    load_gpt2,
    load_gpt2_params_from_tf_ckpt,
)

SIZE = "124M"
DATA = "model.ckpt.data-00000-of-00001"
HPARAMS = {"n_vocab": 64, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 2}


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files  # {file name: bytes}, served at /<prefix>/<size>/<file name>
        self.faults = {}  # {url path: [fault, ...]}, each used by one request, in order
        self.requests = []  # (url path, Range header or None), in arrival order
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def fail(self, path, *faults):
        self.faults.setdefault(path, []).extend(faults)

    def paths(self, prefix=""):
        return [path for path, _ in self.requests if path.startswith(prefix)]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests.append((self.path, self.headers.get("Range")))
            queue = server.faults.get(self.path)
            fault = queue.pop(0) if queue else None
        body = server.files.get(self.path.rsplit("/", 1)[-1])
        if self.path.count("/") != 3 or body is None:
            fault = ("status", 404)
        if fault and fault[0] == "status":
            self.send_error(fault[1])
            return
        if fault and fault[0] == "short":  # a wrong, short file, consistently announced
            body = body[: fault[1]]
        start = 0
        range_header = self.headers.get("Range")
        if range_header and not (fault and fault[0] == "ignore_range"):
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if fault and fault[0] == "range_from_zero":  # a 206 for bytes it was not asked
                start = 0
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if fault and fault[0] == "cut":  # the full length announced, then only some bytes
            self.wfile.write(body[start : start + fault[1]])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The seven files of a tiny GPT-2 checkpoint (written once) and the arrays in it."""
    folder = tmp_path_factory.mktemp("source") / SIZE
    arrays = write_gpt2_checkpoint(folder, **HPARAMS, seed=0)
    files = {name: (folder / name).read_bytes() for name in FILENAMES}
    return files, arrays


@pytest.fixture
def server(checkpoint):
    httpd = FileServer(checkpoint[0])
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def no_mirror_env(monkeypatch):
    monkeypatch.delenv("GPT2_MIRROR_URL", raising=False)


def fetch(models_dir, **kwargs):
    """OpenAI's source, checking sizes only against what the server announces (the known sizes
    are those of the real files; `test_known_sizes_*` below pass the tiny files' sizes)."""
    return download_and_load_gpt2(SIZE, models_dir, source="openai", expected_sizes={}, **kwargs)


def closed_port_url():
    """A loopback URL nothing listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sources(server, *prefixes):
    return [f"{server.url}/{prefix}" for prefix in prefixes]


def assert_files_identical(model_dir, files):
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(FILENAMES)  # no .part left
    for name, body in files.items():
        assert (model_dir / name).read_bytes() == body, name


def assert_params_equal(settings, params, arrays):
    assert settings == HPARAMS
    assert set(params) == {"wte", "wpe", "g", "b", "blocks"}
    assert len(params["blocks"]) == HPARAMS["n_layer"]
    np.testing.assert_array_equal(params["wte"], arrays["model/wte"])
    np.testing.assert_array_equal(params["wpe"], arrays["model/wpe"])
    np.testing.assert_array_equal(params["g"], arrays["model/ln_f/g"])
    np.testing.assert_array_equal(params["b"], arrays["model/ln_f/b"])
    for i, block in enumerate(params["blocks"]):
        assert set(block) == {"attn", "mlp", "ln_1", "ln_2"}
        for path in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj", "ln_1", "ln_2"):
            group, _, layer = path.partition("/")
            entry = block[group][layer] if layer else block[group]
            keys = ("g", "b") if path.startswith("ln") else ("w", "b")
            assert set(entry) == set(keys)
            for key in keys:
                expected = np.squeeze(arrays[f"model/h{i}/{path}/{key}"])
                assert entry[key].shape == expected.shape, (i, path, key)
                np.testing.assert_array_equal(entry[key], expected)
    assert params["blocks"][0]["attn"]["c_attn"]["w"].shape == (8, 24)  # [1, 8, 24] squeezed


def test_downloads_all_seven_files_and_loads_them(server, checkpoint, tmp_path):
    files, arrays = checkpoint
    settings, params = fetch(tmp_path, base_urls=sources(server, "primary", "backup"))
    assert_files_identical(tmp_path / SIZE, files)
    assert_params_equal(settings, params, arrays)
    assert server.paths() == [f"/primary/{SIZE}/{name}" for name in FILENAMES]
    assert all(range_header is None for _, range_header in server.requests)


def test_resumes_a_cut_download_with_a_range_request(server, checkpoint, tmp_path):
    files, _ = checkpoint
    path = f"/primary/{SIZE}/{DATA}"
    server.fail(path, ("cut", 3000))
    with pytest.raises(DownloadError, match=DATA):
        fetch(tmp_path, base_urls=sources(server, "primary"))
    model_dir = tmp_path / SIZE
    assert not (model_dir / DATA).exists()  # a short file never gets the final name
    assert (model_dir / (DATA + ".part")).read_bytes() == files[DATA][:3000]

    server.requests.clear()
    settings, _ = fetch(tmp_path, base_urls=sources(server, "primary"))
    assert settings == HPARAMS
    assert server.requests[0] == (path, "bytes=3000-")  # then the three files after it
    assert server.paths() == [path] + [f"/primary/{SIZE}/{name}" for name in FILENAMES[4:]]
    assert_files_identical(model_dir, files)


def test_cut_on_the_primary_is_resumed_from_the_backup(server, checkpoint, tmp_path):
    files, arrays = checkpoint
    server.fail(f"/primary/{SIZE}/{DATA}", ("cut", 1234))
    settings, params = fetch(tmp_path, base_urls=sources(server, "primary", "backup"))
    assert (f"/backup/{SIZE}/{DATA}", "bytes=1234-") in server.requests
    assert server.paths("/backup") == [f"/backup/{SIZE}/{DATA}"]
    assert_files_identical(tmp_path / SIZE, files)
    assert_params_equal(settings, params, arrays)


@pytest.mark.parametrize("primary_down", ["HTTP 500", "HTTP 404", "connection refused"])
def test_fails_over_from_primary_to_backup(server, checkpoint, tmp_path, primary_down):
    files, _ = checkpoint
    if primary_down == "connection refused":
        primary = closed_port_url()
    else:
        primary = f"{server.url}/primary"
        for name in FILENAMES:
            server.fail(f"/primary/{SIZE}/{name}", ("status", int(primary_down[-3:])))
    fetch(tmp_path, base_urls=[primary, f"{server.url}/backup"])
    assert server.paths("/backup") == [f"/backup/{SIZE}/{name}" for name in FILENAMES]
    assert_files_identical(tmp_path / SIZE, files)


def test_mirror_argument_is_tried_first(server, checkpoint, tmp_path):
    fetch(
        tmp_path,
        mirror_url=f"{server.url}/mirror/",  # a trailing slash is fine
        base_urls=sources(server, "primary", "backup"),
    )
    assert server.paths() == [f"/mirror/{SIZE}/{name}" for name in FILENAMES]
    assert_files_identical(tmp_path / SIZE, checkpoint[0])


def test_mirror_from_the_environment_and_the_argument_wins(server, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_MIRROR_URL", f"{server.url}/mirror")
    fetch(tmp_path / "a", base_urls=sources(server, "primary"))
    assert server.paths() == [f"/mirror/{SIZE}/{name}" for name in FILENAMES]

    server.requests.clear()
    fetch(
        tmp_path / "b",
        mirror_url=f"{server.url}/backup",
        base_urls=sources(server, "primary"),
    )
    assert server.paths() == [f"/backup/{SIZE}/{name}" for name in FILENAMES]


def test_a_failing_mirror_falls_back_to_the_primary(server, tmp_path):
    server.fail(f"/mirror/{SIZE}/encoder.json", ("status", 403))
    fetch(tmp_path, mirror_url=f"{server.url}/mirror", base_urls=sources(server, "primary"))
    assert server.paths("/primary") == [f"/primary/{SIZE}/encoder.json"]


def test_every_source_failing_raises_a_helpful_error(server, tmp_path):
    refused = closed_port_url()
    for name in FILENAMES:
        server.fail(f"/mirror/{SIZE}/{name}", ("status", 500))
        server.fail(f"/primary/{SIZE}/{name}", ("status", 404))
    with pytest.raises(DownloadError) as excinfo:
        fetch(
            tmp_path,
            mirror_url=f"{server.url}/mirror",
            base_urls=[f"{server.url}/primary", refused],
        )
    message = str(excinfo.value)
    assert "'checkpoint'" in message  # the first file
    assert f"{server.url}/mirror/{SIZE}/checkpoint: HTTP 500" in message
    assert f"{server.url}/primary/{SIZE}/checkpoint: HTTP 404" in message
    assert f"{refused}/{SIZE}/checkpoint: cannot connect" in message
    assert "GPT2_MIRROR_URL" in message and "mirror_url" in message
    assert "internet connection" in message
    assert str(tmp_path / SIZE) in message  # where to place the files by hand
    assert list((tmp_path / SIZE).iterdir()) == []


def test_complete_files_are_reused_without_any_network(server, checkpoint, tmp_path, monkeypatch):
    files, arrays = checkpoint
    base_urls = sources(server, "primary")
    fetch(tmp_path, base_urls=base_urls)
    server.shutdown()
    server.server_close()  # nothing listens any more: any connection would fail
    monkeypatch.setenv("GPT2_MIRROR_URL", closed_port_url())

    settings, params = fetch(tmp_path, base_urls=base_urls)
    assert_params_equal(settings, params, arrays)
    settings, _ = download_and_load_gpt2(SIZE, tmp_path)  # "auto": complete on disk, no network
    assert settings == HPARAMS
    assert_files_identical(tmp_path / SIZE, files)


def test_only_missing_files_are_downloaded(server, checkpoint, tmp_path):
    base_urls = sources(server, "primary")
    fetch(tmp_path, base_urls=base_urls)
    (tmp_path / SIZE / "vocab.bpe").unlink()
    server.requests.clear()
    fetch(tmp_path, base_urls=base_urls)
    assert server.paths() == [f"/primary/{SIZE}/vocab.bpe"]
    assert_files_identical(tmp_path / SIZE, checkpoint[0])


def test_partial_file_is_restarted_when_the_server_ignores_range(server, checkpoint, tmp_path):
    files, _ = checkpoint
    model_dir = tmp_path / SIZE
    model_dir.mkdir()
    (model_dir / (DATA + ".part")).write_bytes(b"garbage from an older attempt")
    server.fail(f"/primary/{SIZE}/{DATA}", ("ignore_range",))
    fetch(tmp_path, base_urls=sources(server, "primary"))
    assert (f"/primary/{SIZE}/{DATA}", "bytes=29-") in server.requests
    assert_files_identical(model_dir, files)


def test_a_206_from_the_wrong_offset_restarts_from_zero(server, checkpoint, tmp_path):
    files, _ = checkpoint
    model_dir = tmp_path / SIZE
    model_dir.mkdir()
    (model_dir / (DATA + ".part")).write_bytes(files[DATA][:100])
    path = f"/primary/{SIZE}/{DATA}"
    server.fail(path, ("range_from_zero",))
    fetch(tmp_path, base_urls=sources(server, "primary"))
    assert [r for r in server.requests if r[0] == path] == [(path, "bytes=100-"), (path, None)]
    assert_files_identical(model_dir, files)


def test_partial_file_longer_than_the_file_is_restarted(server, checkpoint, tmp_path):
    files, _ = checkpoint
    model_dir = tmp_path / SIZE
    model_dir.mkdir()
    too_long = b"x" * (len(files["encoder.json"]) + 10)
    (model_dir / "encoder.json.part").write_bytes(too_long)
    fetch(tmp_path, base_urls=sources(server, "primary"))
    requests = [r for r in server.requests if r[0].endswith("/encoder.json")]
    assert requests == [
        (f"/primary/{SIZE}/encoder.json", f"bytes={len(too_long)}-"),  # answered 416
        (f"/primary/{SIZE}/encoder.json", None),
    ]
    assert_files_identical(model_dir, files)


def test_short_download_is_never_renamed(server, checkpoint, tmp_path):
    files, _ = checkpoint
    url = f"{server.url}/primary/{SIZE}/{DATA}"
    destination = tmp_path / DATA
    server.fail(f"/primary/{SIZE}/{DATA}", ("cut", 10), ("cut", 0))
    with pytest.raises(DownloadError, match=f"10 of {len(files[DATA]):,} bytes"):
        download_file(url, destination)
    with pytest.raises(DownloadError, match=f"10 of {len(files[DATA]):,} bytes"):
        download_file(url, destination)  # resumed, but no byte arrived
    assert not destination.exists()
    assert server.requests[-1][1] == "bytes=10-"
    download_file(url, destination)
    assert destination.read_bytes() == files[DATA]


def test_corrupt_file_from_a_server_gives_a_clear_error(server, tmp_path):
    # A server announcing a short length for a wrong, short body cannot be caught while
    # downloading; reading the checkpoint then fails with advice, not a TensorFlow traceback.
    server.fail(f"/primary/{SIZE}/{DATA}", ("short", 500))
    with pytest.raises(CheckpointError) as excinfo:
        fetch(tmp_path, base_urls=sources(server, "primary"))
    message = str(excinfo.value)
    assert str(tmp_path / SIZE) in message and "delete" in message
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


@pytest.mark.parametrize(("name", "keep"), [(DATA, 0.5), ("model.ckpt.index", 0.3), ("hparams.json", 0.5)])
def test_truncated_checkpoint_on_disk_gives_a_clear_error(checkpoint, tmp_path, name, keep):
    files, _ = checkpoint
    model_dir = tmp_path / SIZE
    model_dir.mkdir()
    for file_name, body in files.items():
        (model_dir / file_name).write_bytes(body)
    body = files[name]
    (model_dir / name).write_bytes(body[: int(len(body) * keep)])
    with pytest.raises(CheckpointError, match="delete") as excinfo:
        fetch(tmp_path, base_urls=[closed_port_url()])
    assert str(model_dir) in str(excinfo.value)


def test_unknown_model_size_lists_the_sizes(tmp_path):
    with pytest.raises(ValueError, match="124M, 355M, 774M, 1558M") as excinfo:
        download_and_load_gpt2("345M", tmp_path)
    assert "'345M'" in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_tensorflow_says_how_to_install_it(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now fails
    with pytest.raises(ImportError, match="pip install tensorflow"):
        load_gpt2_params_from_tf_ckpt(tmp_path, HPARAMS)


def test_empty_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no TensorFlow checkpoint in") as excinfo:
        load_gpt2_params_from_tf_ckpt(tmp_path, HPARAMS)
    assert str(tmp_path) in str(excinfo.value)
    with pytest.raises(CheckpointError, match="hparams.json does not exist"):
        load_gpt2(tmp_path)


def test_checkpoint_prefix_and_folder_give_the_same_params(checkpoint, tmp_path):
    files, arrays = checkpoint
    for name, body in files.items():
        (tmp_path / name).write_bytes(body)
    settings = json.loads(files["hparams.json"])
    from_prefix = load_gpt2_params_from_tf_ckpt(tmp_path / "model.ckpt", settings)
    assert_params_equal(settings, from_prefix, arrays)
    assert_params_equal(*load_gpt2(tmp_path), arrays)


def test_layer_count_mismatch_is_reported(checkpoint, tmp_path):
    for name, body in checkpoint[0].items():
        (tmp_path / name).write_bytes(body)
    with pytest.raises(CheckpointError, match="n_layer=1"):
        load_gpt2_params_from_tf_ckpt(tmp_path, {**HPARAMS, "n_layer": 1})
    with pytest.raises(CheckpointError, match="lacks model/h2"):
        load_gpt2_params_from_tf_ckpt(tmp_path, {**HPARAMS, "n_layer": 3})


def test_module_constants_are_the_books_urls():
    assert gpt_download.PRIMARY_BASE_URL == "https://openaipublic.blob.core.windows.net/gpt-2/models"
    assert gpt_download.BACKUP_BASE_URL == ("https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2")
    assert Path(gpt_download.__file__).parent == Path(__file__).resolve().parent.parent
