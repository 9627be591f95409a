"""The command line as people type it: --version, `config show`, help texts, overrides anywhere and parsed by
the type of the key they set, YAML mistakes located in the file."""
import argparse
import dataclasses
import subprocess
import sys

import pytest
import yaml

import contrastive
from contrastive.cli import build_parser, main
from contrastive.config import ConfigError, load_config, to_dict
from tests.conftest import REPO


def test_string_keys_keep_the_text_as_typed():
    cfg = load_config(None, ["data.train=shards/{00000..00009}.tar", "model.name=no", "data.caption_key=123",
                             "model.compile_backend=null", "data.val=a.tar::b/{0..3}.tar"])
    assert cfg.data.train == "shards/{00000..00009}.tar"
    assert cfg.model.name == "no" and cfg.data.caption_key == "123" and cfg.model.compile_backend == "null"
    assert cfg.data.val == "a.tar::b/{0..3}.tar"
    # Other keys are still YAML: booleans, numbers, null, lists, mappings.
    cfg = load_config(None, ["data.resampled=no", "train.steps=12", "optim.lr=1e-4", "data.uint8_batches=null",
                             "data.train_weights=[1, 3]", "model.aug={scale: [0.8, 1.0]}",
                             "eval.evaluators=[{name: zeroshot, data: 'x/{0..1}.tar'}]"])
    assert (cfg.data.resampled, cfg.train.steps, cfg.optim.lr, cfg.data.uint8_batches) == (False, 12, 1e-4, None)
    assert cfg.data.train_weights == [1.0, 3.0] and cfg.model.aug == {"scale": [0.8, 1.0]}
    assert cfg.eval.evaluators[0].data == "x/{0..1}.tar"
    with pytest.raises(ConfigError, match="train.steps must be an integer, got 'ten'"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match="unknown config key 'model.nam'"):
        load_config(None, ["model.nam=no"])


def test_braces_the_shell_expanded_are_refused():
    # What bash passes for an unquoted data.train=d/{00000..00002}.tar: only the last shard would be used.
    with pytest.raises(ConfigError, match="did the shell expand braces"):
        load_config(None, [f"data.train=d/{i:05d}.tar" for i in range(3)])
    assert load_config(None, ["train.steps=3", "model.name=x", "train.steps=4"]).train.steps == 4  # later wins
    # Adjacent repeats that no brace expansion makes keep "the later wins": a non-string key, other text.
    assert load_config(None, ["train.steps=3", "train.steps=4"]).train.steps == 4
    assert load_config(None, ["model.aug={scale: [0.5, 1.0]}", "model.aug={hflip: 0.5}"]).model.aug == {"hflip": 0.5}
    assert load_config(None, ["model.name=tiny-vit-32", "model.name=demo-vit-48"]).model.name == "demo-vit-48"


def test_yaml_error_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\n  batch_size: [8, 16\n  log_every: 2\n")  # the list is never closed
    code = main(["config", "show", str(path)])
    err = capsys.readouterr().err.strip()
    # PyYAML sees the problem at `log_every:` (line 4, column 12, counting from 1): where the flow list ends.
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{path}:4:12:" in err and "expected ',' or ']'" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"contrastive {contrastive.__version__}"


def test_config_show_prints_the_resolved_config(monkeypatch):
    monkeypatch.chdir(REPO)
    config = "configs/demo.yaml"
    # Overrides before and after the file: the printed YAML is what load_config resolves, every key of it.
    done = subprocess.run([sys.executable, "-m", "contrastive.cli", "config", "show", "train.steps=7", config,
                           "model.name=no", "data.train=d/{0..3}.tar"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    expected = load_config(config, ["train.steps=7", "model.name=no", "data.train=d/{0..3}.tar"])
    assert shown == to_dict(expected)
    file_values = yaml.safe_load((REPO / config).read_text())
    assert shown["train"]["batch_size"] == file_values["train"]["batch_size"]  # from the file, not a default
    assert (shown["train"]["steps"], shown["model"]["name"], shown["data"]["train"]) == (7, "no", "d/{0..3}.tar")
    assert set(shown) == {f.name for f in dataclasses.fields(expected)}


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _all_parsers(child)


def test_help_states_each_default_once():
    checked = 0
    for parser in _all_parsers(build_parser()):
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text, \
            parser.prog
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help and action.help is not argparse.SUPPRESS:
                helped = formatter._expand_help(action)
                assert helped.count("(default") + helped.count("; default:") <= 1, (parser.prog, helped)
                checked += 1
    assert checked > 100
    sub = {p.prog: p for p in _all_parsers(build_parser())}
    # Defaults that tell something are still shown.
    assert "(default: 256)" in sub["contrastive prep pairs"].format_help().replace("\n", " ")


def test_train_takes_overrides_before_between_and_after_options():
    args = build_parser().parse_args(["train", "train.steps=3", "--config", "c.yaml", "data.train=x.tar",
                                      "--out", "o", "model.name=no"])
    assert (args.config, args.out) == ("c.yaml", "o")
    assert args.overrides == ["train.steps=3", "data.train=x.tar", "model.name=no"]
    # Commands with sub-commands still parse, and positionals of other commands may follow options too.
    args = build_parser().parse_args(["prep", "synthetic", "--seed", "3", "out"])
    assert (args.seed, str(args.out_dir)) == (3, "out")


def test_prep_pairs_on_a_table_of_urls_points_to_img2dataset(tmp_path, capsys):
    table = tmp_path / "cc3m.tsv"
    table.write_text("url\tcaption\nhttps://example.com/a.jpg\ta dog\nhttp://example.com/b.jpg\ta cat\n")
    code = main(["prep", "pairs", str(table), str(tmp_path / "out"), "--num-procs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "2 of 2 rows" in err and "https://example.com/a.jpg" in err
    assert f"img2dataset --url_list {table} --input_format tsv --url_col url --caption_col caption" in err
    assert "data.train=shards" in err and not list((tmp_path / "out").glob("*.tar"))
