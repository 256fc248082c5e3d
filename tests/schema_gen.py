"""Bodies from the published OpenAPI schemas, for tests/test_contract.py.

A small generator for the subset of OpenAPI 3.0 schema the request bodies use (object,
string, integer, number, enum, anyOf, nullable, array, `$ref`, and the empty schema for
"any JSON"), because hypothesis-jsonschema does not run on this Hypothesis. The oracle is
`jsonschema` (Draft 4, which OpenAPI 3.0's schema object extends) on the same schema with
`nullable` spelled as JSON Schema; the boundaries are read from the schema as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema
from hypothesis import strategies as st

Schema = dict[str, Any]

json_any = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                   max_size=3),
    max_leaves=6,
)
# printable ASCII and a little beyond; '\n' and a format character too (texts allow them,
# task ids and task types do not: the schema says so in words, see server_only_refusal)
_chars = st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs"),
                       include_characters="\n\u200b", exclude_characters="\ud800")


def resolve(schema: Schema, components: dict[str, Schema]) -> Schema:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def to_jsonschema(schema: Any, components: dict[str, Schema]) -> Any:
    """OpenAPI 3.0 -> JSON Schema: refs inlined, `nullable` as a null alternative."""
    if isinstance(schema, list):
        return [to_jsonschema(s, components) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        return to_jsonschema(resolve(schema, components), components)
    out = {k: to_jsonschema(v, components) for k, v in schema.items()
           if k not in ("nullable", "description", "title", "example", "format")}
    if schema.get("nullable"):
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        if "type" in out or "anyOf" in out:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def valid(schema: Schema, components: dict[str, Schema], value: Any) -> bool:
    return jsonschema.Draft4Validator(to_jsonschema(schema, components)).is_valid(value)


def _string(schema: Schema) -> st.SearchStrategy[str]:
    if "pattern" in schema:
        return st.from_regex(schema["pattern"], fullmatch=True)
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    # no maxLength: the schema allows any length, so a long string must be accepted too
    edges = [n for n in {low, high if high is not None else 5000} if n > 20]
    high = 30 if high is None else high
    return st.one_of(st.text(_chars, min_size=low, max_size=min(high, 20)),
                     *[st.sampled_from(["x" * n, "é" * n]) for n in edges])


def _number(schema: Schema, integer: bool) -> st.SearchStrategy[Any]:
    low, high = schema.get("minimum"), schema.get("maximum")
    ints = st.integers(low, high)
    if integer:
        return ints
    return st.one_of(ints, st.floats(low, high, allow_nan=False, allow_infinity=False))


def from_schema(schema: Schema, components: dict[str, Schema]) -> st.SearchStrategy[Any]:
    """Values the schema allows."""
    schema = resolve(schema, components)
    strategy = _from_schema(schema, components)
    return st.one_of(strategy, st.none()) if schema.get("nullable") else strategy


def _from_schema(schema: Schema, components: dict[str, Schema]) -> st.SearchStrategy[Any]:
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of(*[from_schema(s, components) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "string":
        return _string(schema)
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "array":
        items = from_schema(schema["items"], components)
        return st.lists(items, max_size=min(schema.get("maxItems", 5), 5))
    if kind == "object":
        props = schema["properties"]
        required = set(schema.get("required", ()))
        optional = sorted(set(props) - required)
        return st.builds(
            lambda req, opt: {**req, **opt},
            st.fixed_dictionaries({k: from_schema(props[k], components) for k in required}),
            st.fixed_dictionaries({}, optional={k: from_schema(props[k], components)
                                                for k in optional}))
    return json_any  # the empty schema: any JSON value


def outside(schema: Schema, components: dict[str, Schema]) -> list[Any]:
    """Values just outside each bound of a (property) schema, and of the wrong type."""
    schema = resolve(schema, components)
    out: list[Any] = []
    if not schema:
        return out  # any JSON value is allowed
    if "enum" in schema:
        out.append("not-" + str(schema["enum"][0]))
    kind = schema.get("type")
    if kind == "string":
        out += [12, ["x"]]
        if "maxLength" in schema:
            out.append("x" * (schema["maxLength"] + 1))
        if schema.get("minLength", 0) > 0:
            out.append("x" * (schema["minLength"] - 1))
        if "pattern" in schema:
            out.append("12a")
    elif kind in ("integer", "number"):
        out += ["7", True]
        step = 1 if kind == "integer" else 0.5
        if "maximum" in schema:
            out.append(schema["maximum"] + step)
        if "minimum" in schema:
            out.append(schema["minimum"] - step)
        if kind == "integer":
            out.append(0.5)
    elif "anyOf" in schema:
        out += [None, [1]] if not schema.get("nullable") else [[1]]
        for alternative in schema["anyOf"]:
            out += [v for v in outside(alternative, components)
                    if not valid(schema, components, v)]
    if not schema.get("nullable") and "anyOf" not in schema:
        out.append(None)
    return out


def inside(schema: Schema, components: dict[str, Schema]) -> list[Any]:
    """Values just inside each bound of a (property) schema."""
    schema = resolve(schema, components)
    out: list[Any] = []
    if "enum" in schema:
        return [*schema["enum"], *([None] if schema.get("nullable") else [])]
    kind = schema.get("type")
    if kind == "string":
        if "maxLength" in schema:
            out += ["x" * schema["maxLength"], "é" * schema["maxLength"]]
        out.append("x" * max(schema.get("minLength", 0), 1))
        if "pattern" in schema:
            out.append("0")
    elif kind in ("integer", "number"):
        out += [schema[k] for k in ("minimum", "maximum") if k in schema]
        if kind == "number" and "maximum" in schema:
            out.append(schema["maximum"] - 0.5)
    elif "anyOf" in schema:
        for alternative in schema["anyOf"]:
            out += inside(alternative, components)
    if schema.get("nullable"):
        out.append(None)
    return out


def boundary_bodies(name: str, base: dict[str, Any], components: dict[str, Schema]
                    ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(what, body) for `base` with one property set just inside or just outside one of its
    bounds, an unknown property, and each required property missing."""
    schema = resolve({"$ref": name}, components)
    for prop, sub in schema["properties"].items():
        for value in inside(sub, components):
            yield f"{name}.{prop} inside: {str(value)[:30]!r}", {**base, prop: value}
        for value in outside(sub, components):
            yield f"{name}.{prop} outside: {str(value)[:30]!r}", {**base, prop: value}
    for prop in schema.get("required", ()):
        yield f"{name} without {prop}", {k: v for k, v in base.items() if k != prop}
    if schema.get("additionalProperties") is False:
        yield f"{name} with an unknown field", {**base, "zz_unknown": 1}


def server_only_refusal(name: str, body: Any) -> bool:
    """Rules the schema states only in words (descriptions), which the server refuses:
    task ids and task types must be printable and task ids not '.'/'..', idempotency keys
    printable ASCII, a user id given as digits at most 2^63-1. True if `body` breaks one."""
    if not isinstance(body, dict):
        return False
    task_id = body.get("task_id")
    if isinstance(task_id, str) and (task_id in (".", "..") or not task_id.isprintable()):
        return True
    task_type = body.get("task_type")
    if name == "Register" and isinstance(task_type, str) and not task_type.isprintable():
        return True
    key = body.get("idempotency_key")
    if isinstance(key, str) and not (key.isascii() and key.isprintable()):
        return True
    user_id = body.get("user_id")
    return isinstance(user_id, str) and user_id.isdigit() and int(user_id) > 2**63 - 1
