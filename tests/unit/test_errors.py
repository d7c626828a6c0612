"""The one-line form of a refused config (runtimes.errors.validation_problems), which the
export / quantize / TFLite CLIs and the bench-result reader share."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmedge.runtimes.errors import validation_problems


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threads: int = Field(ge=1)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    inner: _Inner


def _error(doc) -> ValidationError:
    with pytest.raises(ValidationError) as err:
        _Config.model_validate(doc)
    return err.value


def test_each_problem_names_its_field_path_and_pydantics_message():
    e = _error({"inner": {"threads": 0, "cores": 2}})
    assert validation_problems(e) == (
        "name: Field required; "
        "inner.threads: Input should be greater than or equal to 1; "
        "inner.cores: Extra inputs are not permitted")
    assert validation_problems(e, limit=2) == (
        "name: Field required; inner.threads: Input should be greater than or equal to 1")


def test_the_export_cli_reports_a_bad_config_with_it(tmp_path, capsys):
    from slmedge.tools.cli.app import main

    config = tmp_path / "export.json"
    config.write_text('{"output": "out", "opset": "eighteen"}')
    assert main(["export", "--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "invalid export config: opset: Input should be a valid integer" in err
