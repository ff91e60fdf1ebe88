"""Hub models by repository id (instructkit/hub_models.py), from a loopback hub (HF_ENDPOINT).

The server serves tiny repositories under the real ids, at `<endpoint>/<repo>/resolve/main/<file>`:
Qwen3 base sharded in two (an index and two shards), SmolLM2 as one model.safetensors and
without generation_config.json, and Llama 3.2 gated behind a token. Checked: what is
downloaded and in which order, a cut shard resumed, no network once complete, a damaged file
downloaded again, the one-line errors of a gated repository (exit code 1), the token sent to
the hub only (not to the server it redirects to) and found in no output and no file.
"""

import json

import numpy as np
import pytest
from loopback_server import closed_port_url, serving
from tiny_hub_tokenizers import write_tokenizer_folder

from instructkit import hub_models
from instructkit.errors import EXIT_BAD_INPUT, EXIT_FAILED, BadInputError, CheckpointError, DownloadError
from instructkit.hf_tokenizer import load_hf_tokenizer
from instructkit.hub_models import (
    GatedRepoError,
    download_hub_model,
    hub_token,
    repo_folder,
    resolve_model_name,
    shard_names,
)

QWEN, SMOL, LLAMA = "Qwen/Qwen3-0.6B-Base", "HuggingFaceTB/SmolLM2-360M", "meta-llama/Llama-3.2-1B"
TOKEN = "hf_TestTokenNeverPrinted0123456789"
NO_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HOME", "XDG_CACHE_HOME")


def safetensors_bytes(arrays):
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(a) for name, a in arrays.items()})


def repo_files(tmp_path, repo_id, family, model_type, sharded, generation=True):
    """{file name: bytes} of a tiny repository; its tokenizer files trained by tiny_hub_tokenizers."""
    folder = tmp_path / "made" / repo_id.replace("/", "--")
    write_tokenizer_folder(folder, family, merges=40)
    files = {name: (folder / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    if generation:
        files["generation_config.json"] = (folder / "generation_config.json").read_bytes()
    files["config.json"] = json.dumps({"model_type": model_type, "hidden_size": 8, "num_hidden_layers": 2,
                                       "vocab_size": 300, "torch_dtype": "bfloat16"}).encode()
    rng = np.random.default_rng(0)
    layers = [{f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((16, 8), dtype=np.float32),
               f"model.layers.{i}.input_layernorm.weight": np.ones(8, np.float32)} for i in range(2)]
    if sharded:
        names = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
        weight_map = {key: name for name, layer in zip(names, layers, strict=True) for key in layer}
        files["model.safetensors.index.json"] = json.dumps(
            {"metadata": {"total_size": 2 * (16 * 8 + 8) * 4}, "weight_map": weight_map}).encode()
        files.update({name: safetensors_bytes(layer) for name, layer in zip(names, layers, strict=True)})
    else:
        files["model.safetensors"] = safetensors_bytes({**layers[0], **layers[1]})
    return files


def served(repos):
    """{url path: bytes} for {repo id: {file name: bytes}}."""
    return {f"/{repo}/resolve/main/{name}": data
            for repo, files in repos.items() for name, data in files.items()}


@pytest.fixture()
def no_token(monkeypatch, tmp_path):
    """No token anywhere: no variables, and a hub home without a token file."""
    for name in NO_TOKEN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path / "hf-home" / "token"


def test_sharded_repository_resumes_a_cut_shard_then_works_offline(tmp_path, monkeypatch, no_token):
    files = repo_files(tmp_path, QWEN, "qwen3", "qwen3", sharded=True)
    models = tmp_path / "models"
    with serving(served({QWEN: files})) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        shard = f"/{QWEN}/resolve/main/model-00002-of-00002.safetensors"
        hub.fail(shard, ("cut", 100))
        with pytest.raises(DownloadError, match="incomplete download"):
            download_hub_model("qwen3-0.6b", models)
        part = models / "Qwen--Qwen3-0.6B-Base" / "model-00002-of-00002.safetensors.part"
        assert part.stat().st_size == 100
        folder = download_hub_model(QWEN, models)
    assert folder == repo_folder(models, QWEN) == models / "Qwen--Qwen3-0.6B-Base"
    order = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "model.safetensors", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors"]
    assert hub.paths() == [f"/{QWEN}/resolve/main/{name}" for name in order] + [shard]
    assert hub.requests[-1] == (shard, "bytes=100-")  # resumed, not started again
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)  # no .part left, no single file
    assert all((folder / name).read_bytes() == data for name, data in files.items())
    assert all("Authorization" not in headers for _, headers in hub.request_headers)  # no token: none sent
    assert shard_names(folder / "model.safetensors.index.json") == order[-2:]

    # complete: no network at all (nothing listens there), and the tokenizer reads the folder
    assert download_hub_model("QWEN3-0.6B", models, hub_endpoint=closed_port_url()) == folder
    tokenizer = load_hf_tokenizer(folder)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.decode(tokenizer.encode("Hi")) == "Hi"

    # a damaged shard is moved aside and downloaded again, alone
    first = "model-00001-of-00002.safetensors"
    (folder / first).write_bytes(files[first][:-4])
    with serving(served({QWEN: files})) as hub:
        assert download_hub_model(QWEN, models, hub_endpoint=hub.url) == folder
    assert hub.paths() == [f"/{QWEN}/resolve/main/{first}"]
    assert (folder / f"{first}.bad").is_file() and (folder / first).read_bytes() == files[first]


def test_single_file_repository_without_generation_config(tmp_path, no_token):
    files = repo_files(tmp_path, SMOL, "smollm2", "llama", sharded=False, generation=False)
    models = tmp_path / "models"
    with serving(served({SMOL: files})) as hub:
        folder = download_hub_model("smollm2-360m", models, hub_endpoint=hub.url + "/")
    assert folder.name == "HuggingFaceTB--SmolLM2-360M"
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)  # no generation_config.json
    asked = [p.rsplit("/", 1)[1] for p in hub.paths()]
    assert asked == ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "model.safetensors"]
    # the absent optional file does not send it back to the network
    assert download_hub_model(SMOL, models, hub_endpoint=closed_port_url()) == folder
    assert load_hf_tokenizer(folder).eos_token_id == 0


