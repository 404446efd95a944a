"""MkDocs hooks (mkdocs.yml: hooks): the docstrings' Sphinx roles (:func:`x`, :class:`x`, :meth:`x`, :data:`x`)
shown as the code they name on the API reference page, instead of the role's raw text."""
import re

_ROLE = re.compile(r":(?:func|class|meth|data|attr|mod):(<code>)")


def on_page_content(html, page, config, files):
    return _ROLE.sub(r"\1", html)
