"""The docs site builds with ``mkdocs build --strict``, and its generated reference holds
every sweep field, recipe parameter and command, each with its documentation.

The build fails on a broken link or anchor, a page missing from the nav, or a reference
(``[packing][hpo.Sweep.packing]``) that does not resolve. The reference pages are generated from
the code (mkdocstrings, mkdocs-typer2), so these tests fail when a field loses its docstring or a
command vanishes from the page, which the build alone lets through (mkdocs-typer2 writes an empty
page when ``typer ... utils docs`` fails). README.md's links into docs/ are checked against the
built site too. One build, about 5 s.
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import griffe
import pytest
import typer

from hpo.cli import app
from hpo.config import Sweep
from hpo.train.recipe import TrainParams

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    env = {
        **os.environ,
        # mkdocs-typer2 runs the `typer` command of this environment; the reference imports this checkout
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "NO_MKDOCS_2_WARNING": "1",
    }
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return folder


def _words(text: str) -> str:
    """Only the words of ``text``, one space apart: markup and punctuation do not count."""
    return " ".join(re.findall(r"[\w*/-]+", text))


def _plain(fragment: str) -> str:
    return _words(html.unescape(re.sub(r"<[^>]+>", " ", fragment)))


def _text(page: Path) -> str:
    """The words of the page's article."""
    source = page.read_text()
    return _plain(source[source.index("<article"):source.index("</article>")])


def _sections(page: Path, prefix: str) -> dict[str, str]:
    """Each documented object under ``prefix`` (its heading id) -> the words up to the next one."""
    source = page.read_text()
    marks = [(m.start(), m.group(1)) for m in re.finditer(rf'id="({re.escape(prefix)}[\w.-]+)"', source)]
    ends = [start for start, _ in marks[1:]] + [len(source)]
    return {name: _plain(source[source.index(">", start):end]) for (start, name), end in zip(marks, ends, strict=True)}


def _first_words(docstring: str, count: int = 5) -> str:
    """The docstring's opening words as the page shows them (Sphinx roles dropped)."""
    return " ".join(_words(re.sub(r":\w+:`", "`", docstring)).split()[:count])


@pytest.mark.parametrize(("cls", "page", "path"), [
    (Sweep, "sweep", "hpo.Sweep"),
    (TrainParams, "train-params", "hpo.train.recipe.TrainParams"),
])
def test_every_field_is_in_the_reference_with_its_docstring(site: Path, cls: type, page: str, path: str) -> None:
    loaded = griffe.load(path.rsplit(".", 1)[0], search_paths=[str(REPO)])[path.rsplit(".", 1)[1]]
    sections = _sections(site / "reference" / page / "index.html", f"{path}.")
    for field in dataclasses.fields(cls):
        docstring = loaded.members[field.name].docstring if field.name in loaded.members else None
        assert docstring and docstring.value.strip(), f"{path}.{field.name} has no docstring for the reference"
        shown = sections.get(f"{path}.{field.name}")
        assert shown is not None, f"{path}.{field.name} is missing from docs/reference/{page}.md's page"
        assert _first_words(docstring.value) in shown, f"{path}.{field.name}'s docstring is not on its page"


def test_every_command_and_flag_is_in_the_cli_reference(site: Path) -> None:
    page = (site / "reference" / "cli" / "index.html").read_text()
    root = typer.main.get_command(app)
    sections = _sections(site / "reference" / "cli" / "index.html", "hpo-")
    assert set(root.commands), "hpo has no commands"
    for name, command in root.commands.items():
        anchor = f"hpo-{name}"
        assert f'id="{anchor}"' in page, f"`hpo {name}` is missing from the CLI reference"
        shown = sections[anchor]
        assert _first_words(command.help or "", 3) in shown, f"`hpo {name}`'s help is not on its page"
        for option in (p for p in command.params if p.param_type_name == "option"):
            if option.hidden:  # kept only to refuse it with a message (`hpo search --resume`): not offered
                assert option.opts[0] not in shown, f"`hpo {name} {option.opts[0]}` is hidden, yet in the reference"
                continue
            assert option.opts[0] in shown, f"`hpo {name} {option.opts[0]}` is missing from the CLI reference"


def test_the_reports_contract_is_in_its_reference(site: Path) -> None:
    text = _text(site / "reference" / "report" / "index.html")
    for fact in ("step is an int greater than the previous call's", "ReportError", "config/*", "hpo_*"):
        assert _words(fact) in text, f"the report contract lost {fact!r}"


def test_readme_links_into_the_docs_resolve(site: Path) -> None:
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert links, "README.md links to no docs page"
    for target, anchor in links:
        assert (REPO / target).is_file(), f"README.md links to {target}, which does not exist"
        built = site / Path(target).relative_to("docs").with_suffix("") / "index.html"
        if target == "docs/index.md":
            built = site / "index.html"
        assert built.is_file(), f"README.md links to {target}, which the site does not build"
        if anchor:
            assert f'id="{anchor}"' in built.read_text(), f"README.md links to {target}#{anchor}: no such anchor"
