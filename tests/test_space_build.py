"""The Space folder that ``python -m space.build`` writes, run the way a Space runs it: ``python app.py`` from the
folder, in a fresh process with a clean environment and a Python that has the dependencies but cannot see this
checkout. Its answers must equal the in-repo Space's."""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client  # noqa: E402
from test_evidence import A1111, photo, png_bytes  # noqa: E402
from test_space_app import EXAMPLES, FAKE_EXAMPLE, REAL_EXAMPLE, free_port, launch_space, predict  # noqa: E402

from gradio_client import handle_file  # noqa: E402

from hub_models.hub import CODE_FILES, HUB_MODELS_DIR, check_repo_folder  # noqa: E402
from space import build  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("cifake-mcdropout-cnn", "cifake-vi-bcnn")
MODEL_IDS = [f"bayesfake/{name}" for name in MODELS]
PINNED = ("torch", "torchvision", "timm", "transformers", "accelerate", "safetensors", "huggingface-hub",
          "bayesian-torch", "gradio-client", "matplotlib", "numpy", "pandas", "pillow", "c2pa-python")
EVIDENCE_DIR = REPO_ROOT / "evidence"
START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "space"
    build.main([str(out), "--models", ",".join(MODELS)])
    return out


@pytest.fixture(scope="module")
def isolated_python(tmp_path_factory) -> str:
    """A Python with this environment's packages but not its .pth files: the editable install of this checkout (a
    .pth that adds an import finder for hub_models, space and train) stays invisible, as on a Space."""
    venv = tmp_path_factory.mktemp("isolated") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [site_packages] = venv.glob("lib/python*/site-packages")
    (site_packages / "dependencies.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    return str(venv / "bin" / "python")


def clean_env(tmp_path: Path, **extra) -> dict[str, str]:
    """No PYTHONPATH, an empty Hub cache: what a fresh Space container has."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
            "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **extra}


def requirements(folder: Path) -> dict[str, str]:
    pins = {}
    for line in (folder / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not pinned: {line!r}"
            pins[name] = version
    return pins


def installed(name: str) -> str:
    return importlib.metadata.version(name).split("+", 1)[0]


# ----------------------------------------------------------------------------------------------------------------------
# What the folder holds


def test_the_folder_holds_the_app_the_package_and_the_chosen_releases(built):
    assert {p.name for p in built.iterdir()} == {"README.md", "requirements.txt", "models.txt", "app.py",
                                                 "detectors.py", "provenance.py", "charts.py", "examples",
                                                 "hub_models", "evidence"}
    assert [p for p in built.rglob("*") if p.is_symlink()] == []
    for name in ("app.py", "detectors.py", "provenance.py", "charts.py"):
        assert (built / name).read_bytes() == (REPO_ROOT / "space" / name).read_bytes()
    # the evidence package whole (its modules import each other), as real files
    assert {p.name: p.read_bytes() for p in (built / "evidence").iterdir()} == {
        p.name: p.read_bytes() for p in EVIDENCE_DIR.glob("*.py")}
    assert sorted(p.name for p in (built / "examples").iterdir()) == sorted(p.name for p in EXAMPLES.iterdir())
    package = built / "hub_models"
    assert {"__init__.py", "hub.py", *CODE_FILES} <= {p.name for p in package.glob("*.py")}
    for module in package.glob("*.py"):
        assert module.read_bytes() == (HUB_MODELS_DIR / module.name).read_bytes()
    assert sorted(p.name for p in package.iterdir() if p.is_dir()) == sorted(MODELS)
    for name in MODELS:
        release = check_repo_folder(package / name)
        source = HUB_MODELS_DIR / name
        assert sorted(p.name for p in release.iterdir()) == sorted(p.name for p in source.iterdir())
        for path in release.iterdir():  # every file resolved to its bytes (code files may be symlinks in the repo)
            assert path.read_bytes() == (source / path.name).read_bytes()
    assert [line for line in (built / "models.txt").read_text().splitlines() if not line.startswith("#")] == MODEL_IDS


def test_requirements_are_pinned_to_the_installed_versions_and_sdk_version_to_gradio(built):
    pins = requirements(built)
    assert set(PINNED) <= set(pins) and "gradio" not in pins
    assert {name: installed(name) for name in pins} == pins
    front = (built / "README.md").read_text().split("---\n")[1]
    assert re.search(rf"^sdk_version: {re.escape(gradio.__version__)}$", front, re.M)
    assert re.search(rf'^python_version: "{sys.version_info.major}.{sys.version_info.minor}"$', front, re.M)
    assert re.search(r"^app_file: app.py$", front, re.M) and re.search(r"^sdk: gradio$", front, re.M)
    card = (built / "README.md").read_text()
    assert all(f"`{model_id}`" in card.split("## This folder")[1] for model_id in MODEL_IDS)


def test_every_third_party_import_of_the_folder_is_pinned(built):
    """Read the folder's code independently of the build: each module it imports is in the standard library, in the
    folder, gradio (the SDK), or from a pinned distribution."""
    own = {p.stem for p in built.glob("*.py")} | {"hub_models", "evidence"}
    modules = set()
    for path in built.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - own - {"__future__"}
    assert {"torch", "transformers", "gradio", "PIL", "bayesian_torch", "c2pa"} <= third_party
    provided_by = importlib.metadata.packages_distributions()
    pinned = set(requirements(built)) | {"gradio"}
    for module in third_party:
        assert {re.sub(r"[-_.]+", "-", d).lower() for d in provided_by[module]} & pinned, module


def test_the_build_refuses_unknown_detectors_and_a_folder_in_use(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build.main([str(tmp_path / "a"), "--models", "cifake-vi-bcnn,no-such-detector"])
    assert "no-such-detector" in capsys.readouterr().err and not (tmp_path / "a").exists()
    used = tmp_path / "used"
    (used / ".git").mkdir(parents=True)
    with pytest.raises(SystemExit):
        build.main([str(used), "--models", "cifake-vi-bcnn"])
    assert "not empty" in capsys.readouterr().err
    (used / "stale.py").write_text("")
    build.main([str(used), "--models", "cifake-vi-bcnn", "--overwrite"])
    assert (used / ".git").is_dir() and (used / "app.py").is_file() and (used / "stale.py").exists()
    build.main([str(used), "--models", "effnetlite0-gnb", "--overwrite"])  # a rebuild replaces the releases
    [release] = [p for p in (used / "hub_models").iterdir() if p.is_dir()]
    assert release.name == "effnetlite0-gnb" and (release / "model.safetensors.index.json").is_file()  # sharded
    assert {p.name: p.read_bytes() for p in release.iterdir()} == {
        p.name: p.read_bytes() for p in (HUB_MODELS_DIR / "effnetlite0-gnb").iterdir()}
    with pytest.raises(ValueError, match="outside the checkout's space/"):
        build.build_space(REPO_ROOT / "space" / "out", ["cifake-vi-bcnn"])


# ----------------------------------------------------------------------------------------------------------------------
# Run as a Space runs it


def test_the_folder_imports_its_own_hub_models_even_beside_an_editable_install(built, tmp_path, isolated_python):
    """With this environment's Python (this checkout installed in editable mode), ``python app.py`` run in the folder
    still imports the folder's hub_models: sys.path[0] is the script's folder, ahead of the editable finder."""
    run = subprocess.run([sys.executable, "app.py", "--show-paths"], cwd=built, env=clean_env(tmp_path),
                         capture_output=True, text=True, check=True)
    assert json.loads(run.stdout) == {"app": str(built / "app.py"), "detectors": str(built / "detectors.py"),
                                      "hub_models": str(built / "hub_models"), "evidence": str(built / "evidence")}
    # the isolated Python really cannot see this checkout (so the served test below proves the folder is complete)
    probe = ("import importlib.util as u; "
             "print([u.find_spec(m) for m in ('hub_models', 'space', 'train', 'evidence')])")
    assert subprocess.run([isolated_python, "-c", probe], cwd=tmp_path, env=clean_env(tmp_path), capture_output=True,
                          text=True, check=True).stdout.strip() == "[None, None, None, None]"


def test_the_folder_serves_the_in_repo_spaces_answers(built, tmp_path, isolated_python):
    """/predict and /evidence from the folder equal the in-repo Space's; the folder's own evidence package reads a
    file's generator parameters."""
    generated = tmp_path / "generated.png"
    generated.write_bytes(png_bytes(photo(320, 240), {"parameters": A1111}))
    port = free_port()
    env = clean_env(tmp_path, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
    log_path = tmp_path / "server.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        # the in-process reference below runs with this process's torch thread count: the same sums, the same bits
        process = subprocess.Popen([isolated_python, "app.py", "--torch-threads", str(torch.get_num_threads())],
                                   cwd=built, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            assert process.poll() is None, f"the Space exited:\n{log_path.read_text()}"
            try:
                client = Client(f"http://127.0.0.1:{port}", verbose=False)
                models = client.predict(api_name="/models")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert time.monotonic() - start < START_TIMEOUT_S, f"no answer:\n{log_path.read_text()}"
                time.sleep(0.5)
        print(f"\nbuilt Space: first /models answer {time.monotonic() - start:.1f} s after start")
        assert [m["name"] for m in models["loaded"]] == MODEL_IDS and models["failed"] == []  # models.txt
        assert f"hub_models': '{built / 'hub_models'}'" in log_path.read_text()  # the start-up log names its code
        served = [predict(client, image, num_samples=30) for image in (FAKE_EXAMPLE, REAL_EXAMPLE, generated)]
        found = client.predict(handle_file(str(generated)), api_name="/evidence")
        assert f"evidence': '{built / 'evidence'}'" in log_path.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
    demo, url = launch_space(MODEL_IDS)
    try:
        reference = Client(url, verbose=False)
        assert served == [predict(reference, image, num_samples=30)
                          for image in (FAKE_EXAMPLE, REAL_EXAMPLE, generated)]
        assert found == reference.predict(handle_file(str(generated)), api_name="/evidence")
        assert found["says"] == "ai-generated" and found["strong"] is True and served[2]["evidence"] == found
    finally:
        demo.close()
