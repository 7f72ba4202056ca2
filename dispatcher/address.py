"""Email addresses as users write them ("Ada <ada@example.com>"), validated without DNS.

Never route with `email.utils.parseaddr`: it returns the first plausible address of a hostile
string (`alice@x)<bob@y>` gives alice). We accept exactly two shapes, a bare address or one
`Name <address>`, and validate the address part with email-validator.
"""

import functools
import re
from dataclasses import dataclass

from dispatcher.errors import InvalidRequest

_NAME_AND_ADDR = re.compile(r"^\s*(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]*)>\s*$")
# C0 controls, DEL and C1 controls: nothing a header value may carry.
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,"]')
# RFC 5322 dot-atom: what email-validator accepts as an ASCII local part without quotes.
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
# Plus U+2028/U+2029, which str.splitlines() (and so the email package) treats as line breaks.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class Address:
    """A validated mailbox: what goes in a header and what goes in the SMTP envelope."""

    display_name: str
    addr_spec: str

    def __str__(self) -> str:
        if not self.display_name:
            return self.addr_spec
        name = self.display_name
        return (
            f'"{name}" <{self.addr_spec}>'
            if _SPECIALS.search(name)
            else f"{name} <{self.addr_spec}>"
        )


def check_header_text(value: str, what: str) -> None:
    """Reject text that could forge a header line (CR/LF, controls, RFC 2047 encoded words).

    `=?` is refused because Python 3.11.7's email package turns an encoded newline inside an
    encoded word into a real header line (CVE-2024-6923).
    """
    if _CONTROL.search(value):
        raise InvalidRequest(f"{what}: control characters (CR, LF, ...) are not allowed")
    if "=?" in value:
        raise InvalidRequest(f"{what}: encoded words ('=?') are not allowed")


def parse_address(text: object, what: str) -> Address:
    """Parse and validate one address; `what` names the field in the error message."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{what}: expected an address string, got {type(text).__name__}")
    check_header_text(text, what)
    match = _NAME_AND_ADDR.match(text)
    name, addr = (match["name"], match["addr"]) if match else ("", text.strip())
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1]
        if '"' in name or "\\" in name:
            raise InvalidRequest(f"{what}: quotes or backslashes inside a display name: {text!r}")
    elif _SPECIALS.search(name):
        # "Doe, John <j@x>" is two addresses to a mail client; make the caller quote it.
        raise InvalidRequest(f"{what}: quote a display name with special characters: {text!r}")
    return Address(name, _validate_addr_spec(addr, what))


def _validate_addr_spec(addr: str, what: str) -> str:
    # Imported here: email-validator costs ~25 ms to import, and `import dispatcher` must stay
    # light for web apps that import it at boot.
    from email_validator import EmailNotValidError, validate_email

    local, at, domain = addr.rpartition("@")
    try:
        if at and len(local) <= 64 and len(addr) <= 254 and _DOT_ATOM.match(local):
            return f"{local}@{_validated_domain(domain)}"
        # No SMTPUTF8 local parts: the stdlib cannot write them into headers, and many relays
        # refuse them; better a clear error at enqueue than a dead request later.
        valid = validate_email(addr, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise InvalidRequest(f"{what}: {addr!r} is not a valid address: {exc}") from None
    return str(valid.normalized)


@functools.lru_cache(maxsize=4096)
def _validated_domain(domain: str) -> str:
    """A domain checked (IDNA, length, labels) and normalised by email-validator, once.

    Domains repeat far more than addresses do, and the domain check is two thirds of
    email-validator's ~30 µs; a plain ASCII local part needs only the dot-atom pattern.
    """
    from email_validator import validate_email

    return str(validate_email(f"x@{domain}", check_deliverability=False).domain)
