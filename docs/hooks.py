"""MkDocs hooks for the generated reference pages.

* mkdocs-typer2 inserts the ``hpo --help`` pages as finished HTML elements, and Markdown then
  runs its inline patterns over their text: a usage line such as ``hpo check-data [OPTIONS]
  [module]`` reads as a reference link, which mkdocs-autorefs fails to resolve (and
  ``--strict`` stops the build). Marking that text atomic, before the inline pass, leaves it
  as the CLI printed it.
* The docstrings name code with Sphinx roles (``:class:`Report```), which mkdocstrings renders
  as Markdown: the role would show as text before the code, so it is dropped.
"""

from __future__ import annotations

import re
from typing import Any
from xml.etree.ElementTree import Element

from markdown import Extension, Markdown
from markdown.treeprocessors import Treeprocessor
from markdown.util import AtomicString

SPHINX_ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|attr|data|exc|obj):(?=<code>)")


class _AtomicCliDocs(Treeprocessor):
    def run(self, root: Element) -> None:
        for block in root.iter("div"):
            if block.get("class") == "typer-docs":
                for element in block.iter():
                    if element.text:
                        element.text = AtomicString(element.text)
                    if element.tail and element is not block:
                        element.tail = AtomicString(element.tail)


class _AtomicCliDocsExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:  # Markdown's own name
        md.treeprocessors.register(_AtomicCliDocs(md), "hpo_atomic_cli_docs", 25)  # before "inline" (20)


def on_config(config: Any, **kwargs: Any) -> Any:
    config.markdown_extensions.append(_AtomicCliDocsExtension())
    return config


def on_page_content(html: str, **kwargs: Any) -> str:
    return SPHINX_ROLE.sub("", html)
