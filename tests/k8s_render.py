"""A small, offline stand-in for `kustomize build`, enough for the kustomizations in k8s/.

The kustomize binary cannot be installed on the development machines, so tests render the
overlays with this module. It implements only what k8s/ uses and raises ValueError on any
other kustomization field, so a kustomization cannot silently drift outside what is tested:

- ``resources``: YAML files (multi-document) and directories holding a kustomization.yaml
  (rendered recursively, their own transformers applied first, as kustomize does).
- ``configMapGenerator`` with ``files`` (``key=path`` or ``path``) and ``literals``,
  behaviours ``create`` and ``replace`` (which keeps the replaced map's labels and
  annotations); ``generatorOptions.disableNameSuffixHash`` must be true (hash suffixes, and
  the reference rewriting they need, are not implemented).
- ``patches`` given by ``path``: strategic-merge patches whose target is the patch's own
  kind/name/namespace, where the namespace may also be one the object had before a
  ``namespace`` transformer moved it (no namespace: an object that had none). Maps merge
  recursively, ``null`` deletes a key, lists of objects merge by their merge key (``name``;
  ``mountPath`` for volumeMounts; ``containerPort`` for ports), the patch's items first and
  then the base's others, as kustomize orders them; other lists are replaced, and a
  top-level ``$patch: delete`` removes the target.
- ``namespace`` (set on every namespaced object), ``labels`` (``pairs`` on metadata only:
  ``includeSelectors`` / ``includeTemplates`` must be false), and ``images`` (``newName`` /
  ``newTag`` / ``digest`` for every ``containers`` / ``initContainers`` image).

Transformers run in kustomize's order for these fields: patches, namespace, labels, images.
Where kubectl is installed, tests/test_k8s.py checks that every kustomization renders here as
`kubectl kustomize` renders it. The helpers at the end read rendered manifests (workload pod specs,
a TrainJob's effective
pod, $(VAR) expansion, resource quantities) for the tests.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILE = "kustomization.yaml"
SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "configMapGenerator",
    "generatorOptions",
    "patches",
    "images",
}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
    "ClusterTrainingRuntime",
}
# Strategic-merge keys of the list fields k8s/ patches (from the Kubernetes API's
# x-kubernetes-patch-merge-key); any other list of objects merges by "name" when every item
# has one, else it is replaced (kyaml's behaviour for lists without a schema).
MERGE_KEYS = {"volumeMounts": "mountPath", "ports": "containerPort"}
PREVIOUS_NAMESPACES = "__previous_namespaces__"  # kept on an object while rendering, as kustomize keeps old ids

Manifest = dict[str, Any]


def object_id(obj: Manifest) -> tuple[str, str, str]:
    """(kind, namespace, name) of a manifest; namespace is "" when unset."""
    meta = obj.get("metadata") or {}
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def load_yaml_documents(path: Path) -> list[Manifest]:
    """Every non-empty YAML document in ``path``."""
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def _read_kustomization(directory: Path) -> dict[str, Any]:
    path = directory / KUSTOMIZATION_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: no {KUSTOMIZATION_FILE}")
    data = yaml.safe_load(path.read_text()) or {}
    unsupported = sorted(set(data) - SUPPORTED_FIELDS)
    if unsupported:
        raise ValueError(f"{path}: fields not supported by the test renderer: {', '.join(unsupported)}")
    return data


def _inside(directory: Path, relative: str) -> Path:
    """Resolve a file path and enforce kustomize's rule that files stay inside the root."""
    path = (directory / relative).resolve()
    if directory.resolve() not in path.parents:
        raise ValueError(f"{directory}: file '{relative}' is outside the kustomization root")
    return path


def _load_resources(directory: Path, entries: list[str]) -> list[Manifest]:
    objects: list[Manifest] = []
    for entry in entries:
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(_render(path))
        elif path.is_file():
            objects.extend(load_yaml_documents(_inside(directory, entry)))
        else:
            raise ValueError(f"{directory}: resource '{entry}' does not exist")
    return objects


