"""Signed DHT records of the hivemind engine: the peer's key, the validators, owner checks.

Each peer generates one RSA-2048 key (hivemind's :class:`~hivemind.utils.crypto.RSAPrivateKey`)
and uses it twice: as its libp2p identity (handed to the p2p daemon through ``identity_path``,
the protobuf ``PrivateKey`` format of hivemind's ``P2P.generate_identity``) and as the signing key
of hivemind's :class:`~hivemind.dht.crypto.RSASignatureValidator`. Every record this engine writes
(membership heartbeats, tombstones, round registrations) has a subkey
``<peer id>[owner:<ssh-rsa public key>]``; the validator makes every DHT node refuse a value under
such a subkey unless it is signed by that key, and :meth:`Owners.peer_of` accepts a subkey only
if ``<peer id>`` is the libp2p id of the embedded key (sha2-256 multihash of the protobuf public
key, per the libp2p peer-ids document, as ``PeerID.from_identity`` computes it). So a record can
only be written, overwritten or tombstoned by the peer it names. A
:class:`~hivemind.dht.schema.SchemaValidator` fixes the membership table's shape: owner-marked
subkeys only, values ``{"alive": bool, "addr": str, "round": int >= -1, "since": float >= 0, "digest": hex str}``.

What signing cannot stop: anyone who reaches the swarm can generate keys and run peers of its
own (Sybil identities); keep ``host_maddrs`` on loopback or a private network unless every
machine that can reach the port is trusted.

Importing this module imports hivemind; the engine does so only when a peer starts.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from typing import Any

import multihash
import pydantic.v1 as pydantic
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

__all__ = ["Owners", "members_key", "new_identity", "validators"]

_OWNED = re.compile(rb"([1-9A-HJ-NP-Za-km-z]{1,128})\[owner:(.+)\]", re.S)  # base58 peer id
_CACHE_MAX = 4096  # distinct public keys remembered; a flood of keys only costs re-derivation
_ADDR_MAX = 1024  # characters in an advertised multiaddr


class _Member(pydantic.BaseModel):
    alive: pydantic.StrictBool
    addr: pydantic.constr(strict=True, max_length=_ADDR_MAX)  # type: ignore[valid-type]
    # Completed syncs the peer's served global state reflects (-1: it serves none), when the
    # peer joined (DHT time) and the state's digest: joiners adopt the most advanced,
    # longest-running peer's state. Records must carry every field: hivemind's SchemaValidator
    # refuses a value that validation would change (e.g. by filling in a default).
    round: pydantic.conint(strict=True, ge=-1) = -1  # type: ignore[valid-type]
    since: pydantic.confloat(strict=True, ge=0.0) = 0.0  # type: ignore[valid-type]
    digest: pydantic.constr(strict=True, regex=r"^[0-9a-f]{0,16}$") = ""  # type: ignore[valid-type]

    class Config:
        extra = pydantic.Extra.forbid


def members_key(run_id: str) -> str:
    """The DHT key of the membership table: ``SchemaValidator`` names it ``{prefix}_{field}``."""
    return f"{run_id}_members"


def validators(run_id: str, key: RSAPrivateKey) -> list[Any]:
    """The record validators every DHT of the run installs (signing with ``key``)."""

    class _Schema(pydantic.BaseModel):
        members: dict[BytesWithPublicKey, _Member]  # type: ignore[valid-type]

    return [RSASignatureValidator(key), SchemaValidator(_Schema, prefix=run_id)]


def new_identity() -> tuple[RSAPrivateKey, str]:
    """A fresh key and a private temp file holding it as a libp2p identity (caller unlinks)."""
    key = RSAPrivateKey()
    proto = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes())
    fd, path = tempfile.mkstemp(prefix="thinwire-identity-")  # mode 0600
    with os.fdopen(fd, "wb") as f:
        f.write(proto.SerializeToString())
    return key, path


def peer_id_of_identity(path: str) -> str:
    with open(path, "rb") as f:
        return PeerID.from_identity(f.read()).to_base58()


def _peer_id_of_public_key(ssh_key: bytes) -> str:
    der = RSAPublicKey.from_bytes(ssh_key)._public_key.public_bytes(
        encoding=serialization.Encoding.DER,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


class Owners:
    """Builds this peer's owner-marked subkeys and checks other peers' ones."""

    def __init__(self, key: RSAPrivateKey, peer_id: str) -> None:
        self.peer_id = peer_id
        self._marker = RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(
            b"_key_", key.get_public_key().to_bytes()
        )
        self._ids: dict[bytes, str | None] = {}

    def subkey(self, prefix: bytes = b"") -> bytes:
        """``prefix + <own peer id>[owner:<own public key>]``."""
        return prefix + self.peer_id.encode() + self._marker

    def peer_of(self, subkey: Any, prefix: bytes = b"") -> str | None:
        """The peer id a subkey speaks for, if it starts with ``prefix`` and its key owns that id."""
        if not isinstance(subkey, bytes) or not subkey.startswith(prefix):
            return None
        m = _OWNED.fullmatch(subkey[len(prefix) :])
        if m is None:
            return None
        claimed, ssh_key = m.group(1).decode(), m.group(2)
        owner = self._ids.get(ssh_key, "")  # threads share the cache; "" = not derived yet
        if owner == "":
            try:
                owner = _peer_id_of_public_key(ssh_key)
            except Exception:  # not an RSA key: the subkey speaks for nobody
                owner = None
            if len(self._ids) >= _CACHE_MAX:
                self._ids.clear()
            self._ids[ssh_key] = owner
        return claimed if owner == claimed else None
