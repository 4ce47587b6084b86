"""The wire schema of the TypeScript SDK, read from its generated protobuf code.

The npm package ships no .proto file, only what ts-proto generated from it
(``proto/src/components/**/protobuf/*.js``). That code has a fixed shape: an enum is an
IIFE assigning ``NAME = number``; a message has ``createBaseX()`` (defaults: ``void 0``
marks proto3 ``optional``) and ``decode()`` with one ``case <number>: if (tag !== <tag>)``
per field, whose reader call tells the type. This module turns it into the same facts
``test_proto_contract.schema_facts`` builds from a descriptor, so both compare directly.
"""

from __future__ import annotations

import re
from pathlib import Path

TS_PROTO_DIR = (
    Path(__file__).parent / "ts" / "node_modules" / "inngest" / "proto" / "src" / "components"
)
# Generated file -> protobuf package of the .proto it came from.
TS_FILES = {
    "connect/protobuf/connect.js": "connect.v1",
    "sdkFeatureObservations/protobuf/feature_observations.js": "sdk_feature_observations.v1",
}
# ts-proto's reader call -> descriptor type (int32 becomes an enum when fromJSON says so).
_READERS = {
    "string": "TYPE_STRING", "bytes": "TYPE_BYTES", "bool": "TYPE_BOOL",
    "int32": "TYPE_INT32", "int64": "TYPE_INT64", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "sint32": "TYPE_SINT32", "sint64": "TYPE_SINT64",
    "fixed32": "TYPE_FIXED32", "fixed64": "TYPE_FIXED64", "sfixed32": "TYPE_SFIXED32",
    "sfixed64": "TYPE_SFIXED64", "double": "TYPE_DOUBLE", "float": "TYPE_FLOAT",
}
_ENUM = re.compile(r"let (\w+) = /\* @__PURE__ \*/ function\(\w+\$1\) \{(.*?)return \w+\$1;",
                   re.S)
_ENUM_VALUE = re.compile(r'\["(\w+)"\] = (-?\d+)\]')
_BASE = re.compile(r"function createBase(\w+)\(\) \{\s*return \{(.*?)\};\s*\}", re.S)
_MESSAGE = re.compile(r"\nconst (\w+) = \{\n\tencode\(.*?\n\tdecode\((.*?)\n\tfromJSON\(object\) "
                      r"\{(.*?)\n\t\},", re.S)
_CASE = re.compile(r"case (\d+):\s*if \(tag !== (\d+)\) break;\s*(.*?)\s*continue;", re.S)
_IMPORT = re.compile(r'import \{ (\w+) \} from "[./]*(?:google/protobuf/(\w+)|.*?)\.js";')


class SchemaError(Exception):
    """The generated code no longer has the shape this reader knows."""


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _type_name(js_name: str, package: str, imported: dict[str, str]) -> str:
    if js_name in imported:
        return imported[js_name]
    return f".{package}.{js_name.replace('_', '.')}"


def file_facts(source: str, package: str, imported: dict[str, str]) -> dict[str, str]:
    """Facts (as schema_facts) of one generated file; ``imported``: JS name -> type name."""
    facts: dict[str, str] = {}
    enums = {}
    for name, body in _ENUM.findall(source):
        enums[name] = name
        facts[f"enum {package}.{name}"] = "enum"
        for value, number in _ENUM_VALUE.findall(body):
            if value != "UNRECOGNIZED":  # ts-proto's own catch-all, not in the schema
                facts[f"enum value {package}.{name}.{value}"] = f"number={number}"
    # fromJSON calls like sDKResponseStatusFromJSON name the enum of an int32 field.
    enum_by_fn = {(n[0].lower() + n[1:] + "FromJSON"): n for n in enums}
    bases = dict(_BASE.findall(source))
    messages = _MESSAGE.findall(source)
    if not messages:
        raise SchemaError(f"no messages found for {package}")
    map_entries = set(re.findall(r"= (\w+)\.decode\(reader, reader\.uint32\(\)\);\s*if \(entry",
                                 source))
    for js_name, decode, from_json in messages:
        full = f"{package}.{js_name.replace('_', '.')}"
        facts[f"message {full}"] = f"map_entry={js_name in map_entries}"
        base = bases.get(js_name)
        if base is None:
            raise SchemaError(f"{js_name}: no createBase{js_name}()")
        defaults = dict(re.findall(r"(\w+): (.*?),?\n", base + "\n"))
        for number, tag, body in _CASE.findall(decode):
            if int(tag) >> 3 != int(number):
                raise SchemaError(f"{js_name}: case {number} checks tag {tag}")
            field = re.search(r"(?:message\.(\w+)|const (entry\d+))", body)
            if field is None:
                raise SchemaError(f"{js_name}: cannot read case {number}: {body!r}")
            if field.group(2):  # map<K, V>: message.prop[entryN.key] = entryN.value
                prop_match = re.search(r"message\.(\w+)\[", body)
                if prop_match is None:
                    raise SchemaError(f"{js_name}: cannot read map case {number}")
                prop = prop_match.group(1)
            else:
                prop = field.group(1)
            repeated = ".push(" in body or field.group(2) is not None
            decoded = re.search(r"(\w+)\.decode\(reader", body)
            reader = re.search(r"reader\.(\w+)\(\)\)?;?\s*$", body)
            if decoded is not None:
                kind, type_name = "TYPE_MESSAGE", _type_name(decoded.group(1), package, imported)
            elif reader is not None and reader.group(1) in _READERS:
                kind, type_name = _READERS[reader.group(1)], ""
                enum_fn = re.search(rf"{prop}: isSet\(object\.{prop}\) \? (\w+)\(", from_json)
                if kind == "TYPE_INT32" and enum_fn and enum_fn.group(1) in enum_by_fn:
                    kind = "TYPE_ENUM"
                    type_name = f".{package}.{enum_by_fn[enum_fn.group(1)]}"
            else:
                raise SchemaError(f"{js_name}.{prop}: unknown reader in {body!r}")
            name = _snake(prop)
            optional = (not repeated and kind != "TYPE_MESSAGE"
                        and defaults.get(prop, "").strip() == "void 0")
            label = "LABEL_REPEATED" if repeated else "LABEL_OPTIONAL"
            facts[f"field {full}.{name}"] = (
                f"number={number} type={kind} label={label} type_name={type_name}"
                f" proto3_optional={optional} oneof={'_' + name if optional else ''}"
            )
    return facts


def ts_facts(root: Path = TS_PROTO_DIR) -> dict[str, str]:
    """Facts of every schema the TypeScript SDK ships (connect and feature observations)."""
    imported_types: dict[str, str] = {}
    sources = {}
    for rel, package in TS_FILES.items():
        source = (root / rel).read_text()
        sources[rel] = source
        for js_name in re.findall(r"\nconst (\w+) = \{\n\tencode\(", source):
            imported_types.setdefault(js_name, _type_name(js_name, package, {}))
    imported_types["Timestamp"] = ".google.protobuf.Timestamp"
    facts: dict[str, str] = {}
    for rel, package in TS_FILES.items():
        facts.update(file_facts(sources[rel], package, imported_types))
    return facts
