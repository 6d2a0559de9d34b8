"""The config reference, docs/config.md, generated from the schema: ``python -m vision_train.docs``.

Every key by its dotted name (``trainer.epochs``, ``data.augment.flip``, ``model.patch_size`` per architecture),
its type, its schema default and its comment: the trailing ``# ...`` on the field's line and the comment lines
directly above it, read from the dataclass's source. The groups are ``config.Config``'s fields; the model
schemas are the registry's (``config.ARCHITECTURES``), wherever each is defined. Then each group's presets in
``conf/`` and the keys they set. ``tests/test_docs.py`` fails when docs/config.md is not what this writes now.

    python -m vision_train.docs            # rewrite docs/config.md
    python -m vision_train.docs --check    # exit 1 when docs/config.md is out of date
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

import yaml

from . import config as config_lib

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "config.md"
CONF = ROOT / "conf"
COMMAND = "python -m vision_train.docs"

# The top-level groups, in the order a reader meets them (conf/config.yaml's defaults list).
GROUPS = ("model", "data", "optimizer", "hardware", "trainer", "logger")


@dataclasses.dataclass(frozen=True)
class Key:
    name: str        # dotted: data.augment.flip
    type: str        # the annotation as written: Optional[List[float]]
    default: str     # the schema's default, as YAML writes it
    comment: str     # the field's comments, joined


# --------------------------------------------------------------------------------------- reading the source
@functools.lru_cache(maxsize=None)
def field_sources(cls: type) -> dict[str, tuple[str, str]]:
    """The fields ``cls`` itself declares: name -> (annotation, comment). The comment is every comment line
    directly above the field (no blank line between) and the trailing comments of its lines, joined."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}   # line -> its comment's text
    code_lines: set[int] = set()    # lines holding code (a comment-only line holds none)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    (node,) = ast.parse(source).body
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, line = [], stmt.lineno - 1
        while line >= 1 and line in comments and line not in code_lines:
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
        annotation = ast.get_source_segment(source, stmt.annotation) or ast.unparse(stmt.annotation)
        out[stmt.target.id] = (annotation, " ".join(above + trailing))
    return out


def _declared(cls: type, name: str) -> tuple[str, str]:
    """The annotation and comment of field ``name`` of ``cls``: the most derived declaration's annotation, and
    the first non-empty comment up the class's bases (``arch: str = "vit"`` keeps ModelConfig's comment)."""
    annotation, comment = "", ""
    for base in cls.__mro__:
        if not dataclasses.is_dataclass(base) or name not in base.__dict__.get("__annotations__", {}):
            continue
        a, c = field_sources(base).get(name, ("", ""))
        annotation = annotation or a
        comment = comment or c
        if annotation and comment:
            break
    return annotation, comment


