"""instruction_data.load_instruction_file: local files in every shape readers bring, and
downloads from a list of sources on a loopback server, checked by sha256 and validated
before the file gets its name."""

import hashlib
import json

import pytest
from loopback_server import closed_port_url, serving

from instructkit.errors import DownloadError
from instructkit.instruction_data import (
    CHAPTER_DATASET,
    PREFERENCE_DATASET,
    PREFERENCE_KEYS,
    DatasetError,
    load_instruction_file,
    load_known_dataset,
)

ENTRIES = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen — ja."},
]
BODY = json.dumps(ENTRIES, ensure_ascii=False).encode("utf-8")
SHA = hashlib.sha256(BODY).hexdigest()
HTML = b"<!DOCTYPE html><html><body>Please log in</body></html>"


def test_known_datasets_are_the_books_files_in_order_github_then_cdn():
    assert CHAPTER_DATASET.urls == (
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
        "instruction-data.json",
        "https://cdn.jsdelivr.net/gh/rasbt/LLMs-from-scratch@main/ch07/01_main-chapter-code/"
        "instruction-data.json",
    )
    assert CHAPTER_DATASET.sha256 == "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
    assert PREFERENCE_DATASET.urls[1] == (
        "https://cdn.jsdelivr.net/gh/rasbt/LLMs-from-scratch@main/ch07/04_preference-tuning-with-dpo/"
        "instruction-data-with-preference.json")
    assert PREFERENCE_DATASET.keys == ("instruction", "input", "output", "chosen", "rejected")


@pytest.mark.parametrize("dataset", [CHAPTER_DATASET, PREFERENCE_DATASET])
def test_shared_copies_match_the_known_sha256_and_load(shared_data, dataset):
    path = shared_data / dataset.file_name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == dataset.sha256
    data = load_known_dataset(dataset, shared_data)  # present: no download
    assert len(data) == 1100
    assert set(data[0]) >= set(dataset.keys)


def test_falls_back_to_the_second_source_when_the_first_is_unreachable(tmp_path):
    path = tmp_path / "instruction-data.json"
    with serving({"/cdn/data.json": BODY}) as httpd:
        urls = [f"{closed_port_url()}/raw/data.json", f"{httpd.url}/cdn/data.json"]
        data = load_instruction_file(path, urls, sha256=SHA)
    assert data == ENTRIES
    assert path.read_bytes() == BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instruction-data.json"]
    with serving({}) as httpd:  # now on disk: read with no request at all
        assert load_instruction_file(path, [f"{httpd.url}/x"], sha256=SHA) == ENTRIES
    assert httpd.requests == []


def test_sha256_mismatch_moves_on_and_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "instruction-data.json"
    altered = BODY.replace(b"Blue", b"Red.")
    with serving({"/raw/d.json": altered, "/cdn/d.json": BODY}) as httpd:
        urls = [f"{httpd.url}/raw/d.json", f"{httpd.url}/cdn/d.json"]
        assert load_instruction_file(path, urls, sha256=SHA) == ENTRIES
        assert httpd.paths() == ["/raw/d.json", "/cdn/d.json"]
        path.unlink()
        with pytest.raises(DatasetError) as excinfo:
            load_instruction_file(path, urls[:1], sha256=SHA)
    message = str(excinfo.value)
    bad = hashlib.sha256(altered).hexdigest()
    assert f"{urls[0]}: sha256 {bad} is not the known {SHA} of instruction-data.json" in message
    assert "could not download instruction-data.json" in message and str(path) in message
    assert list(tmp_path.iterdir()) == []  # never saved under any name


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"not": "a list"}', "expected a JSON list of entries, got dict"),
    (b'[{"instruction": "x", "output": 3}]', "entry 0: 'output' must be a string, got int"),
    (BODY[: len(BODY) // 2], "not valid JSON"),
])
def test_bad_downloads_are_never_saved(tmp_path, body, reason):
    path = tmp_path / "data.json"
    with serving({"/a": body, "/b": body}) as httpd, pytest.raises(DatasetError) as excinfo:
        load_instruction_file(path, [f"{httpd.url}/a", f"{httpd.url}/b"])  # no sha256: validation only
    assert str(excinfo.value).count(reason) == 2  # both sources tried, both rejected
    assert list(tmp_path.iterdir()) == []


