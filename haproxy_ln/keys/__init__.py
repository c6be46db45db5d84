"""Key custody: the Lightning node's secrets, sealed at rest, usable only on the active node.

See custody.py for the life cycle, sealing.py for the sealed-file format,
lnd.py for lnd's unlock over gRPC, and docs/keys.md for operators.
"""

from haproxy_ln.keys.custody import (
    FileCustody,
    KeyCustody,
    NoCustody,
    SecretFile,
    custody_from_config,
)
from haproxy_ln.keys.lnd import PASSWORD_ROLE, LndCustody, lnd_state, unlock_wallet
from haproxy_ln.keys.lnrpc import WalletState
from haproxy_ln.keys.sealing import Kek, KekSource, Secret, open_sealed, seal, unseal

__all__ = [
    "PASSWORD_ROLE",
    "FileCustody",
    "Kek",
    "KekSource",
    "KeyCustody",
    "LndCustody",
    "NoCustody",
    "Secret",
    "SecretFile",
    "WalletState",
    "custody_from_config",
    "lnd_state",
    "open_sealed",
    "seal",
    "unlock_wallet",
    "unseal",
]
