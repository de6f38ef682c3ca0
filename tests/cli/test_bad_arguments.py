"""Every option of every command, given a value it cannot take, ends in one line on stderr naming
the option, exit 2, empty stdout and nothing written. Options are read from the CLI itself, so a
new option is covered (or this test asks for its bad values)."""

import inspect
import typing

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.models import OptionInfo
from typer.testing import CliRunner

from tests.conftest import tiny_export
from turbo.cli.app import app
from turbo.cli.commands.bench import parse_ints
from turbo.cli.commands.export import parse_batch, parse_image_size, parse_r
from turbo.core.errors import UsageError

runner = CliRunner()

BASE = {  # valid arguments for each command, so that only the option under test is wrong
    "models": [],
    "plan": ["-m", "vit-b16", "--tiny"],
    "export": ["-m", "vit-b16", "--tiny", "--random-weights", "-o", "{out}"],
    "bench": ["{export}", "--batch", "2", "--iters", "1", "--warmup", "0"],
    "eval": ["{export}", "--data", "{images}"],
    "caption": ["{export}", "{image}"],
    "retrieve": ["{export}", "--images", "{images}", "--texts", "{texts}"],
    "vqa": ["{export}", "{image}", "what is it?"],
    "generate": ["llava-1.5-7b", "{image}", "USER: <image> hi", "--tiny", "--random-weights"],
    "check": ["{export}"],
    "deploy triton": ["{export}", "-o", "{out}"],
    "serve": ["{tmp}"],
}
ZERO_IS_VALID = {"r", "threshold", "min_length", "calib_seed", "itm_rerank", "max_queue_delay_us"}
CHOICES = ["method", "metric", "merge_kernel", "merge_op", "precision", "quant", "trt_merge", "runtime", "device",
           "ort_merge", "torch_merge", "backend"]
TEXT = {  # str options: values each must refuse
    **{name: ["bogus"] for name in CHOICES},
    "model": ["{tmp}/no/such/dir", "./no/such/dir"],
    "r": ["x", "-1", "\u00b2", "1,,2"],
    "schedule": ["bogus", "1,2"],
    "image_size": ["0", "x", "10x0", "-4"],
    "batch": ["0", "x", "-2"],
    "data": ["{tmp}/missing"],
    "calib": ["{tmp}/missing"],
    "calib_images": ["{tmp}/missing"],
    "images": ["{tmp}/missing"],
    "texts": ["{tmp}/missing", "{tmp}/file/texts.txt"],
    "labels": ["{tmp}/missing"],
    "captions": ["{tmp}/missing"],
    "questions": ["{tmp}/missing"],
    "baseline": ["{tmp}/missing"],
    "output": ["{tmp}/file/out"],
    "plot": ["{tmp}/file/plot.png"],
    "url": ["ftp://host:1", "localhost"],
    "concurrency": ["0", "x", "-2"],
    "preferred_batch": ["0", "x", "9"],
    "alpha": ["x", "nan", "-1", "inf"],
    "sweep": ["bogus", "speed=1", "method=fast", "alpha=-1"],
    "llm_drop": ["bogus", "fastv:keep=0.5", "fastv:ratio=1", "pyramid:stages=0", "fastv:layer=9"],
}
FREE_TEXT = {"prompt"}  # any string is a valid value


def _options(command: str) -> dict[str, tuple[str, type]]:
    """name -> (its first flag, its value type) for each non-flag option of `command`."""
    commands, *group = reversed(command.split())  # "deploy triton": the deploy group's triton command
    if group:
        commands = next(g.typer_instance for g in app.registered_groups if g.name == group[0]).registered_commands
    else:
        commands = app.registered_commands
    callback = next(c.callback for c in commands if c.name == command.split()[-1])
    hints = typing.get_type_hints(callback)
    options = {}
    for name, parameter in inspect.signature(callback).parameters.items():
        kind = next(t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None))
        if isinstance(parameter.default, OptionInfo) and kind is not bool:
            options[name] = (parameter.default.param_decls[0], kind)
    return options


def _bad_values(name: str, kind: type) -> list[str]:
    if kind is int:
        return ["-1", "x", "1.5"] + ([] if name in ZERO_IS_VALID else ["0"])
    if kind is float:
        return ["nan", "inf", "-1", "x"]
    return TEXT.get(name, [])


CASES = [(command, flag, name, value) for command in BASE for name, (flag, kind) in _options(command).items()
         for value in _bad_values(name, kind)]


def test_every_option_has_bad_values():
    missing = [f"{command} {flag}" for command in BASE for name, (flag, kind) in _options(command).items()
               if not _bad_values(name, kind) and name not in FREE_TEXT]
    assert not missing, f"add the values these options must refuse to TEXT: {missing}"


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    images = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype("uint8")).save(images / f"{i}.png")
    export = tiny_export(tmp_path_factory, "vit-b16", 4, batch=2).directory
    (images.parent / "texts.txt").write_text("a cat\n")
    return {"export": str(export), "images": str(images), "image": str(images / "0.png"),
            "texts": str(images.parent / "texts.txt")}


@pytest.mark.parametrize("command, flag, name, value", CASES, ids=[f"{c} {f} {v}" for c, f, _, v in CASES])
def test_a_bad_value_is_one_line_naming_the_option(places, tmp_path, command, flag, name, value):
    (tmp_path / "file").write_text("a regular file")
    fill = {**places, "tmp": str(tmp_path), "out": str(tmp_path / "out")}
    base = [a.format(**fill) for a in BASE[command]]
    if flag in base:  # the option under test replaces its valid value
        del base[base.index(flag):base.index(flag) + 2]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = runner.invoke(app, [*command.split(), *base, flag, value.format(**fill)])
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert name.replace("_", "-") in lines[0].lower() or value.format(**fill) in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


TEXTS = st.text(alphabet=st.sampled_from("0123456789,x X-+. _\u00b2\u0661\u00bdautodynamic"), max_size=10) | st.text(
    max_size=8)


@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_option_parsers_return_a_valid_value_or_refuse_in_one_line(text):
    """Whatever text a user types, each parser either returns a value its option can take or
    raises a one-line UsageError (never a ValueError: '²'.isdigit() is True, int('²') fails)."""
    valid = {
        "batch": (parse_batch, lambda v: v is None or v >= 1),
        "image size": (parse_image_size, lambda v: len(v) == 2 and min(v) >= 1),
        "r": (lambda t: parse_r(t, None, None), lambda v: v >= 0),
        "r list": (lambda t: parse_ints(t, "--r"), lambda v: v and min(v) >= 0),
        "batch list": (lambda t: parse_ints(t, "--batch", least=1), lambda v: v and min(v) >= 1),
    }
    for parse, acceptable in valid.values():
        try:
            value = parse(text)
        except UsageError as error:
            assert "\n" not in str(error)
            continue
        assert acceptable(value), (text, value)