def _generate_config_maps(directory: Path, data: dict[str, Any], objects: list[Manifest]) -> None:
    generators = data.get("configMapGenerator") or []
    if generators and not (data.get("generatorOptions") or {}).get("disableNameSuffixHash"):
        raise ValueError(
            f"{directory}: configMapGenerator needs generatorOptions.disableNameSuffixHash: true "
            "(the test renderer does not rewrite hashed names)"
        )
    for spec in generators:
        config_map = _build_config_map(directory, spec)
        behavior = spec.get("behavior", "create")
        match = [i for i, obj in enumerate(objects) if object_id(obj) == object_id(config_map)]
        if behavior == "create":
            if match:
                raise ValueError(f"{directory}: ConfigMap {spec['name']} already exists; use behavior: replace")
            objects.append(config_map)
        elif behavior == "replace":
            if not match:
                raise ValueError(
                    f"{directory}: no ConfigMap {spec['name']} in namespace '{spec.get('namespace', '')}' to replace"
                )
            old = objects[match[0]].get("metadata") or {}
            for field in ("labels", "annotations"):
                if old.get(field):
                    config_map["metadata"][field] = {**old[field], **config_map["metadata"].get(field, {})}
            objects[match[0]] = config_map
        else:
            raise ValueError(f"{directory}: configMapGenerator behavior '{behavior}' is not supported")


