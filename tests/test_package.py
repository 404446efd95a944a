"""The installable package: ``pip install .`` gives ``disentangle_channels`` (never a bare ``utils``) and the console
scripts; the top-level scripts of a clone are the command modules themselves."""
import importlib
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script (top-level file and utils/commands module) -> (console script, a flag its --help names)
COMMANDS = {
    "get_importances_for_classes": ("dc-importances", "--max_images_per_class"),
    "get_cosine_similarities": ("dc-similarities", "--cos_sim_low"),
    "disentangle_channel": ("dc-channel", "--channel_disentangle"),
    "get_results": ("dc-results", "--get_quantitative"),
    "summarize_results": ("dc-summarize", "--results_dir"),
    "visualize_channel": ("dc-visualize", "--fv_method"),
    "disentangle_layer": ("dc-layer", "--min_concepts"),
    "demo": ("dc-demo", "--max_channels"),
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install --target`` of the project, once per session. It is built from a copy of what the build reads
    (pyproject.toml, README.md, utils/), so that setuptools' build/ and egg-info never land in the working tree."""
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("target")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "utils"), src / "utils", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "-q", "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return target


def _run_installed(target, tmp_path, *args):
    """``python ARGS`` in ``tmp_path`` with only the installed copy on the path (not the repository)."""
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_install_gives_one_package_and_no_utils(installed, tmp_path):
    assert (installed / "disentangle_channels" / "__init__.py").is_file()
    assert (installed / "disentangle_channels" / "cli" / "__init__.py").is_file()
    assert not (installed / "utils").exists()
    imports = "; ".join(f"import disentangle_channels.cli.{m}" for m in COMMANDS)
    r = _run_installed(installed, tmp_path, "-c", (
        f"import sys, disentangle_channels; {imports}; print(disentangle_channels.__version__); "
        "print(disentangle_channels.cli.demo.demo_model('vit', None)); "
        "print(sorted(m for m in sys.modules if m == 'utils' or m.startswith('utils.')))"))
    assert r.returncode == 0, r.stderr
    version, vit, utils_modules = r.stdout.splitlines()
    assert version == importlib.import_module("utils").__version__ == "0.1.0"
    # --model vit of dc-demo is the installed file of the digits ViT
    assert vit == f"{installed / 'disentangle_channels' / 'model' / 'demo_models.py'}:digits_vit", vit
    assert utils_modules == "[]"


def test_console_scripts_help(installed, tmp_path):
    for module, (script, flag) in COMMANDS.items():
        path = installed / "bin" / script
        assert path.is_file(), script
        r = _run_installed(installed, tmp_path, str(path), "--help")
        assert r.returncode == 0 and flag in r.stdout and r.stdout.startswith(f"usage: {script}"), (script, r.stderr)


def test_scripts_are_the_command_modules():
    """``import get_results`` (tests, benchmarks) gives the package's module, so monkeypatching it reaches main."""
    for module in COMMANDS:
        assert importlib.import_module(module) is importlib.import_module(f"utils.cli.{module}"), module


def test_scripts_help_from_the_clone():
    """``python SCRIPT --help`` of the scripts whose help no other test runs as a process (the others: test_demo,
    test_stage1, test_stage3, test_stage4, test_visualize)."""
    for module in ("get_cosine_similarities", "summarize_results", "disentangle_layer"):
        r = subprocess.run([sys.executable, f"{module}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and COMMANDS[module][1] in r.stdout, (module, r.stderr)


def test_the_quickstart_notebook_runs_top_to_bottom_on_the_installed_package(installed, tmp_path, monkeypatch):
    """examples/quickstart.ipynb executed by a Jupyter kernel that sees only the installed package (not the
    clone): every cell runs, the logits are kept, the saved result loads with the same activations and the report
    is shown inline."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", str(installed))
    nb = nbformat.read(os.path.join(ROOT, "examples", "quickstart.ipynb"), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # to look at
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "the same concept activations after loading: True" in text
    diff = float(text.split("largest |logit difference| on 397 validation images: ")[1].split()[0])
    assert diff <= 1e-3
    shown = nb.cells[-1].outputs[0]["data"]["text/html"]
    assert shown.startswith("<iframe srcdoc=") and "data:image/png;base64," in shown
    assert (tmp_path / "quickstart_result" / "disentangled.pt").is_file()


def test_the_old_path_of_the_demo_vit_still_builds(tmp_path):
    """Stores and exported networks made before the package was rehoused name ``utils/demo_models.py``: that
    path still builds the digits ViT (the same weights from the same seed); another missing file is still refused."""
    import torch

    from utils.errors import UserError
    from utils.model.sources import build_own

    repo = os.path.dirname(importlib.import_module("utils").__path__[0])
    new = build_own(os.path.join(repo, "utils", "model", "demo_models.py") + ":digits_vit", "none", None, seed=3)
    old = build_own(os.path.join(repo, "utils", "demo_models.py") + ":digits_vit", "none", None, seed=3)
    assert new.weights_id == old.weights_id
    for a, b in zip(new.model.state_dict().values(), old.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="no file"):
        build_own(str(tmp_path / "models" / "demo_models.py") + ":digits_vit", "none", None)
