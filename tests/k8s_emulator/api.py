"""A stateful Kubernetes API over real HTTP, built on kmock's server and request model.

kmock supplies the HTTP server on 127.0.0.1, the parsed request model, request recording and its
DSL for injecting faults (`api.handler['patch', kmock.resource('apps', 'v1', 'deployments')][:2] << 409`).
The stateful behaviour is ours: kmock 0.8's own `KubernetesEmulator` lacks what kopf and kubectl
need (see docs/operator.md, "The test API server").
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import re
import traceback
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import rendering

from tests.k8s_emulator import patching, quantity, schema
from tests.k8s_emulator.resources import BUILTINS, ResourceType, from_crd

Body = dict[str, Any]
ObjectKey = tuple[str, str]  # (namespace or "", name)

HISTORY = 20000  # watch events kept per resource type for watches that resume from a resourceVersion


class ApiError(Exception):
    """An error answered as a metav1.Status."""

    def __init__(self, code: int, reason: str, message: str, details: Body | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> Body:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _true(value: str | None) -> bool:
    """A boolean query parameter as the API server parses it (Go's strconv.ParseBool): kopf and kubectl send
    `true`, the Python clients `True`."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    what = f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural
    return ApiError(
        404,
        "NotFound",
        f'{what} "{name}" not found',
        {"name": name, "group": rtype.group, "kind": rtype.plural},
    )


def _conflict(rtype: ResourceType, name: str) -> ApiError:
    what = f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {what} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        {"name": name, "group": rtype.group, "kind": rtype.plural},
    )


# --- selectors ---------------------------------------------------------------------------------

_SET_RE = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in [*parts, current] if p.strip()]


def _label_term(term: str) -> Callable[[dict[str, str]], bool]:
    if m := _SET_RE.match(term):
        key, negate, values = m.group(1), m.group(2) == "notin", {v.strip() for v in m.group(3).split(",")}
        return lambda labels: (labels.get(key) in values) != negate
    if "!=" in term:
        key, value = (s.strip() for s in term.split("!=", 1))
        return lambda labels: labels.get(key) != value
    if "=" in term:
        key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
        return lambda labels: labels.get(key) == value
    if term.startswith("!"):
        absent = term[1:].strip()
        return lambda labels: absent not in labels
    return lambda labels: term in labels


def label_selector(text: str | None) -> Callable[[dict[str, str]], bool]:
    """A predicate over labels for a labelSelector string (=, ==, !=, in, notin, exists, !exists)."""
    tests = [_label_term(term) for term in _split_selector(text or "")]
    return lambda labels: all(test(labels) for test in tests)


