"""gpt_download.py (the book's three functions) and instructkit/gpt2_weights.py (their machinery)
against a real HTTP server on 127.0.0.1 serving small GPT-2 checkpoints.

The server (tests/loopback_server.py) serves OpenAI's files under three prefixes, /primary,
/backup and /mirror, so one server stands in for every source; hub tests serve
`/<repo>/resolve/main/<file>`.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from gpt2_checkpoint import gpt2_variable_shapes, write_gpt2_checkpoint
from hub_checkpoint import (
    book_state_dict_arrays,
    hub_openai_arrays,
    save_weights,
    write_hub_model_folder,
    write_hub_tokenizer_files,
)
from loopback_server import closed_port_url, serving

import gpt_download
from gpt_download import download_and_load_gpt2, download_file, load_gpt2_params_from_tf_ckpt
from instructkit import downloads, gpt2_weights
from instructkit.errors import CheckpointError, DownloadError
from instructkit.gpt2_sizes import GPT2_SIZES
from instructkit.gpt2_tokenizer import TokenizerFilesError, tokenizer_from_folder
from instructkit.gpt2_weights import (
    FILENAMES,
    OPENAI_FILE_SIZES,
    check_checkpoint_folder,
    check_hparams,
    choose_weights_source,
    read_hparams,
)
from instructkit.hub import BOOK_HUB_REPO, OPENAI_HUB_REPOS, load_hub_weights

SIZE = "124M"
DATA = "model.ckpt.data-00000-of-00001"
HPARAMS = {"n_vocab": 64, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 2}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The seven files of a tiny GPT-2 checkpoint (written once) and the arrays in it."""
    folder = tmp_path_factory.mktemp("source") / SIZE
    arrays = write_gpt2_checkpoint(folder, **HPARAMS, seed=0)
    files = {name: (folder / name).read_bytes() for name in FILENAMES}
    return files, arrays


@pytest.fixture
def server(checkpoint):
    files = {f"/{prefix}/{SIZE}/{name}": body for prefix in ("primary", "backup", "mirror")
             for name, body in checkpoint[0].items()}
    with serving(files) as httpd:
        yield httpd


@pytest.fixture(autouse=True)
def no_mirror_env(monkeypatch):
    monkeypatch.delenv("GPT2_MIRROR_URL", raising=False)


def fetch(models_dir, **kwargs):
    """OpenAI's source, checking sizes only against what the server announces (the known sizes
    are those of the real files; `test_known_sizes_*` below pass the tiny files' sizes)."""
    return download_and_load_gpt2(SIZE, models_dir, source="openai", expected_sizes={}, **kwargs)


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
    settings, _ = download_and_load_gpt2(SIZE, tmp_path, source="auto")  # complete on disk: no network
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
        downloads.download_file(url, destination)
    with pytest.raises(DownloadError, match=f"10 of {len(files[DATA]):,} bytes"):
        downloads.download_file(url, destination)  # resumed, but no byte arrived
    assert not destination.exists()
    assert server.requests[-1][1] == "bytes=10-"
    downloads.download_file(url, destination)
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
def test_truncated_checkpoint_on_disk_gives_a_clear_error(checkpoint, tmp_path, capsys, name, keep):
    files, _ = checkpoint
    model_dir = tmp_path / SIZE
    model_dir.mkdir()
    for file_name, body in files.items():
        (model_dir / file_name).write_bytes(body)
    body = files[name]
    (model_dir / name).write_bytes(body[: int(len(body) * keep)])
    if name == DATA:  # only its size tells it is cut, and that only while downloading
        with pytest.raises(CheckpointError, match="delete") as excinfo:
            fetch(tmp_path, base_urls=[closed_port_url()])
        assert str(model_dir) in str(excinfo.value)
        return
    # The index's footer and the JSON are checked before reuse: the file is moved aside and
    # downloaded again, which offline is the download's clear error
    with pytest.raises(DownloadError, match=f"could not download '{name}' from any source"):
        fetch(tmp_path, base_urls=[closed_port_url()])
    assert f"{model_dir / name} is not a" in capsys.readouterr().err
    assert (model_dir / f"{name}.bad").read_bytes() == body[: int(len(body) * keep)]
    assert not (model_dir / name).exists()


