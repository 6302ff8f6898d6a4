"""peco_scale.tools: every tool answers --help, and the old names (``python -m peco_scale.export`` ...,
``launch/bench_step.py``, ``launch/tokenize_images.py``) still run the same tool."""

import importlib
import subprocess
import sys

import pytest

from conftest import ROOT

TOOLS = ("export", "probe", "plan", "tokenize", "collect", "plot", "bench_step")
OLD_NAMES = ("export", "probe", "plan", "tokenize", "collect", "plot")


@pytest.mark.parametrize("name", TOOLS)
def test_each_tool_has_a_contract_and_answers_help(name, capsys):
    tool = importlib.import_module(f"peco_scale.tools.{name}")
    assert "error:" in tool.__doc__ and "exits 2" in tool.__doc__
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0
    assert f"python -m peco_scale.tools.{name}" in capsys.readouterr().out


@pytest.mark.parametrize("name", OLD_NAMES)
def test_old_module_names_are_the_tools(name):
    assert importlib.import_module(f"peco_scale.{name}") is importlib.import_module(f"peco_scale.tools.{name}")


@pytest.mark.parametrize("argv", [[sys.executable, "-m", f"peco_scale.{n}"] for n in OLD_NAMES]
                         + [[sys.executable, str(ROOT / "launch" / f)] for f in ("bench_step.py", "tokenize_images.py")],
                         ids=[*OLD_NAMES, "launch/bench_step.py", "launch/tokenize_images.py"])
def test_old_commands_still_run(argv):
    res = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "usage: python -m peco_scale.tools." in res.stdout, res.stderr[-2000:]
