"""Schema checks for the deployment files, with schemas shipped in packages (no network).

- compose: the Compose Specification's JSON schema, as check-jsonschema ships it;
- Kubernetes: the API's OpenAPI-derived JSON schemas per kind and version, as kubernetes-validate
  ships them (strict: unknown fields are errors, as `kubectl apply --validate=strict` makes them).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

# The oldest Kubernetes minor a site may run that the manifests must fit (validated strictly).
KUBERNETES_VERSION = "1.30"


def compose_schema() -> dict:
    text = (resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json").read_text()
    return json.loads(text)


def compose_errors(path: Path) -> list[str]:
    """Every way the compose file breaks the Compose Specification, as 'path: message' lines."""
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    document = yaml.safe_load(path.read_text())
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def assert_compose_valid(*paths: Path) -> None:
    for path in paths:
        errors = compose_errors(path)
        assert not errors, f"{path.name} breaks the compose specification:\n" + "\n".join(errors)


def kubernetes_errors(document: dict, version: str = KUBERNETES_VERSION) -> list[str]:
    """Every schema error of one Kubernetes object (empty when valid)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [
            f"{document.get('kind')}/{document.get('metadata', {}).get('name')}: {exc.message} at "
            f"{'/'.join(map(str, exc.path))}"
        ]
    return []