def test_unknown_model_size_lists_the_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"not in \('124M', '355M', '774M', '1558M'\)") as excinfo:
        download_and_load_gpt2("345M", tmp_path)
    assert "'345M'" in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_tensorflow_says_how_to_install_it(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now fails
    with pytest.raises(ImportError, match="pip install -r requirements-tf.txt") as excinfo:
        load_gpt2_params_from_tf_ckpt(tmp_path, HPARAMS)
    assert "source='hub-openai'" in str(excinfo.value)


def test_empty_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no TensorFlow checkpoint in") as excinfo:
        load_gpt2_params_from_tf_ckpt(tmp_path, HPARAMS)
    assert str(tmp_path) in str(excinfo.value)
    with pytest.raises(CheckpointError, match="hparams.json does not exist"):
        read_hparams(tmp_path)


def test_checkpoint_prefix_and_folder_give_the_same_params(checkpoint, tmp_path):
    files, arrays = checkpoint
    for name, body in files.items():
        (tmp_path / name).write_bytes(body)
    settings = json.loads(files["hparams.json"])
    from_prefix = load_gpt2_params_from_tf_ckpt(tmp_path / "model.ckpt", settings)
    assert_params_equal(settings, from_prefix, arrays)
    assert_params_equal(read_hparams(tmp_path), load_gpt2_params_from_tf_ckpt(tmp_path, settings), arrays)


def test_layer_count_mismatch_is_reported(checkpoint, tmp_path):
    for name, body in checkpoint[0].items():
        (tmp_path / name).write_bytes(body)
    with pytest.raises(CheckpointError, match="n_layer=1"):
        load_gpt2_params_from_tf_ckpt(tmp_path, {**HPARAMS, "n_layer": 1})
    with pytest.raises(CheckpointError, match="lacks model/h2"):
        load_gpt2_params_from_tf_ckpt(tmp_path, {**HPARAMS, "n_layer": 3})


def test_module_constants_are_the_books_urls():
    assert gpt2_weights.PRIMARY_BASE_URL == "https://openaipublic.blob.core.windows.net/gpt-2/models"
    assert gpt2_weights.BACKUP_BASE_URL == ("https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2")
    assert Path(gpt_download.__file__).parent == Path(__file__).resolve().parent.parent


# ---- the book's calls: its three functions, called as the chapter calls them ----


def test_book_call_downloads_the_seven_files_and_returns_settings_and_params(server, checkpoint, tmp_path):
    """`download_and_load_gpt2(model_size=..., models_dir=...)`, no source given: OpenAI's
    checkpoint, as in the book (only its two hosts are replaced by the loopback server)."""
    files, arrays = checkpoint
    result = download_and_load_gpt2(model_size=SIZE, models_dir=str(tmp_path),
                                    base_urls=sources(server, "primary", "backup"),
                                    expected_sizes=sizes_of(files))
    assert type(result) is tuple and len(result) == 2
    settings, params = result
    assert_params_equal(settings, params, arrays)
    assert server.paths() == [f"/primary/{SIZE}/{name}" for name in FILENAMES]  # the book's order
    assert_files_identical(tmp_path / SIZE, files)

    server.fail(f"/primary/{SIZE}/encoder.json", ("status", 503))
    server.requests.clear()
    settings, params = download_and_load_gpt2(model_size=SIZE, models_dir=str(tmp_path / "again"),
                                              base_urls=sources(server, "primary", "backup"),
                                              expected_sizes=sizes_of(files))
    assert server.paths("/backup") == [f"/backup/{SIZE}/encoder.json"]  # the backup, for that file only
    assert_params_equal(settings, params, arrays)


@pytest.fixture
def offline_proxy(monkeypatch):
    """urllib sends every request to a proxy on a closed loopback port: each one fails at once,
    with no network, and the download errors name the URLs that were asked for. (Through the
    environment, which every opener reads: downloads open URLs with their own SSL context.)"""
    proxy = closed_port_url()
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy)


