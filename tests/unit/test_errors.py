"""The one-line form of a refused config (runtimes.errors.validation_problems), which the
export / quantize / TFLite CLIs and the bench-result reader share."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmedge.runtimes.errors import validation_problems


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threads: int = Field(ge=1)


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str

    @field_validator("name")
    @classmethod
    def _lower(cls, value: str) -> str:
        if value != value.lower():
            raise ValueError(f"{value!r} must be lower case")
        return value


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    inner: _Inner
    items: list[_Item] = []

    @model_validator(mode="after")
    def _unique(self) -> _Config:
        names = [i.name for i in self.items]
        if len(set(names)) < len(names):
            raise ValueError("items: a name is used twice")
        if self.name == "bad":
            raise ValueError("the name 'bad' is reserved")
        return self


def _error(doc) -> ValidationError:
    with pytest.raises(ValidationError) as err:
        _Config.model_validate(doc)
    return err.value


def test_each_problem_names_its_field_path_and_the_message():
    e = _error({"inner": {"threads": 0, "cores": 2}})
    assert validation_problems(e) == (
        "field name: required; "
        "field inner.threads: Input should be greater than or equal to 1; "
        "field inner.cores: Extra inputs are not permitted")


def test_a_limit_keeps_the_first_problems_and_counts_the_rest():
    e = _error({"inner": {"threads": 0, "cores": 2}})
    assert validation_problems(e, limit=2) == (
        "field name: required; field inner.threads: Input should be greater than or equal to 1; "
        "and 1 more")
    assert validation_problems(e, limit=3) == validation_problems(e)  # nothing left to count


def test_list_items_by_index_and_a_validators_own_text():
    e = _error({"name": "a", "inner": {"threads": 1}, "items": [{"name": "ok"}, {"name": "Up"}]})
    # pydantic's "Value error, " prefix is dropped: the validator's text is the message
    assert validation_problems(e) == "field items.1.name: 'Up' must be lower case"


def test_a_model_level_check_names_its_field_or_the_top_level():
    e = _error({"name": "a", "inner": {"threads": 1}, "items": [{"name": "x"}, {"name": "x"}]})
    assert validation_problems(e) == "field items: a name is used twice"
    e = _error({"name": "bad", "inner": {"threads": 1}})
    assert validation_problems(e) == "field (top level): the name 'bad' is reserved"
    assert validation_problems(e, top="(fleet)") == "field (fleet): the name 'bad' is reserved"


def test_hooks_name_the_field_and_explain_an_error_with_what_the_caller_knows():
    doc = {"name": "a", "inner": {"threads": 1}, "items": [{"name": "x", "colour": "red"}]}
    e = _error(doc)

    def name(err):  # the item by its name, as a fleet names a device
        loc = list(err["loc"])
        return ".".join(f"{p} ({doc['items'][p]['name']})" if loc[:1] == ["items"] and
                        isinstance(p, int) else str(p) for p in loc)

    def explain(err):
        return "unknown field; allowed fields here: name" \
            if err["type"] == "extra_forbidden" else None

    assert validation_problems(e, name=name, explain=explain) == (
        "field items.0 (x).colour: unknown field; allowed fields here: name")
    # explain returning None keeps the default message
    assert validation_problems(e, name=name, explain=lambda err: None) == (
        "field items.0 (x).colour: Extra inputs are not permitted")


def test_the_export_cli_reports_a_bad_config_with_it(tmp_path, capsys):
    from slmedge.tools.cli.app import main

    config = tmp_path / "export.json"
    config.write_text('{"output": "out", "opset": "eighteen"}')
    assert main(["export", "--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "invalid export config: field opset: Input should be a valid integer" in err
