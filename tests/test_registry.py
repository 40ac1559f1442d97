"""The plugin manager and the one registry: hooks, sources, collisions, did-you-mean."""

from dataclasses import dataclass

import pytest

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.plugins import BUILTIN_PLUGINS, get_plugin_manager
from qbench.quant.base import Quantizer, QuantizedModel
from qbench.registry import KIND_HOOKS, build_registry, unknown_name_message


class EchoQuantizer(Quantizer):
    """A test quantizer: returns the model unchanged."""

    name = "minmax"  # deliberately collides with the built-in
    family = "ptq"
    citation = "test"
    summary = "test double"

    def quantize(self, model, bits, scope, calibration, seed):
        return QuantizedModel(model)


class CollidingPlugin:
    @hookimpl
    def qbench_register_quantizers(self):
        return [EchoQuantizer]


@dataclass(frozen=True)
class Nameless:
    name: str = ""


class NamelessPlugin:
    @hookimpl
    def qbench_register_suites(self):
        return [Nameless()]


def test_builtins_register_every_kind_with_their_source():
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    for kind in KIND_HOOKS:
        assert registry.entries(kind), f"no built-in {kind}"
    minmax = registry.entry("quantizers", "minmax")
    assert minmax.source == "builtin:qbench_plugins.quantizers.minmax"
    assert {entry.name for entry in registry.entries("quantizers")} >= {"fp32", "minmax"}
    assert registry.get("models", "toy-clip").name == "toy-clip"
    assert "toy-id" in registry.names("suites")


def test_plugin_manager_is_fresh_per_call():
    first, second = get_plugin_manager(load_entrypoints=False), get_plugin_manager(load_entrypoints=False)
    assert first is not second
    assert len(first.get_plugins()) == len(BUILTIN_PLUGINS)


def test_name_collision_names_both_sources():
    manager = get_plugin_manager(load_entrypoints=False, extra_plugins=(CollidingPlugin(),))
    with pytest.raises(QbenchError) as caught:
        build_registry(manager)
    message = str(caught.value)
    assert "'minmax' is registered twice" in message
    assert "builtin:qbench_plugins.quantizers.minmax" in message
    assert "CollidingPlugin" in message
    assert "\n" not in message


def test_nameless_object_is_rejected():
    manager = get_plugin_manager(load_entrypoints=False, extra_plugins=(NamelessPlugin(),))
    with pytest.raises(QbenchError, match="without a name"):
        build_registry(manager)


def test_unknown_name_suggests_close_matches_and_lists_available():
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    with pytest.raises(QbenchError) as caught:
        registry.get("quantizers", "minmx")
    message = str(caught.value)
    assert "unknown quantizer 'minmx'" in message
    assert "did you mean 'minmax'" in message
    assert "available: " in message and "fp32" in message


def test_unknown_name_without_close_match_has_no_suggestion():
    message = unknown_name_message("model", "zzz", ["toy-clip"], "qbench list models")
    assert "did you mean" not in message
    assert message == "unknown model 'zzz' (available: toy-clip; see 'qbench list models')"