def test_book_call_asks_openais_host_then_the_books_backup(offline_proxy, tmp_path):
    primary = f"https://openaipublic.blob.core.windows.net/gpt-2/models/{SIZE}/checkpoint"
    backup = f"https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/{SIZE}/checkpoint"
    with pytest.raises(DownloadError) as excinfo:
        download_and_load_gpt2(model_size=SIZE, models_dir=str(tmp_path))
    message = str(excinfo.value)
    assert f"Tried:\n  {primary}: cannot connect" in message
    assert message.index(primary) < message.index(f"  {backup}: cannot connect")
    # the package's download-only half (for the command lines) asks the same two hosts
    with pytest.raises(DownloadError) as excinfo:
        gpt2_weights.download_gpt2(SIZE, tmp_path / "b", "openai")
    assert f"Tried:\n  {primary}: cannot connect" in str(excinfo.value)
    assert f"  {backup}: cannot connect" in str(excinfo.value)


@pytest.mark.parametrize("main_down", ["HTTP 500", "connection refused"])
def test_book_download_file_falls_back_to_the_backup_url(server, checkpoint, tmp_path, main_down):
    files, _ = checkpoint
    name = "vocab.bpe"
    url = f"{server.url}/primary/{SIZE}/{name}"
    if main_down == "connection refused":
        url = f"{closed_port_url()}/{name}"
    server.fail(f"/primary/{SIZE}/{name}", ("status", 500))
    destination = str(tmp_path / name)
    assert download_file(url, destination, f"{server.url}/backup/{SIZE}/{name}") is None  # as the book's
    assert Path(destination).read_bytes() == files[name]
    assert server.paths("/backup") == [f"/backup/{SIZE}/{name}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no .part left

    server.requests.clear()  # a complete file is kept without asking any server
    download_file(url, destination, f"{server.url}/backup/{SIZE}/{name}")
    assert server.requests == []


def test_book_download_file_without_a_working_url_raises(server, tmp_path):
    """The book prints a message and returns; here a DownloadError names both URLs."""
    url, backup = (f"{server.url}/{prefix}/{SIZE}/missing" for prefix in ("primary", "backup"))
    with pytest.raises(DownloadError) as excinfo:
        download_file(url, str(tmp_path / "missing"), backup)
    assert f"{url}: HTTP 404" in str(excinfo.value) and f"{backup}: HTTP 404" in str(excinfo.value)
    with pytest.raises(DownloadError, match=f"{url}: HTTP 404"):
        download_file(url, str(tmp_path / "missing"))  # no backup_url, as the book allows
    assert list(tmp_path.iterdir()) == []


def test_book_reader_on_the_prefix_from_latest_checkpoint(checkpoint, tmp_path):
    import tensorflow as tf  # the checkpoint fixture has already skipped without it

    files, arrays = checkpoint
    for name, body in files.items():
        (tmp_path / name).write_bytes(body)
    with open(tmp_path / "hparams.json", encoding="utf-8") as file:
        settings = json.load(file)
    tf_ckpt_path = tf.train.latest_checkpoint(str(tmp_path))
    assert tf_ckpt_path == str(tmp_path / "model.ckpt")
    params = load_gpt2_params_from_tf_ckpt(tf_ckpt_path, settings)
    assert_params_equal(settings, params, arrays)  # the book's nested dict, every array equal


def test_download_only_needs_no_tensorflow(server, checkpoint, tmp_path, monkeypatch):
    """gpt2_weights.download_gpt2, which the command lines run before reading the weights."""
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now fails
    files, _ = checkpoint
    source, path = gpt2_weights.download_gpt2(SIZE, tmp_path, "openai", base_urls=sources(server, "primary"),
                                              expected_sizes=sizes_of(files))
    assert (source, path) == ("openai", tmp_path / SIZE)
    assert_files_identical(path, files)
    with pytest.raises(ImportError, match="requirements-tf.txt"):
        download_and_load_gpt2(SIZE, tmp_path)  # reading OpenAI's checkpoint does need it


# ---- known sizes: a mirror serving the wrong bytes moves on, never a bad file in place ----


def sizes_of(files):
    return {name: len(body) for name, body in files.items()}


def test_known_sizes_of_the_real_files():
    assert OPENAI_FILE_SIZES["355M"][DATA] == 1_419_292_672
    assert OPENAI_FILE_SIZES["124M"][DATA] == 497_759_232
    assert set(OPENAI_FILE_SIZES) == set(gpt2_weights.MODEL_SIZES)
    assert all(set(sizes) <= set(FILENAMES) for sizes in OPENAI_FILE_SIZES.values())
    assert all(sizes["encoder.json"] == 1042301 for sizes in OPENAI_FILE_SIZES.values())


def test_sizes_of_the_larger_files_follow_the_rule_of_the_published_ones(checkpoint):
    """The 774M and 1558M sizes are derived: checked here by the rule that gives 124M's and 355M's."""
    files, arrays = checkpoint  # a real tf.compat.v1 Saver checkpoint: float32 values, nothing else
    assert len(files[DATA]) == 4 * sum(array.size for array in arrays.values())
    for _, folder, n_embd, n_layer, n_head in GPT2_SIZES.values():
        shapes = gpt2_variable_shapes(n_vocab=50257, n_ctx=1024, n_embd=n_embd, n_layer=n_layer)
        assert OPENAI_FILE_SIZES[folder][DATA] == 4 * sum(math.prod(s) for s in shapes.values())
        hparams = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": n_embd, "n_head": n_head,
                   "n_layer": n_layer}
        assert OPENAI_FILE_SIZES[folder]["hparams.json"] == len(json.dumps(hparams, indent=2) + "\n")
    assert OPENAI_FILE_SIZES["1558M"][DATA] == 6_230_444_800  # 1,557,611,200 parameters


