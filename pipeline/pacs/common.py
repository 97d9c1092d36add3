"""Credentials, TLS settings and the error shared by the PACS protocols (a leaf module).

Credentials never come from a URL (refused there) and never reach logs, artifacts or tables:
they are read from environment variables (or handed over by the flows from a Prefect Secret
block) and only ever attached to an HTTP session or nothing at all (DIMSE has no credentials; its
access control is the peer's AE title allow-list).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline.errors import Reason

# Environment variables read by `Credentials.from_env` (prefix UNET_PACS for pulling; a push
# destination reads UNET_PUSH_* first and falls back to UNET_PACS_*).
ENV_USERNAME = "{prefix}_USERNAME"
ENV_PASSWORD = "{prefix}_PASSWORD"
ENV_TOKEN = "{prefix}_TOKEN"  # a bearer token (OAuth access token); wins over username/password
ENV_CA_BUNDLE = "{prefix}_CA_BUNDLE"  # a PEM file of CA certificates to trust instead of the system's
ENV_AET = "UNET_PACS_AET"  # our own AE title for DIMSE (default DEFAULT_AET)
PULL_PREFIX = "UNET_PACS"
PUSH_PREFIX = "UNET_PUSH"
DEFAULT_AET = "UNET_PIPELINE"


class PacsError(RuntimeError):
    """A PACS that could not be reached or refused a request: a stable reason and a message.

    The message names the host and what to check; it never holds credentials or query values.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across processes (RuntimeError's default uses args)
        return (type(self), (self.reason, self.message))


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials for a DICOMweb server: a bearer token, or basic username and password.

    `repr` hides the secrets, so a Credentials object in a traceback or log line leaks nothing.
    """

    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None  # PEM file of trusted CAs; None: the system's trust store
    verify_tls: bool = True  # False only for a test server with a self-signed certificate

    @property
    def kind(self) -> str:
        """'bearer', 'basic' or 'none' (what a log line may say about them)."""
        if self.token:
            return "bearer"
        return "basic" if self.username else "none"

    @classmethod
    def from_env(cls, prefix: str = PULL_PREFIX, *, fallback: str | None = None) -> Credentials:
        """Read {prefix}_TOKEN or {prefix}_USERNAME + {prefix}_PASSWORD, and {prefix}_CA_BUNDLE.

        Each variable falls back to the same name under `fallback` when unset (push -> pull).
        Raises ValueError when a username comes without a password (or the reverse).
        """

        def get(template: str) -> str | None:
            for p in (prefix, fallback):
                if p and os.environ.get(template.format(prefix=p)):
                    return os.environ[template.format(prefix=p)]
            return None

        username, password, token = get(ENV_USERNAME), get(ENV_PASSWORD), get(ENV_TOKEN)
        if bool(username) != bool(password) and not token:
            missing = ENV_PASSWORD if username else ENV_USERNAME
            raise ValueError(
                f"PACS credentials are half set: {missing.format(prefix=prefix)} is empty; set both "
                f"{ENV_USERNAME.format(prefix=prefix)} and {ENV_PASSWORD.format(prefix=prefix)}, or "
                f"{ENV_TOKEN.format(prefix=prefix)}"
            )
        return cls(username=username, password=password, token=token, ca_bundle=get(ENV_CA_BUNDLE))

    @classmethod
    def from_mapping(cls, data: dict[str, str], *, ca_bundle: str | None = None) -> Credentials:
        """From a secret's JSON value: {"token": ...} or {"username": ..., "password": ...}."""
        unknown = set(data) - {"username", "password", "token", "ca_bundle"}
        if unknown:
            raise ValueError(
                f"PACS secret has unknown keys {sorted(unknown)}; valid: token, username, password, ca_bundle"
            )
        return cls(
            username=data.get("username"),
            password=data.get("password"),
            token=data.get("token"),
            ca_bundle=data.get("ca_bundle") or ca_bundle,
        )


def our_aet() -> str:
    """Our DIMSE AE title: $UNET_PACS_AET or UNET_PIPELINE (at most 16 characters)."""
    aet = os.environ.get(ENV_AET) or DEFAULT_AET
    if not 0 < len(aet) <= 16:
        raise ValueError(f"{ENV_AET}={aet!r}: an AE title has 1 to 16 characters")
    return aet
