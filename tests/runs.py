"""Run folders of the smoke recipe for the pipeline tests: its data/ and tokenizer/ made once
per test module, then copied into each test's own run."""
import shutil
from pathlib import Path

import pytest

from finteam import pipeline
from finteam.config import load_recipe


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The smoke recipe's data/ and tokenizer/, made once for the module."""
    out = tmp_path_factory.mktemp("prepared")
    pipeline.run_data(load_recipe("smoke", [f"out_dir={out}"]))
    return out


def new_run(prepared: Path, path: Path) -> Path:
    """A run folder at `path` holding a copy of the prepared data and tokenizer."""
    for part in ("data", "tokenizer"):
        shutil.copytree(prepared / part, path / part)
    return path
