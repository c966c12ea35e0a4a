"""HTTPS and WSS on the server's one port, from a self-signed certificate made here, and
the config and launcher checks that catch an unusable certificate before a browser does."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from echo_hooks import EchoHooks
from mm_client import Client
from websockets.exceptions import InvalidMessage
from websockets.sync.client import connect

from core.config import ConfigError, build
from stages.server.config import ServerConfig
from stages.server.ws_server import WebServer

REPO = Path(__file__).resolve().parents[3]


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM): with ``cryptography``
    when it is installed, else the ``openssl`` command; skips the test with neither."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is here")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=30)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(pem):
    hooks = EchoHooks()
    cert, key = pem
    server = WebServer(ServerConfig(port=0, tls_cert=str(cert), tls_key=str(key), stop_timeout_s=3.0), hooks)
    hooks.sink = server
    server.start()
    yield server
    server.stop()
    hooks.close()


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def test_https_and_wss_on_one_port(tls_server, pem):
    cert, _ = pem
    assert tls_server.url == f"https://127.0.0.1:{tls_server.port}/"
    with urllib.request.urlopen(tls_server.url + "health", context=trusting(cert), timeout=5) as response:
        assert response.status == 200 and json.loads(response.read())["ok"] is True
    with urllib.request.urlopen(tls_server.url, context=trusting(cert), timeout=5) as response:
        assert b"<script" in response.read()
    url = tls_server.url.replace("https://", "wss://") + "ws"
    with connect(url, ssl=trusting(cert), compression=None, open_timeout=5, close_timeout=1) as ws:
        client = Client(ws)
        assert client.text("config.current")["revision"] == 1
        client.roundtrip(1)


def test_an_untrusted_or_plain_client_is_refused_and_the_server_stays_up(tls_server, pem):
    cert, _ = pem
    url = tls_server.url.replace("https://", "wss://") + "ws"
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(url, ssl=ssl.create_default_context(), open_timeout=5)
    with pytest.raises(InvalidMessage):  # plain ws to a TLS port: no HTTP answer at all
        connect(tls_server.url.replace("https://", "ws://") + "ws", open_timeout=2)
    with connect(url, ssl=trusting(cert), compression=None, open_timeout=5, close_timeout=1) as ws:
        Client(ws).roundtrip(2)


def test_both_files_are_checked_when_the_config_loads(pem, tmp_path):
    cert, key = pem
    assert ServerConfig(tls_cert=str(cert), tls_key=str(key)).tls
    assert not ServerConfig().tls
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = [
        ({"tls_cert": str(cert)}, "tls_key", "set both or neither"),
        ({"tls_key": str(key)}, "tls_cert", "set both or neither"),
        ({"tls_cert": str(tmp_path / "missing.pem"), "tls_key": str(key)}, "tls_cert", "no certificate file"),
        ({"tls_cert": str(cert), "tls_key": str(tmp_path / "missing.pem")}, "tls_key", "no key file"),
        ({"tls_cert": str(garbage), "tls_key": str(key)}, "tls_cert", "not a PEM certificate and its key"),
        ({"tls_cert": str(key), "tls_key": str(cert)}, "tls_cert", "not a PEM certificate and its key"),
    ]
    for values, field, words in cases:
        with pytest.raises(ConfigError) as info:
            build(ServerConfig, values, "server")
        assert info.value.path == f"server.{field}", values
        assert words in info.value.reason, info.value.reason


def test_an_encrypted_key_is_refused_not_prompted_for(pem, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to encrypt a key")
    cert, key = pem
    locked = tmp_path / "locked.pem"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-out", str(locked), "-aes256", "-passout", "pass:pw"],
                   check=True, capture_output=True, timeout=30)
    with pytest.raises(ConfigError) as info:
        ServerConfig(tls_cert=str(cert), tls_key=str(locked))
    assert "encrypted" in info.value.reason


def run_mirror(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "mirror.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_launcher_flags_set_the_files_and_fail_clearly(pem, tmp_path):
    cert, key = pem
    result = run_mirror("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(key), "--dry-run")
    assert result.returncode == 2
    assert "server.tls_cert: no certificate file" in result.stderr + result.stdout
    result = run_mirror("--tls-cert", str(cert), "--tls-key", str(key), "--dry-run")
    assert result.returncode == 0, result.stderr
