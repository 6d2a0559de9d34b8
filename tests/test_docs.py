"""The documentation: docs/config.md is what ``python -m vision_train.docs`` writes from the schema now, naming
every key; the README stays short; every relative link in README.md and docs/*.md leads to a file."""

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from vision_train import config as config_lib
from vision_train import docs

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def schema_keys(schema: type, prefix: str) -> set[str]:
    """The dotted leaf keys of a schema dataclass, walked here independently of the generator."""
    hints, out = typing.get_type_hints(schema), set()
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out |= schema_keys(hint, f"{prefix}{f.name}.")
        elif not (schema is config_lib.Config and f.name == "model"):
            out.add(f"{prefix}{f.name}")
    return out


@pytest.mark.fast
def test_the_config_reference_is_what_the_generator_writes_from_the_schema_now():
    assert docs.OUTPUT == ROOT / "docs" / "config.md"
    assert docs.OUTPUT.read_text() == docs.render(), (
        f"docs/config.md is out of date with the schema's comments; refresh it with: {docs.COMMAND}")


@pytest.mark.fast
def test_the_config_reference_names_every_key_of_the_schema_and_every_architecture():
    text = docs.OUTPUT.read_text()
    expected = schema_keys(config_lib.Config, "")
    for schema in config_lib.ARCHITECTURES.values():
        expected |= schema_keys(schema, "model.")
    assert {"data.augment.flip", "trainer.objective", "model.patch_size", "model.hidden_size"} <= expected
    missing = sorted(k for k in expected if f"| `{k}` |" not in text)
    assert not missing, f"keys absent from docs/config.md (run {docs.COMMAND}): {missing}"
    assert set(docs.all_keys()) == expected
    for arch in config_lib.ARCHITECTURES:
        assert f"### model.arch={arch}" in text


@pytest.mark.fast
def test_the_reference_reads_each_fields_trailing_comment_and_the_comment_lines_above_it():
    @dataclass
    class Base:
        size: int = 3                  # pixels
        # not this one: a blank line follows

        # the rate,
        # per 256 images
        rate: float = 0.1              # (peak)
        names: List[str] = field(default_factory=lambda: ["a", "b"])
        limit: Optional[int] = None

    @dataclass
    class Child(Base):
        size: int = 5                  # (no comment of its own would keep the base's)
        rate: float = 0.2

    rows = {k.name: k for k in docs.keys(Child, "x.")}
    assert rows["x.size"] == docs.Key("x.size", "int", "5", "(no comment of its own would keep the base's)")
    assert rows["x.rate"] == docs.Key("x.rate", "float", "0.2", "the rate, per 256 images (peak)")
    assert rows["x.names"] == docs.Key("x.names", "List[str]", "[a, b]", "")
    assert rows["x.limit"] == docs.Key("x.limit", "Optional[int]", "null", "")
    text = docs.OUTPUT.read_text()
    assert "| `trainer.batch_size` | `int` | `128` | global, split across devices |" in text
    assert "'+optimizer.lr_mults={head\\..*:1,.*:0}'" in text  # (a comment block above the field)


@pytest.mark.fast
def test_the_readme_is_at_most_300_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines; move the detail to docs/"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # (code blocks hold no links or headings)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a Markdown page's headings: lower case, punctuation dropped, spaces to -."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", prose(path), flags=re.M)}


@pytest.mark.fast
def test_every_relative_link_in_the_readme_and_docs_leads_to_a_file_and_its_heading():
    assert (ROOT / "docs" / "config.md") in PAGES and len(PAGES) > 5
    assert {"a-runs-fate", "weights--biases"} <= anchors(ROOT / "docs" / "checkpoints.md") | anchors(
        ROOT / "docs" / "tracking.md")
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # a URL
            path, _, anchor = target.partition("#")
            file = page.parent / path if path else page
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
