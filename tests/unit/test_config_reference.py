"""docs/configuration.md is generated from the declarations; every key is documented once."""

import dataclasses
from pathlib import Path

from traqmilter.config_reference import render
from traqmilter.core import settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_reference_is_up_to_date() -> None:
    assert DOC.read_text() == render(), (
        "docs/configuration.md is stale: regenerate it with"
        " python -m traqmilter.config_reference > docs/configuration.md"
    )


def test_every_declared_key_has_a_doc() -> None:
    for cls in vars(settings).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
