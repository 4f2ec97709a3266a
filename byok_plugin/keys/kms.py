"""Key-encryption keys in a KMS: OpenBao / HashiCorp Vault Transit, and AWS KMS.

Each wraps and unwraps workspace data keys (:mod:`byok_plugin.keys.envelope`) and never sees a stored
provider key. Chosen with ``BYOK_KEY_PROVIDER``; each needs its extra installed:

- ``vault-transit`` (``pip install 'byok-plugin[vault]'``, ``hvac``): the Transit key
  ``BYOK_VAULT_TRANSIT_KEY`` (default ``byok``) at ``BYOK_VAULT_ADDR`` (or ``VAULT_ADDR``), mount
  ``BYOK_VAULT_TRANSIT_MOUNT`` (default ``transit``), with the token in ``VAULT_TOKEN`` (never on
  a command line). The key must be a *derived* key (``bao write transit/keys/byok
  type=aes256-gcm96 derived=true``): the workspace id is its key-derivation context, so a wrapped
  key moved to another workspace does not decrypt, and Transit's ``rewrap`` keeps that binding
  (its associated data is not accepted by ``rewrap``, and a non-derived key would silently ignore
  the context, so a non-derived key is refused). The stored blob is Transit's own ``vault:vN:...``
  ciphertext, its key id ``<key>:vN``: rotating the Transit key (``bao write -f
  transit/keys/byok/rotate``) then ``byok keys rewrap`` moves every data key to the new version
  inside Transit; the data keys never leave it. The token needs ``update`` on
  ``transit/encrypt/<key>``, ``transit/decrypt/<key>``, ``transit/rewrap/<key>`` and ``read`` on
  ``transit/keys/<key>``.
- ``aws-kms`` (``pip install 'byok-plugin[aws]'``, ``boto3``): the KMS key
  ``BYOK_AWS_KMS_KEY_ID`` (id, ARN or alias), with the encryption context
  ``{"byok:workspace": <workspace id>}``; region and credentials from the usual AWS chain
  (``AWS_REGION``...), endpoint ``BYOK_AWS_KMS_ENDPOINT_URL`` if set (a VPC endpoint). Moving to
  another KMS key (a new ``BYOK_AWS_KMS_KEY_ID``) then ``byok keys rewrap`` uses ``ReEncrypt``:
  the data keys never leave KMS. (KMS's own automatic rotation keeps the key id: nothing to do.)

A KMS that does not answer within ``BYOK_KMS_TIMEOUT`` seconds (default 5) raises; the caller
(:class:`~byok_plugin.keys.envelope.DataKeys`) names the KMS and the workspace in the error.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Mapping
from typing import Any

from byok_hookspecs import WrappedDataKey

from byok_plugin.core.errors import KeyringError
from byok_plugin.settings import SettingsError

__all__ = ["AwsKmsKeyEncryption", "VaultTransitKeyEncryption", "workspace_context"]

_AAD_DOMAIN = b"byok-plugin/data-key/v1"
_VAULT_VERSION = re.compile(r"^vault:v(\d+):")


def workspace_context(workspace_id: str) -> bytes:
    """The associated data binding a wrapped data key to its workspace (length-prefixed)."""
    raw = workspace_id.encode("utf-8")
    return _AAD_DOMAIN + struct.pack(">I", len(raw)) + raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _missing_extra(extra: str, module: str) -> SettingsError:
    return SettingsError(
        f"BYOK_KEY_PROVIDER={extra} needs the {module!r} package: "
        f"pip install 'byok-plugin[{'vault' if extra == 'vault-transit' else 'aws'}]'"
    )


class VaultTransitKeyEncryption:
    """Data keys wrapped by an OpenBao / Vault Transit key (see the module docstring)."""

    name = "vault-transit"

    def __init__(
        self,
        *,
        url: str,
        token: str,
        key: str = "byok",
        mount: str = "transit",
        timeout: float = 5.0,
    ) -> None:
        try:
            import hvac  # type: ignore[import-untyped]
        except ImportError:
            raise _missing_extra(self.name, "hvac") from None
        self.url = url
        self.key = key
        self.mount = mount
        self._client = hvac.Client(url=url, token=token, timeout=timeout)
        self._checked = False  # the key is a derived key (read once, on first use)

    @classmethod
    def from_environ(cls, env: Mapping[str, str], timeout: float) -> VaultTransitKeyEncryption:
        url = env.get("BYOK_VAULT_ADDR") or env.get("VAULT_ADDR")
        token = env.get("VAULT_TOKEN")
        if not url:
            raise SettingsError(
                "BYOK_KEY_PROVIDER=vault-transit needs BYOK_VAULT_ADDR (or VAULT_ADDR), the "
                "OpenBao/Vault address, such as https://vault.internal:8200"
            )
        if not token:
            raise SettingsError(
                "BYOK_KEY_PROVIDER=vault-transit needs VAULT_TOKEN, a token allowed to encrypt "
                "and decrypt with the Transit key"
            )
        return cls(
            url=url,
            token=token,
            key=env.get("BYOK_VAULT_TRANSIT_KEY") or "byok",
            mount=env.get("BYOK_VAULT_TRANSIT_MOUNT") or "transit",
            timeout=timeout,
        )

    def __repr__(self) -> str:
        return f"VaultTransitKeyEncryption(url={self.url!r}, key={self.key!r})"

    def describe(self) -> str:
        return f"OpenBao/Vault Transit key {self.key!r} (mount {self.mount!r}) at {self.url}"

    def _check_derived(self) -> None:
        if self._checked:
            return
        info = self._client.secrets.transit.read_key(name=self.key, mount_point=self.mount)
        if not info["data"].get("derived"):
            raise KeyringError(
                f"{self.describe()} is not a derived key: byok-plugin binds each data key to its "
                f"workspace through Transit's key-derivation context, which a non-derived key "
                f"ignores. Create one with `bao write {self.mount}/keys/<name> "
                f"type=aes256-gcm96 derived=true` and set BYOK_VAULT_TRANSIT_KEY to it"
            )
        self._checked = True

    def _wrapped(self, ciphertext: str) -> WrappedDataKey:
        version = _VAULT_VERSION.match(ciphertext)
        if version is None:
            raise KeyringError(f"{self.describe()} answered a ciphertext without a key version")
        return WrappedDataKey(
            self.name, f"{self.key}:v{version.group(1)}", ciphertext.encode("ascii")
        )

    def wrap(self, workspace_id: str, data_key: bytes) -> WrappedDataKey:
        self._check_derived()
        response = self._client.secrets.transit.encrypt_data(
            name=self.key,
            plaintext=_b64(data_key),
            context=_b64(workspace_context(workspace_id)),
            mount_point=self.mount,
        )
        return self._wrapped(str(response["data"]["ciphertext"]))

    def rewrap(self, workspace_id: str, wrapped: WrappedDataKey) -> WrappedDataKey:
        """Transit's ``rewrap``: the same data key under the Transit key's latest version,
        without it leaving Transit."""
        self._check_derived()
        response = self._client.secrets.transit.rewrap_data(
            name=self.key,
            ciphertext=self._ciphertext(workspace_id, wrapped),
            context=_b64(workspace_context(workspace_id)),
            mount_point=self.mount,
        )
        return self._wrapped(str(response["data"]["ciphertext"]))

    def _ciphertext(self, workspace_id: str, wrapped: WrappedDataKey) -> str:
        """The Transit ciphertext of a wrapped key, checked against the key id it is stored with."""
        key, _, version = wrapped.key_id.rpartition(":v")
        ciphertext = wrapped.blob.decode("ascii", errors="replace")
        found = _VAULT_VERSION.match(ciphertext)
        if key != self.key or found is None or found.group(1) != version:
            raise KeyringError(
                f"the data key of workspace {workspace_id!r} names Transit key "
                f"{wrapped.key_id!r}, but its ciphertext is of "
                f"{self.key + ':v' + found.group(1) if found else 'no key version'}: it was "
                f"altered (or {self.describe()} is not the Transit key that wrapped it)"
            )
        return ciphertext

    def unwrap(self, workspace_id: str, wrapped: WrappedDataKey) -> bytes | None:
        if wrapped.provider != self.name:
            return None
        ciphertext = self._ciphertext(workspace_id, wrapped)
        self._check_derived()
        response = self._client.secrets.transit.decrypt_data(
            name=self.key,
            ciphertext=ciphertext,
            context=_b64(workspace_context(workspace_id)),
            mount_point=self.mount,
        )
        return base64.b64decode(response["data"]["plaintext"])


class AwsKmsKeyEncryption:
    """Data keys wrapped by an AWS KMS key (see the module docstring)."""

    name = "aws-kms"

    def __init__(
        self,
        *,
        key_id: str,
        region: str | None = None,
        endpoint_url: str | None = None,
        timeout: float = 5.0,
        client: Any = None,
    ) -> None:
        self.key_id = key_id
        self.region = region
        self.endpoint_url = endpoint_url
        if client is None:
            try:
                import boto3  # type: ignore[import-untyped]
                from botocore.config import Config  # type: ignore[import-untyped]
            except ImportError:
                raise _missing_extra(self.name, "boto3") from None
            client = boto3.client(
                "kms",
                region_name=region,
                endpoint_url=endpoint_url,
                config=Config(
                    connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2}
                ),
            )
        self._client = client

    @classmethod
    def from_environ(cls, env: Mapping[str, str], timeout: float) -> AwsKmsKeyEncryption:
        key_id = env.get("BYOK_AWS_KMS_KEY_ID")
        if not key_id:
            raise SettingsError(
                "BYOK_KEY_PROVIDER=aws-kms needs BYOK_AWS_KMS_KEY_ID, the KMS key's id, ARN or "
                "alias (alias/byok)"
            )
        return cls(
            key_id=key_id,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            endpoint_url=env.get("BYOK_AWS_KMS_ENDPOINT_URL") or None,
            timeout=timeout,
        )

    def __repr__(self) -> str:
        return f"AwsKmsKeyEncryption(key_id={self.key_id!r})"

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"AWS KMS key {self.key_id}{where}"

    @staticmethod
    def _context(workspace_id: str) -> dict[str, str]:
        return {"byok:workspace": workspace_id}

    def wrap(self, workspace_id: str, data_key: bytes) -> WrappedDataKey:
        response = self._client.encrypt(
            KeyId=self.key_id, Plaintext=data_key, EncryptionContext=self._context(workspace_id)
        )
        return WrappedDataKey(self.name, str(response["KeyId"]), bytes(response["CiphertextBlob"]))

    def rewrap(self, workspace_id: str, wrapped: WrappedDataKey) -> WrappedDataKey:
        """KMS ``ReEncrypt`` to the configured key, without the data key leaving KMS."""
        response = self._client.re_encrypt(
            CiphertextBlob=wrapped.blob,
            SourceKeyId=wrapped.key_id,
            SourceEncryptionContext=self._context(workspace_id),
            DestinationKeyId=self.key_id,
            DestinationEncryptionContext=self._context(workspace_id),
        )
        return WrappedDataKey(self.name, str(response["KeyId"]), bytes(response["CiphertextBlob"]))

    def unwrap(self, workspace_id: str, wrapped: WrappedDataKey) -> bytes | None:
        if wrapped.provider != self.name:
            return None
        response = self._client.decrypt(
            CiphertextBlob=wrapped.blob,
            KeyId=wrapped.key_id,
            EncryptionContext=self._context(workspace_id),
        )
        return bytes(response["Plaintext"])