def test_truncated_file_from_a_mirror_moves_on_to_the_next_source(server, checkpoint, tmp_path):
    files, arrays = checkpoint
    server.fail(f"/mirror/{SIZE}/{DATA}", ("short", 500))  # announced as 500 bytes: consistent
    settings, params = download_and_load_gpt2(
        SIZE, tmp_path, mirror_url=f"{server.url}/mirror", base_urls=sources(server, "primary"),
        source="openai", expected_sizes=sizes_of(files))
    assert server.paths("/primary") == [f"/primary/{SIZE}/{DATA}"]
    assert_files_identical(tmp_path / SIZE, files)
    assert_params_equal(settings, params, arrays)


def test_wrong_size_from_every_source_is_a_clear_error_and_no_file(server, checkpoint, tmp_path):
    files, _ = checkpoint
    for prefix in ("mirror", "primary"):
        server.fail(f"/{prefix}/{SIZE}/{DATA}", ("short", 500))
    with pytest.raises(DownloadError) as excinfo:
        download_and_load_gpt2(
            SIZE, tmp_path, mirror_url=f"{server.url}/mirror", base_urls=sources(server, "primary"),
            source="openai", expected_sizes=sizes_of(files))
    message = str(excinfo.value)
    expected = f"serves 500 bytes for {DATA}, expected {len(files[DATA]):,} bytes"
    assert f"could not download '{DATA}'" in message
    assert f"{server.url}/mirror/{SIZE}/{DATA}: {expected}" in message
    assert f"{server.url}/primary/{SIZE}/{DATA}: {expected}" in message
    assert not (tmp_path / SIZE / DATA).exists()
    assert not (tmp_path / SIZE / (DATA + ".part")).exists()  # the wrong bytes are not kept


def test_wrong_size_without_announced_length_is_caught_after_the_download(server, checkpoint, tmp_path):
    files, _ = checkpoint
    url = f"{server.url}/primary/{SIZE}/hparams.json"
    with pytest.raises(DownloadError, match=r"serves \d+ bytes for hparams.json, expected 7 bytes"):
        downloads.download_file(url, tmp_path / "hparams.json", expected_size=7)
    assert list(tmp_path.iterdir()) == []
    downloads.download_file(url, tmp_path / "hparams.json", expected_size=len(files["hparams.json"]))
    assert (tmp_path / "hparams.json").read_bytes() == files["hparams.json"]


def test_sha256_mismatch_deletes_the_download(server, checkpoint, tmp_path):
    import hashlib

    files, _ = checkpoint
    url = f"{server.url}/primary/{SIZE}/vocab.bpe"
    with pytest.raises(DownloadError, match="vocab.bpe has sha256 .* expected 00"):
        downloads.download_file(url, tmp_path / "vocab.bpe", sha256="00" * 32)
    assert list(tmp_path.iterdir()) == []
    right = hashlib.sha256(files["vocab.bpe"]).hexdigest()
    destination = downloads.download_file(url, tmp_path / "vocab.bpe", sha256=right)
    assert destination.read_bytes() == files["vocab.bpe"]


