"""Prompt templates: one YAML file per scenario (travel-guide page, product poster, menu, …).

A template file holds `name`, `description`, `language` (en|zh|auto), `aspect_ratio` (one of
Qwen-Image's), `negative_prompt`, `params` (name -> {description, required, default, example,
alternatives}) and `prompt`, a Jinja2 template. Text that must be drawn in the image goes through
the `quoted` filter, which wraps it in double quotes and changes nothing else:

    prompt: A poster with the title {{ title | quoted }} …      # -> … the title "故宫 · The Forbidden City" …
    prompt: 海报标题为{{ title | quoted("zh") }}                 # -> 海报标题为“故宫”

Autoescaping is off (a prompt is not HTML) and undefined names are errors (StrictUndefined).
After rendering, the template's OWN whitespace is tidied (runs of spaces from YAML line folding or
an empty `{% if %}` block become one space, none between two CJK characters); quoted text is
kept byte for byte.

Built-in templates live in the repository's top-level `templates/` directory. After a regular
(non-editable) install they are found in `jobs/builtin_templates/`: pyproject.toml maps
`templates/` there at build time (see `builtin_templates_dir`). User directories add templates or
replace built-ins of the same name.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.meta
import jinja2.sandbox

from qwen_worker.errors import UserError
from qwen_worker.presets import ASPECT_RATIOS  # Qwen-Image's table, (width, height) by ratio

LANGUAGES = ("en", "zh", "auto")
TEMPLATE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

_TEMPLATE_FIELDS = {"name", "description", "language", "aspect_ratio", "negative_prompt", "params", "prompt"}
_OPTIONAL_FIELDS = {"inputs"}  # editing templates: what each input image of a row is
_PARAM_FIELDS = {"description", "required", "default", "example", "alternatives"}
_QUOTES = {"en": ('"', '"'), "zh": ("\u201c", "\u201d")}  # "…" and “…”
# `quoted` marks its output with these two private-use characters so that the whitespace tidy-up
# after rendering (YAML line folding, empty `{% if %}` blocks) never touches quoted text.
_KEEP_OPEN, _KEEP_CLOSE = "\ue000", "\ue001"


class TemplateError(UserError):
    """A template file is broken, or a template was given params it cannot render."""


# ---------------------------------------------------------------------------------------------
# params


def parse_params(value: Any) -> dict:
    """Params as a dict, from a dict or a JSON string holding an object.

    Raises TemplateError("params must be a JSON object, got: …") for anything else
    (a JSON list, a number, invalid JSON, None).
    """
    if type(value) is not str:  # a JSON string is the usual case: straight to the decoder
        if type(value) is dict:
            return value
        if isinstance(value, Mapping):
            return dict(value)
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            parsed = _JSON.decode(value)
        except RecursionError:
            raise TemplateError(f"params must be a JSON object nested less deeply, got: {_show(value)}") from None
        except ValueError:
            parsed = None
        if type(parsed) is dict:
            return parsed
    raise TemplateError(f"params must be a JSON object, got: {_show(value)}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)  # one decoder: json.loads with options builds one per call


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _value_problem(name: str, value: Any) -> str | None:
    """Why `value` cannot be a param value (strings and finite numbers only), or None."""
    ok = isinstance(value, str) or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    )
    if ok:
        return None
    return f"param `{name}` must be a string or a number, got: {type(value).__name__} {_show(value)}"


def _ticks(names) -> str:
    return ", ".join(f"`{n}`" for n in names)


# ---------------------------------------------------------------------------------------------
# the Jinja2 environment


def quoted(value: Any, style: str = "en") -> str:
    """Wrap text that must be drawn in the image in double quotes, verbatim (no escaping).

    style "en" gives "…", style "zh" gives “…” (the quotes Chinese prompts use)."""
    if style not in _QUOTES:
        raise jinja2.TemplateRuntimeError(f"quoted: style must be 'en' or 'zh', got: {style!r}")
    if value is None or isinstance(value, jinja2.Undefined):
        raise jinja2.TemplateRuntimeError("quoted: got no value")
    opening, closing = _QUOTES[style]
    return f"{_KEEP_OPEN}{opening}{value}{closing}{_KEEP_CLOSE}"


_QUOTED_SPLIT = re.compile(f"({_KEEP_OPEN}[^{_KEEP_CLOSE}]*{_KEEP_CLOSE})")


def _tidy(text: str) -> str:
    """Collapse the template's own whitespace: runs become one space, and disappear at the ends
    and between two CJK characters (YAML folds lines with a space, which Chinese does not use).
    Quoted text (between the markers) is kept byte for byte."""
    pieces = _QUOTED_SPLIT.split(text) if _KEEP_OPEN in text else [text]  # odd pieces: quoted, with markers
    out: list[str] = []
    last = ""  # the last character written
    pending_space = False  # whitespace seen since then
    for i, piece in enumerate(pieces):
        if i % 2:  # quoted: verbatim
            body = piece[1:-1]
            if pending_space and last and body and not (_is_cjk(last) and _is_cjk(body[0])):
                out.append(" ")
            if body:
                out.append(body)
                last = body[-1]
            pending_space = False
            continue
        tidied = _tidy_piece(piece) if len(piece) <= 1024 else _tidy_piece.__wrapped__(piece)
        if tidied is None:
            pending_space = pending_space or bool(piece)
            continue
        words, leading_space, trailing_space = tidied
        if (pending_space or leading_space) and last and not (_is_cjk(last) and _is_cjk(words[0])):
            out.append(" ")
        out.append(words)
        last = words[-1]
        pending_space = trailing_space
    return "".join(out)


@functools.lru_cache(maxsize=4096)  # most pieces are the template's own text between quoted values, the same each row
def _tidy_piece(piece: str) -> tuple[str, bool, bool] | None:
    """Unquoted text with its whitespace tidied on its own: (its words, joined by the rule; whether
    it starts with whitespace; whether it ends with whitespace), or None when it is all whitespace."""
    words = piece.split()
    if not words:
        return None
    out = [words[0]]
    for before, word in zip(words, words[1:]):
        if not (_is_cjk(before[-1]) and _is_cjk(word[0])):
            out.append(" ")
        out.append(word)
    return "".join(out), piece[0].isspace(), piece[-1].isspace()


def _is_cjk(c: str) -> bool:
    """Whether a space next to `c` on both sides may go (the characters _CJK_RE matches)."""
    if c < "\u201c":
        return False
    return (c <= "\u201d") or ("\u2e80" <= c <= "\u9fff") or ("\uf900" <= c <= "\ufaff") or (
        "\ufe30" <= c <= "\ufe4f") or ("\uff00" <= c <= "\uffef")


def _make_environment() -> jinja2.Environment:
    env = jinja2.sandbox.SandboxedEnvironment(
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    env.filters["quoted"] = quoted
    return env


_ENV = _make_environment()
_GLOBALS = dict(_ENV.globals)


# ---------------------------------------------------------------------------------------------
# Template


@dataclass(frozen=True)
class Param:
    name: str
    description: str
    required: bool
    example: Any
    default: Any = None  # only for optional params (required: false), which must have one
    alternatives: tuple = ()  # more example values, used to vary sample manifests

    @property
    def examples(self) -> tuple:
        return (self.example, *self.alternatives)


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    language: str
    aspect_ratio: str
    negative_prompt: str
    params: Mapping[str, Param]
    prompt: str  # the Jinja2 source
    source: str = ""  # the file it came from
    inputs: tuple = ()  # editing templates: a description of each input image a row gives (`image`/`images`)
    sha256: str = ""  # of the file's text: a job's identity includes the templates its rows use
    _compiled: Any = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the template's aspect ratio in Qwen-Image's table."""
        return ASPECT_RATIOS[self.aspect_ratio]

    def required_params(self) -> list[str]:
        return [p.name for p in self.params.values() if p.required]

    def sample_params(self, variant: int = 0) -> dict:
        """Params built from the examples; `variant` n picks each param's n-th example value
        (cycling through `example` + `alternatives`), so sample manifests vary deterministically."""
        return {p.name: p.examples[variant % len(p.examples)] for p in self.params.values()}

    def check_params(self, params: Any) -> dict:
        """The params with defaults filled in; TemplateError naming the broken rule otherwise."""
        given = parse_params(params)
        where = f"template '{self.name}'"
        if not given.keys() <= self.params.keys():
            unknown = [k for k in given if k not in self.params]
            raise TemplateError(
                f"{where}: unknown param(s) {_ticks(unknown)} (expected: {_ticks(self.params) or 'none'})"
            )
        missing = [name for name, param in self.params.items() if param.required and given.get(name) is None]
        if missing:
            raise TemplateError(f"{where}: missing param(s) {_ticks(missing)}")
        values = {}
        for name, param in self.params.items():
            value = given.get(name)
            if value is None:
                value = param.default
            kind = type(value)
            if kind is str:
                if param.required and not value.strip():
                    raise TemplateError(f"{where}: param `{name}` is required and must not be empty")
                if _KEEP_OPEN in value or _KEEP_CLOSE in value:
                    raise TemplateError(f"{where}: param `{name}` contains a reserved character (U+E000 or U+E001)")
            elif kind is not int and kind is not float or not math.isfinite(value):
                raise TemplateError(f"{where}: {_value_problem(name, value)}")
            values[name] = value
        return values

    def render(self, params: Any) -> str:
        """The prompt text for `params` (a dict or a JSON object string).

        The template's own whitespace is tidied (see `_tidy`); quoted text is never altered."""
        values = self.check_params(params)
        compiled = self._compiled
        try:  # what Template.render does, without copying the globals into a new dict per call
            return _tidy("".join(compiled.root_render_func(compiled.new_context({**_GLOBALS, **values}, shared=True))))
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template '{self.name}' ({self.source}): {_one_line(exc)}") from None
        except Exception as exc:  # a filter that fails on this value, e.g. round("twelve")
            raise TemplateError(
                f"template '{self.name}' ({self.source}) cannot render these params: {type(exc).__name__}: {_one_line(exc)}"
            ) from None

    def row_defaults(self) -> dict:
        """Manifest columns a row rendered from this template gets unless it sets them."""
        return {
            "language": self.language,
            "aspect_ratio": self.aspect_ratio,
            "negative_prompt": self.negative_prompt,
        }


