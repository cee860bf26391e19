"""Write a pushable Space folder: the app, the hub_models and evidence packages, the chosen released detectors, pinned
requirements.

    python -m space.build OUT_DIR [--models NAME,...] [--overwrite]
    hf upload ORG/SPACE OUT_DIR . --repo-type space

OUT_DIR gets
* ``README.md``: the Space card (space/README.md) with ``sdk_version`` set to the installed gradio and
  ``python_version`` to this interpreter's, so the Space runs what was tested here;
* ``requirements.txt``: every package of space/requirements.txt, plus any other third-party import of the folder's
  code, pinned ``==`` to the version installed here (gradio itself comes from ``sdk_version``);
* ``app.py``, ``detectors.py``, ``provenance.py``, ``charts.py``, ``examples/``: the app, run as ``python app.py``;
* ``hub_models/``: the modules of the package that the app imports, directly or through each other (nothing from
  train/);
* ``evidence/``: the evidence package (what a file says about its own origin), whole: its modules import only each
  other, numpy, Pillow and c2pa-python;
* ``hub_models/NAME/``: each chosen release as a self-contained Hub repo folder (symlinks resolved into files), where
  ``hub_models.hub`` finds it offline as the bundled copy of ``bayesfake/NAME``;
* ``models.txt``: the chosen repo ids, which the app serves by default.

``python app.py`` imports ``hub_models`` and ``evidence`` from the folder itself (sys.path[0] is the script's folder),
never from an editable install of a checkout.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

from hub_models.export import write_hub_folder
from hub_models.hub import DEFAULT_REPO_IDS, HUB_MODELS_DIR, HUB_ORG, RELEASED, bundled_folder

SPACE_DIR = Path(__file__).resolve().parent
EVIDENCE_DIR = SPACE_DIR.parent / "evidence"  # this checkout's evidence package (space/evidence links to it)
REQUIREMENTS = SPACE_DIR / "requirements.txt"  # which packages; the build pins each to the installed version
CARD = SPACE_DIR / "README.md"
DEV_ONLY = {"__init__.py", "build.py"}  # modules of space/ that the Space folder does not need
PACKAGES = ("hub_models", "evidence")  # the checkout's packages that space/ links to and the Space folder holds
MODELS_FILE = "models.txt"  # app.MODELS_FILE's name
PROJECT = "bayesfake"  # this project's own distribution (the editable install): never a requirement
SDK = "gradio"  # the Space's SDK: installed by the Space from sdk_version, so not in requirements.txt


def distribution_name(name: str) -> str:
    """PEP 503 normalised distribution name (``Pillow`` -> ``pillow``, ``bayesian_torch`` -> ``bayesian-torch``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(path: Path = REQUIREMENTS) -> list[str]:
    """The package names of a requirements file, without their version specifiers."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0])
    return names


def imports(path: Path) -> list[tuple[int, str]]:
    """(level, dotted name) of every module ``path`` imports, anywhere in the file: level 0 for absolute imports,
    1 for ``from . import x`` / ``from .x import y``. ``from a import b`` gives both ``a`` and ``a.b`` (b may be a
    module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found += [(node.level, base)] if base else []
            found += [(node.level, f"{base}.{alias.name}".lstrip(".")) for alias in node.names]
    return found


def package_modules(entry_files: list[Path], package: Path = HUB_MODELS_DIR) -> list[Path]:
    """The modules of ``package`` (hub_models) that ``entry_files`` import, directly or through each other."""
    todo = [package / "__init__.py", *entry_files]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        in_package = path.parent == package
        for level, name in imports(path):
            if level == 0 and name.split(".")[0] == package.name:
                name = name.partition(".")[2]
            elif not (level == 1 and in_package):
                continue
            module = package / f"{name.split('.')[0]}.py"
            if name and module.is_file():
                todo.append(module)
    return sorted(p for p in seen if p.parent == package)


def third_party_distributions(folder: Path) -> set[str]:
    """The installed distributions that provide the third-party modules imported by the ``.py`` files under
    ``folder`` (normalised names). Standard library modules and the folder's own modules are left out; a module of
    this project that the folder lacks (train, say) is an error."""
    own = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    provided_by = importlib.metadata.packages_distributions()
    modules = {name.split(".")[0] for path in folder.rglob("*.py") for level, name in imports(path) if level == 0}
    found = set()
    for module in sorted(modules - set(sys.stdlib_module_names) - own - {"__future__"}):
        distributions = {distribution_name(d) for d in provided_by.get(module, ())}
        if not distributions:
            raise RuntimeError(f"the Space imports {module!r}, which no installed distribution provides")
        if PROJECT in distributions:
            raise RuntimeError(f"the Space imports {module!r}, a part of this project that the Space folder lacks")
        found |= distributions
    return found


def pinned(name: str) -> str:
    """``name==VERSION`` as installed here; a local version label (``2.14.1+cu130``) is dropped, since ``==2.14.1``
    matches any build of that release and the index a Space installs from has no local labels."""
    version = importlib.metadata.version(name)
    return f"{distribution_name(name)}=={version.split('+', 1)[0]}"


def requirements_text(folder: Path) -> str:
    names = [distribution_name(n) for n in requirement_names()]
    extra = sorted(third_party_distributions(folder) - set(names) - {SDK})
    lines = [f"# Written by `python -m space.build` from {REQUIREMENTS.name} and the folder's imports: the versions",
             f"# installed where the Space was built and tested. {SDK}=={importlib.metadata.version(SDK)} comes from "
             f"sdk_version in README.md.",
             *(pinned(n) for n in dict.fromkeys(names) if n != SDK), *(pinned(n) for n in extra)]
    return "\n".join(lines) + "\n"


def card_text(models: list[str]) -> str:
    """space/README.md with the Space front matter set to what is installed here, and the detectors the folder holds."""
    text = CARD.read_text()
    front, sep, body = text.removeprefix("---\n").partition("\n---\n")
    if not text.startswith("---\n") or not sep:
        raise RuntimeError(f"{CARD} has no front matter (--- ... ---)")
    settings = {"sdk_version": importlib.metadata.version(SDK),
                "python_version": f'"{sys.version_info.major}.{sys.version_info.minor}"'}
    for key, value in settings.items():
        front, count = re.subn(rf"^{key}:.*$", f"{key}: {value}", front, flags=re.M)
        if count != 1:
            raise RuntimeError(f"{CARD}'s front matter has no {key}")
    built = (f"\n## This folder\n\nWritten by `python -m space.build` from {source_revision()}; it serves "
             + ", ".join(f"`{m}`" for m in models) + " (bundled under `hub_models/`).\n")
    return f"---\n{front}\n---\n{body.rstrip()}\n{built}"


def source_revision() -> str:
    """The checkout's commit (with "+ uncommitted changes" when space/, hub_models/ or evidence/ differ from it), if it
    is one."""
    root = SPACE_DIR.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "space", *PACKAGES],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "a copy of the project that is not a git checkout"
    return f"commit {commit}" + (" + uncommitted changes" if dirty else "")


def release_names(models: str | list[str] | None) -> list[str]:
    """Released detector names (``NAME`` or ``bayesfake/NAME``, a list or comma-separated); default: those served by
    default (``hub_models.hub.DEFAULT_REPO_IDS``; an opt-in release is bundled only when named)."""
    if models is None:
        return [repo_id.removeprefix(f"{HUB_ORG}/") for repo_id in DEFAULT_REPO_IDS]
    if isinstance(models, str):
        models = models.split(",")
    names = [m.strip().removeprefix(f"{HUB_ORG}/") for m in models if m.strip()]
    unknown = [n for n in names if n not in RELEASED or bundled_folder(n) is None]
    if unknown or not names:
        raise ValueError(f"not a released detector with a folder under {HUB_MODELS_DIR}: "
                         f"{', '.join(unknown) or '(none given)'}; choose from {', '.join(RELEASED)}")
    return list(dict.fromkeys(names))


def build_space(out_dir: str | Path, models: str | list[str] | None = None, overwrite: bool = False) -> Path:
    """Write the Space folder for the released detectors ``models`` (default: all) into ``out_dir``; return it.

    ``out_dir`` must be empty or absent; with ``overwrite``, what an earlier build wrote there is replaced (other files,
    such as a Space repo's .git, are kept)."""
    names = release_names(models)
    out = Path(out_dir).resolve()
    if out == SPACE_DIR or SPACE_DIR in out.parents or out in SPACE_DIR.parents:
        raise ValueError(f"write the Space folder outside the checkout's space/ folder (got {out})")
    app_files = sorted(p for p in SPACE_DIR.glob("*.py") if p.name not in DEV_ONLY)
    written = [*(p.name for p in app_files), "examples", *PACKAGES, "README.md", "requirements.txt", MODELS_FILE]
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (pass overwrite=True / --overwrite to replace a built Space)")
        for name in written:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for path in app_files:
        shutil.copyfile(path, out / path.name)
    shutil.copytree(SPACE_DIR / "examples", out / "examples", symlinks=False)
    package = out / "hub_models"
    package.mkdir()
    for path in package_modules(app_files):
        shutil.copyfile(path, package / path.name)
    for name in names:  # self-contained copies: the releases' code files are symlinks to hub_models/*.py in a checkout
        write_hub_folder(bundled_folder(name), package / name)
    (out / "evidence").mkdir()
    for path in sorted(EVIDENCE_DIR.glob("*.py")):
        shutil.copyfile(path, out / "evidence" / path.name)
    (out / MODELS_FILE).write_text("# Served by default (app.py --models or BAYESFAKE_MODELS override it)\n"
                                   + "".join(f"{HUB_ORG}/{name}\n" for name in names))
    (out / "README.md").write_text(card_text([f"{HUB_ORG}/{name}" for name in names]))
    (out / "requirements.txt").write_text(requirements_text(out))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="the Space folder to write (empty or absent)")
    parser.add_argument("--models", help=f"comma-separated released detectors (default: those served by default: "
                                         f"{','.join(DEFAULT_REPO_IDS)}; any of {','.join(RELEASED)})")
    parser.add_argument("--overwrite", action="store_true", help="replace what an earlier build wrote in OUT_DIR")
    args = parser.parse_args(argv)
    try:
        out = build_space(args.out_dir, args.models, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB); run it with `cd {out} && python app.py`, push it with "
          f"`hf upload ORG/SPACE {out} . --repo-type space`")


if __name__ == "__main__":
    main()
