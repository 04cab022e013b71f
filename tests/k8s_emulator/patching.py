"""The patch formats of the Kubernetes API: JSON merge, strategic merge (approximated), JSON patch, apply."""

from __future__ import annotations

import copy
from typing import Any


class PatchTestFailed(Exception):
    """A JSON patch `test` operation did not match (the API answers 422)."""


class PatchInvalid(Exception):
    """A malformed patch (the API answers 422)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _named(items: Any) -> bool:
    return isinstance(items, list) and all(isinstance(i, dict) and "name" in i for i in items)


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Like a merge patch, but lists of named items (containers, env, ports, volumes) merge by name."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        old = result.get(key)
        if value is None:
            result.pop(key, None)
        elif _named(value) and _named(old) and old:
            merged = {item["name"]: item for item in old}
            for item in value:
                if item.get("$patch") == "delete":
                    merged.pop(item["name"], None)
                else:
                    merged[item["name"]] = strategic_merge_patch(merged.get(item["name"]), item)
            result[key] = list(merged.values())
        else:
            result[key] = strategic_merge_patch(old, value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchInvalid(f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, list):
            doc = doc[int(part)]
        elif isinstance(doc, dict):
            doc = doc[part]
        else:
            raise KeyError(part)
    return doc


def _get(doc: Any, path: str) -> Any:
    try:
        return _walk(doc, _pointer(path))
    except (KeyError, IndexError, ValueError) as e:
        raise PatchInvalid(f"path {path!r} does not exist") from e


def _add(doc: Any, path: str, value: Any) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    try:
        parent = _walk(doc, parts[:-1])
    except (KeyError, IndexError, ValueError) as e:
        raise PatchInvalid(f"parent of {path!r} does not exist") from e
    last = parts[-1]
    if isinstance(parent, list):
        parent.insert(len(parent) if last == "-" else int(last), value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise PatchInvalid(f"cannot add to {path!r}")
    return doc


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    try:
        parent = _walk(doc, parts[:-1])
        if isinstance(parent, list):
            del parent[int(parts[-1])]
        else:
            del parent[parts[-1]]
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise PatchInvalid(f"path {path!r} does not exist") from e
    return doc


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902: add, remove, replace, move, copy, test."""
    if not isinstance(ops, list):
        raise PatchInvalid("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "test":
            if _get(doc, path) != op.get("value"):
                raise PatchTestFailed(f"test operation on {path!r} failed")
        elif kind == "add":
            doc = _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            doc = _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            doc = _add(_remove(doc, path), path, copy.deepcopy(op.get("value")))
        elif kind == "move":
            value = _get(doc, op["from"])
            doc = _add(_remove(doc, op["from"]), path, value)
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, op["from"])))
        else:
            raise PatchInvalid(f"unknown JSON patch operation {kind!r}")
    return doc


def leaf_paths(doc: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Paths of the leaves of a document; lists are atomic leaves."""
    if isinstance(doc, dict) and doc:
        paths: set[tuple[str, ...]] = set()
        for key, value in doc.items():
            paths |= leaf_paths(value, (*prefix, key))
        return paths
    return {prefix}


def _delete_path(doc: dict[str, Any], path: tuple[str, ...]) -> None:
    node: Any = doc
    parents = []
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        parents.append((node, key))
        node = node[key]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    # Drop the maps this left empty, as field ownership would.
    for parent, key in reversed(parents):
        if parent[key] == {}:
            del parent[key]


def apply(
    current: dict[str, Any], previous_applied: dict[str, Any] | None, applied: dict[str, Any]
) -> dict[str, Any]:
    """Server-side apply for one field manager: its fields are set, fields it stopped applying are removed.

    Approximation: lists are atomic (real SSA merges lists with merge keys across managers).
    """
    result = copy.deepcopy(current)
    if previous_applied is not None:
        for path in leaf_paths(previous_applied) - leaf_paths(applied):
            if path and path[0] not in ("apiVersion", "kind"):
                _delete_path(result, path)
    return _deep_set(result, applied)


def _deep_set(target: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
    for key, value in applied.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key] = _deep_set(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target
