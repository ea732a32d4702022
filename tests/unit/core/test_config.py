from __future__ import annotations

import pytest

from kvmha.manager.core.config import CONFIG_SPECS, ConfigError, CoreConfig


def test_defaults_round_trip_through_their_text() -> None:
    parsed = CoreConfig.from_mapping({spec.name: spec.default for spec in CONFIG_SPECS})
    assert parsed == CoreConfig()


def test_every_field_has_a_documented_name() -> None:
    named = {spec.field for spec in CONFIG_SPECS}
    assert named == set(CoreConfig.__dataclass_fields__)
    assert all(spec.description for spec in CONFIG_SPECS)


def test_fast_failover_defaults() -> None:
    config = CoreConfig()
    assert config.ping_timeout_s >= 3 * config.ping_interval_s  # one lost ping never starts an investigation
    assert config.ping_timeout_s + config.investigation_timeout_s < 15
    assert config.ha_workers == 5 and config.fence_max_silent_ratio == 0.5


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ping.interval", "soon", "ping.interval: 'soon' is not a number"),
        ("ping.interval", "-1", "greater than 0"),
        ("ping.timeout", "nan", "finite"),
        ("ha.workers", "2.5", "ha.workers: '2.5' is not a whole number"),
        ("ha.workers", "0", "at least 1"),
        ("fence.max.silent.ratio", "1.5", "at most 1"),
        ("guest.shutdown.restart", "maybe", "not a boolean"),
        ("no.such.key", "1", "unknown setting 'no.such.key'"),
        ("ping.timeout", "1", "must be longer than ping.interval"),
    ],
)
def test_bad_values_are_clear_errors(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        CoreConfig.from_mapping({name: value})


def test_values_apply_on_top_of_a_base() -> None:
    base = CoreConfig.from_mapping({"ha.workers": "9"})
    changed = CoreConfig.from_mapping({"guest.shutdown.restart": "yes", "isolation.margin": "0"}, base=base)
    assert (changed.ha_workers, changed.guest_shutdown_restart, changed.isolation_margin_s) == (9, True, 0.0)
