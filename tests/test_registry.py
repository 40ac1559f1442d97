"""The plugin manager and the one registry: hooks, sources, collisions, did-you-mean."""

import pytest

from qbench import __version__
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.plugins import BUILTIN_PLUGINS, get_plugin_manager
from qbench.quant.base import Quantizer, QuantizedModel
from qbench.registry import KIND_HOOKS, PluginContractError, build_registry, unknown_name_message


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


class NamelessQuantizer(EchoQuantizer):
    """A valid quantizer but for its empty name."""

    name = ""


class NamelessPlugin:
    @hookimpl
    def qbench_register_quantizers(self):
        return [NamelessQuantizer]


class BuiltinCollision:
    """Pretends to be a built-in plugin that reuses a built-in name: a qbench bug, not a user problem."""

    @hookimpl
    def qbench_register_quantizers(self):
        return [EchoQuantizer]


def test_builtins_register_every_kind_with_their_source():
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    for kind in KIND_HOOKS:
        assert registry.entries(kind), f"no built-in {kind}"
    minmax = registry.entry("quantizers", "minmax")
    assert minmax.source == "builtin:qbench_plugins.quantizers.minmax"
    assert (minmax.distribution, minmax.version, minmax.builtin) == ("qbench", __version__, True)
    assert registry.identity("quantizers", "minmax") == f"qbench=={__version__}"
    assert {entry.name for entry in registry.entries("quantizers")} >= {"fp32", "minmax"}
    assert registry.get("models", "toy-clip").name == "toy-clip"
    assert "toy-id" in registry.names("suites")


def test_plugin_manager_is_fresh_per_call():
    first, second = get_plugin_manager(load_entrypoints=False), get_plugin_manager(load_entrypoints=False)
    assert first is not second
    assert len(first.get_plugins()) == len(BUILTIN_PLUGINS)


def test_name_collision_warns_naming_both_sources_and_keeps_the_builtin(capsys):
    manager = get_plugin_manager(load_entrypoints=False, extra_plugins=(CollidingPlugin(),))
    registry = build_registry(manager)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("qbench: warning: ")
    assert "'minmax' is registered twice" in lines[0]
    assert "builtin:qbench_plugins.quantizers.minmax" in lines[0]
    assert "CollidingPlugin" in lines[0]
    kept = registry.entry("quantizers", "minmax")
    assert kept.builtin and kept.value is not EchoQuantizer


def test_name_collision_between_builtins_is_a_bug():
    manager = get_plugin_manager(load_entrypoints=False)
    manager.register(BuiltinCollision(), name="builtin:tests.collision")
    with pytest.raises(PluginContractError, match="'minmax' is registered twice"):
        build_registry(manager)


def test_nameless_object_is_skipped_with_a_warning(capsys):
    manager = get_plugin_manager(load_entrypoints=False, extra_plugins=(NamelessPlugin(),))
    registry = build_registry(manager)
    err = capsys.readouterr().err
    assert err.count("qbench: warning:") == 1 and "has no name" in err and "NamelessPlugin" in err
    assert "" not in registry.names("quantizers") and "minmax" in registry.names("quantizers")


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
