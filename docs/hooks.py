"""MkDocs hooks (mkdocs.yml): the job spec reference generated from the pydantic models that validate
every spec (service.spec), so that it cannot drift from them; and the benchmarks' figures
(bench/figures/) published under figures/, where docs/benchmarks.md links them."""

from __future__ import annotations

import inspect
import sys
import textwrap
import types
import typing
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "bench" / "figures"
REFERENCE = "job-spec-reference.md"
MARKER = "<!-- the job spec reference (docs/hooks.py) -->"


def on_files(files, config):
    """bench/figures/* as figures/* of the site (the plots, and the tables the benchmarks write: pages
    linked from the benchmarks page, not in the nav)."""
    for path in sorted(FIGURES.glob("*")):
        if path.suffix in (".png", ".md", ".json") and path.is_file():
            files.append(File(f"figures/{path.name}", src_dir=str(FIGURES.parent), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"],
                              inclusion=InclusionLevel.NOT_IN_NAV if path.suffix == ".md" else InclusionLevel.UNDEFINED))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != REFERENCE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{REFERENCE} lost its marker {MARKER!r}")
    return markdown.replace(MARKER, spec_reference())


def _type(annotation: object) -> str:
    """A field's type as a reader writes it: `int`, `float or null`, `magnitude | random | ...`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in typing.get_args(annotation) if a is not type(None)]
        nullable = type(None) in typing.get_args(annotation)
        return " or ".join(parts) + (" or null" if nullable else "")
    if origin in (list, tuple, dict):
        args = ", ".join(_type(a) for a in typing.get_args(annotation) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    if isinstance(annotation, type):
        return annotation.__name__ if not hasattr(annotation, "model_fields") else f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return str(annotation).replace("typing.", "")


def _bounds(field) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}
    out = []
    for m in field.metadata:
        for attr, word in words.items():
            value = getattr(m, attr, None)
            if value is not None:
                out.append(f"{word} {value:g}" if isinstance(value, float) else f"{word} {value}")
    return ", ".join(out)


def _default(field) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(made when needed)"
    else:
        value = field.default
    if hasattr(value, "model_dump"):
        return "(its own defaults)"
    return f"`{value!r}`".replace("|", "\\|") if value is not None else "null"


def _docstring(doc: str) -> list[str]:
    """A class docstring as Markdown: its paragraphs, and a block after a line ending in `::` as code."""
    lines = inspect.cleandoc(doc).splitlines() if doc.strip() else []
    out, para, code = [], [], None
    for line in lines + [""]:
        if code is not None:
            if line.strip() == "" or line.startswith(" "):
                code.append(line)
                continue
            out += ["```yaml", *textwrap.dedent("\n".join(code)).strip("\n").splitlines(), "```", ""]
            code = None
        if line.strip() == "":
            if para:
                out += [" ".join(para), ""]
                para = []
        elif line.rstrip().endswith("::"):
            para.append(line.rstrip()[:-1])
            out += [" ".join(para), ""]
            para, code = [], []
        else:
            para.append(line.strip())
    return out


def spec_reference() -> str:
    """Every section of the job spec: its fields, types, defaults and bounds, from service.spec."""
    sys.path.insert(0, str(ROOT))
    from service import spec
    sections, seen = [spec.JobSpec], set()
    out = []
    while sections:
        model = sections.pop(0)
        if model.__name__ in seen:
            continue
        seen.add(model.__name__)
        out += [f"## {model.__name__}", "", *_docstring(model.__doc__ or "")]
        out += ["| field | type | default | bounds |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            out.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {_bounds(field)} |")
            for a in [field.annotation, *typing.get_args(field.annotation)]:
                for b in [a, *typing.get_args(a)]:
                    if isinstance(b, type) and hasattr(b, "model_fields"):
                        sections.append(b)
        out.append("")
    return "\n".join(out)
