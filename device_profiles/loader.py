"""Read device profiles: the built-in YAML files beside this module, or a user's YAML file
that may ``extends:`` a built-in one.

Every problem becomes a :class:`UsageError` (exit 2) that names the file, the field and
what is allowed there.
"""

from __future__ import annotations

import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from slmedge.runtimes.errors import UsageError, validation_problems

from .schema import DeviceProfile

BUILTIN_DIR = Path(__file__).parent
_MAX_EXTENDS_DEPTH = 8


def builtin_names() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def _is_path(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml")) or "/" in ref or "\\" in ref or Path(ref).is_file()


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"profile {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"profile {path}: not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"profile {path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UsageError(
            f"profile {path}: the top level must be a mapping of fields (name, device, runtime, "
            f"...), got {type(data).__name__}"
        )
    return data


def _merge(base: dict, override: dict) -> dict:
    """Deep-merge mappings; lists and scalars of ``override`` replace the base's."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _raw(ref: str, origin: Path | None, chain: tuple[Path, ...] = ()) -> tuple[dict, Path]:
    """The merged raw mapping of a profile reference (built-in name or path)."""
    if len(chain) > _MAX_EXTENDS_DEPTH:
        raise UsageError(f"profile {chain[0]}: 'extends' chain deeper than {_MAX_EXTENDS_DEPTH}")
    if _is_path(ref):
        path = Path(ref)
        if not path.is_absolute() and origin is not None:
            path = origin.parent / path
        if not path.is_file():
            # name the file that refers to the missing one (issue 14: "profile file / does
            # not exist" did not say which profile had `extends: /`)
            where = f"profile {origin}: field extends: " if origin else ""
            raise UsageError(f"{where}profile file {path} does not exist; built-in profiles: "
                             f"{', '.join(builtin_names())}")
    else:
        path = BUILTIN_DIR / f"{ref}.yaml"
        if not path.is_file():
            where = f"{origin}: field extends: " if origin else ""
            raise UsageError(f"{where}no built-in profile '{ref}'; allowed values: "
                             f"{', '.join(builtin_names())} (or a path to a .yaml file)")
    if path.resolve() in [p.resolve() for p in chain]:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UsageError(f"profile {chain[0]}: field extends: a cycle ({cycle})")
    data = _read_yaml(path)
    base = data.get("extends")
    if base is not None:
        if not isinstance(base, str):
            raise UsageError(f"profile {path}: field extends: must be a profile name or path, "
                             f"got {base!r}")
        try:
            parent, _ = _raw(base, path, (*chain, path))
        except UsageError as e:  # a problem in the file it extends: say who extends it
            if str(path) in str(e):
                raise
            raise UsageError(f"profile {path}: field extends: {e}") from None
        parent.pop("name", None)
        parent.pop("description", None)
        data = _merge(parent, data)
    return data, path


def load_profile(ref: str | Path) -> DeviceProfile:
    """A built-in profile by name, or a YAML file (optionally ``extends:`` another)."""
    ref = str(ref)
    data, path = _raw(ref, None)
    data.setdefault("name", path.stem)
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as e:
        raise UsageError(f"profile {path}: " + validation_problems(
            e, top="(profile)", name=_field, explain=explain)) from None


def load_builtin_profiles() -> list[DeviceProfile]:
    return [load_profile(name) for name in builtin_names()]


# -- turning pydantic's errors into "field X: allowed values ..." ----------------------------


def _unwrap(annotation):
    """The model class or enum inside ``X | None``, ``list[X]`` or ``Annotated[...]``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (list, tuple, set):
        return _unwrap(typing.get_args(annotation)[0])
    if origin is not None:  # Union / X | None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else args
    return annotation


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model class that holds the field at ``loc`` (its parent), walking the schema."""
    model: typing.Any = DeviceProfile
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if isinstance(model, list):  # a discriminated union: the tag names the member
            model = next((m for m in model if getattr(m.model_fields.get("name"), "annotation",
                          None) is not None and part in typing.get_args(
                              m.model_fields["name"].annotation)), None)
            if model is None:
                return None
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _unwrap(field.annotation)
    if isinstance(model, list):
        return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _field(err: dict) -> str:
    """The field's dotted name, without the discriminator tag pydantic inserts into the
    location of a union member; a provider's tag error names the provider's ``name``."""
    loc = tuple(err.get("loc", ()))
    shown = [str(p) for p in loc if not (isinstance(p, str) and p.endswith("ExecutionProvider")
                                         and p != loc[-1])]
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        shown.append("name")
    return ".".join(shown)


def explain(err: dict) -> str | None:
    """What a profile's reader needs beyond pydantic's message for one error: the fields or
    values allowed there. None: :func:`validation_problems`' own message (with the value)."""
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _model_at(tuple(err.get("loc", ())))
        allowed = ", ".join(parent.model_fields) if parent else "see `slmedge profiles show`"
        return f"unknown field; allowed fields here: {allowed}"
    if kind == "union_tag_invalid":
        return (f"unknown provider {ctx.get('tag')!r}; allowed values: "
                f"{', '.join(_names_of_providers())}")
    if kind == "union_tag_not_found":
        return f"a provider needs a name; allowed values: {', '.join(_names_of_providers())}"
    if kind == "enum":
        return f"{err.get('input')!r} is not allowed; allowed values: {ctx.get('expected')}"
    if kind in ("missing", "value_error"):
        return None
    return f"{err.get('msg')} (got {err.get('input')!r})"


def _names_of_providers() -> list[str]:
    from .schema import PROVIDER_NAMES

    return list(PROVIDER_NAMES)


def profile_summary(profile: DeviceProfile) -> dict:
    """The short facts ``profiles list`` prints."""
    return {
        "name": profile.name,
        "description": profile.description,
        "os": profile.device.os.value,
        "arch": profile.device.arch.value,
        "providers": [p.name for p in profile.runtime.providers],
        "shapes": profile.shapes.policy.value,
        "recipe": profile.recipe.precision.value + (
            "" if profile.recipe.quantization.value == "none"
            else f"+{profile.recipe.quantization.value}"),
        "formats": [f.value for f in profile.artifact.formats],
    }


def to_jsonable(profile: DeviceProfile) -> dict:
    """The full profile as plain JSON types (enums as their values)."""
    return profile.model_dump(mode="json")


def session_kwargs(name: str) -> dict:
    """What a profile sets on a decoder session: its providers (with options) in order and its
    CPU-fallback rule (the keywords of the runners' ``run_*_bench``)."""
    profile = load_profile(name)
    return {"providers": profile.provider_specs(),
            "allow_cpu_fallback": profile.runtime.allow_cpu_fallback}
