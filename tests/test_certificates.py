"""Certificates (instructkit/downloads.py: ssl_context, open_url): downloads trust the system's
store, else certifi's, or the bundle SSL_CERT_FILE / REQUESTS_CA_BUNDLE names; a certificate
no trusted authority vouches for is one line that says so and how to fix it.

The server is a real HTTPS server on 127.0.0.1 with a self-signed certificate made in the
test (the `cryptography` package, else the `openssl` command): no system store trusts it,
just as a python.org Python on macOS trusts nothing before "Install Certificates.command",
and a company proxy's certificate is trusted by nothing but the company's CA bundle.
"""

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, TOKENIZER_DIR
from loopback_server import FileServer, running

from gpt_download import download_file as book_download_file
from instructkit import downloads, gpt2_weights, hub, judge_http
from instructkit.errors import BadInputError
from instructkit.instruction_data import load_instruction_file

DATA = [{"instruction": "Name a primary color.", "input": "", "output": "Red."}] * 3
DATA_BYTES = json.dumps(DATA).encode()


def make_self_signed(folder):
    """(certificate, key) PEM files for 127.0.0.1, self-signed; skips without a way to make them."""
    cert, key = folder / "self-signed.pem", folder / "self-signed.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is available "
                        "to make a self-signed certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    return make_self_signed(tmp_path_factory.mktemp("tls"))