# ---- hparams.json against the chosen model size ----


def test_check_hparams_names_both_sizes():
    medium = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24}
    check_hparams(medium, "gpt2-medium")
    check_hparams(medium, "gpt2-medium (355M)")
    with pytest.raises(CheckpointError) as excinfo:
        check_hparams(medium, "124M", where="gpt2/124M/hparams.json")
    assert str(excinfo.value) == (
        "gpt2/124M/hparams.json says n_embd 1024, n_layer 24, n_head 16 (gpt2-medium), but "
        "gpt2-small was chosen: choose gpt2-medium, or delete that folder to download gpt2-small")
    with pytest.raises(CheckpointError, match=r"n_embd 8, n_layer 2, n_head 2 \(no GPT-2 size\)"):
        check_hparams(HPARAMS, "gpt2-xl")


def test_check_checkpoint_folder(tmp_path):
    assert check_checkpoint_folder(tmp_path / "124M", "gpt2-small") is None  # nothing there yet
    folder = tmp_path / "124M"
    folder.mkdir()
    (folder / "hparams.json").write_text(json.dumps(HPARAMS), encoding="utf-8")
    with pytest.raises(CheckpointError, match="but gpt2-small was chosen") as excinfo:
        check_checkpoint_folder(folder, "gpt2-small")
    assert str(folder / "hparams.json") in str(excinfo.value)
    small = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    (folder / "hparams.json").write_text(json.dumps(small), encoding="utf-8")
    assert check_checkpoint_folder(folder, "124M") == small
    (folder / "hparams.json").write_text("{", encoding="utf-8")
    with pytest.raises(CheckpointError, match="is corrupt"):
        check_checkpoint_folder(folder, "124M")


# ---- the hub sources: same parameters as OpenAI's checkpoint, no TensorFlow ----

# 64-wide heads, as in every GPT-2 size: the hub files do not store the head count.
HUB_HPARAMS = {"n_vocab": 64, "n_ctx": 16, "n_embd": 128, "n_head": 2, "n_layer": 2}
BOOK_REPO = BOOK_HUB_REPO
OPENAI_REPO = OPENAI_HUB_REPOS[SIZE]
BOOK_STEM = "gpt2-small-124M"


@pytest.fixture(scope="session")
def hub_checkpoints(tmp_path_factory):
    """OpenAI's TF checkpoint of HUB_HPARAMS and the same arrays in the hub layouts, as bytes."""
    root = tmp_path_factory.mktemp("hub")
    arrays = write_gpt2_checkpoint(root / "openai" / SIZE, **HUB_HPARAMS, seed=3)
    n_layer = HUB_HPARAMS["n_layer"]
    layouts = {
        "hub-openai": save_weights(hub_openai_arrays(arrays, n_layer), root / "a" / "model.safetensors"),
        "hub-openai-prefixed": save_weights(hub_openai_arrays(arrays, n_layer, prefix="transformer."),
                                            root / "b" / "model.safetensors"),
        "hub-book": save_weights(book_state_dict_arrays(arrays, n_layer),
                                 root / "c" / f"{BOOK_STEM}.safetensors"),
        "hub-book-pth": save_weights(book_state_dict_arrays(arrays, n_layer),
                                     root / "d" / f"{BOOK_STEM}.pth"),
    }
    write_hub_tokenizer_files(root / "openai" / SIZE, root / "tok")
    tokenizer = {f"/{OPENAI_REPO}/resolve/main/{n}": (root / "tok" / n).read_bytes()
                 for n in ("vocab.json", "merges.txt")}
    return root / "openai" / SIZE, {k: v.read_bytes() for k, v in layouts.items()}, tokenizer


def hub_files(hub_checkpoints, layout):
    """{url path: bytes} for a hub server holding one layout (and the tokenizer files)."""
    _, layouts, tokenizer = hub_checkpoints
    if layout.startswith("hub-openai"):
        path = f"/{OPENAI_REPO}/resolve/main/model.safetensors"
    else:
        suffix = ".pth" if layout.endswith("pth") else ".safetensors"
        path = f"/{BOOK_REPO}/resolve/main/{BOOK_STEM}{suffix}"
    return {path: layouts[layout], **tokenizer}


