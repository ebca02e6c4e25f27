"""The README's configuration reference is the schema's own documentation (medpeft.config.docs): it
cannot drift from the code. ``python tests/test_readme.py --write`` rewrites the tables in place."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from medpeft.config.docs import key_tables
from medpeft.files import write_text_atomic

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- keys:{re.escape(name)} -->\n)(.*?)(<!-- /keys:{re.escape(name)} -->)", re.S)


def rendered(text: str) -> str:
    """`text` with every marked table replaced by the schema's."""
    for name, table in key_tables().items():
        text, found = _block(name).subn(lambda m, table=table: m.group(1) + table + "\n" + m.group(3), text)
        assert found == 1, f"README.md has no (or more than one) <!-- keys:{name} --> block"
    return text


def test_the_readmes_key_tables_are_the_schemas():
    text = README.read_text()
    assert rendered(text) == text, "README.md's key tables differ from the schema: python tests/test_readme.py --write"


def test_every_key_of_every_section_and_method_is_in_the_readme():
    from medpeft.config import METHODS, TrainConfig

    text = README.read_text()
    assert all(f"`train.{f.name}`" in text for f in TrainConfig.fields())
    assert all(f"| `{name}` |" in text for name in METHODS.classes)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_text_atomic(README, rendered(README.read_text()))
