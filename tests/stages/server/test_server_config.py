"""``ServerConfig`` validation: defaults are sane, nonsense is refused with the field's name."""

from __future__ import annotations

import pytest

from core.config import ConfigError, build
from stages.server.config import ServerConfig


def test_defaults():
    config = ServerConfig()
    assert (config.host, config.port) == ("127.0.0.1", 8765)
    assert config.max_message_bytes == 4 << 20
    assert config.stats_interval_s <= 1.0
    assert config.max_frame_pixels <= config.max_frame_width * config.max_frame_height
    # One second of 16 kHz PCM16 per chunk, 100 chunks a second, 2 s ahead of real time.
    assert (config.max_audio_chunk_bytes, config.max_audio_chunks_per_s, config.audio_burst_s) == (32000, 100, 2.0)
    # Hardening: no token, no TLS, own origin only; limits a page never meets.
    assert (config.token, config.tls_cert, config.tls_key, config.allowed_origins) == (None, None, None, ())
    assert (config.handshake_timeout_s, config.slow_reader_close_s) == (10.0, 10.0)
    assert (config.max_messages_per_s, config.message_burst) == (200.0, 400)


def test_builds_from_a_yaml_mapping():
    config = build(ServerConfig, {"port": 0, "ping_interval_s": None, "max_sessions": 2}, "server")
    assert (config.port, config.ping_interval_s, config.max_sessions) == (0, None, 2)
    config = build(ServerConfig, {"allowed_origins": ["https://a.example", "http://b.example:8080"],
                                  "slow_reader_close_s": None, "token": "0123456789abcdef"}, "server")
    assert config.allowed_origins == ("https://a.example", "http://b.example:8080")
    assert (config.slow_reader_close_s, config.token) == (None, "0123456789abcdef")


@pytest.mark.parametrize("values, field", [
    ({"host": ""}, "host"),
    ({"port": 70000}, "port"),
    ({"port": -1}, "port"),
    ({"max_message_bytes": 100}, "max_message_bytes"),
    ({"max_queue": 0}, "max_queue"),
    ({"max_sessions": 0}, "max_sessions"),
    ({"max_frame_width": 8}, "max_frame_width"),
    ({"max_frame_pixels": 4096 * 4096}, "max_frame_pixels"),
    ({"stats_interval_s": 2.0}, "stats_interval_s"),
    ({"stats_interval_s": 0.0}, "stats_interval_s"),
    ({"session_out_queue": 0}, "session_out_queue"),
    ({"session_error_queue": 0}, "session_error_queue"),
    ({"ping_timeout_s": 0.0}, "ping_timeout_s"),
    ({"stop_timeout_s": 0.0}, "stop_timeout_s"),
    ({"max_audio_chunk_bytes": 641}, "max_audio_chunk_bytes"),
    ({"max_audio_chunk_bytes": 0}, "max_audio_chunk_bytes"),
    ({"max_audio_chunk_bytes": 4 << 20}, "max_audio_chunk_bytes"),     # bigger than a message may be
    ({"max_audio_chunks_per_s": 0}, "max_audio_chunks_per_s"),
    ({"audio_burst_s": 0.5}, "audio_burst_s"),                        # a 1 s chunk could never fit
    ({"audio_burst_s": 120.0}, "audio_burst_s"),
    ({"model_action_wait_s": 0.0}, "model_action_wait_s"),
    ({"model_action_wait_s": 10.0}, "model_action_wait_s"),            # past the handshake's own timeout
    ({"handshake_timeout_s": 2.0}, "model_action_wait_s"),             # 8 s of waiting no longer fits
    ({"handshake_timeout_s": 0.0}, "handshake_timeout_s"),
    ({"max_messages_per_s": 0.0}, "max_messages_per_s"),
    ({"message_burst": 0}, "message_burst"),
    ({"slow_reader_close_s": 0.0}, "slow_reader_close_s"),
    ({"allowed_origins": ("*",)}, "allowed_origins[0]"),
    ({"token": "too-short"}, "token"),
    ({"tls_cert": "/no/such/cert.pem", "tls_key": "/no/such/key.pem"}, "tls_cert"),
])
def test_refusals_name_the_field(values, field):
    with pytest.raises(ConfigError) as info:
        ServerConfig(**values)
    assert info.value.path == field


def test_unknown_key_via_build():
    with pytest.raises(ConfigError) as info:
        build(ServerConfig, {"prot": 1}, "server")
    assert str(info.value).startswith("server.prot: unknown key")