def _template_from_mapping(data: Any, source: str) -> Template:
    def bad(message: str) -> TemplateError:
        return TemplateError(f"bad template file {source}: {message}")

    if not isinstance(data, dict):
        raise bad(f"expected a mapping at the top level, got: {type(data).__name__}")
    missing = sorted(_TEMPLATE_FIELDS - set(data))
    if missing:
        raise bad(f"missing field(s) {_ticks(missing)}")
    unknown = sorted(set(data) - _TEMPLATE_FIELDS - _OPTIONAL_FIELDS)
    if unknown:
        raise bad(f"unknown field(s) {_ticks(unknown)} (expected: {_ticks(sorted(_TEMPLATE_FIELDS | _OPTIONAL_FIELDS))})")
    inputs = data.get("inputs") or []
    if not isinstance(inputs, list) or not all(isinstance(item, str) and item.strip() for item in inputs) or len(inputs) > 3:
        raise bad(f"`inputs` must be a list of up to 3 descriptions of the row's input images, got: {_show(inputs)}")

    name = data["name"]
    if not isinstance(name, str) or not TEMPLATE_NAME_RE.match(name):
        raise bad(f"`name` must be lowercase letters, digits and dashes (at most 63), got: {_show(name)}")
    stem = Path(source).stem
    if stem != name:
        raise bad(f"`name` must match the file name {stem!r}, got: {name!r}")
    for key in ("description", "prompt"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise bad(f"`{key}` must be a non-empty string, got: {_show(data[key])}")
    if not isinstance(data["negative_prompt"], str):
        raise bad(f"`negative_prompt` must be a string (\" \" for none), got: {_show(data['negative_prompt'])}")
    if data["language"] not in LANGUAGES:
        raise bad(f"`language` must be one of {', '.join(LANGUAGES)}, got: {_show(data['language'])}")
    ratio = data["aspect_ratio"]
    if ratio not in ASPECT_RATIOS:
        hint = " (quote it in YAML, e.g. \"3:4\": unquoted, YAML reads 3:4 as a number)" if isinstance(ratio, int) else ""
        raise bad(f"`aspect_ratio` must be one of {' '.join(ASPECT_RATIOS)}, got: {_show(ratio)}{hint}")

    raw_params = data["params"] or {}
    if not isinstance(raw_params, dict):
        raise bad(f"`params` must be a mapping of name -> spec, got: {type(raw_params).__name__}")
    params: dict[str, Param] = {}
    for pname, spec in raw_params.items():
        if not isinstance(pname, str) or not PARAM_NAME_RE.match(pname):
            raise bad(f"param name must be an identifier, got: {_show(pname)}")
        if not isinstance(spec, dict):
            raise bad(f"param `{pname}`: expected a mapping, got: {type(spec).__name__}")
        unknown = sorted(set(spec) - _PARAM_FIELDS)
        if unknown:
            raise bad(f"param `{pname}`: unknown field(s) {_ticks(unknown)} (expected: {_ticks(sorted(_PARAM_FIELDS))})")
        for key in ("description", "required", "example"):
            if key not in spec:
                raise bad(f"param `{pname}`: missing field `{key}`")
        required = spec["required"]
        if not isinstance(required, bool):
            raise bad(f"param `{pname}`: `required` must be true or false, got: {_show(required)}")
        if required and "default" in spec:
            raise bad(f"param `{pname}`: a required param takes no `default`")
        if not required and "default" not in spec:
            raise bad(f"param `{pname}`: an optional param needs a `default` (\"\" for none)")
        alternatives = spec.get("alternatives") or []
        if not isinstance(alternatives, list):
            raise bad(f"param `{pname}`: `alternatives` must be a list, got: {type(alternatives).__name__}")
        param = Param(
            name=pname,
            description=str(spec["description"]),
            required=required,
            example=spec["example"],
            default=spec.get("default"),
            alternatives=tuple(alternatives),
        )
        for value in param.examples + (() if required else (param.default,)):
            problem = _value_problem(pname, value)
            if problem:
                raise bad(problem)
        params[pname] = param

    try:
        ast = _ENV.parse(data["prompt"])
        compiled = _ENV.from_string(data["prompt"])
    except jinja2.TemplateSyntaxError as exc:
        raise bad(f"Jinja2 syntax error in `prompt` line {exc.lineno}: {exc.message}") from None
    used = jinja2.meta.find_undeclared_variables(ast)
    undeclared = sorted(used - set(params))
    if undeclared:
        raise bad(f"`prompt` uses undeclared param(s) {_ticks(undeclared)} (declare them under `params`)")
    unused = [p for p in params if p not in used]
    if unused:
        raise bad(f"param(s) {_ticks(unused)} declared but never used in `prompt`")

    template = Template(
        name=name,
        description=data["description"].strip(),
        language=data["language"],
        aspect_ratio=ratio,
        negative_prompt=data["negative_prompt"],
        params=params,
        prompt=data["prompt"],
        source=source,
        inputs=tuple(item.strip() for item in inputs),
        _compiled=compiled,
    )
    for variant in range(max(len(p.examples) for p in params.values()) if params else 1):
        try:
            template.render(template.sample_params(variant))
        except TemplateError as exc:
            raise bad(f"does not render with its example params: {exc}") from None
    return template


def load_template_file(path: str | Path) -> Template:
    import dataclasses
    import hashlib

    from jobs.yaml_files import read_yaml

    path = Path(path)
    data = read_yaml(path, "template", TemplateError)
    template = _template_from_mapping(data, str(path))
    return dataclasses.replace(template, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


# ---------------------------------------------------------------------------------------------
# the library


def builtin_templates_dir() -> Path:
    """Where the built-in templates are.

    In a source checkout or an editable install: `<repo>/templates/` next to the `jobs` package.
    In a wheel install: `jobs/builtin_templates/`, which pyproject.toml maps from `templates/`
    (`package-dir = {"jobs.builtin_templates" = "templates"}` + package-data `*.yaml`)."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "builtin_templates", package_dir.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise TemplateError(
        f"built-in templates not found (looked in {package_dir / 'builtin_templates'} "
        f"and {package_dir.parent / 'templates'}); reinstall qwen-batch"
    )


class TemplateLibrary:
    """Templates by name: built-ins, then user directories (later ones replace earlier names)."""

    def __init__(self, templates: Mapping[str, Template] | None = None):
        self._templates: dict[str, Template] = dict(templates or {})

    def add_dir(self, directory: str | Path, *, must_exist: bool = True) -> None:
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            if must_exist:
                raise TemplateError(f"template directory not found: {directory}")
            return
        for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
            template = load_template_file(path)
            self._templates[template.name] = template

    def names(self) -> list[str]:
        return sorted(self._templates)

    def get(self, name: str) -> Template:
        try:
            return self._templates[name]
        except KeyError:
            raise TemplateError(f"unknown template {name!r} (known: {', '.join(self.names()) or 'none'})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._templates

    def __iter__(self):
        return iter(self._templates[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._templates)

    def render(self, name: str, params: Any) -> str:
        return self.get(name).render(params)


def load_library(extra_dirs: Sequence[str | Path] = (), *, builtin: bool = True) -> TemplateLibrary:
    """Built-in templates plus those in `extra_dirs` (a user file replaces a built-in of the same name)."""
    library = TemplateLibrary()
    if builtin:
        library.add_dir(builtin_templates_dir())
    for directory in extra_dirs:
        library.add_dir(directory)
    return library


__all__ = [
    "ASPECT_RATIOS",
    "LANGUAGES",
    "Param",
    "Template",
    "TemplateError",
    "TemplateLibrary",
    "builtin_templates_dir",
    "load_library",
    "load_template_file",
    "parse_params",
    "quoted",
]
