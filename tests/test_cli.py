"""The ``bayesfake`` command, run as the installed entry point (pyproject's [project.scripts])."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bayesfake.cli import main
from hub_models.golden import differences
from hub_models.hub import HUB_MODELS_DIR, RELEASED

BAYESFAKE = shutil.which("bayesfake", path=str(Path(sys.executable).parent)) or shutil.which("bayesfake")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def run(*args, check=True, timeout=300):
    done = subprocess.run([BAYESFAKE, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_the_command_is_installed():
    assert BAYESFAKE, "pip install -e . installs the bayesfake command"


def test_info_lists_every_released_detector_with_its_data_size_version_and_metrics():
    rows = json.loads(run("info", "--json").stdout)
    assert [Path(r["name"]).name for r in rows] == list(RELEASED)
    for row in rows:
        config = json.loads((HUB_MODELS_DIR / Path(row["name"]).name / "config.json").read_text())
        assert row["version"] == config["release_version"]
        assert row["training_data"] == config["training_domain"]
        assert all(name.lower() in row["training_data"].lower() for name in config["training_data"])  # in words
        assert row["input_size"] == f"{config['image_size']}x{config['image_size']}"
        assert row["metrics"]["acc"] == config["metrics"]["cls/acc"]
    table = run("info").stdout.splitlines()
    assert table[0].startswith("| detector | version |") and len(table) == 2 + len(RELEASED)


def test_info_on_a_folder_and_on_nothing_usable(tmp_path):
    folder = HUB_MODELS_DIR / "cifake-vi-bcnn"
    assert json.loads(run("info", "--json", str(folder)).stdout)[0]["folder"] == str(folder)
    done = run("info", str(tmp_path / "nope"), check=False)
    assert done.returncode != 0 and "neither a folder" in done.stderr


@pytest.mark.parametrize("command,says", [("train", "TrainConfig"), ("search", "--grid"), ("evaluate", "--split"),
                                          ("export", "--version"), ("serve", "--torch-threads"),
                                          ("build-space", "OUT_DIR")])
def test_each_subcommand_reaches_its_module(command, says, capsys):
    """In-process (the modules import once): each subcommand hands its arguments to its module's own parser."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and says in capsys.readouterr().out


def test_unknown_or_missing_subcommand_is_refused():
    done = run("nope", check=False)
    assert done.returncode == 2 and "invalid choice: 'nope'" in done.stderr
    done = run(check=False)
    assert done.returncode == 2 and "COMMAND" in done.stdout


def test_export_through_the_command(tmp_path):
    """bayesfake export writes a Hub-ready folder (real code files, golden outputs) from a release folder."""
    out = tmp_path / "exported"
    run("export", str(HUB_MODELS_DIR / "cifake-vi-bcnn"), str(out), "--repo-id", "someorg/vi")
    assert (out / "golden_outputs.json").is_file() and not (out / "modeling_bayesfake.py").is_symlink()
    assert not differences(json.loads((HUB_MODELS_DIR / "cifake-vi-bcnn" / "golden_outputs.json").read_text()),
                           json.loads((out / "golden_outputs.json").read_text()))