def _field(obj: Body, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "" if node is None else str(node)


def _field_term(term: str) -> Callable[[Body], bool]:
    negate = "!=" in term
    key, value = (part.strip() for part in term.replace("!=", "=").replace("==", "=").split("=", 1))
    return lambda obj: (_field(obj, key) == value) != negate


def field_selector(text: str | None) -> Callable[[Body], bool]:
    """A predicate over objects for a fieldSelector string (=, ==, !=)."""
    tests = [_field_term(term) for term in _split_selector(text or "")]
    return lambda obj: all(test(obj) for test in tests)


def _canonical_quantities(rtype: ResourceType, obj: Body) -> None:
    """Resource quantities of pods and pod templates in canonical form, as the API server stores them."""
    if rtype.kind == "Pod":
        quantity.canonical_pod_spec(obj.get("spec") or {})
    elif rtype.kind in ("Deployment", "ReplicaSet"):
        quantity.canonical_pod_spec(((obj.get("spec") or {}).get("template") or {}).get("spec") or {})


# --- the store ---------------------------------------------------------------------------------


@attrs.define
class _Watcher:
    namespace: str | None
    matches: Callable[[Body], bool]
    queue: asyncio.Queue[tuple[str, Body] | None]


@attrs.define
class Store:
    """Objects, resource versions, watch history and the rules the API server enforces on writes."""

    types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict)  # (group, version, plural)
    objects: dict[tuple[str, str], dict[ObjectKey, Body]] = attrs.field(factory=dict)
    history: dict[tuple[str, str], list[tuple[int, str, Body]]] = attrs.field(factory=dict)
    watchers: dict[tuple[str, str], list[_Watcher]] = attrs.field(factory=dict)
    applied: dict[tuple[tuple[str, str], ObjectKey, str], Body] = attrs.field(factory=dict)
    revision: int = 1000
    compacted: int = 0  # watches resuming from an older resourceVersion get 410 Gone (etcd compaction)

    def __attrs_post_init__(self) -> None:
        for rtype in BUILTINS:
            self.register(rtype)
        self.create(self.find("", "v1", "namespaces"), None, {"metadata": {"name": "default"}})
        self.create(self.find("", "v1", "namespaces"), None, {"metadata": {"name": "kube-system"}})

    # resource types

    def register(self, rtype: ResourceType) -> None:
        self.types[(rtype.group, rtype.version, rtype.plural)] = rtype
        self.objects.setdefault(rtype.key, {})
        self.history.setdefault(rtype.key, [])
        self.watchers.setdefault(rtype.key, [])

    def unregister_crd(self, crd: Body) -> None:
        for rtype in from_crd(crd):
            self.types.pop((rtype.group, rtype.version, rtype.plural), None)

    def find(self, group: str, version: str, plural: str) -> ResourceType:
        try:
            return self.types[(group, version, plural)]
        except KeyError:
            raise ApiError(404, "NotFound", "the server could not find the requested resource") from None

    def groups(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for group, version, _ in self.types:
            if version not in found.setdefault(group, []):
                found[group].append(version)
        return found

    # reading

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> Body:
        obj = self.objects[rtype.key].get((namespace or "", name))
        if obj is None:
            raise _not_found(rtype, name)
        return self._present(rtype, obj)

    def select(
        self, rtype: ResourceType, namespace: str | None, labels: str | None = None, fields: str | None = None
    ) -> list[Body]:
        match_labels, match_fields = label_selector(labels), field_selector(fields)
        return [
            self._present(rtype, obj)
            for (ns, _), obj in sorted(self.objects[rtype.key].items())
            if (namespace is None or ns == namespace)
            and match_labels(obj["metadata"].get("labels") or {})
            and match_fields(obj)
        ]

    @staticmethod
    def _present(rtype: ResourceType, obj: Body) -> Body:
        return {**copy.deepcopy(obj), "apiVersion": rtype.api_version, "kind": rtype.kind}

    # writing

    def _commit(self, rtype: ResourceType, event: str, obj: Body) -> Body:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        key = (obj["metadata"].get("namespace") or "", obj["metadata"]["name"])
        if event == "DELETED":
            self.objects[rtype.key].pop(key, None)
            for akey in [k for k in self.applied if k[0] == rtype.key and k[1] == key]:
                del self.applied[akey]
        else:
            self.objects[rtype.key][key] = obj
        snapshot = self._present(rtype, obj)
        history = self.history[rtype.key]
        history.append((self.revision, event, snapshot))
        if len(history) > HISTORY:
            self.compacted = max(self.compacted, history[-HISTORY - 1][0])
            del history[:-HISTORY]
        for watcher in self.watchers[rtype.key]:
            if watcher.namespace in (None, key[0]) and watcher.matches(snapshot):
                watcher.queue.put_nowait((event, snapshot))
        if rtype.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._crd_changed(obj, deleted=event == "DELETED")
        return snapshot

    def _crd_changed(self, crd: Body, deleted: bool) -> None:
        if deleted:
            self.unregister_crd(crd)
            return
        for rtype in from_crd(crd):
            self.register(rtype)
        # Established at once: there is no controller to wait for.
        crd.setdefault("status", {})["conditions"] = [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": ""},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": ""},
        ]
        crd["status"]["acceptedNames"] = crd["spec"]["names"]
        crd["status"]["storedVersions"] = [
            v["name"] for v in crd["spec"].get("versions", []) if v.get("storage")
        ]

    def _admit(self, rtype: ResourceType, obj: Body, old: Body | None = None) -> Body:
        """Pruning, defaulting and validation of custom resources against their CRD's schema (and, on an
        update, its transition rules against the object it replaces)."""
        if rtype.schema is None:
            return obj
        pruned = schema.default(schema.prune(obj, rtype.schema), rtype.schema)
        pruned["metadata"] = obj["metadata"]
        errors = schema.validate(pruned, rtype.schema, old)
        if errors:
            name = obj["metadata"].get("name", "")
            raise ApiError(
                422,
                "Invalid",
                f'{rtype.kind}.{rtype.group} "{name}" is invalid: ' + ", ".join(errors),
                {
                    "name": name,
                    "group": rtype.group,
                    "kind": rtype.kind,
                    "causes": [{"reason": "FieldValueInvalid", "message": e} for e in errors],
                },
            )
        return pruned

    def create(self, rtype: ResourceType, namespace: str | None, body: Body, dry_run: bool = False) -> Body:
        obj = copy.deepcopy(body)
        obj.pop("apiVersion", None)  # presented from the resource type on every read
        obj.pop("kind", None)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value: name or generateName is required")
        if rtype.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the request")
            meta["namespace"] = namespace or "default"
        else:
            meta.pop("namespace", None)
        key = (meta.get("namespace") or "", meta["name"])
        if key in self.objects[rtype.key]:
            what = f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural
            raise ApiError(
                409,
                "AlreadyExists",
                f'{what} "{meta["name"]}" already exists',
                {"name": meta["name"], "group": rtype.group, "kind": rtype.plural},
            )
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        for transient in ("resourceVersion", "deletionTimestamp", "managedFields"):
            meta.pop(transient, None)
        if rtype.status and rtype.kind != "CustomResourceDefinition":
            obj.pop("status", None)  # the status subresource is the only way to write status
        obj = self._admit(rtype, obj)
        _canonical_quantities(rtype, obj)
        if dry_run:
            return self._present(rtype, {**obj, "metadata": {**obj["metadata"], "resourceVersion": ""}})
        return self._commit(rtype, "ADDED", obj)

    def replace(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        new: Body,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> Body:
        """Write a whole new object (PUT, and every patch after it is applied)."""
        key = (namespace or "", name)
        old = self.objects[rtype.key].get(key)
        if old is None:
            raise _not_found(rtype, name)
        wanted_rv = (new.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise _conflict(rtype, name)
        obj = copy.deepcopy(new)
        obj.pop("apiVersion", None)
        obj.pop("kind", None)
        if subresource == "status":
            # Only status changes through /status; everything else stays as it was.
            obj = {**copy.deepcopy(old), "status": obj.get("status")}
            if obj["status"] is None:
                obj.pop("status")
        else:
            meta = obj.setdefault("metadata", {})
            for immutable in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp"):
                if immutable in old["metadata"]:
                    meta[immutable] = old["metadata"][immutable]
                else:
                    meta.pop(immutable, None)
            meta["generation"] = old["metadata"].get("generation", 1)
            if rtype.status:
                if "status" in old:
                    obj["status"] = copy.deepcopy(old["status"])
                else:
                    obj.pop("status", None)
            obj = self._admit(rtype, obj, old)
            _canonical_quantities(rtype, obj)
            if self._essence(obj) != self._essence(old):
                meta["generation"] += 1
        obj["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if obj == old:
            return self._present(rtype, old)  # a no-op write changes nothing, not even resourceVersion
        if dry_run:
            return self._present(rtype, obj)
        if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
            return self._remove(rtype, obj)
        return self._commit(rtype, "MODIFIED", obj)

    @staticmethod
    def _essence(obj: Body) -> Body:
        return {k: v for k, v in obj.items() if k not in ("metadata", "status")}

    def patch(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        content_type: str,
        body: bytes,
        subresource: str | None,
        manager: str | None,
        dry_run: bool = False,
    ) -> Body:
        key = (namespace or "", name)
        old = self.objects[rtype.key].get(key)
        kind = content_type.split(";")[0].strip()
        try:
            if kind == "application/apply-patch+yaml":
                applied = yaml.safe_load(body) or {}
                if old is None:
                    created = self.create(rtype, namespace, applied, dry_run=dry_run)
                    if not dry_run:
                        self.applied[(rtype.key, key, manager or "")] = applied
                    return created
                new = patching.apply(
                    self._present(rtype, old), self.applied.get((rtype.key, key, manager or "")), applied
                )
                result = self.replace(rtype, namespace, name, new, subresource, dry_run)
                if not dry_run:
                    self.applied[(rtype.key, key, manager or "")] = applied
                return result
            if old is None:
                raise _not_found(rtype, name)
            current = self._present(rtype, old)
            data = json.loads(body or b"null")
            if kind == "application/json-patch+json":
                new = patching.json_patch(current, data)
            elif kind == "application/merge-patch+json":
                new = patching.merge_patch(current, data)
            elif kind == "application/strategic-merge-patch+json":
                new = patching.strategic_merge_patch(current, data)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the content type {kind!r} is not supported")
        except patching.PatchTestFailed as e:
            raise ApiError(422, "Invalid", str(e)) from e
        except (patching.PatchInvalid, ValueError) as e:
            raise ApiError(422, "Invalid", f"the patch could not be applied: {e}") from e
        # A patch that does not name a resourceVersion must not fail on a stale one.
        if not (isinstance(data, dict) and (data.get("metadata") or {}).get("resourceVersion")):
            new.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self.replace(rtype, namespace, name, new, subresource, dry_run)

    def delete(self, rtype: ResourceType, namespace: str | None, name: str, dry_run: bool = False) -> Body:
        obj = self.objects[rtype.key].get((namespace or "", name))
        if obj is None:
            raise _not_found(rtype, name)
        if dry_run:
            return self._present(rtype, obj)
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                obj["metadata"]["deletionTimestamp"] = _now()
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
                return self._commit(rtype, "MODIFIED", obj)
            return self._present(rtype, obj)
        return self._remove(rtype, obj)

    def _remove(self, rtype: ResourceType, obj: Body) -> Body:
        snapshot = self._commit(rtype, "DELETED", copy.deepcopy(obj))
        self._collect_garbage(obj["metadata"]["uid"])
        if rtype.kind == "Namespace":
            for types in list(self.types.values()):
                if types.namespaced:
                    for ns, name in list(self.objects[types.key]):
                        if ns == obj["metadata"]["name"]:
                            self.delete(types, ns, name)
        return snapshot

    def _collect_garbage(self, owner_uid: str) -> None:
        """The garbage collector, synchronously: dependents of a removed owner are deleted."""
        dependents = []
        for rtype in {t.key: t for t in self.types.values()}.values():
            for (ns, name), obj in self.objects[rtype.key].items():
                refs = obj["metadata"].get("ownerReferences") or []
                if any(ref.get("uid") == owner_uid for ref in refs):
                    dependents.append((rtype, ns, name))
        for rtype, ns, name in dependents:
            if (ns, name) in self.objects[rtype.key]:
                self.delete(rtype, ns or None, name)

    # scale subresource

    def get_scale(self, rtype: ResourceType, namespace: str | None, name: str) -> Body:
        if not rtype.scale:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        obj = self.get(rtype, namespace, name)
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: obj["metadata"][k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in obj["metadata"]
            },
            "spec": {"replicas": int(_field(obj, rtype.scale["specReplicasPath"][1:]) or 0)},
            "status": {
                "replicas": int(_field(obj, rtype.scale["statusReplicasPath"][1:]) or 0),
                "selector": _field(obj, rtype.scale.get("labelSelectorPath", ".status.selector")[1:]),
            },
        }

    def set_scale(
        self, rtype: ResourceType, namespace: str | None, name: str, scale: Body, dry_run: bool = False
    ) -> Body:
        assert rtype.scale is not None
        obj = self.get(rtype, namespace, name)
        wanted_rv = (scale.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != obj["metadata"]["resourceVersion"]:
            raise _conflict(rtype, name)
        node = obj
        path = rtype.scale["specReplicasPath"][1:].split(".")
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = int((scale.get("spec") or {}).get("replicas") or 0)
        self.replace(rtype, namespace, name, obj, dry_run=dry_run)
        return self.get_scale(rtype, namespace, name)

    # watching

    def compact(self) -> None:
        """Forget the watch history, as etcd compaction does: resuming from before now answers 410 Gone."""
        self.compacted = self.revision
        for history in self.history.values():
            history.clear()

    def subscribe(
        self, rtype: ResourceType, namespace: str | None, matches: Callable[[Body], bool], since: str | None
    ) -> tuple[_Watcher, list[tuple[str, Body]]]:
        """A live watcher plus the events it must see first: the missed ones, or all objects as ADDED.

        Raises 410 Gone when the missed events are no longer kept (the client must list again)."""
        if since and since != "0" and int(since) < self.compacted:
            raise ApiError(410, "Expired", f"too old resource version: {since} ({self.compacted})")
        watcher = _Watcher(namespace, matches, asyncio.Queue())
        if since and since != "0":
            backlog = [(event, obj) for rv, event, obj in self.history[rtype.key] if rv > int(since)]
        else:
            backlog = [("ADDED", obj) for obj in self.select(rtype, namespace)]
        backlog = [
            (event, obj)
            for event, obj in backlog
            if namespace in (None, obj["metadata"].get("namespace")) and matches(obj)
        ]
        self.watchers[rtype.key].append(watcher)
        return watcher, backlog

    def unsubscribe(self, rtype: ResourceType, watcher: _Watcher) -> None:
        self.watchers[rtype.key].remove(watcher)

    def close_watches(self) -> None:
        for watchers in self.watchers.values():
            for watcher in watchers:
                watcher.queue.put_nowait(None)


# --- HTTP -----------------------------------------------------------------------------------------

_PATH_RE = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+)(?=/))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?/?$"
)


