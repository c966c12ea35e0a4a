"""Live runtime settings: partial updates, revisions, presets, and the per-rank view."""

import pytest

from core.config import ConfigError
from core.settings import RuntimeSettings
from runtime.live_config import LiveConfig
from runtime.live_view import LiveView


def test_update_bumps_revision_and_keeps_other_values():
    live = LiveConfig(RuntimeSettings(), {})
    revision, settings = live.update({"strength": 0.2, "style": "ink"})
    assert revision == 2 and settings.strength == 0.2 and settings.style == "ink"
    assert settings.output_size == RuntimeSettings().output_size


@pytest.mark.parametrize("partial, match", [
    ({"strenght": 1}, r"config\.strenght: unknown key; allowed: .*strength"),
    ({"strength": 2}, r"config\.strength: must be within 0\.\.1, got 2"),
    ({"style": "sepia"}, r"config\.style: got 'sepia'; allowed: 'auto', 'neon'"),
    ({"output_size": "big"}, r"config\.output_size: expected an integer"),
    ([1, 2], r"config: expected an object of settings, got list"),
])
def test_bad_update_changes_nothing(partial, match):
    live = LiveConfig(RuntimeSettings(), {})
    with pytest.raises(ConfigError, match=match):
        live.update(partial)
    assert live.current() == (1, RuntimeSettings())


def test_presets_apply_and_unknown_names_are_rejected():
    live = LiveConfig(RuntimeSettings(), {"calm": {"style": "aurora", "strength": 0.3}})
    revision, settings = live.apply_preset("calm")
    assert revision == 2 and settings.style == "aurora"
    with pytest.raises(ConfigError, match=r"unknown preset 'loud'; allowed: calm"):
        live.apply_preset("loud")


def test_a_bad_preset_is_rejected_at_startup():
    with pytest.raises(ConfigError, match=r"presets\.broken\.strength: must be within 0\.\.1"):
        LiveConfig(RuntimeSettings(), {"broken": {"strength": 9}})


def test_view_adopts_only_newer_revisions_and_raises_the_flush_floor():
    view = LiveView(1, RuntimeSettings())
    assert view.set(3, RuntimeSettings(strength=0.1))
    assert not view.set(2, RuntimeSettings(strength=0.9))  # late, out-of-order update
    assert view.get().revision == 3 and view.get().settings.strength == 0.1
    assert view.flush_floor == 3


def test_an_update_that_changes_nothing_keeps_the_revision():
    live = LiveConfig(RuntimeSettings(), {})
    assert live.update({"strength": RuntimeSettings().strength})[0] == 1
    assert live.update({})[0] == 1
    assert live.update({"strength": 0.1})[0] == 2
