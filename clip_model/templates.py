"""Prompt templates for zero-shot classification: "a photo of a {c}." with "{c}" the class name.

Light on purpose (no torch): eval suites validate their templates when a command line checks its
input, before anything heavy is loaded. clip_model.zero_shot uses them to build classifiers.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CLASS_PLACEHOLDER", "check_templates", "fill_template"]

CLASS_PLACEHOLDER = "{c}"


def check_templates(templates: Sequence[str], *, source: str = "templates") -> list[str]:
    """Return `templates` as a list; ValueError naming the first one without "{c}"."""
    if isinstance(templates, str):
        raise ValueError(f"{source}: expected a list of templates, got the string {templates!r}")
    templates = list(templates)
    if not templates:
        raise ValueError(f"{source}: no templates; give at least one, e.g. 'a photo of a {{c}}.'")
    for template in templates:
        if CLASS_PLACEHOLDER not in template:
            raise ValueError(
                f"{source}: template {template!r} has no {CLASS_PLACEHOLDER} placeholder for the "
                f"class name; write it as e.g. 'a photo of a {{c}}.'"
            )
    return templates


def fill_template(template: str, classname: str) -> str:
    """`template` with every "{c}" replaced by `classname` (other braces are left as they are)."""
    return template.replace(CLASS_PLACEHOLDER, classname)
