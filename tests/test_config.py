import subprocess
import sys

import pytest

from flame.config import Config, config_from_dict, load_config
from flame.errors import ConfigError


def test_defaults_validate():
    cfg = load_config([])
    assert cfg.model.name == "tiny" and cfg.data.context_len == 256


def test_precedence_cli_over_toml_over_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("x")
    f = tmp_path / "run.toml"
    f.write_text('[optim]\nlr = 1e-4\nwarmup_steps = 7\n[data]\ninputs = ["a.txt", "b.txt"]\n')
    cfg = load_config(["--config", str(f), "--optim.lr", "5e-4", "--train.compile", "--data.varlen=false"])
    assert cfg.optim.lr == 5e-4  # CLI wins
    assert cfg.optim.warmup_steps == 7  # TOML wins over default
    assert cfg.data.inputs == ["a.txt", "b.txt"]
    assert cfg.train.compile is True and cfg.data.varlen is False
    assert cfg.optim.beta2 == Config().optim.beta2


def test_list_values_from_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "y").mkdir()
    for name in ("x.txt", "y/1.jsonl", "a", "b"):
        (tmp_path / name).write_text("x")
    cfg = load_config(["--data.inputs", "x.txt", "y/*.jsonl", "--train.max_steps", "5"])
    assert cfg.data.inputs == ["x.txt", "y/*.jsonl"] and cfg.train.max_steps == 5
    assert load_config(["--data.inputs", "a,b"]).data.inputs == ["a", "b"]
    with pytest.raises(ConfigError, match="'nope/\\*.jsonl' matches no file"):
        load_config(["--data.inputs", "nope/*.jsonl"])


def test_negative_number_value():
    with pytest.raises(ConfigError, match="optim.lr = -0.001 must be > 0"):
        load_config(["--optim.lr", "-1e-3"])


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--optim.lrr", "1"], "did you mean optim.lr?"),
        (["--optimm.lr", "1"], "did you mean optim.lr?"),
        (["--train.max_step", "3"], "did you mean train.max_steps?"),
        (["--data.context_len", "abc"], "expected an integer"),
        (["--data.context_len", "0"], "data.context_len = 0 must be > 0"),
        (["--data.store", "/no/such/store"], "no such directory"),
        (["--optim.schedule", "cosin"], "did you mean cosine?"),
        (["--train.compile", "maybe"], "expected true or false"),
        (["--model.overrides", '{"rope_scaling": null}'], "null at rope_scaling"),
    ],
)
def test_cli_mistakes(args, expect):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert expect in str(e.value)
    assert e.value.exit_code == 2


def test_toml_mistakes_are_collected(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[optim]\nlr = -1\nwarmup = 3\n[trian]\nmax_steps = 1\n[data]\ncontext_len = 'long'\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(f)])
    text = str(e.value)
    assert "did you mean optim.warmup_steps?" in text
    assert "did you mean [train]?" in text
    assert "data.context_len" in text and "expected an integer" in text
    assert "optim.lr = -1.0 must be > 0" in text


def test_malformed_toml(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", str(f)])


def test_unreadable_config_file(tmp_path, monkeypatch):
    """A --config that exists but cannot be read (root reads any mode, so the read itself fails)."""
    import pathlib

    f = tmp_path / "locked.toml"
    f.write_text("[optim]\nlr = 1e-3\n")
    real = pathlib.Path.read_text

    def denied(self, *a, **kw):
        if self == f:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "read_text", denied)
    with pytest.raises(ConfigError, match="cannot read .*locked.toml.*Permission denied"):
        load_config(["--config", str(f)])


def test_round_trip_through_toml_and_dict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").write_text("x")
    (tmp_path / "b").write_text("x")
    cfg = load_config(
        ["--optim.lr", "1e-3", "--model.overrides", '{"hidden_size": 64}', "--data.inputs", "a", "b"]
    )
    f = tmp_path / "saved.toml"
    f.write_text(cfg.to_toml())
    again = load_config(["--config", str(f)])
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def _flame(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "flame", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_cli_typo_exit_code_and_one_line():
    r = _flame("train", "--optim.lrr", "3e-4")
    assert r.returncode == 2
    assert "did you mean optim.lr?" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_toml_typo_exit_code(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("[optim]\nlrr = 3e-4\n")
    r = _flame("train", "--config", str(f))
    assert r.returncode == 2 and "did you mean optim.lr?" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_every_option_with_default():
    from flame.config import all_keys

    r = _flame("train", "--help")
    assert r.returncode == 0
    for key in all_keys():
        assert f"--{key}" in r.stdout
    assert "(default: 256)" in r.stdout


def test_unknown_command():
    r = _flame("trian")
    assert r.returncode == 2 and "did you mean `flame train`?" in r.stderr


def test_shipped_configs_use_known_keys():
    import tomllib
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert len(files) >= 3
    for f in files:
        config_from_dict(tomllib.loads(f.read_text()))  # raises ConfigError on an unknown key


def test_default_config_file_equals_embedded_default():
    from pathlib import Path

    f = Path(__file__).parents[1] / "configs" / "default.toml"
    assert load_config(["--config", str(f)]) == Config()


def test_choices_come_from_the_literal_annotations():
    import typing

    from flame.config import choice_fields, validate

    hints = typing.get_type_hints(type(Config().optim))
    assert typing.get_origin(hints["schedule"]) is typing.Literal
    assert choice_fields()["optim.schedule"] == ("cosine", "linear", "constant", "wsd")
    assert choice_fields()["data.bad_records"] == ("skip", "error")
    cfg = Config()
    cfg.parallel.strategy = "fdsp"  # set in code, not parsed: validate still refuses it
    assert validate(cfg) == [
        "parallel.strategy = 'fdsp' is not one of auto, none, ddp, fsdp (did you mean fsdp?)"
    ]


def test_tables_on_the_command_line_take_json_or_toml(tmp_path):
    as_json = load_config(["--model.overrides", '{"hidden_size": 64, "rope_scaling": {"factor": 2.0}}'])
    as_toml = load_config(["--model.overrides", "{hidden_size = 64, rope_scaling = {factor = 2.0}}"])
    assert (
        as_json.model.overrides
        == as_toml.model.overrides
        == {"hidden_size": 64, "rope_scaling": {"factor": 2.0}}
    )
    with pytest.raises(ConfigError, match="or a TOML inline table"):
        load_config(["--model.overrides", "{hidden_size: 64"])


def test_summary_lists_only_what_differs_from_the_defaults():
    from flame.config import changed_from_defaults, summary

    assert changed_from_defaults(Config()) == {} and summary(Config()) == "config: the defaults"
    cfg = load_config(["--optim.lr", "1e-3", "--train.max_steps", "7", "--log.console", "plain"])
    assert changed_from_defaults(cfg) == {
        "train": {"max_steps": 7},
        "optim": {"lr": 1e-3},
        "log": {"console": "plain"},
    }
    assert summary(cfg).splitlines() == [
        "config (what differs from the defaults):",
        "  [train] max_steps = 7",
        "  [optim] lr = 0.001",
        '  [log] console = "plain"',
    ]