def _yaml(value) -> str:
    if value is None:
        return "null"
    if value == config_lib.MISSING:
        return "required"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def keys(schema: type, prefix: str) -> list[Key]:
    """Every leaf key of the dataclass ``schema`` under ``prefix`` (``data.``), nested groups expanded."""
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        hint = hints.get(f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += keys(hint, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = config_lib.MISSING
        annotation, comment = _declared(schema, f.name)
        out.append(Key(f"{prefix}{f.name}", annotation, _yaml(default), comment))
    return out


def group_schemas() -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) of every group but the model: ``Config``'s dataclass fields."""
    hints = typing.get_type_hints(config_lib.Config)
    return [(name, hints[name]) for name in GROUPS
            if isinstance(hints.get(name), type) and dataclasses.is_dataclass(hints[name])]


def all_keys() -> list[str]:
    """Every dotted key the schema has: each group's, and ``model.*`` of every registered architecture."""
    names = [k.name for prefix, schema in group_schemas() for k in keys(schema, f"{prefix}.")]
    for schema in config_lib.ARCHITECTURES.values():
        names += [k.name for k in keys(schema, "model.")]
    return sorted(set(names))


# ------------------------------------------------------------------------------------------------ presets
def _header(path: Path) -> str:
    """A preset's leading comment (its first paragraph), without Hydra's ``@package`` line."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("@package"):
            continue
        if not text:
            if out:
                break  # (the first paragraph only)
            continue
        out.append(text)
    return " ".join(out)


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def presets(group: str) -> list[tuple[str, str, str, list[str]]]:
    """(option, the schema it extends, its header, the keys it sets) of every ``conf/<group>/*.yaml``."""
    out = []
    for path in sorted((CONF / group).glob("*.yaml")):
        body = yaml.safe_load(path.read_text()) or {}
        base = ""
        for entry in body.pop("defaults", []) or []:
            if isinstance(entry, str) and entry.startswith("/schema/"):
                base = entry.split("/")[3].split("@")[0]  # /schema/model/vit@_here_ -> vit
        sets = [f"{k}={_yaml(v)}" for k, v in _flat(body)] if group in GROUPS else []
        out.append((path.stem, base, _header(path), sets))
    return out


def default_options() -> dict[str, str]:
    """The option of each group that ``python -m vision_train`` composes when none is given."""
    out = {}
    for entry in yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            out.update({k: v for k, v in entry.items() if v is not None})
    return out


# --------------------------------------------------------------------------------------------- the page
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[Key]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for k in rows:
        lines.append(f"| `{k.name}` | `{_cell(k.type)}` | `{_cell(k.default)}` | {_cell(k.comment)} |")
    return lines


def _preset_table(group: str, prefix: str) -> list[str]:
    rows = presets(group)
    if not rows:
        return []
    lines = [f"Presets (`conf/{group}/`; `{group}=<preset>`):", "",
             "| preset | what | sets |" if prefix else "| preset | what |",
             "|---|---|---|" if prefix else "|---|---|"]
    for name, _, header, sets in rows:
        shown = ", ".join(f"`{prefix}{item}`" for item in sets)
        lines.append(f"| `{name}` | {_cell(header)} | {_cell(shown)} |" if prefix else
                     f"| `{name}` | {_cell(header)} |")
    return lines + [""]


def render() -> str:
    defaults = default_options()
    out = [
        "# Config reference",
        "",
        f"Generated from the schema's comments by `{COMMAND}`; do not edit by hand (`tests/test_docs.py` fails",
        "when this page differs from what that command writes). The schema: the dataclasses in",
        "`vision_train/config.py` and each architecture's in the model registry (`vision_train.models`).",
        "",
        "Every key is given as `key=value` on the command line, type-checked against this schema; a key the",
        "schema lacks is refused, `+key` included. *default* is the schema's; a preset (`conf/<group>/<preset>.yaml`)",
        "sets its own values on top, and `python -m vision_train` composes "
        + ", ".join(f"`{g}={defaults[g]}`" for g in GROUPS if g in defaults)
        + " unless told otherwise. `python -m vision_train --cfg job` prints a composed config.",
        "",
        "Contents: " + ", ".join(f"[`{g}.*`](#{g})" for g in GROUPS)
        + ", [experiment presets](#experiment), [Optuna searches](#hparams_search).",
        "",
    ]
    schemas = dict(group_schemas())
    for group in GROUPS:
        out += [f"## {group}", ""]
        if group == "model":
            out += ["The keys depend on the architecture (`model.arch`, set by the preset); each architecture's "
                    "schema is registered in `vision_train.models.ARCHITECTURES`.", ""]
            for arch, schema in sorted(config_lib.ARCHITECTURES.items()):  # (in any registration order)
                doc = inspect.cleandoc(schema.__dict__.get("__doc__") or "")  # (its own, not a base's)
                if doc.startswith(f"{schema.__name__}("):
                    doc = ""  # (the signature dataclasses write where there is no docstring)
                out += [f"### model.arch={arch}", ""] + ([doc, ""] if doc else [])
                out += _table(keys(schema, "model.")) + [""]
                out += _preset_table_arch(arch)
            continue
        out += _table(keys(schemas[group], f"{group}.")) + [""]
        out += _preset_table(group, f"{group}.")
    for group in ("experiment", "hparams_search"):
        title = {"experiment": "Experiment presets", "hparams_search": "Optuna searches (with `-m`)"}[group]
        out += [f"## {group}", "", f"{title}: `{group}=<preset>` sets keys of several groups at once.", ""]
        out += _preset_table(group, "")
    return "\n".join(out).rstrip() + "\n"


def _preset_table_arch(arch: str) -> list[str]:
    rows = [r for r in presets("model") if r[1] == arch]
    lines = ["Presets of this architecture (`model=<preset>`):", "", "| preset | what | sets |", "|---|---|---|"]
    for name, _, header, sets in rows:
        shown = ", ".join(f"`model.{item}`" for item in sets)
        lines.append(f"| `{name}` | {_cell(header)} | {_cell(shown)} |")
    return lines + [""] if rows else []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date; run {COMMAND}")
            return 1
        return 0
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(all_keys())} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
