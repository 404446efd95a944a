"""The CLI reference page (reference/cli.md), generated from the commands' own argparse parsers.

mkdocs-gen-files runs this file at every ``mkdocs build`` (mkdocs.yml: plugins, gen-files), so the page lists
exactly the flags that ``--help`` shows and can never drift from it: every option string of every parser, with
its group, metavar, default and help. ``render()`` needs neither mkdocs nor a build (tests/test_docs.py calls it).
"""
from __future__ import annotations

import argparse
import html
import importlib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = "reference/cli.md"

# (script, what it is), in the order of the pipeline; the console scripts come from pyproject.toml
COMMANDS = [
    ("get_importances_for_classes", "stage 1: relevance of every unit for every training image"),
    ("get_cosine_similarities", "stage 2: candidate channels and gamma-polysemantic pairs"),
    ("disentangle_channel", "stage 3: split one channel"),
    ("get_results", "stage 4: results on the validation images"),
    ("summarize_results", "the paper's table"),
    ("visualize_channel", "pictures of a channel before and after the split"),
    ("disentangle_layer", "a whole layer in one command"),
    ("demo", "the whole pipeline on bundled data"),
]
WIDTH = 76  # the usage block: as --help prints it in a terminal this wide (a code block of the page)


def console_scripts() -> dict[str, str]:
    """script module -> console script, as pyproject.toml's [project.scripts] declares them."""
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    return {m: s for s, m in re.findall(r'^(dc-[\w-]+)\s*=\s*"disentangle_channels\.cli\.(\w+):cli"', text, re.M)}


def parser_of(name: str) -> argparse.ArgumentParser:
    """The command's parser, as ``python NAME.py`` builds it (utils.cli.NAME is what the script runs)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    p = importlib.import_module(f"utils.cli.{name}").get_args_parser()
    p.prog = f"{name}.py"
    p.formatter_class = lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=WIDTH)
    return p


def _text(s: str) -> str:
    """Plain text inside a Markdown table cell: nothing in it is read as Markdown or HTML."""
    s = re.sub(r"([\\`*_\[\]|{}])", r"\\\1", " ".join(s.split()))
    return html.escape(s, quote=False).replace("$", "&#36;")  # no $ starts maths


def _code(s: str) -> str:
    """Inline code inside a table cell (a pipe would end the cell even in a code span: written as an entity)."""
    return "<code>" + html.escape(s, quote=False).replace("|", "&#124;") + "</code>"


def _flags(fmt: argparse.HelpFormatter, a: argparse.Action) -> str:
    """The option strings (one per line) and, below them, the arguments they take: ``--mean`` / ``M [M ...]``."""
    if not a.option_strings:
        return _code(a.dest)
    cell = "<br>".join(_code(o) for o in a.option_strings)
    if a.nargs != 0:
        cell += "<br>" + _code(fmt._format_args(a, a.dest.upper()))
    return cell


def _default(a: argparse.Action) -> str:
    """`` (default: X)``, unless the help says it already (in its words: a computed default such as
    --num_workers' min(8, CPUs) would show the number of the machine that built the page)."""
    if a.default in (None, argparse.SUPPRESS) or a.nargs == 0 or "default" in (a.help or ""):
        return ""
    value = " ".join(map(str, a.default)) if isinstance(a.default, (list, tuple)) else str(a.default)
    return f" (default: {_code(value)})"


def _help(fmt: argparse.HelpFormatter, a: argparse.Action) -> str:
    if a.help == argparse.SUPPRESS:
        return "(accepted; not shown by <code>--help</code>)"
    text = _text(fmt._expand_help(a)) if a.help else ""
    if a.required:
        text += " **(required)**"
    return text + _default(a)


def render_command(name: str, what: str, console: str | None) -> str:
    p = parser_of(name)
    fmt = p._get_formatter()
    out = [f"## `{name}.py` {{#{name}}}", "", f"{what[0].upper()}{what[1:]}."
           + (f" Installed as the console script `{console}`, with the same flags." if console else ""), "",
           "```text", p.format_usage().rstrip(),
           "```", ""]
    if p.description:
        out += ["??? note \"What it does (the top of `--help`)\"", "", "    ```text"]
        out += [f"    {ln}".rstrip() for ln in p.description.strip("\n").splitlines()]
        out += ["    ```", ""]
    for group in p._action_groups:
        actions = group._group_actions
        if not actions:
            continue
        title = "options" if group.title in ("optional arguments", "options") else group.title
        out += [f"**{_text(title)}**", "", '<div class="cli-flags" markdown>', "", "| flag | meaning |",
                "| --- | --- |"]
        out += [f"| {_flags(fmt, a)} | {_help(fmt, a)} |" for a in actions]
        out += ["", "</div>", ""]
    return "\n".join(out)


def render() -> str:
    """The whole page: every command, every group, every option string."""
    consoles = console_scripts()
    head = ["# Command-line reference", "",
            "Generated from the commands' own parsers (`get_args_parser()` in `utils/cli/`) every time the site "
            "is built, so it lists exactly what `--help` prints: every flag of every command, with its group, "
            "arguments, help and default. Each script runs the same way from a clone (`python SCRIPT.py`), as its "
            "console script after `pip install .`, and under torchrun (`torchrun --nproc_per_node=N -- SCRIPT.py ...`, "
            "see [Running at scale](../scale.md)). Bad input gets one line `error: ...` on stderr and exit code 2 "
            "(see [Troubleshooting](../troubleshooting.md)).", "",
            "| command | console script | what |", "| --- | --- | --- |"]
    head += [f"| [`{n}.py`](#{n}) | `{consoles.get(n, '-')}` | {w} |" for n, w in COMMANDS]
    return "\n".join(head) + "\n\n" + "\n\n".join(render_command(n, w, consoles.get(n)) for n, w in COMMANDS) + "\n"


if __name__ == "<run_path>":  # mkdocs-gen-files, at build time
    import mkdocs_gen_files

    with mkdocs_gen_files.open(PAGE, "w") as f:
        f.write(render())
    # the quickstart notebook lives in examples/ (a test runs it there); the site renders a copy (mkdocs-jupyter),
    # not run at build time, with a note under its title saying so
    import json

    with open(os.path.join(ROOT, "examples", "quickstart.ipynb"), encoding="utf-8") as src:
        nb = json.load(src)
    nb["cells"].insert(1, {"cell_type": "markdown", "id": "site-note", "metadata": {}, "source": [
        "> This page shows `examples/quickstart.ipynb` of the repository as it is stored, without outputs; run it in "
        "Jupyter (after `pip install -e \".[demo]\"`) to see them."]})
    with mkdocs_gen_files.open("quickstart.ipynb", "w") as f:
        json.dump(nb, f, indent=1)
elif __name__ == "__main__":
    sys.stdout.write(render())
