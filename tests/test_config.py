"""Configs: recipes, --set overrides, shortcuts, and the error a user gets for every kind of mistake."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmclip.config import (
    config_hash,
    describe,
    field,
    from_dict,
    load_config,
    parse_override,
    save_config,
    set_path,
    to_dict,
    to_yaml,
)
from dmclip.errors import DmclipError
from dmclip.recipe import parse_yaml


@dataclass
class OptimConfig:
    lr: float = field(5e-4, "peak learning rate", min=0.0)
    warmup_steps: int = field(10, "linear warm-up length, steps", min=0)
    betas: tuple[float, float] = field((0.9, 0.98), "AdamW betas")


@dataclass
class LossConfig:
    alpha: float = field(0.5, "weight of KD vs contrastive", min=0.0, max=1.0)
    kind: str = field("kl", "distillation loss", choices=["kl", "mse", "cosine"])


@dataclass
class SampleConfig:
    name: str = field("demo", "run name")
    seed: int = field(0, "random seed")
    precision: Literal["fp32", "bf16"] = field("fp32", "autocast dtype")
    image_sizes: list[int] = field([32, 64], "image sides, pixels")
    teacher: str | None = field(None, "model reference")
    cache_dir: Path = field(Path("cache"), "where data is cached")
    weights: dict[str, float] = field({"itc": 1.0}, "loss weights by part")
    shuffle: bool = field(True, "shuffle each epoch")
    optim: OptimConfig = field(OptimConfig(), "optimizer")
    loss: LossConfig = field(LossConfig(), "loss")


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(fn, *args, **kwargs) -> DmclipError:
    with pytest.raises(DmclipError) as info:
        fn(*args, **kwargs)
    assert info.value.hint, "every config error says how to fix it"
    return info.value


# -------------------------------------------------------------------------------- happy paths


def test_recipe_then_set_then_shortcut_in_that_order(tmp_path):
    recipe = _recipe(tmp_path, "seed: 3\noptim:\n  lr: 1.0e-3\nloss:\n  alpha: 0.1\n")
    cfg, text = load_config(SampleConfig, recipe, sets=["loss.alpha=0.2", "optim.lr=1e-2"],
                            shortcuts={"loss.alpha": 0.75, "seed": None})
    assert text.startswith("seed: 3")
    assert cfg.seed == 3  # a shortcut left at None does not override
    assert cfg.optim.lr == 0.01  # "1e-2" is a string to YAML 1.1; the float field still reads it
    assert cfg.loss.alpha == 0.75  # shortcut beats --set beats recipe
    assert cfg.optim.warmup_steps == 10 and cfg.loss.kind == "kl"


def test_values_are_converted_to_the_field_types(tmp_path):
    cfg, _ = load_config(SampleConfig, None, sets=["image_sizes=16", "cache_dir=/tmp/x", "optim.betas=[0.8, 0.9]",
                                                   "weights={itc: 1, lm: 2}", "teacher=open_clip:ViT-B-32"])
    assert cfg.image_sizes == [16]  # one value where a list is expected
    assert cfg.cache_dir == Path("/tmp/x")
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.weights == {"itc": 1.0, "lm": 2.0} and isinstance(cfg.weights["lm"], float)
    assert cfg.teacher == "open_clip:ViT-B-32"
    assert load_config(SampleConfig, None, sets=["name=123"])[0].name == "123"  # a number where text is expected


def test_tuples_lists_and_mappings_convert_each_item():
    @dataclass
    class Tuples:
        sizes: tuple[int, ...] = field((8,), "image sides")
        anything: tuple = field((), "any items")
        betas: tuple[float, float] = field((0.9, 0.98), "AdamW betas")
        items: list = field([], "any items")
        weights: dict[str, float] = field({}, "by name")
        raw: dict = field({}, "anything by name")

    cfg = from_dict(Tuples, {"sizes": [1, 2.0, 3], "anything": [1, "a"], "betas": [1, 0], "items": [1, "a"],
                             "weights": {1: 2}, "raw": {"a": [1]}})
    assert cfg == Tuples(sizes=(1, 2, 3), anything=(1, "a"), betas=(1.0, 0.0), items=[1, "a"], weights={"1": 2.0},
                         raw={"a": [1]})
    assert [type(v) for v in cfg.sizes + cfg.betas] == [int, int, int, float, float]
    assert _error(from_dict, Tuples, {"sizes": [1, "x"]}).message == "sizes[1] = 'x' has the wrong type: expected int"


def test_empty_recipe_gives_defaults(tmp_path):
    cfg, _ = load_config(SampleConfig, _recipe(tmp_path, "# nothing yet\n"))
    assert cfg == SampleConfig()


def test_resolved_yaml_with_command_line_loads(tmp_path):
    cfg = SampleConfig(seed=7)
    path = tmp_path / "resolved.yaml"
    path.write_text("command: distill\n" + to_yaml(cfg))
    assert load_config(SampleConfig, path)[0] == cfg


def test_field_records_help_range_and_choices_and_gives_each_config_its_own_defaults():
    @dataclass
    class Local:
        sizes: list[int] = field([1, 2], "image sides", min=1)
        mode: str = field("a", "a mode", choices=["a", "b"])
        optim: OptimConfig = field(OptimConfig(lr=0.1), "optimizer")
        extra: dict = field(factory=lambda: {"x": 1}, help="anything")
        share: float = field(0.5, min=0.0, max=1.0)
        sample: SampleConfig = field(SampleConfig(seed=3), "a section holding a list")

    one, two = Local(), Local()
    one.sample.image_sizes.append(128)
    assert two.sample == SampleConfig(seed=3)
    one.sizes.append(3)
    one.optim.betas = (0.1, 0.2)
    one.extra["y"] = 2
    assert (two.sizes, two.optim, two.extra) == ([1, 2], OptimConfig(lr=0.1), {"x": 1})
    meta = {f.name: dict(f.metadata) for f in dataclasses.fields(Local)}
    assert meta["sizes"] == {"help": "image sides", "min": 1, "max": None, "choices": None}
    assert meta["share"] == {"help": "", "min": 0.0, "max": 1.0, "choices": None}
    assert (meta["mode"]["choices"], meta["extra"]["help"]) == (("a", "b"), "anything")
    assert _error(from_dict, Local, {"mode": "c"}).message == "mode = 'c' is not allowed"


def test_config_hash_names_the_config():
    assert config_hash(SampleConfig()) == config_hash(SampleConfig())
    assert config_hash(SampleConfig()) != config_hash(SampleConfig(seed=1))
    assert len(config_hash(SampleConfig())) == 6


def test_describe_lists_every_leaf_with_help():
    rows = {key: (tp, default, help_) for key, tp, default, help_ in describe(SampleConfig)}
    assert rows["optim.lr"] == ("float", "0.0005", "peak learning rate")
    assert rows["loss.kind"][2] == "distillation loss"
    assert "optim" not in rows and len(rows) == 13
    # the types and defaults as `--help` and the config reference show them
    assert rows["precision"][:2] == ("'fp32' | 'bf16'", "'fp32'")
    assert rows["teacher"][:2] == ("str | null", "None")
    assert rows["image_sizes"][:2] == ("list of int", "[32, 64]")
    assert rows["optim.betas"][:2] == ("list of float", "(0.9, 0.98)")
    assert rows["weights"][:2] == ("dict", "{'itc': 1.0}")

    @dataclass
    class Plain:
        data_dir: str = dataclasses.field(metadata={"help": "where the data is"})  # required: no default
        count: int = dataclasses.field(default=1)
        anything: list = dataclasses.field(default_factory=list)

    assert describe(Plain) == [("data_dir", "str", "''", "where the data is"), ("count", "int", "1", ""),
                               ("anything", "list", "[]", "")]


# -------------------------------------------------------------------------------- round trip


def test_save_load_round_trip(tmp_path):
    cfg = SampleConfig(name="a: tricky 'name'", teacher="yes", cache_dir=Path("/data/x y"),
                       optim=OptimConfig(lr=1e-10, betas=(0.5, 0.999)), weights={"on": 1e20})
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(SampleConfig, tmp_path / "resolved.yaml")[0] == cfg


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x85\u2028\u2029"), max_size=20)
_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def sample_configs(draw):
    return SampleConfig(
        name=draw(_text), seed=draw(st.integers(-(2**63), 2**63)),
        precision=draw(st.sampled_from(["fp32", "bf16"])),
        image_sizes=draw(st.lists(st.integers(0, 4096), max_size=4)),
        teacher=draw(st.none() | _text), cache_dir=Path(draw(st.sampled_from(["cache", "/abs/p", "a b/c"]))),
        weights=draw(st.dictionaries(_text, _finite, max_size=3)), shuffle=draw(st.booleans()),
        optim=OptimConfig(lr=draw(st.floats(0, 10)), warmup_steps=draw(st.integers(0, 10**6)),
                          betas=(draw(_finite), draw(_finite))),
        loss=LossConfig(alpha=draw(st.floats(0, 1)), kind=draw(st.sampled_from(["kl", "mse", "cosine"]))),
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample_configs())
def test_round_trip_property(tmp_path, cfg):
    """Whatever the resolved config holds, resolved.yaml gives back the same config (and hash)."""
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    loaded = load_config(SampleConfig, path)[0]
    assert loaded == cfg
    assert config_hash(loaded) == config_hash(cfg)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_either_parses_or_is_a_dmclip_error(text):
    try:
        data = parse_yaml(text)
    except DmclipError:
        return
    try:
        from_dict(SampleConfig, data)
    except DmclipError:
        pass


# ------------------------------------------------------------------------------------ errors


def test_unknown_key_names_full_path_and_closest_key(tmp_path):
    err = _error(load_config, SampleConfig, _recipe(tmp_path, "optim:\n  lr: 1.0\n  warmup_step: 3\n"))
    assert err.message == "unknown config key 'optim.warmup_step'"
    assert err.hint == "did you mean optim.warmup_steps?"
    err = _error(load_config, SampleConfig, _recipe(tmp_path, "sede: 3\n"))
    assert (err.message, err.hint) == ("unknown config key 'sede'", "did you mean seed?")
    err = _error(from_dict, SampleConfig, {"optim": {"lrate": 1.0}})  # a looser typo still finds its key
    assert err.hint == "did you mean optim.lr?"


def test_unknown_key_without_close_match_lists_valid_keys():
    err = _error(from_dict, SampleConfig, {"loss": {"zzz": 1}})
    assert err.message == "unknown config key 'loss.zzz'"
    assert err.hint == "valid keys here: loss.alpha, loss.kind"
    err = _error(from_dict, LossConfig, {"zzz": 1})
    assert (err.message, err.hint) == ("unknown config key 'zzz'", "valid keys here: alpha, kind")


@pytest.mark.parametrize("key, value, message", [
    ("seed", "three", "seed = 'three' has the wrong type: expected int"),
    ("seed", 2.5, "seed = 2.5 has the wrong type: expected int"),
    ("shuffle", "maybe", "shuffle = 'maybe' has the wrong type: expected bool"),
    ("optim.lr", [1, 2], "optim.lr = [1, 2] has the wrong type: expected float"),
    ("optim", 3, "optim = 3 has the wrong type: expected mapping"),
    ("image_sizes", ["a"], "image_sizes[0] = 'a' has the wrong type: expected int"),
    ("optim.betas", [0.9], "optim.betas = [0.9] has 1 items, expected 2"),
    # YAML reads yes/no/true/false as booleans: a boolean is never taken for a number, a list or a name
    ("optim.lr", True, "optim.lr = True has the wrong type: expected float"),
    ("seed", False, "seed = False has the wrong type: expected int"),
    ("image_sizes", True, "image_sizes = True has the wrong type: expected list of int"),
    ("name", True, "name = True has the wrong type: expected str"),
    ("teacher", [1], "teacher = [1] has the wrong type: expected str | null"),
    ("teacher", {"a": 1}, "teacher = {'a': 1} has the wrong type: expected str | null"),
    ("optim.betas", 0.9, "optim.betas = 0.9 has the wrong type: expected list of float"),
    ("optim.betas", [0.9, "x"], "optim.betas[1] = 'x' has the wrong type: expected float"),
    ("weights", 3, "weights = 3 has the wrong type: expected dict"),
    ("weights", {True: 1}, "weights = True has the wrong type: expected str"),  # YAML's `yes:` key
    ("weights", {"lm": "x"}, "weights.lm = 'x' has the wrong type: expected float"),
    ("cache_dir", 3, "cache_dir = 3 has the wrong type: expected Path"),
])
def test_wrong_type_names_key_value_and_type(key, value, message):
    data: dict = {}
    set_path(data, key, value, SampleConfig)
    assert _error(from_dict, SampleConfig, data).message == message


def test_a_fraction_for_a_whole_number_field_is_refused_not_truncated(tmp_path, capsys):
    """`--set train.steps=2.5` would otherwise train 2 steps without a word: it is a one-line error naming the
    key and the fix, and no run directory is made. A whole number written as a float (3.0) is that number."""
    from dmclip.cli.main import main

    assert main(["pretrain", "--set", "train.steps=2.5", "--runs-dir", str(tmp_path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["error: train.steps = 2.5 has the wrong type: expected int",
                     "hint: set train.steps to a value of type int"]
    assert not any(tmp_path.iterdir())
    cfg, _ = load_config(SampleConfig, None, sets=["seed=3.0", "image_sizes=[16.0, 32]"])
    assert (cfg.seed, cfg.image_sizes) == (3, [16, 32]) and type(cfg.seed) is int
    err = _error(load_config, SampleConfig, None, sets=["image_sizes=[16, 32.5]"])
    assert err.message == "image_sizes[1] = 32.5 has the wrong type: expected int"


@dataclass
class BoundedConfig:
    fraction: float = field(0.5, "a share", min=0.0, max=1.0)
    ceiling: int = field(4, "at most this many", max=10)
    sizes: list[int] = field([8], "each at least 1", min=1)
    limits: list[float | None] = field([None], "null = no limit", min=0.0)
    top: float = field(1.0, "at most 2", max=2.0)


def test_range_bounds_are_inclusive_and_every_item_of_a_list_is_checked():
    cfg = from_dict(BoundedConfig, {"fraction": 0.0, "ceiling": 10, "sizes": [1, 5]})
    assert (cfg.fraction, cfg.ceiling, cfg.sizes) == (0.0, 10, [1, 5])
    assert from_dict(BoundedConfig, {"fraction": 1.0}).fraction == 1.0
    err = _error(from_dict, BoundedConfig, {"ceiling": 11})
    assert (err.message, err.hint) == ("ceiling = 11 is out of range", "ceiling must be <= 10")
    err = _error(from_dict, BoundedConfig, {"sizes": [4, 0]})
    assert (err.message, err.hint) == ("sizes = 0 is out of range", "sizes must be >= 1")
    assert _error(from_dict, BoundedConfig, {"limits": [None, -1.0]}).message == "limits = -1.0 is out of range"
    assert _error(from_dict, BoundedConfig, {"top": float("nan")}).message == "top = nan is not a number"


@pytest.mark.parametrize("setting, message, hint", [
    ("loss.alpha=1.5", "loss.alpha = 1.5 is out of range", "loss.alpha must be between 0.0 and 1.0"),
    ("optim.lr=-1", "optim.lr = -1.0 is out of range", "optim.lr must be >= 0.0"),
    ("optim.lr=.nan", "optim.lr = nan is not a number", "set optim.lr to a number"),
    ("loss.kind=msee", "loss.kind = 'msee' is not allowed", "use one of kl, mse, cosine (did you mean 'mse'?)"),
    ("precision=fp31", "precision = 'fp31' is not allowed", "use one of 'fp32', 'bf16' (did you mean 'fp32'?)"),
])
def test_out_of_range_and_bad_choice(setting, message, hint):
    err = _error(load_config, SampleConfig, None, sets=[setting])
    assert (err.message, err.hint) == (message, hint)


@pytest.mark.parametrize("text, message, hint", [
    ("seed: 1\noptim:\n  lr: [1, 2\n", "recipe recipe.yaml is not valid YAML at line 4, column 1",
     "check the YAML syntax"),
    ("optim:\n\tlr: 1.0\n", "recipe recipe.yaml is not valid YAML at line 2, column 1", "indent with spaces, not tabs"),
    ("seed: 1\nname: a\nseed: 2\n", "recipe recipe.yaml: duplicated key 'seed' at line 3, column 1 (first at line 1)",
     "keep one of the two entries"),
    ("name: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
     "recipe recipe.yaml: refused tag !!python/object/apply:os.system at line 1, column 7", "recipes are plain data"),
    ("a: &x [*x]\n", "recipe recipe.yaml refers to itself through a YAML anchor/alias", "replace the recursive"),
    ("? [a, b]\n: 1\n", "recipe recipe.yaml: a key at line 1, column 3 is a list, not a plain name", "write keys as plain words"),
    ("- seed: 1\n", "recipe recipe.yaml must be a mapping of keys to values, not a list", "write it as `key: value`"),
    ("just a string\n", "recipe recipe.yaml must be a mapping of keys to values, not a str", "write it as `key: value`"),
])
def test_recipe_errors(tmp_path, text, message, hint):
    err = _error(load_config, SampleConfig, _recipe(tmp_path, text))
    assert err.message.startswith(message), err.message
    assert err.hint.startswith(hint), err.hint


def test_code_tags_never_run(tmp_path):
    marker = tmp_path / "pwned"
    _error(load_config, SampleConfig, _recipe(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\n"))
    assert not marker.exists()


def test_missing_directory_and_non_utf8_recipes(tmp_path):
    assert "does not exist" in _error(load_config, SampleConfig, tmp_path / "nope.yaml").message
    assert "is a directory" in _error(load_config, SampleConfig, tmp_path).message
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text" in _error(load_config, SampleConfig, bad).message


@pytest.mark.parametrize("setting, message, hint", [
    ("optim.lr", "--set 'optim.lr' has no '='", "write it as --set key.path=value, e.g. --set train.lr=1e-3"),
    ("=3", "--set '=3' has no key", "write it as --set key.path=value"),
    ("optim..lr=3", "--set optim..lr: 'optim..lr' is not a key path", "write it as a.b.c=value"),
    ("optim.lrr=1", "--set optim.lrr: unknown config key 'optim.lrr'", "did you mean optim.lr?"),
    ("optimizer.lr=1", "--set optimizer.lr: unknown config key 'optimizer'", "did you mean optim?"),
    ("optim.lr.max=1", "--set optim.lr.max: optim.lr is a float value, not a section", "set optim.lr itself"),
    ("optim.lrate=1", "--set optim.lrate: unknown config key 'optim.lrate'", "did you mean optim.lr?"),
    ("optim.zzz=1", "--set optim.zzz: unknown config key 'optim.zzz'",
     "valid keys here: optim.lr, optim.warmup_steps, optim.betas"),
    ("zzz=1", "--set zzz: unknown config key 'zzz'", "valid keys here: name, seed, precision,"),
    ("seed=[1, 2", "--set seed is not valid YAML at line 1, column 6", "check the YAML syntax"),
])
def test_set_errors(setting, message, hint):
    err = _error(load_config, SampleConfig, None, sets=[setting])
    assert err.message.startswith(message), err.message
    assert err.hint.startswith(hint), err.hint


def test_parse_override_reads_values_as_yaml():
    assert parse_override("optim.lr=1e-3") == ("optim.lr", "1e-3")  # YAML 1.1; the float field converts it
    assert parse_override("image_sizes=[1, 2]") == ("image_sizes", [1, 2])
    assert parse_override("teacher=open_clip:ViT-B-32=x") == ("teacher", "open_clip:ViT-B-32=x")
    assert parse_override("teacher=null") == ("teacher", None)
    assert parse_override("name=") == ("name", "")
    assert parse_override('name=" padded "') == ("name", "padded")


@dataclass
class OptionalSectionConfig:
    optim: OptimConfig | None = field(None, "optimizer, when there is one")


def test_set_names_the_full_path_of_a_deep_key_and_sets_one_entry_of_a_mapping():
    from dmclip.capfilt.config import CapfiltConfig

    err = _error(load_config, CapfiltConfig, None, sets=["finetune.train.stepz=3"])
    assert (err.message, err.hint) == ("--set finetune.train.stepz: unknown config key 'finetune.train.stepz'",
                                       "did you mean finetune.train.steps?")
    assert load_config(SampleConfig, None, sets=["weights.lm=2"])[0].weights == {"lm": 2.0}


def test_set_reaches_into_an_optional_section_and_checks_its_keys():
    cfg, _ = load_config(OptionalSectionConfig, None, sets=["optim.lr=0.1"])
    assert cfg.optim == OptimConfig(lr=0.1)
    assert load_config(OptionalSectionConfig, None)[0].optim is None
    err = _error(load_config, OptionalSectionConfig, None, sets=["optim.lrr=0.1"])
    assert (err.message, err.hint) == ("--set optim.lrr: unknown config key 'optim.lrr'", "did you mean optim.lr?")
    err = _error(from_dict, OptionalSectionConfig, {"optim": {"lrr": 0.1}})  # a recipe: the same key named
    assert (err.message, err.hint) == ("unknown config key 'optim.lrr'", "did you mean optim.lr?")


def test_recipe_blocks_a_command_reads_itself_are_left_out_and_the_recipe_text_is_returned(tmp_path):
    @dataclass
    class Swept:
        RECIPE_BLOCKS: ClassVar[tuple[str, ...]] = ("sweep",)
        seed: int = field(0, "random seed")

    text = "seed: 2\nsweep:\n  alpha: [0, 1]\n"
    assert load_config(Swept, _recipe(tmp_path, text)) == (Swept(seed=2), text)
    assert load_config(Swept, None) == (Swept(), "")
    assert "unknown config key 'sweep'" in _error(load_config, SampleConfig, _recipe(tmp_path, text)).message


@dataclass
class NeedsConfig:
    data_dir: str = dataclasses.field(metadata={"help": "where the data is"})


@dataclass
class OuterConfig:
    needs: NeedsConfig


def test_required_field_without_default_is_named():
    err = _error(from_dict, NeedsConfig, {})
    assert err.message == "config key 'data_dir' is required and has no default"
    err = _error(from_dict, OuterConfig, {"needs": {}})
    assert (err.message, err.hint) == ("config key 'needs.data_dir' is required and has no default",
                                       "set it in the recipe or with --set needs.data_dir=...")


def test_resolved_yaml_reads_in_field_order_as_block_lists_and_keeps_unicode():
    text = to_yaml(SampleConfig(name="café"))
    assert text.startswith("name: café\nseed: 0\nprecision: fp32\nimage_sizes:\n- 32\n- 64\n"), text


def test_to_dict_is_plain_data():
    data = to_dict(SampleConfig())
    assert data["optim"]["betas"] == [0.9, 0.98] and data["cache_dir"] == "cache"


# ------------------------------------------------------------------------------------ sections


def test_a_section_set_in_part_keeps_its_fields_own_defaults(tmp_path):
    """capfilt's finetune.train defaults to TrainConfig(steps=100, batch_size=32, lr=1e-4, ...): a recipe, --set
    or shortcut that changes one key of it (--steps, --report-to) must keep the others, not TrainConfig()'s."""
    from dmclip.capfilt.config import CapfiltConfig

    default = CapfiltConfig().finetune.train
    cfg, _ = load_config(CapfiltConfig, _recipe(tmp_path, "finetune:\n  train:\n    lr: 3.0e-4\n"),
                         ["finetune.train.log_every=1"], {"finetune.train.steps": 7})
    train = cfg.finetune.train
    assert (train.lr, train.log_every, train.steps) == (3e-4, 1, 7)
    assert (train.batch_size, train.warmup_steps, train.checkpoint_every) == (default.batch_size, default.warmup_steps,
                                                                              default.checkpoint_every) == (32, 10, 50)


