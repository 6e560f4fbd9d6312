"""The registries: what a user sees when a name is wrong, duplicated, or comes from a plugin."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dmclip import registry
from dmclip.cli.main import main
from dmclip.errors import DmclipError
from dmclip.registry import REGISTRIES, Registry

FIXTURE = Path(__file__).parent / "plugin_fixture"


@pytest.fixture
def restore_registries(monkeypatch):
    """Plugins loaded by a test are gone afterwards (other tests iterate over the registries)."""
    registry.load_plugins()
    saved = {kind: dict(reg._entries) for kind, reg in REGISTRIES.items()}
    yield
    for kind, reg in REGISTRIES.items():
        reg._entries.clear()
        reg._entries.update(saved[kind])
    registry._loaded, registry._failure = True, None
    for name in ("dmclip_test_plugin", "dmclip_broken_plugin"):
        sys.modules.pop(name, None)


def _toy() -> Registry:
    reg: Registry = Registry("students")
    for name in ("mamba-ti", "mamba-s", "mamba-b", "vit-s"):
        reg.add(name, lambda name=name, **kw: (name, kw), description=f"{name} model")
    return reg


def test_register_and_get_builds_with_kwargs():
    reg = _toy()

    @reg.register("vit-nano", tiny={"depth": 1})
    def vit_nano(depth: int = 4):
        """A small ViT.

        More text that is not the description."""
        return ("vit-nano", depth)

    assert reg.get("vit-nano", depth=2) == ("vit-nano", 2)
    assert reg.entry("vit-nano").description == "A small ViT."
    assert reg.entry("vit-nano").tiny == {"depth": 1}
    assert "vit-nano" in reg and len(reg) == 5


def test_duplicate_name_is_an_error_and_keeps_the_first():
    reg = _toy()
    with pytest.raises(DmclipError, match="'mamba-s' is registered twice") as info:
        reg.add("mamba-s", lambda: "impostor")
    assert "rename" in info.value.hint
    assert reg.get("mamba-s") == ("mamba-s", {})


@pytest.mark.parametrize("wrong, suggested", [("mamba-tii", "mamba-ti"), ("vit_s", "vit-s"), ("mamba-S", "mamba-s")])
def test_unknown_name_suggests_close_matches(wrong, suggested):
    with pytest.raises(DmclipError) as info:
        _toy().get(wrong)
    assert info.value.message == f"no student named {wrong!r}"
    assert repr(suggested) in info.value.hint and "dmclip list students" in info.value.hint


def test_unknown_name_without_close_match_lists_what_exists():
    with pytest.raises(DmclipError) as info:
        _toy().get("resnet50")
    assert "choose one of: mamba-b, mamba-s, mamba-ti, vit-s" in info.value.hint


def test_error_uses_singular_kind_names():
    with pytest.raises(DmclipError, match="no loss named 'klx'"):
        Registry("losses").get("klx")


def test_names_filters_with_a_glob_and_sorts():
    reg = _toy()
    assert reg.names("mamba*") == ["mamba-b", "mamba-s", "mamba-ti"]
    assert reg.names() == ["mamba-b", "mamba-s", "mamba-ti", "vit-s"]
    assert reg.names("nothing*") == []
    assert [e.name for e in reg.entries("vit*")] == ["vit-s"]


def test_the_six_registries_exist():
    assert sorted(REGISTRIES) == ["datasets", "families", "losses", "references", "selectors", "students"]


def test_entry_point_plugin_registers_entries(monkeypatch, restore_registries):
    monkeypatch.syspath_prepend(str(FIXTURE / "good"))
    registry.load_plugins(force=True)
    student = registry.students.entry("plugin-echo")
    assert student.source == "plugin echo"
    assert registry.students.get("plugin-echo", **student.tiny).in_features == 4
    assert registry.losses.entry("plugin-zero").source == "plugin zero"  # a function entry point, called


def test_plugin_shows_in_dmclip_list(monkeypatch, restore_registries, capsys):
    monkeypatch.syspath_prepend(str(FIXTURE / "good"))
    registry.load_plugins(force=True)
    assert main(["list", "students", "--pattern", "plugin-*"]) == 0
    out = capsys.readouterr().out
    assert "plugin-echo" in out and "plugin echo" in out and "A one-layer student" in out


def test_broken_plugin_is_a_one_line_error_naming_it(monkeypatch, restore_registries, capsys):
    monkeypatch.syspath_prepend(str(FIXTURE / "broken"))
    with pytest.raises(DmclipError) as info:
        registry.load_plugins(force=True)
    assert "plugin 'broken' (dmclip_broken_plugin) failed to load" in info.value.message
    assert "dmclip_dependency_that_is_not_installed" in info.value.message
    assert "pip uninstall dmclip-broken-plugin" in info.value.hint
    # the next lookup reports it again instead of silently missing the plugin's entries
    with pytest.raises(DmclipError, match="plugin 'broken'"):
        registry.students.names()
    assert main(["list", "students"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: plugin 'broken'") and err[1].startswith("hint: ")


def test_plugin_reusing_a_builtin_name_is_refused(monkeypatch, restore_registries):
    registry.students.add("plugin-echo", lambda: None, description="a built-in that came first")
    monkeypatch.syspath_prepend(str(FIXTURE / "good"))
    with pytest.raises(DmclipError, match="'plugin-echo' is registered twice .*dmclip and plugin echo"):
        registry.load_plugins(force=True)
    assert registry.students._entries["plugin-echo"].description == "a built-in that came first"


# ----------------------------------------------------------------------------------------- reference schemes

BUILTIN_SCHEMES = ["builtin", "ensemble", "open_clip", "run", "store"]


def test_reference_schemes_are_registry_entries_listed_with_their_form(capsys):
    assert set(BUILTIN_SCHEMES) <= set(registry.references.names())
    for name in registry.references.names():
        assert registry.references.entry(name).description.startswith(f"{name}:"), name  # says how to write it
    assert main(["list", "references"]) == 0
    out = capsys.readouterr().out
    assert "(none)" not in out and all(name in out for name in BUILTIN_SCHEMES)


def test_the_old_registry_name_still_lists_and_imports_with_a_warning(capsys, caplog):
    assert main(["list", "teachers"]) == 0
    captured = capsys.readouterr()  # the CLI logs through its own console (stderr), not to the root logger
    assert "references" in captured.out and "`dmclip list teachers` is now `dmclip list references`" in captured.err
    from dmclip.registry import teachers

    assert teachers is registry.references and "dmclip.registry.teachers is now dmclip.registry.references" in caplog.text


def test_plugin_teacher_scheme_resolves_like_a_builtin_one(monkeypatch, restore_registries, capsys):
    import torch

    from dmclip.models.refs import load_model_ref
    from dmclip.models.teachers import load_teacher

    monkeypatch.syspath_prepend(str(FIXTURE / "good"))
    registry.load_plugins(force=True)
    assert registry.references.entry("plugin-tiny").source == "plugin echo"
    model, teacher, other = load_model_ref("plugin-tiny:3"), load_teacher("plugin-tiny:3"), load_model_ref("plugin-tiny:4")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # the seed after the colon reached the plugin's factory
        assert torch.equal(model.encode_image(images), teacher.encode_image(images))
        assert not torch.equal(model.encode_image(images), other.encode_image(images))
    assert not model.training and not any(p.requires_grad for p in teacher.parameters())
    assert main(["list", "references", "--pattern", "plugin-*"]) == 0
    out = capsys.readouterr().out
    assert "plugin-tiny" in out and "plugin echo" in out


def test_misspelt_scheme_suggests_the_registered_one():
    from dmclip.models.refs import load_model_ref

    with pytest.raises(DmclipError) as info:
        load_model_ref("opn_clip:ViT-B-32:random")
    assert info.value.message == "no model 'opn_clip:ViT-B-32:random': 'opn_clip' is not a reference scheme"
    assert "'open_clip'" in info.value.hint and "dmclip list references" in info.value.hint


def test_the_old_store_scheme_still_reads_with_a_warning(tmp_path, caplog):
    from dmclip.models.teachers import load_teacher

    with pytest.raises(DmclipError) as info:
        load_teacher(f"embeddings:{tmp_path}")
    assert info.value.message == f"{tmp_path} is not a reinforced store (no meta.json)"  # read as store:<dir>
    assert "the scheme embeddings: is now store:" in caplog.text


def test_a_distill_only_scheme_is_a_teacher_but_not_a_model():
    from dmclip.models.refs import load_model_ref
    from dmclip.models.teachers import EnsembleTeacher, load_teacher

    ref = "ensemble:builtin:world-vit+builtin:world-vit"
    with pytest.raises(DmclipError) as info:
        load_model_ref(ref)
    assert info.value.message == f"{ref!r} is an ensemble of teachers, not a model"
    assert "dmclip distill --teacher ensemble:" in info.value.hint
    teacher = load_teacher(ref)
    assert isinstance(teacher, EnsembleTeacher) and teacher.refs == ["builtin:world-vit", "builtin:world-vit"]
