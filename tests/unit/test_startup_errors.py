"""`cortex serve` and `neuron serve` refuse unusable settings before starting anything: one line on
stderr that names the setting and where it came from, exit code 2, no traceback.

The CLIs' main() runs in this process (each case fails before a server or worker starts); the last
tests run real processes, to see the exit code and stderr exactly as an operator does."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cortex import cli as cortex_cli
from neuron import cli as neuron_cli
from tests.helpers import ROOT

CLIS = {"cortex": cortex_cli.main, "neuron": neuron_cli.main}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for prefix in ("CORTEX_", "NEURON_"):
        for name in list(os.environ):
            if name.startswith(prefix):
                monkeypatch.delenv(name)


def refused(capsys, which: str, argv: list[str]) -> str:
    """Run `which serve ARGV`; it must return (or argparse exit with) 2. Returns its stderr."""
    try:
        code = CLIS[which](["serve", *argv])
    except SystemExit as exit_:  # argparse's refusal of a flag
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("which", ["cortex", "neuron"])
def test_a_missing_config_file(capsys, tmp_path, which):
    path = tmp_path / "nope.toml"
    assert one_line(refused(capsys, which, ["--config", str(path)])) == f"{which}: --config {path}: no such file"


@pytest.mark.parametrize("which", ["cortex", "neuron"])
def test_a_malformed_config_file(capsys, tmp_path, which):
    path = tmp_path / "bad.toml"
    path.write_text("listen = \n")
    line = one_line(refused(capsys, which, ["--config", str(path)]))
    assert line.startswith(f"{which}: --config {path}: not valid TOML: ") and "line 1" in line


@pytest.mark.parametrize("which, text, expected", [
    ("cortex", 'poll_seconds = "fast"', "poll_seconds = 'fast' is not a number"),
    ("cortex", "neuron = [1, 2]", "neuron = 1 is not a string"),
    ("neuron", 'cpu_memory_gb = "lots"', "cpu_memory_gb = 'lots' is not a number"),
    ("neuron", "listen = 50061", "listen = 50061 is not a string"),
    ("neuron", 'unknown_thing = 1', "unknown settings ['unknown_thing']"),
])
def test_a_config_value_of_the_wrong_type(capsys, tmp_path, which, text, expected):
    path = tmp_path / "settings.toml"
    path.write_text(text + "\n")
    line = one_line(refused(capsys, which, ["--config", str(path)]))
    assert line.startswith(f"{which}: ") and str(path) in line and expected in line


@pytest.mark.parametrize("which, env, expected", [
    ("cortex", {"CORTEX_POLL_SECONDS": "fast"}, "cortex: CORTEX_POLL_SECONDS='fast' is not a number"),
    ("neuron", {"NEURON_CPU_MEMORY_GB": "lots"}, "neuron: NEURON_CPU_MEMORY_GB='lots' is not a number"),
    ("cortex", {"CORTEX_LOG_LEVEL": "loud"}, "cortex: CORTEX_LOG_LEVEL 'loud' is not one of debug, info, warning, "
                                             "error"),
    ("neuron", {"NEURON_LOG_FORMAT": "xml"}, "neuron: NEURON_LOG_FORMAT 'xml' is not one of json, console, auto"),
])
def test_an_env_value_of_the_wrong_type_or_unknown(capsys, monkeypatch, which, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert one_line(refused(capsys, which, [])) == expected


@pytest.mark.parametrize("which", ["cortex", "neuron"])
def test_an_unknown_log_level_or_format_flag(capsys, which):
    err = refused(capsys, which, ["--log-level", "loud"])
    assert "argument --log-level: invalid choice: 'loud'" in err.strip().splitlines()[-1]
    err = refused(capsys, which, ["--log-format", "xml"])
    assert "argument --log-format: invalid choice: 'xml'" in err.strip().splitlines()[-1]


def test_a_log_level_from_the_config_file_is_checked(capsys, tmp_path):
    path = tmp_path / "cortex.toml"
    path.write_text('log_level = "loud"\n')
    assert one_line(refused(capsys, "cortex", ["--config", str(path)])) == (
        f"cortex: {path}: log_level 'loud' is not one of debug, info, warning, error")


def test_a_negative_cpu_memory_budget(capsys, monkeypatch):
    assert one_line(refused(capsys, "neuron", ["--cpu-memory-gb", "-1", "--model-root", str(ROOT)])) == (
        "neuron: --cpu-memory-gb -1.0 is below its minimum 0")
    monkeypatch.setenv("NEURON_CPU_MEMORY_GB", "-0.5")
    assert one_line(refused(capsys, "neuron", ["--model-root", str(ROOT)])) == (
        "neuron: NEURON_CPU_MEMORY_GB -0.5 is below its minimum 0")


def test_a_negative_down_expiry(capsys):
    assert one_line(refused(capsys, "cortex", ["--down-expiry-seconds", "-5"])) == (
        "cortex: --down-expiry-seconds -5.0 is below its minimum 0")


def test_a_model_root_that_does_not_exist_is_refused(capsys, tmp_path):
    missing = tmp_path / "no-models"
    assert one_line(refused(capsys, "neuron", ["--model-root", str(ROOT), "--model-root", str(missing)])) == (
        f"neuron: model root {str(missing)!r} does not exist (--model-root / NEURON_MODEL_ROOT): give the "
        "directory that holds the checkpoints")
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "is not a directory" in one_line(refused(capsys, "neuron", ["--model-root", str(a_file)]))


@pytest.mark.parametrize("which", ["cortex", "neuron"])
def test_as_a_process_the_refusal_is_one_line_and_exit_code_2(tmp_path, which):
    path = tmp_path / "bad.toml"
    path.write_text("[[[\n")
    run = subprocess.run([sys.executable, "-m", f"{which}.cli", "serve", "--config", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"{which}: --config {path}: not valid TOML")