# ------------------------------------------------------------------------------------ the sets scored after training


@pytest.mark.parametrize("given, zeroshot", [
    ("eval.zeroshot=[imagefolder:zs,imagefolder:zs2]", ["imagefolder:zs", "imagefolder:zs2"]),
    ("eval.zeroshot=world-zeroshot:size=200,seed=1", ["world-zeroshot:size=200,seed=1"]),  # one spec, commas and all
    ('eval.zeroshot=["world-zeroshot:size=200,seed=1", world-shift]', ["world-zeroshot:size=200,seed=1", "world-shift"]),
])
def test_eval_sets_are_lists_and_a_plain_string_is_one(given, zeroshot):
    from dmclip.distill import DistillConfig

    cfg, _ = load_config(DistillConfig, None, [given])
    assert cfg.eval.zeroshot == zeroshot and cfg.eval.named and cfg.eval.run_sets() == (zeroshot, [])


def test_no_set_named_scores_the_worlds_and_the_old_empty_string_scores_nothing(tmp_path, caplog):
    from dmclip.distill import DistillConfig

    default, _ = load_config(DistillConfig)
    assert not default.eval.named and default.eval.run_sets() == (["world-zeroshot"], []) and default.eval.each_run
    old, _ = load_config(DistillConfig, _recipe(tmp_path, "eval:\n  zeroshot: ''\n"))
    assert (old.eval.zeroshot, old.eval.each_run) == ([], False)
    assert "eval.zeroshot: '' is read as eval.each_run: false" in caplog.text


def test_a_spec_cut_at_its_comma_is_refused_with_the_quoting_that_keeps_it():
    from dmclip.distill import DistillConfig

    err = _error(load_config, DistillConfig, None, ["eval.zeroshot=[world-zeroshot:size=200,seed=1]"])
    assert err.message == "eval.zeroshot[1] = 'seed=1' is a dataset option, not a set"
    assert err.hint == "quote a spec that holds a comma, e.g. --set 'eval.zeroshot=[\"world-zeroshot:size=200,seed=1\"]'"


def test_a_renamed_key_still_reads_with_a_warning(tmp_path, caplog):
    """BLIP's model.distill_alpha is model.momentum_distill_weight: old recipes, resolved.yaml files and --set."""
    from dmclip.pretrain import PretrainConfig

    old, _ = load_config(PretrainConfig, _recipe(tmp_path, "model:\n  distill_alpha: 0.3\n"))
    by_set, _ = load_config(PretrainConfig, None, ["model.distill_alpha=0.2"])
    assert (old.model.momentum_distill_weight, by_set.model.momentum_distill_weight) == (0.3, 0.2)
    assert "config key model.distill_alpha is now model.momentum_distill_weight" in caplog.text
    assert "distill_alpha" not in to_yaml(old)