def test_gated_repository_needs_a_token_sent_to_the_hub_only(tmp_path, monkeypatch, capsys, no_token):
    files = repo_files(tmp_path, LLAMA, "llama3", "llama", sharded=True)
    models = tmp_path / "models"

    def gate(path, headers):  # the hub's answers: 401 without a valid token, 403 without access
        auth = headers.get("Authorization")
        if not path.startswith(f"/{LLAMA}/"):
            return None
        if auth == f"Bearer {TOKEN}":
            return None
        return 403 if auth == "Bearer hf_valid_but_no_license" else 401

    cdn_files = {"/cdn/shard-1": files["model-00001-of-00002.safetensors"]}  # where the hub redirects
    with serving(served({LLAMA: files})) as hub, serving(cdn_files) as cdn:
        hub.check = gate
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        capsys.readouterr()
        assert hub_models.main([LLAMA, "--models-dir", str(models)]) == EXIT_FAILED
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith(f"error: the hub at {hub.url} refused {LLAMA} (HTTP 401)")
        assert "accept its license on https://huggingface.co/meta-llama/Llama-3.2-1B" in err
        assert "'huggingface-cli login'" in err and "set HF_TOKEN" in err
        assert hub.request_headers[0][1].get("Authorization") is None

        no_token.parent.mkdir(parents=True)
        no_token.write_text("hf_wrong_token\n")  # the login file, with a token the hub refuses
        with pytest.raises(GatedRepoError, match=rf"the token from {no_token} \(HTTP 401: not a valid"):
            download_hub_model(LLAMA, models)
        monkeypatch.setenv("HF_TOKEN", "hf_valid_but_no_license")  # the variable wins over the file
        with pytest.raises(GatedRepoError, match=rf"from HF_TOKEN has no access to {LLAMA} \(HTTP 403\)"):
            download_hub_model(LLAMA, models)

        monkeypatch.setenv("HF_TOKEN", TOKEN)
        hub.fail(f"/{LLAMA}/resolve/main/model-00001-of-00002.safetensors",
                 ("redirect", f"{cdn.url}/cdn/shard-1"))
        # a redirect within the hub (a renamed repository) keeps the token: the gate lets it in
        moved = f"/{LLAMA}/resolve/renamed/model-00002-of-00002.safetensors"
        hub.files[moved] = files["model-00002-of-00002.safetensors"]
        hub.fail(f"/{LLAMA}/resolve/main/model-00002-of-00002.safetensors", ("redirect", hub.url + moved))
        seen = len(hub.request_headers)
        capsys.readouterr()
        assert hub_models.main([LLAMA, "--models-dir", str(models)]) == 0
        out, err = capsys.readouterr()
    folder = models / "meta-llama--Llama-3.2-1B"
    assert out == f"{folder}\n"
    assert all(headers.get("Authorization") == f"Bearer {TOKEN}" for _, headers in hub.request_headers[seen:])
    assert hub.paths()[-1] == moved
    assert cdn.paths() == ["/cdn/shard-1"] and "Authorization" not in cdn.request_headers[0][1]
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    assert all((folder / name).read_bytes() == files[name] for name in files)
    # the token is in no output and no file
    assert TOKEN not in out + err
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_names_tokens_and_indexes(tmp_path, capsys, monkeypatch):
    assert resolve_model_name("llama3.2-3b") == "meta-llama/Llama-3.2-3B"
    assert resolve_model_name("SmolLM2-1.7B") == "HuggingFaceTB/SmolLM2-1.7B"
    assert resolve_model_name("Qwen/Qwen3-1.7B-Base") == "Qwen/Qwen3-1.7B-Base"
    assert {resolve_model_name(n) for n in hub_models.SHORT_NAMES} == {
        "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-1.7B-Base", "HuggingFaceTB/SmolLM2-135M",
        "HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-1.7B", "meta-llama/Llama-3.2-1B",
        "meta-llama/Llama-3.2-3B"}
    for bad in ("qwen4", "../etc/passwd", "a/b/c", "owner/..", "owner/a--b", "/name", "owner/"):
        with pytest.raises(BadInputError, match="neither a hub repository id .* nor a short name .*qwen3-0"):
            resolve_model_name(bad)
    assert hub_models.main(["qwen4", "--models-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("error: 'qwen4' is neither")

    home = tmp_path / "home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text(" hf_file \n")
    (tmp_path / "elsewhere").write_text("hf_path")
    monkeypatch.setenv("HOME", str(home))  # the default: ~/.cache/huggingface/token
    elsewhere = str(tmp_path / "elsewhere")
    assert hub_token({}) == ("hf_file", str(home / ".cache" / "huggingface" / "token"))
    assert hub_token({"HF_TOKEN": " hf_env ", "HF_TOKEN_PATH": elsewhere}) == ("hf_env", "HF_TOKEN")
    assert hub_token({"HF_TOKEN": "", "HF_TOKEN_PATH": elsewhere}) == ("hf_path", elsewhere)
    assert hub_token({"HF_HOME": str(tmp_path / "none")}) == (None, None)
    assert hub_token({"XDG_CACHE_HOME": str(home / ".cache")})[0] == "hf_file"

    index = tmp_path / "model.safetensors.index.json"
    for weight_map in ({"a": "../outside.safetensors"}, {"a": "sub/x.safetensors"}, {}, {"a": "x.bin"}):
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match="delete it and run the download again"):
            shard_names(index)


def test_a_missing_repository_is_one_line(tmp_path, no_token):
    with serving({}) as hub, pytest.raises(DownloadError) as info:
        download_hub_model("someone/no-such-model", tmp_path, hub_endpoint=hub.url)
    assert str(info.value) == (f"the hub at {hub.url} has no someone/no-such-model (HTTP 404 for "
                               "config.json): check the repository id")
    assert "\n" not in str(info.value)
