"""``python space/app.py`` in a second checkout runs that checkout's hub_models and evidence packages, not those of
whichever checkout was installed in editable mode (space/hub_models and space/evidence are symlinks to ../hub_models and
../evidence, and sys.path[0] is space/)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_a_second_checkouts_app_imports_its_own_hub_models(tmp_path):
    second = tmp_path / "second"
    subprocess.run(["git", "clone", "--quiet", "--shared", str(REPO_ROOT), str(second)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}  # no PYTHONPATH
    # Where a plain `import hub_models` goes in this environment (the editable install, if any): never the clone
    probe = "import importlib.util; print(importlib.util.find_spec('hub_models'))"
    plain = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                           check=True)
    assert str(second) not in plain.stdout
    runs = {  # run side by side: each start imports torch, transformers and gradio
        "python space/app.py from the checkout (scripts/space.sh, the README)": (["space/app.py"], second),
        "python /abs/space/app.py from another folder": ([str(second / "space" / "app.py")], elsewhere),
    }
    started = {how: subprocess.Popen([sys.executable, *argv, "--show-paths"], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for how, (argv, cwd) in runs.items()}
    expected = {"app": str(second / "space" / "app.py"), "detectors": str(second / "space" / "detectors.py"),
                "hub_models": str(second / "hub_models"), "evidence": str(second / "evidence")}
    for how, process in started.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{how}: {err}"
        assert json.loads(out) == expected, how