def assert_same_params(params, expected):
    """Every array equal, bit for bit, in the same nested layout."""
    if isinstance(expected, dict):
        assert set(params) == set(expected)
        for key in expected:
            assert_same_params(params[key], expected[key])
    elif isinstance(expected, list):
        assert len(params) == len(expected)
        for a, b in zip(params, expected, strict=True):
            assert_same_params(a, b)
    else:
        assert params.dtype == np.float32 and params.shape == expected.shape
        np.testing.assert_array_equal(params, expected)


def tiny_gpt(settings):
    from previous_chapters import GPTModel

    return GPTModel({"vocab_size": settings["n_vocab"], "context_length": settings["n_ctx"],
                     "emb_dim": settings["n_embd"], "n_heads": settings["n_head"],
                     "n_layers": settings["n_layer"], "drop_rate": 0.0, "qkv_bias": True}).eval()


def gpt_logits(model, settings):
    import torch

    ids = torch.tensor(np.random.default_rng(0).integers(0, settings["n_vocab"], size=(2, settings["n_ctx"])))
    with torch.no_grad():
        return model(ids)


def loaded_gpt(settings, params):
    from previous_chapters import load_weights_into_gpt

    model = tiny_gpt(settings)
    load_weights_into_gpt(model, params)
    return model


@pytest.mark.parametrize("layout", ["hub-openai", "hub-openai-prefixed", "hub-book", "hub-book-pth"])
def test_every_source_gives_the_same_parameters_and_logits(hub_checkpoints, tmp_path, layout, one_thread):
    import torch

    openai_dir = hub_checkpoints[0]
    settings, expected = download_and_load_gpt2(SIZE, openai_dir.parent)  # complete: read, no network
    source = "hub-book" if layout.startswith("hub-book") else "hub-openai"
    with serving(hub_files(hub_checkpoints, layout)) as httpd:
        got_settings, params = download_and_load_gpt2(SIZE, tmp_path, source=source, hub_endpoint=httpd.url)
    assert settings == got_settings == HUB_HPARAMS
    assert_same_params(params, expected)
    logits = gpt_logits(loaded_gpt(got_settings, params), settings)
    assert torch.equal(logits, gpt_logits(loaded_gpt(settings, expected), settings))
    assert logits.abs().max() > 0.1

    weights = {"hub-openai": "model.safetensors", "hub-book": f"{BOOK_STEM}.safetensors"}[source]
    if layout == "hub-book-pth":  # the .safetensors file is asked for first, then the .pth
        assert httpd.paths()[0] == f"/{BOOK_REPO}/resolve/main/{weights}"
        weights = f"{BOOK_STEM}.pth"
    on_disk = sorted(p.name for p in (tmp_path / SIZE).iterdir())
    assert on_disk == sorted([weights, "merges.txt", "vocab.json"])
    # complete on disk: "auto" picks this source and loads it with no network at all
    assert choose_weights_source("auto", SIZE, tmp_path) == source
    assert_same_params(download_and_load_gpt2(SIZE, tmp_path, source="auto")[1], expected)


def test_book_state_dict_loads_into_gptmodel_as_saved(hub_checkpoints, tmp_path, one_thread):
    """The book's file is GPTModel's own state dict: loading it directly gives the same model."""
    import torch

    path = tmp_path / f"{BOOK_STEM}.pth"
    path.write_bytes(hub_checkpoints[1]["hub-book-pth"])
    settings, params = load_hub_weights(path)
    direct = tiny_gpt(settings)
    direct.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert torch.equal(gpt_logits(direct, settings), gpt_logits(loaded_gpt(settings, params), settings))


def test_hf_endpoint_redirects_every_request(hub_checkpoints, tmp_path, monkeypatch):
    with serving(hub_files(hub_checkpoints, "hub-book")) as httpd:
        monkeypatch.setenv("HF_ENDPOINT", f"{httpd.url}/")  # a trailing slash is fine
        download_and_load_gpt2(SIZE, tmp_path, source="hub-book")
    assert httpd.paths() == [f"/{BOOK_REPO}/resolve/main/{BOOK_STEM}.safetensors",
                             f"/{OPENAI_REPO}/resolve/main/vocab.json",
                             f"/{OPENAI_REPO}/resolve/main/merges.txt"]