@attrs.define(kw_only=True)
class Handler(kmock.RawHandler):
    """The kmock handler: injected reactions first (faults for tests), then the stateful API."""

    store: Store = attrs.field(factory=Store)
    slow_requests_s: float = 0.0  # latency added to every request, to simulate a slow API
    record: bool = True  # keep requests for kmock assertions; off for benchmarks

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body = await raw_request.read()
        request = self._parse(raw_request, body)
        if self.record:
            self._requests.append(request)
        try:
            if self.slow_requests_s:
                await asyncio.sleep(self.slow_requests_s)
            try:
                return await super()._handle(request)  # reactions injected by a test
            except NotImplementedError:
                pass
            return await self._serve(raw_request, request)
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)
        except Exception as e:
            if self._errors:
                self._errors[-1].append(e)
            error = ApiError(
                500, "InternalError", f"{type(e).__name__}: {e}", {"traceback": traceback.format_exc()}
            )
            return aiohttp.web.json_response(error.status(), status=500)

    def _parse(self, raw: aiohttp.web.BaseRequest, body: bytes) -> rendering.Request:
        match = _PATH_RE.match(raw.path)
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        fields: Body = {}
        if match:
            group = "" if match["core"] else match["group"]
            version = match["core"] or match["version"]
            fields = dict(
                resource=kmock.resource(group, version, match["plural"]),
                namespace=match["ns"],
                name=match["name"],
                subresource=match["sub"],
                action=self._action(raw.method, match["name"], raw.query),
            )
        return rendering.Request(
            id=len(self._requests),
            raw_request=raw,
            url=raw.url,
            method=raw.method,
            params=dict(raw.query),
            headers=dict(raw.headers),
            cookies=dict(raw.cookies),
            body=body,
            text=body.decode(errors="replace"),
            data=data,
            **fields,
        )

    @staticmethod
    def _action(method: str, name: str | None, query: Any) -> kmock.action | None:
        if method == "GET":
            return (
                kmock.action.WATCH
                if _true(query.get("watch"))
                else (kmock.action.FETCH if name else kmock.action.LIST)
            )
        return {
            "POST": kmock.action.CREATE,
            "PATCH": kmock.action.UPDATE,
            "PUT": kmock.action.UPDATE,
            "DELETE": kmock.action.DELETE,
        }.get(method)

    async def _serve(
        self, raw: aiohttp.web.BaseRequest, request: rendering.Request
    ) -> aiohttp.web.StreamResponse:
        path = raw.path.rstrip("/") or "/"
        if path == "/openapi/v2" and "protobuf" in raw.headers.get("Accept", ""):
            # An empty protobuf message is an empty OpenAPI document: kubectl then skips client-side
            # validation, which would otherwise need the real schemas of every kind.
            return aiohttp.web.Response(
                body=b"", content_type="application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
            )
        if "protobuf" in raw.headers.get("Content-Type", "") or "cbor" in raw.headers.get("Content-Type", ""):
            # JSON only; client-go falls back to JSON when a server answers 415 to other encodings.
            raise ApiError(415, "UnsupportedMediaType", "the emulator speaks JSON only")
        if raw.method == "GET" and (answer := self._discovery(path)) is not None:
            return aiohttp.web.json_response(answer)
        match = _PATH_RE.match(raw.path)
        if match is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        group = "" if match["core"] else match["group"]
        version = match["core"] or match["version"]
        plural, ns, name, sub = match["plural"], match["ns"], match["name"], match["sub"]
        rtype = self.store.find(group, version, plural)
        if rtype.namespaced is False:
            ns = None
        query = raw.query
        dry_run = query.get("dryRun") == "All"
        store = self.store
        data = request.data

        if raw.method == "GET" and not name:
            if _true(query.get("watch")):
                return await self._watch(raw, rtype, ns, query)
            items = store.select(rtype, ns, query.get("labelSelector"), query.get("fieldSelector"))
            body = {
                "kind": f"{rtype.kind}List",
                "apiVersion": rtype.api_version,
                "metadata": {"resourceVersion": str(store.revision)},
                "items": items,
            }
            return self._respond(raw, rtype, body)
        if raw.method == "GET" and name and _true(query.get("watch")):
            return await self._watch(raw, rtype, ns, {**query, "fieldSelector": f"metadata.name={name}"})
        if name is None and raw.method != "POST":
            raise ApiError(405, "MethodNotAllowed", f"{raw.method} is not supported on collections")
        if sub not in (None, "status", "scale"):
            raise ApiError(404, "NotFound", f"the server could not find the subresource {sub!r}")
        if sub == "scale":
            if raw.method == "GET":
                return aiohttp.web.json_response(store.get_scale(rtype, ns, name or ""))
            scale = store.get_scale(rtype, ns, name or "")
            if raw.method == "PUT":
                scale = data or {}
            elif raw.method == "PATCH":
                ctype = raw.headers.get("Content-Type", "")
                scale = (
                    patching.json_patch(scale, data)
                    if "json-patch" in ctype
                    else patching.merge_patch(scale, data)
                )
            return aiohttp.web.json_response(store.set_scale(rtype, ns, name or "", scale, dry_run))
        if raw.method == "GET":
            return self._respond(raw, rtype, store.get(rtype, ns, name or ""))
        if raw.method == "POST":
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "the request body must be a JSON object")
            return aiohttp.web.json_response(store.create(rtype, ns, data, dry_run), status=201)
        if raw.method == "PUT":
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "the request body must be a JSON object")
            return aiohttp.web.json_response(store.replace(rtype, ns, name or "", data, sub, dry_run))
        if raw.method == "PATCH":
            created = ns is not None and (ns, name) not in store.objects[rtype.key]
            result = store.patch(
                rtype,
                ns,
                name or "",
                raw.headers.get("Content-Type", ""),
                request.body,
                sub,
                query.get("fieldManager"),
                dry_run,
            )
            return aiohttp.web.json_response(result, status=201 if created else 200)
        if raw.method == "DELETE":
            return aiohttp.web.json_response(store.delete(rtype, ns, name or "", dry_run))
        raise ApiError(405, "MethodNotAllowed", f"{raw.method} is not supported")

    def _respond(self, raw: aiohttp.web.BaseRequest, rtype: ResourceType, body: Body) -> aiohttp.web.Response:
        if "as=Table" in raw.headers.get("Accept", ""):
            return aiohttp.web.json_response(_table(rtype, body))
        return aiohttp.web.json_response(body)

    async def _watch(
        self, raw: aiohttp.web.BaseRequest, rtype: ResourceType, ns: str | None, query: Any
    ) -> aiohttp.web.StreamResponse:
        labels, fields = (
            label_selector(query.get("labelSelector")),
            field_selector(query.get("fieldSelector")),
        )

        def matches(obj: Body) -> bool:
            return labels(obj["metadata"].get("labels") or {}) and fields(obj)

        timeout = float(query.get("timeoutSeconds") or 1800)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            watcher, backlog = self.store.subscribe(rtype, ns, matches, query.get("resourceVersion"))
        except ApiError as e:
            # As the API server does: the watch starts (200), and its one event is the error.
            await response.prepare(raw)
            await response.write(json.dumps({"type": "ERROR", "object": e.status()}).encode() + b"\n")
            await response.write_eof()
            return response
        table = "as=Table" in raw.headers.get("Accept", "")
        await response.prepare(raw)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            for event, obj in backlog:
                await response.write(self._watch_line(rtype, event, obj, table))
            while True:
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                if item is None:
                    break
                await response.write(self._watch_line(rtype, item[0], item[1], table))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.unsubscribe(rtype, watcher)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await response.write_eof()
        return response

    @staticmethod
    def _watch_line(rtype: ResourceType, event: str, obj: Body, table: bool) -> bytes:
        payload = _table(rtype, {"items": [obj]}) if table else obj
        return json.dumps({"type": event, "object": payload}).encode() + b"\n"

    # discovery and the documents kubectl asks for

    def _discovery(self, path: str) -> Body | None:
        store = self.store
        groups = store.groups()
        if path == "/version":
            return {
                "major": "1",
                "minor": "32",
                "gitVersion": "v1.32.0-dgemma-emulator",
                "platform": "linux/amd64",
            }
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
            }
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_group(name, versions) for name, versions in sorted(groups.items()) if name],
            }
        if path.startswith("/openapi/v2"):
            # Empty: kubectl then skips client-side validation (it would need the real schemas).
            return {
                "swagger": "2.0",
                "info": {"title": "dgemma emulator", "version": "v1.32.0"},
                "paths": {},
                "definitions": {},
            }
        if path == "/openapi/v3":
            # Custom resources only: `kubectl explain` reads them; built-in kinds have no schemas here.
            return {
                "paths": {
                    f"apis/{t.group}/{t.version}": {
                        "serverRelativeURL": f"/openapi/v3/apis/{t.group}/{t.version}?hash={store.revision}"
                    }
                    for t in store.types.values()
                    if t.schema is not None
                }
            }
        if m := re.fullmatch(r"/openapi/v3/apis/([^/]+)/([^/]+)", path):
            schemas = {
                f"{'.'.join(reversed(t.group.split('.')))}.{t.version}.{t.kind}": {
                    **t.schema,
                    "x-kubernetes-group-version-kind": [
                        {"group": t.group, "version": t.version, "kind": t.kind}
                    ],
                }
                for t in store.types.values()
                if t.schema is not None and (t.group, t.version) == (m[1], m[2])
            }
            if not schemas:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            paths = {}
            for t in store.types.values():
                if t.schema is None or (t.group, t.version) != (m[1], m[2]):
                    continue
                ref = f"#/components/schemas/{'.'.join(reversed(t.group.split('.')))}.{t.version}.{t.kind}"
                scope = "/namespaces/{namespace}" if t.namespaced else ""
                paths[f"/apis/{t.group}/{t.version}{scope}/{t.plural}/{{name}}"] = {
                    "get": {
                        "x-kubernetes-action": "get",
                        "x-kubernetes-group-version-kind": {
                            "group": t.group,
                            "version": t.version,
                            "kind": t.kind,
                        },
                        "responses": {"200": {"content": {"application/json": {"schema": {"$ref": ref}}}}},
                    }
                }
            return {
                "openapi": "3.0.0",
                "info": {"title": "dgemma emulator", "version": "v1.32.0"},
                "paths": paths,
                "components": {"schemas": schemas},
            }
        if path in ("/healthz", "/livez", "/readyz"):
            return {"status": "ok"}
        if m := re.fullmatch(r"/apis/([^/]+)", path):
            if m[1] not in groups:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {"kind": "APIGroup", "apiVersion": "v1", **_group(m[1], groups[m[1]])}
        if m := re.fullmatch(r"/api/(v1)|/apis/([^/]+)/([^/]+)", path):
            group, version = ("", "v1") if m[1] else (m[2], m[3])
            rtypes = [t for (g, v, _), t in store.types.items() if g == group and v == version]
            if not rtypes:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": rtypes[0].api_version,
                "resources": [entry for t in rtypes for entry in t.discovery()],
            }
        return None


