"""The documentation: the CLI reference lists every flag of every command, the site builds with
``mkdocs build --strict`` (when the docs extra is installed: ``pip install -e ".[docs]"``), and the README stays a
front page whose links, like every page's, point at files that exist."""
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def gen_cli():
    """docs/gen_cli.py as a module (mkdocs-gen-files runs it at build time; ``render()`` needs no mkdocs)."""
    spec = importlib.util.spec_from_file_location("gen_cli", os.path.join(DOCS, "gen_cli.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pages() -> list[str]:
    return sorted(os.path.join(folder, f) for folder, _, files in os.walk(DOCS) for f in files if f.endswith(".md"))


def test_cli_reference_lists_every_flag_of_every_command():
    gen = gen_cli()
    text = gen.render()
    commands = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "utils", "cli"))
                      if f.endswith(".py") and f not in ("__init__.py", "parsing.py"))
    assert sorted(name for name, _ in gen.COMMANDS) == commands  # a new command gets its section
    scripts = gen.console_scripts()
    assert sorted(scripts) == commands
    for name in commands:
        assert f"## `{name}.py`" in text and f"`{scripts[name]}`" in text, name
        parser = importlib.import_module(f"utils.cli.{name}").get_args_parser()
        section = text.split(f"## `{name}.py`", 1)[1].split("\n## ", 1)[0]
        options = [o for a in parser._actions for o in a.option_strings]
        assert len(options) > 3, name
        for option in options:  # the flag itself in a code span, never a prefix of a longer flag (--p, --f)
            assert re.search(rf"<code>{re.escape(option)}[ <]", section), f"{name}.py: {option} not in the reference"


@pytest.mark.parametrize("module", ["mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python",
                                    "mkdocs_gen_files", "mkdocs_jupyter"])
def test_docs_extra_is_declared(module):
    """Whatever the site's build imports is in pyproject.toml's docs extra."""
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    extra = re.search(r"^docs = \[(.*?)^\]", text, re.M | re.S)
    assert extra, "no docs extra in pyproject.toml"
    package = {"material": "mkdocs-material", "mkdocstrings_handlers.python": "mkdocstrings",
               "mkdocs_gen_files": "mkdocs-gen-files", "mkdocs_jupyter": "mkdocs-jupyter"}.get(module, module)
    assert re.search(rf'"{re.escape(package)}[\[>=<"]', extra.group(1)), package


def test_site_builds_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_gen_files",
                   "mkdocs_jupyter"):
        pytest.importorskip(module, reason='the docs extra is not installed (pip install -e ".[docs]")')
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "--classes_for_concept1" in cli and "--max_images_per_class" in cli
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "disentangle" in api and "polysemantic_pairs" in api and "UserError" in api
    assert (site / "quickstart" / "index.html").is_file()
    assert not any(re.search(r":(func|class|meth):<code>", p.read_text()) for p in site.rglob("*.html"))


def test_readme_is_a_front_page():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move the rest into docs/"


def _links(path: str) -> list[str]:
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_relative_links_point_at_files():
    """Every relative link of README.md and of the docs pages names a file that exists; the pages link only inside
    docs/ (what the site serves) or to the pages made at build time."""
    generated = {os.path.join(DOCS, *gen_cli().PAGE.split("/")), os.path.join(DOCS, "quickstart.ipynb")}
    checked = 0
    for path in [os.path.join(ROOT, "README.md"), *pages()]:
        for link in _links(path):
            if re.match(r"^[a-z]+:", link) or link.startswith("#"):
                continue
            target = os.path.normpath(os.path.join(os.path.dirname(path), link.split("#")[0]))
            where = os.path.relpath(path, ROOT)
            assert os.path.exists(target) or target in generated, f"{where}: {link} points at nothing"
            if path.startswith(DOCS + os.sep):
                assert target.startswith(DOCS + os.sep), f"{where}: {link} leaves docs/ (the site cannot serve it)"
            checked += 1
    assert checked > 50


def test_the_architecture_page_lists_every_module_of_the_package_and_no_other():
    """The layout table of docs/architecture.md against the package's files: a module moved, added or renamed
    without the page following fails here."""
    page = open(os.path.join(DOCS, "architecture.md"), encoding="utf-8").read()
    listed = set(re.findall(r"^\| `([a-z_0-9/]+\.py)` \|", page, re.M))
    utils = os.path.join(ROOT, "utils")
    present = {os.path.relpath(os.path.join(folder, f), utils).replace(os.sep, "/")
               for folder, _, files in os.walk(utils) for f in files
               if f.endswith(".py") and f != "__init__.py"
               and (f == "parsing.py" or not folder.endswith(os.sep + "cli"))}  # the commands: one row, `cli/`
    assert listed >= present, f"not on the page: {sorted(present - listed)}"
    scripts = {f for f in os.listdir(ROOT) if f.endswith(".py")}
    assert listed <= present | scripts, f"on the page, not in the package: {sorted(listed - present - scripts)}"
