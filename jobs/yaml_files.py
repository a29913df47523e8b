"""Reading the YAML files users write (templates, schedules) with one-line errors."""

from __future__ import annotations

from pathlib import Path


def read_yaml(path: str | Path, kind: str, error: type[Exception]):
    """The parsed YAML of `path`; `error` (a UserError subclass) says which `kind` of file could not
    be read or parsed, and on which line."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {kind} file {path}: {exc}") from None
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml's: 10x faster
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"bad {kind} file {path}: YAML error{where}: {problem}") from None