def test_html_from_every_source_is_one_captive_portal_line(tmp_path):
    path = tmp_path / "data.json"
    with serving({"/a": HTML, "/b": HTML}) as httpd, pytest.raises(DownloadError) as excinfo:
        load_instruction_file(path, [f"{httpd.url}/a", f"{httpd.url}/b"])
    assert str(excinfo.value) == (
        f"{httpd.url}/a answered with an HTML page (a captive portal, a login page or a proxy's "
        "error?) instead of data.json; open a browser to sign in to the network, or check the URL")
    assert httpd.paths() == ["/a", "/b"]  # both tried
    assert list(tmp_path.iterdir()) == []


def test_a_bad_download_already_on_disk_is_moved_aside_and_downloaded_again(tmp_path, capsys):
    path = tmp_path / "instruction-data.json"
    path.write_bytes(HTML)  # what an older version could leave behind
    with serving({"/a": BODY}) as httpd:
        assert load_instruction_file(path, [f"{httpd.url}/a"], sha256=SHA) == ENTRIES
    assert path.read_bytes() == BODY
    assert (tmp_path / "instruction-data.json.bad").read_bytes() == HTML
    err = capsys.readouterr().err
    assert (f"{path} is not a JSON or JSON Lines file (an HTML page): moved it aside to "
            "instruction-data.json.bad and downloading it again") in err
    # a file of one's own (no sources) is never moved: its problem is an error
    (tmp_path / "mine.json").write_bytes(HTML)
    with pytest.raises(DatasetError, match="an HTML page, not JSON"):
        load_instruction_file(tmp_path / "mine.json")
    assert (tmp_path / "mine.json").exists()


def test_html_with_status_200_falls_through_to_a_good_source(tmp_path):
    path = tmp_path / "data.json"
    with serving({"/a": HTML, "/b": BODY}) as httpd:
        assert load_instruction_file(path, [f"{httpd.url}/a", f"{httpd.url}/b"]) == ENTRIES


def test_no_source_at_all(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_instruction_file(tmp_path / "missing.json")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + BODY)
    assert load_instruction_file(path) == ENTRIES


def test_non_utf8_bytes_name_the_offset(tmp_path):
    path = tmp_path / "cp1252.json"
    body = json.dumps(ENTRIES, ensure_ascii=False).encode("cp1252")
    path.write_bytes(body)
    offset = body.index(b"\x97")  # the em dash, one byte in Windows-1252/Latin-1
    with pytest.raises(DatasetError) as excinfo:
        load_instruction_file(path)
    assert str(excinfo.value) == (f"{path}: not UTF-8 text (byte 0x97 at offset {offset}); save it as UTF-8")


def test_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="is a folder, not a data file"):
        load_instruction_file(tmp_path)


def test_json_lines_and_optional_input(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [{"instruction": "Name a colour.", "output": "Blue."},  # no input: an empty one
             {"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen — ja."}]
    path.write_text("\n".join(json.dumps(e, ensure_ascii=False) for e in lines) + "\n\n", encoding="utf-8")
    assert load_instruction_file(path) == ENTRIES
    path.write_text(json.dumps(lines[0]) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2 is not valid JSON Lines"):
        load_instruction_file(path)


def test_bad_entries_name_index_and_key(tmp_path):
    path = tmp_path / "pref.json"
    path.write_text(json.dumps([{**e, "chosen": "a", "rejected": "b"} for e in ENTRIES[:1]]
                               + [{**ENTRIES[1], "chosen": "a"}]), encoding="utf-8")
    with pytest.raises(DatasetError, match="entry 1 has no 'rejected' key"):
        load_instruction_file(path, keys=PREFERENCE_KEYS)
    assert len(load_instruction_file(path)) == 2  # the chapter's keys are all there


def test_a_cut_download_resumes_from_the_next_source(tmp_path):
    path = tmp_path / "data.json"
    with serving({"/a": BODY, "/b": BODY}) as httpd:
        httpd.fail("/a", ("cut", 40))
        assert load_instruction_file(path, [f"{httpd.url}/a", f"{httpd.url}/b"], sha256=SHA) == ENTRIES
    assert httpd.requests[-1] == ("/b", "bytes=40-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]
