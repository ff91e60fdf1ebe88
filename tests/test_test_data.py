"""conftest.find_test_data: ../shared/data, else $CH07_TEST_DATA, else a cache filled once
from the network, each file checked by sha256 (here against a loopback server)."""

import hashlib

import pytest
from conftest import DATA_ENV_VAR, TEST_DATA_FILES, find_test_data
from loopback_server import closed_port_url, serving

FILES = {"a.json": b"[1, 2, 3]\n", "sub/b.txt": b"tokenizer bytes"}


def files_at(url):
    return {name: ([f"{url}/{name}"], hashlib.sha256(body).hexdigest()) for name, body in FILES.items()}


def test_every_file_has_a_sha256_and_https_sources():
    assert len(TEST_DATA_FILES) == 5
    for urls, sha256 in TEST_DATA_FILES.values():
        assert len(sha256) == 64 and all(url.startswith("https://") for url in urls)


def test_shared_folder_first_then_the_environment_variable(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    offline = files_at(closed_port_url())  # any download attempt would fail loudly
    env = {DATA_ENV_VAR: str(tmp_path / "mine")}
    with serving({}) as httpd:
        assert find_test_data(shared, env, tmp_path / "cache", offline) == shared
        assert find_test_data(tmp_path / "none", env, tmp_path / "cache", offline) == tmp_path / "mine"
    assert httpd.requests == [] and not (tmp_path / "cache").exists()


def test_downloads_once_into_the_cache_checked_by_sha256(tmp_path):
    served = {"/good/" + name: body for name, body in FILES.items()}
    served["/bad/a.json"] = b"[6, 6, 6]\n"
    with serving(served) as httpd:
        files = files_at(f"{httpd.url}/good")
        files["a.json"] = ([f"{httpd.url}/bad/a.json"] + files["a.json"][0], files["a.json"][1])
        cache = find_test_data(tmp_path / "none", {}, tmp_path / "cache", files)
        assert cache == tmp_path / "cache"
        assert {name: (cache / name).read_bytes() for name in FILES} == FILES
        assert httpd.paths() == ["/bad/a.json", "/good/a.json", "/good/sub/b.txt"]
        httpd.requests.clear()
        find_test_data(tmp_path / "none", {}, tmp_path / "cache", files)
        assert httpd.requests == []  # complete: no network


def test_a_failed_download_is_a_warning_and_leaves_no_file(tmp_path):
    with pytest.warns(UserWarning) as record:
        cache = find_test_data(tmp_path / "none", {}, tmp_path / "cache", files_at(closed_port_url()))
    assert [str(w.message).split(":")[0] for w in record] == [
        "test data a.json is missing", "test data sub/b.txt is missing"]
    assert "cannot connect" in str(record[0].message)
    assert not (cache / "a.json").exists() and not (cache / "sub" / "b.txt").exists()
