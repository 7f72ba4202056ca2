"""DKIM: a signature over the final bytes of every message whose From domain is `dkim.domain`
(or one of its subdomains), made once when the message is rendered, so every retry sends the
same signed bytes. dkimpy signs (optional extra `dispatcher[dkim]`); it is imported only when
`dkim` is configured.
"""

import base64
import email.utils
import re
import subprocess
from pathlib import Path

from dispatcher.errors import SettingsError, UsageError
from dispatcher.permissions import private_dir, private_file
from dispatcher.settings import DkimSettings

# Signed whether present or not: one listed but absent cannot be added later unnoticed.
SIGNED_HEADERS = (
    "From",
    "To",
    "Cc",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
_FROM = re.compile(rb"^From:[ \t]*((?:.*)(?:\r\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
RSA_BITS = 2048
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


class Signer:
    """Signs messages with one key; built once per process from `dkim` settings."""

    def __init__(self, settings: DkimSettings) -> None:
        try:
            import dkim
        except ImportError:
            raise SettingsError(
                "dkim: signing needs dkimpy; install it with pip install 'dispatcher[dkim]'"
            ) from None
        self._dkim = dkim
        self.domain = settings.domain.lower()
        self._selector = settings.selector.encode("ascii")
        self._algorithm = settings.algorithm.encode("ascii")
        try:
            self._key = settings.key_file.read_bytes().strip() + b"\n"
        except OSError as exc:
            raise SettingsError(f"dkim.key_file: cannot read {settings.key_file}: {exc}") from None
        try:  # a key that does not fit the algorithm fails now, not on the first mail
            self._sign(b"From: a@" + self.domain.encode() + b"\r\n\r\nkey check\r\n")
        except dkim.DKIMException as exc:
            raise SettingsError(
                f"dkim.key_file: {settings.key_file} is not a {settings.algorithm} key: {exc}"
            ) from None

    def sign(self, data: bytes) -> bytes:
        """`data` with a DKIM-Signature field in front, or unchanged when its From address is
        not in this domain."""
        if not self.signs(data):
            return data
        return self._sign(data) + data

    def signs(self, data: bytes) -> bool:
        """Whether the From field's domain is `dkim.domain` or a subdomain of it."""
        end = data.find(b"\r\n\r\n")
        found = _FROM.search(data, 0, end if end >= 0 else len(data))
        if found is None:
            return False
        unfolded = found[1].replace(b"\r\n", b"").decode("ascii", "replace")
        domain = email.utils.parseaddr(unfolded)[1].rpartition("@")[2].lower()
        return domain == self.domain or domain.endswith("." + self.domain)

    def _sign(self, data: bytes) -> bytes:
        return bytes(
            self._dkim.sign(
                data,
                self._selector,
                self.domain.encode("ascii"),
                self._key,
                canonicalize=(b"relaxed", b"relaxed"),
                signature_algorithm=self._algorithm,
                include_headers=[name.lower().encode("ascii") for name in SIGNED_HEADERS],
            )
        )


def keygen(selector: str, folder: Path, algorithm: str) -> tuple[Path, Path, str]:
    """Write a new key pair: `<selector>.dkim.key` (secret, mode 0600, what `dkim.key_file`
    names) and `<selector>.dkim.txt` (the public key as its DNS TXT record value); returns
    both paths and the record."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", selector):
        raise UsageError(f"keygen --dkim: {selector!r} is not a selector (letters, digits, '-')")
    if algorithm not in ALGORITHMS:
        raise UsageError(f"--algorithm: expected one of {', '.join(ALGORITHMS)}, not {algorithm}")
    secret, public = folder / f"{selector}.dkim.key", folder / f"{selector}.dkim.txt"
    for path in (secret, public):
        if path.exists():
            raise UsageError(f"keygen --dkim: {path} exists; refusing to overwrite a key")
    private_file(private_dir(folder) / secret.name)  # owner-only before the key is in it
    try:
        record = _rsa(secret) if algorithm == "rsa-sha256" else _ed25519(secret)
    except BaseException:
        secret.unlink()
        raise
    public.write_text(record + "\n", encoding="ascii")
    return secret, public, record


def _rsa(path: Path) -> str:
    """RSA with the openssl command (as dkimpy's own dknewkey does): neither the stdlib nor
    dkimpy generates RSA keys."""
    try:
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{RSA_BITS}",
             "-out", str(path)],
            check=True, capture_output=True,
        )  # fmt: skip
        public = subprocess.run(
            ["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
    except FileNotFoundError:
        raise SettingsError(
            "keygen --dkim: rsa-sha256 keys are made with the openssl command, which is not"
            " installed; install it or use --algorithm ed25519-sha256"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise SettingsError(f"keygen --dkim: openssl failed: {exc.stderr.decode()}") from None
    return f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"


def _ed25519(path: Path) -> str:
    """Ed25519 (RFC 8463) in dkimpy's format: the base64 of the 32-byte seed."""
    try:
        import nacl.signing
    except ImportError:
        raise SettingsError(
            "keygen --dkim: ed25519 needs PyNaCl; install it with pip install 'dispatcher[dkim]'"
        ) from None
    key = nacl.signing.SigningKey.generate()
    path.write_bytes(base64.b64encode(bytes(key)) + b"\n")
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(bytes(key.verify_key)).decode()}"


def dns_record(selector: str, domain: str, record: str) -> str:
    """The record as a zone file line; long values split into 255-byte strings (RFC 7208)."""
    chunks = " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))
    return f"{selector}._domainkey.{domain}. IN TXT ( {chunks} )"