def test_auto_downloads_from_the_hub_without_tensorflow(hub_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now fails
    with serving(hub_files(hub_checkpoints, "hub-openai")) as httpd:
        monkeypatch.setenv("HF_ENDPOINT", httpd.url)
        settings, _ = download_and_load_gpt2(SIZE, tmp_path, source="auto")
    assert settings == HUB_HPARAMS
    assert httpd.paths()[0] == f"/{OPENAI_REPO}/resolve/main/model.safetensors"


def test_auto_prefers_what_is_complete_on_disk(checkpoint, tmp_path):
    folder = tmp_path / SIZE
    assert choose_weights_source("auto", SIZE, tmp_path) == "hub-openai"  # nothing on disk
    folder.mkdir()
    (folder / f"{BOOK_STEM}.pth").write_bytes(b"x")
    assert choose_weights_source("auto", SIZE, tmp_path) == "hub-openai"  # no tokenizer files yet
    (folder / "vocab.json").write_bytes(b"x")
    (folder / "merges.txt").write_bytes(b"x")
    assert choose_weights_source("auto", SIZE, tmp_path) == "hub-book"
    for name, body in checkpoint[0].items():
        (folder / name).write_bytes(body)
    assert choose_weights_source("auto", SIZE, tmp_path) == "openai"  # OpenAI's files come first
    assert choose_weights_source("hub-openai", SIZE, tmp_path) == "hub-openai"
    with pytest.raises(ValueError, match="auto, openai, hub-book, hub-openai; got 'hub'"):
        choose_weights_source("hub", SIZE, tmp_path)
    with pytest.raises(ValueError, match="124M, 355M, 774M, 1558M"):
        choose_weights_source("auto", "gpt2-small", tmp_path)


def test_hub_download_resumes_a_cut_file(hub_checkpoints, tmp_path):
    files = hub_files(hub_checkpoints, "hub-openai")
    path = f"/{OPENAI_REPO}/resolve/main/model.safetensors"
    with serving(files) as httpd:
        httpd.fail(path, ("cut", 5000))
        with pytest.raises(DownloadError, match="model.safetensors") as excinfo:
            download_and_load_gpt2(SIZE, tmp_path, source="hub-openai", hub_endpoint=httpd.url)
        assert "HF_ENDPOINT" in str(excinfo.value)
        assert not (tmp_path / SIZE / "model.safetensors").exists()
        settings, _ = download_and_load_gpt2(SIZE, tmp_path, source="hub-openai", hub_endpoint=httpd.url)
    assert settings == HUB_HPARAMS
    assert (path, "bytes=5000-") in httpd.requests
    assert (tmp_path / SIZE / "model.safetensors").read_bytes() == files[path]


def test_a_cut_safetensors_download_is_not_replaced_by_the_pth(hub_checkpoints, tmp_path):
    files = {**hub_files(hub_checkpoints, "hub-book"), **hub_files(hub_checkpoints, "hub-book-pth")}
    path = f"/{BOOK_REPO}/resolve/main/{BOOK_STEM}.safetensors"
    with serving(files) as httpd:
        httpd.fail(path, ("cut", 100))
        with pytest.raises(DownloadError, match="incomplete download: 100 of"):
            download_and_load_gpt2(SIZE, tmp_path, source="hub-book", hub_endpoint=httpd.url)
    assert httpd.paths() == [path]  # the .pth is asked for only when the hub has no .safetensors
    assert sorted(p.name for p in (tmp_path / SIZE).iterdir()) == [f"{BOOK_STEM}.safetensors.part"]


def test_hub_source_missing_everywhere_names_every_file_tried(hub_checkpoints, tmp_path):
    with serving({}) as httpd, pytest.raises(DownloadError) as excinfo:
        download_and_load_gpt2(SIZE, tmp_path, source="hub-book", hub_endpoint=httpd.url)
    message = str(excinfo.value)
    for name in (f"{BOOK_STEM}.safetensors", f"{BOOK_STEM}.pth"):
        assert f"{httpd.url}/{BOOK_REPO}/resolve/main/{name}: HTTP 404" in message
    assert "HF_ENDPOINT" in message and str(tmp_path / SIZE) in message


@pytest.mark.parametrize("layout", ["hub-openai", "hub-book-pth"])
def test_corrupt_hub_weights_on_disk_give_a_clear_error(hub_checkpoints, tmp_path, layout):
    name = "model.safetensors" if layout == "hub-openai" else f"{BOOK_STEM}.pth"
    path = tmp_path / name
    path.write_bytes(hub_checkpoints[1][layout][:3000])
    with pytest.raises(CheckpointError, match="delete it and run the download again") as excinfo:
        load_hub_weights(path)
    assert str(path) in str(excinfo.value)
    assert excinfo.value.__cause__ is None


def test_foreign_or_incomplete_weights_files_are_named(hub_checkpoints, tmp_path):
    path = save_weights({"encoder.layer.0.weight": np.zeros(3, np.float32)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="neither the book's GPTModel weights nor"):
        load_hub_weights(path)
    from safetensors.numpy import load, save

    cases = [("hub-openai", "h.1.mlp.c_fc.bias", "h1/mlp/c_fc/b"), ("hub-openai", "ln_f.weight", "ln_f/g"),
             ("hub-book", "trf_blocks.0.att.W_key.bias", "trf_blocks.0.att.W_key.bias")]
    for layout, dropped, named in cases:
        arrays = load(hub_checkpoints[1][layout])
        del arrays[dropped]
        path = tmp_path / "y.safetensors"
        path.write_bytes(save(arrays))
        with pytest.raises(CheckpointError, match=f"lacks the weight .*{named}"):
            load_hub_weights(path)


def test_a_hub_model_folder_made_without_tensorflow_loads_offline(shared_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now fails
    arrays = write_hub_model_folder(tmp_path / SIZE, shared_data / "gpt2-tokenizer", n_vocab=50257,
                                    n_ctx=8, n_embd=64, n_layer=1)
    settings, params = download_and_load_gpt2(SIZE, tmp_path, source="auto", hub_endpoint=closed_port_url())
    assert settings == {"n_vocab": 50257, "n_ctx": 8, "n_embd": 64, "n_head": 1, "n_layer": 1}
    np.testing.assert_array_equal(params["blocks"][0]["mlp"]["c_fc"]["w"], arrays["model/h0/mlp/c_fc/w"][0])
    assert tokenizer_from_folder(tmp_path / SIZE).encode("Hello, world") == [15496, 11, 995]


# ---- the tokenizer from the files beside the weights ----

SAMPLES = [
    "Hello, world. Is this-- a test?",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nRewrite 'The cat sat.' in passive voice.",
    "  spaces   and\ttabs\n\n\nnewlines   ",
    "Ünïcödé 漢字 🙂 — ‘quotes’ 12345 3.14 don't we'll I'm",
    "a <|endoftext|> read as plain text",
]


def test_tokenizer_from_either_pair_of_files_equals_tiktoken(shared_data, tokenizer, tmp_path):
    openai_dir = shared_data / "gpt2-tokenizer"
    write_hub_tokenizer_files(openai_dir, tmp_path)
    for folder in (openai_dir, tmp_path):
        enc = tokenizer_from_folder(folder)
        assert enc.n_vocab == tokenizer.n_vocab == 50257
        for text in SAMPLES:
            ids = enc.encode(text, disallowed_special=())
            assert ids == tokenizer.encode(text, disallowed_special=()), (folder, text)
            assert enc.decode(ids) == text
        special = "Hi<|endoftext|>"
        assert enc.encode(special, allowed_special={"<|endoftext|>"}) == [17250, 50256]
        assert enc.encode(special, allowed_special={"<|endoftext|>"}) == tokenizer.encode(
            special, allowed_special={"<|endoftext|>"})


def test_tokenizer_files_missing_or_mismatched(shared_data, tmp_path):
    with pytest.raises(TokenizerFilesError, match="neither encoder.json"):
        tokenizer_from_folder(tmp_path)
    write_hub_tokenizer_files(shared_data / "gpt2-tokenizer", tmp_path)
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges[1], merges[2] = merges[2], merges[1]  # two merges swapped: ranks no longer match ids
    (tmp_path / "merges.txt").write_text("\n".join(merges), encoding="utf-8")
    with pytest.raises(ValueError, match="do not belong together"):
        tokenizer_from_folder(tmp_path)