@contextlib.contextmanager
def https_serving(files, cert, key):
    """loopback_server's FileServer behind TLS with `cert`: https://127.0.0.1:PORT."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd = FileServer(files)
    # the handshake happens in each request's thread, so a client that rejects the
    # certificate cannot stall the server
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True,
                                       do_handshake_on_connect=False)
    httpd.url = httpd.url.replace("http://", "https://")
    httpd.handle_error = lambda request, address: None  # a client refusing the certificate: expected
    with running(httpd):
        yield httpd


@pytest.fixture
def server(self_signed):
    cert, key = self_signed
    files = {"/data.json": DATA_BYTES, "/api/version": b'{"version": "0.0.0"}'}
    with https_serving(files, cert, key) as httpd:
        yield httpd


@pytest.fixture(autouse=True)
def no_bundle_from_the_environment(monkeypatch):
    for name in (*downloads.CA_BUNDLE_ENV_VARS, "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


def assert_names_the_certificate(message):
    assert message.startswith("the certificate of 127.0.0.1 could not be verified "
                              "(CERTIFICATE_VERIFY_FAILED: self-signed certificate)"), message
    assert "Install Certificates.command" in message
    assert "SSL_CERT_FILE (or REQUESTS_CA_BUNDLE)" in message
    assert "internet" not in message and "\n" not in message  # one line, not the network


def test_dataset_download_names_the_certificate_problem(server, tmp_path):
    with pytest.raises(downloads.CertificateError) as excinfo:
        load_instruction_file(tmp_path / "data.json", sources=[f"{server.url}/data.json"])
    assert_names_the_certificate(str(excinfo.value))
    assert "neither this system's certificates nor certifi's" in str(excinfo.value)
    assert excinfo.value.exit_code == 1  # a DownloadError: the machine, not the user's input
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_hub_download_names_the_certificate_problem(server, tmp_path):
    with pytest.raises(downloads.CertificateError) as excinfo:
        hub.download_hub_files("124M", tmp_path, "hub-openai", hub_endpoint=server.url)
    assert_names_the_certificate(str(excinfo.value))


def test_gpt2_weights_download_names_the_certificate_problem(server, tmp_path):
    with pytest.raises(downloads.CertificateError) as excinfo:
        gpt2_weights.download_gpt2("124M", tmp_path, "openai", base_urls=[server.url])
    assert_names_the_certificate(str(excinfo.value))
    # the book's download_file (gpt_download.py), with its backup URL failing the same way
    with pytest.raises(downloads.CertificateError) as excinfo:
        book_download_file(f"{server.url}/data.json", str(tmp_path / "data.json"),
                           f"{server.url}/backup/data.json")
    assert_names_the_certificate(str(excinfo.value))


def test_a_certificate_failure_among_other_failures_gives_the_certificate_advice(server, tmp_path):
    from loopback_server import closed_port_url

    with pytest.raises(downloads.DownloadError) as excinfo:
        downloads.download_first([f"{server.url}/data.json", f"{closed_port_url()}/data.json"],
                                 tmp_path / "data.json")
    message = str(excinfo.value)
    assert (f"  {server.url}/data.json: certificate not verified (CERTIFICATE_VERIFY_FAILED: "
            "self-signed certificate)\n") in message
    assert "cannot connect" in message and "Install Certificates.command" in message


def test_the_finetuning_command_reports_it_in_one_line_with_exit_code_1(server, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in downloads.CA_BUNDLE_ENV_VARS}
    proc = subprocess.run(
        [sys.executable, "-m", "instructkit.finetune", "--test_mode", "--data",
         str(tmp_path / "data.json"), "--data-url", f"{server.url}/data.json",
         "--output-dir", str(tmp_path), "--tokenizer-dir", str(TOKENIZER_DIR)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: the certificate of 127.0.0.1 could not be verified ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("variable", downloads.CA_BUNDLE_ENV_VARS)
def test_the_bundle_the_environment_names_is_trusted(variable, server, self_signed, tmp_path,
                                                      monkeypatch):
    monkeypatch.setenv(variable, str(self_signed[0]))  # the certificate as its own CA
    data = load_instruction_file(tmp_path / "data.json", sources=[f"{server.url}/data.json"])
    assert data == DATA and (tmp_path / "data.json").read_bytes() == DATA_BYTES


def test_a_bundle_from_the_environment_replaces_certifi(server, self_signed, tmp_path, monkeypatch):
    """SSL_CERT_FILE names what to trust: a bundle that does not vouch for the server fails,
    and says which variable to fix, even where certifi would have trusted it."""
    certifi = pytest.importorskip("certifi")
    other, _ = make_self_signed(tmp_path)  # another self-signed certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    monkeypatch.setattr(certifi, "where", lambda: str(self_signed[0]))
    with pytest.raises(downloads.CertificateError) as excinfo:
        downloads.download_file(f"{server.url}/data.json", tmp_path / "data.json")
    message = str(excinfo.value)
    assert f"with the CA bundle that SSL_CERT_FILE names ({other})" in message
    assert "Point SSL_CERT_FILE at the CA bundle that signed it" in message


def test_a_missing_bundle_is_named(server, tmp_path, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "nowhere.pem"))
    with pytest.raises(BadInputError, match=r"^REQUESTS_CA_BUNDLE names '.*nowhere.pem', which is "
                                            r"not a readable file of PEM certificates"):
        downloads.download_file(f"{server.url}/data.json", tmp_path / "data.json")


def test_certifi_is_the_fallback_when_the_system_store_fails(server, self_signed, tmp_path,
                                                             monkeypatch):
    certifi = pytest.importorskip("certifi")
    monkeypatch.setattr(certifi, "where", lambda: str(self_signed[0]))  # certifi trusts it
    destination = downloads.download_file(f"{server.url}/data.json", tmp_path / "data.json")
    assert destination.read_bytes() == DATA_BYTES
    # one request reached the server: the handshake with the system's store failed before it
    assert server.paths() == ["/data.json"]
    with pytest.raises(urllib.error.URLError) as excinfo:  # (the system's store alone fails)
        urllib.request.urlopen(f"{server.url}/data.json", timeout=10, context=downloads.ssl_context())
    assert isinstance(excinfo.value.reason, ssl.SSLCertVerificationError)


def test_without_certifi_the_message_names_the_system_store_only(server, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "certifi", None)  # import certifi raises ImportError
    assert downloads.certifi_context() is None
    with pytest.raises(downloads.CertificateError) as excinfo:
        downloads.download_file(f"{server.url}/data.json", tmp_path / "data.json")
    assert_names_the_certificate(str(excinfo.value))
    assert "with this system's certificates. " in str(excinfo.value)


def test_an_https_judge_trusts_the_same_bundle(server, self_signed, monkeypatch):
    url = f"{server.url}/api/version"
    monkeypatch.setitem(sys.modules, "certifi", None)  # the system's store alone: it fails
    with pytest.raises(downloads.CertificateError) as excinfo:
        judge_http.open_url(url, timeout=10)
    assert_names_the_certificate(str(excinfo.value))
    monkeypatch.setenv("SSL_CERT_FILE", str(self_signed[0]))
    with judge_http.open_url(url, timeout=10) as response:
        assert json.loads(response.read()) == {"version": "0.0.0"}


def test_an_https_judge_falls_back_on_certifi(server, self_signed, monkeypatch):
    certifi = pytest.importorskip("certifi")
    monkeypatch.setattr(certifi, "where", lambda: str(self_signed[0]))  # certifi trusts it
    with judge_http.open_url(f"{server.url}/api/version", timeout=10) as response:
        assert json.loads(response.read()) == {"version": "0.0.0"}


def test_the_scoring_command_names_the_judges_certificate_in_one_line(server, tmp_path, capsys,
                                                                      monkeypatch):
    from instructkit import score

    monkeypatch.setitem(sys.modules, "certifi", None)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-certificate")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([{**DATA[0], "model_response": "Red."}]), encoding="utf-8")
    code = score.main(["--file-path", str(answers), "--api", "openai", "--base-url",
                       f"{server.url}/v1", "--model", "judge"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert_names_the_certificate(err.removeprefix("error: ").strip())
    assert "sk-test-certificate" not in err


def test_a_folder_of_hashed_certificates_is_trusted_too(server, self_signed, tmp_path, monkeypatch):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command names the certificate by its subject hash")
    subject_hash = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(self_signed[0])],
                                  capture_output=True, text=True, check=True).stdout.strip()
    folder = tmp_path / "certs"
    folder.mkdir()
    shutil.copyfile(self_signed[0], folder / f"{subject_hash}.0")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(folder))
    destination = downloads.download_file(f"{server.url}/data.json", tmp_path / "data.json")
    assert destination.read_bytes() == DATA_BYTES