def _group(name: str, versions: list[str]) -> Body:
    listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": listed, "preferredVersion": listed[0]}


def _jsonpath(obj: Body, path: str) -> Any:
    """The small JSONPath subset printer columns use: `.a.b` and `.a[?(@.k=="v")].b`."""
    node: Any = obj
    for part in re.findall(r"\[\?\(@\.\w+==\"[^\"]*\"\)\]|[^.\[\]]+", path):
        if part.startswith("[?"):
            m = re.match(r"\[\?\(@\.(\w+)==\"([^\"]*)\"\)\]", part)
            assert m is not None
            node = next((i for i in node or [] if isinstance(i, dict) and i.get(m[1]) == m[2]), None)
        else:
            node = node.get(part) if isinstance(node, dict) else None
    return node


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"


def _table(rtype: ResourceType, body: Body) -> Body:
    """A meta.k8s.io/v1 Table, so `kubectl get` shows the CRD's printer columns."""
    columns: list[Body] = [{"name": "Name", "type": "string", "format": "name", "priority": 0}]
    extra: Iterable[Body] = rtype.printer_columns or (
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )
    columns += [
        {"name": c["name"], "type": c.get("type", "string"), "format": "", "priority": c.get("priority", 0)}
        for c in extra
    ]
    items = body.get("items", [body])
    rows = []
    for item in items:
        cells: list[Any] = [item["metadata"]["name"]]
        for column in extra:
            value = _jsonpath(item, column["jsonPath"])
            cells.append(
                _age(value) if column.get("type") == "date" else ("<none>" if value is None else value)
            )
        partial = {
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": item["metadata"],
        }
        rows.append({"cells": cells, "object": partial})
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": (body.get("metadata") or {}).get("resourceVersion", "")},
        "columnDefinitions": columns,
        "rows": rows,
    }
