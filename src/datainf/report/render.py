"""The Jinja2 templates of the reports (``report/templates``: the pages, their pieces and their CSS).

Autoescaping is on for every template: a text from the data (a training example, a setting, a title) is
always HTML-escaped, so it shows as text and never as markup. Undefined names are errors, not empty text.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jinja2

#: the folder of the templates, inside the package (shipped as package data)
TEMPLATES = Path(__file__).with_name("templates")


@functools.cache
def environment() -> jinja2.Environment:
    """The one template environment: templates from :data:`TEMPLATES`, autoescaping on, strict undefined."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(template: str, **data: Any) -> str:
    """The text of ``template`` (a file name under :data:`TEMPLATES`) rendered with ``data``."""
    return environment().get_template(template).render(**data)


__all__ = ["TEMPLATES", "environment", "render"]