def _build_config_map(directory: Path, spec: dict[str, Any]) -> Manifest:
    unknown = sorted(set(spec) - {"name", "namespace", "behavior", "files", "literals"})
    if unknown:
        raise ValueError(f"{directory}: configMapGenerator fields not supported: {', '.join(unknown)}")
    values: dict[str, str] = {}
    for entry in spec.get("files") or []:
        key, _, relative = entry.rpartition("=") if "=" in entry else ("", "", entry)
        path = _inside(directory, relative)
        values[key or path.name] = path.read_text()
    for entry in spec.get("literals") or []:
        key, sep, value = entry.partition("=")
        if not sep:
            raise ValueError(f"{directory}: literal '{entry}' is not key=value")
        values[key] = value
    metadata: dict[str, Any] = {"name": spec["name"]}
    if spec.get("namespace"):
        metadata["namespace"] = spec["namespace"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": values}


# ---------------------------------------------------------------------------------------------
# Strategic merge


def _merge_key(field: str, items: list[Any]) -> str | None:
    if not items or not all(isinstance(item, dict) for item in items):
        return None
    key = MERGE_KEYS.get(field, "name")
    return key if all(key in item for item in items) else None


def _merge_list(field: str, base: list[Any], patch: list[Any]) -> list[Any]:
    key = _merge_key(field, base + patch)
    if key is None:
        return copy.deepcopy(patch)
    olds = {old[key]: old for old in base}
    merged = [
        strategic_merge(olds[item[key]], item) if item[key] in olds else copy.deepcopy(item)
        for item in patch
        if item.get("$patch") != "delete"
    ]
    patched = {item[key] for item in patch}
    return merged + [copy.deepcopy(old) for old in base if old[key] not in patched]


def strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Merge ``patch`` into a copy of ``base`` with the strategic-merge rules listed above."""
    result = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = strategic_merge(result[key], value)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(key, result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _apply_patches(directory: Path, entries: list[dict[str, Any]], objects: list[Manifest]) -> list[Manifest]:
    for entry in entries:
        if set(entry) != {"path"}:
            raise ValueError(f"{directory}: only 'patches: - path: FILE' is supported, got {sorted(entry)}")
        for patch in load_yaml_documents(_inside(directory, entry["path"])):
            kind, namespace, name = object_id(patch)
            targets = [
                i
                for i, obj in enumerate(objects)
                if object_id(obj)[0] == kind
                and object_id(obj)[2] == name
                and namespace in {object_id(obj)[1], *obj.get(PREVIOUS_NAMESPACES, ())}
            ]
            if len(targets) != 1:
                raise ValueError(
                    f"{directory}: patch {entry['path']} matches {len(targets)} objects "
                    f"for {kind}/{name}; it must match exactly one"
                )
            if patch.get("$patch") == "delete":
                objects.pop(targets[0])
                continue
            body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
            objects[targets[0]] = strategic_merge(objects[targets[0]], body)
    return objects


# ---------------------------------------------------------------------------------------------
# Simple transformers


def _set_namespace(namespace: str, objects: list[Manifest]) -> None:
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED_KINDS:
            obj.setdefault(PREVIOUS_NAMESPACES, []).append(object_id(obj)[1])
            obj.setdefault("metadata", {})["namespace"] = namespace


def _add_labels(directory: Path, entries: list[dict[str, Any]], objects: list[Manifest]) -> None:
    for entry in entries:
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise ValueError(f"{directory}: labels with includeSelectors/includeTemplates are not supported")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(entry.get("pairs") or {})


IMAGE_PATTERN = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]*))?(?:@(?P<digest>.+))?$")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port is part of the name."""
    match = IMAGE_PATTERN.match(image)
    if match is None:
        raise ValueError(f"not an image reference: '{image}'")
    return match["name"], match["tag"], match["digest"]


def _retag(image: str, rule: dict[str, Any]) -> str:
    name, tag, digest = split_image(image)
    if name != rule["name"]:
        return image
    name = rule.get("newName", name)
    if "digest" in rule:
        return f"{name}@{rule['digest']}"
    if "newTag" in rule:
        return f"{name}:{rule['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _set_images(rules: list[dict[str, Any]], node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and "image" in container:
                        for rule in rules:
                            container["image"] = _retag(container["image"], rule)
            _set_images(rules, value)
    elif isinstance(node, list):
        for item in node:
            _set_images(rules, item)


def render(directory: str | Path) -> list[Manifest]:
    """Render the kustomization in ``directory`` to a list of manifests (plain dicts).
    Raises `ValueError` on a kustomization field or patch this renderer does not support."""
    objects = _render(Path(directory))
    for obj in objects:
        obj.pop(PREVIOUS_NAMESPACES, None)
    return objects


def _render(directory: Path) -> list[Manifest]:
    data = _read_kustomization(directory)
    objects = _load_resources(directory, data.get("resources") or [])
    _generate_config_maps(directory, data, objects)
    objects = _apply_patches(directory, data.get("patches") or [], objects)
    if data.get("namespace"):
        _set_namespace(data["namespace"], objects)
    _add_labels(directory, data.get("labels") or [], objects)
    _set_images(data.get("images") or [], objects)
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        if object_id(obj) in seen:
            raise ValueError(f"{directory}: duplicate object {'/'.join(object_id(obj))}")
        seen.add(object_id(obj))
    return objects


# ---------------------------------------------------------------------------------------------
# Reading rendered manifests


def find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    """The one object of ``kind`` named ``name``."""
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(matches) != 1:
        raise ValueError(f"expected one {kind}/{name}, found {len(matches)}")
    return matches[0]


def trainjob_pod(trainjob: Manifest) -> dict:
    """The pod a TrainJob's `node` replicated job runs: trainer settings + our runtimePatches."""
    trainer = trainjob["spec"]["trainer"]
    pod: dict[str, Any] = {"containers": [{"name": "node"}]}
    for patch in trainjob["spec"].get("runtimePatches", []):
        for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if job["name"] == "node":
                pod = strategic_merge(pod, job["template"]["spec"]["template"]["spec"])
    node = next(c for c in pod["containers"] if c["name"] == "node")
    node.update(
        image=trainer["image"],
        command=trainer["command"],
        env=trainer.get("env", []),
        resources=trainer["resourcesPerNode"],
    )
    return pod


def pods(objects: list[Manifest]) -> list[tuple[Manifest, dict]]:
    """(owner object, pod spec) for every workload in ``objects``."""
    result = []
    for obj in objects:
        if obj["kind"] in ("Job", "Deployment"):
            result.append((obj, obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "TrainJob":
            result.append((obj, trainjob_pod(obj)))
    return result


def containers(pod: dict) -> list[dict]:
    """Init containers and containers of a pod spec."""
    return pod.get("initContainers", []) + pod["containers"]


def expand(container: dict, text: str, **extra: str) -> str:
    """Kubernetes $(VAR) expansion with the container's literal env values."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e} | extra
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), text)


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity as a number (cores, bytes, devices)."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    if match is None or (match[2] not in units and match[2]):
        raise ValueError(f"not a resource quantity: '{value}'")
    return float(match[1]) * units.get(match[2], 1)
