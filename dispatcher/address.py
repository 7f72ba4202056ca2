"""Email addresses as users write them ("Ada <ada@example.com>"), validated without DNS.

Never route with `email.utils.parseaddr`: it returns the first plausible address of a hostile
string (`alice@x)<bob@y>` gives alice). We accept exactly two shapes, a bare address or one
`Name <address>`. The daemon validates the address part with email-validator (`parse_address`);
the client only checks the shape (`check_address`), a fraction of that cost.
"""

import functools
import re
from dataclasses import dataclass

from dispatcher.errors import InvalidRequest

_NAME_AND_ADDR = re.compile(r"^\s*(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]*)>\s*$")
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,"]')
# C0 controls, DEL and C1 controls: nothing a header value may carry. Plus U+2028/U+2029,
# which str.splitlines() (and so the email package) treats as line breaks.
_CONTROLS = r"\x00-\x1f\x7f-\x9f\u2028\u2029"
_CONTROL = re.compile(f"[{_CONTROLS}]")
# The shape the client checks: a dot-atom local part, dot-separated labels of letters and digits
# (any script) with inner hyphens, and either nothing around it or a display name that is quoted
# or free of specials, and no control character. `=?` and the length are checked after.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# RFC 5322 dot-atom: what email-validator accepts as an ASCII local part without quotes.
_DOT_ATOM = re.compile(rf"^{_ATOM}(\.{_ATOM})*$")
_LABEL = r"[^\W_]+(?:-+[^\W_]+)*"
_ADDR_SPEC = rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+"
_SPACE = rf"[^\S{_CONTROLS}]*"
_NAME = rf'"[^"\\{_CONTROLS}]*"|[^()<>\[\]:;@\\,"{_CONTROLS}]*?'
_SHAPE = re.compile(rf"{_SPACE}(?:({_ADDR_SPEC})|(?:{_NAME}){_SPACE}<({_ADDR_SPEC})>){_SPACE}")
# The common address in its plainest form, which `check_address` accepts without a doubt: a bare
# dot-atom without `=` or `?` (so no `=?`) at ASCII labels. `wire` passes one at the cost of
# this match alone.
_PLAIN_ATOM = r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]+"
_PLAIN_LABEL = r"[A-Za-z0-9]+(?:-+[A-Za-z0-9]+)*"
PLAIN_ADDRESS = re.compile(
    rf"{_PLAIN_ATOM}(?:\.{_PLAIN_ATOM})*@{_PLAIN_LABEL}(?:\.{_PLAIN_LABEL})+\Z"
)


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


def check_address(text: object, what: str) -> None:
    """Check the shape of one address, as the client does before handing a request over.

    It refuses what could forge a header or a recipient (controls, `=?`, a second address,
    unquoted specials in a name) and what is plainly not an address. What it leaves to the
    daemon's `parse_address`: email-validator's checks of the domain (IDNA, label and total
    lengths, reserved names such as `localhost`) and its normalisation.
    """
    if not isinstance(text, str):
        raise InvalidRequest(f"{what}: expected an address string, got {type(text).__name__}")
    match = _SHAPE.fullmatch(text)
    if match is None or "=?" in text:
        check_header_text(text, what)  # the precise reason, when it is one of these
        raise InvalidRequest(
            f"{what}: {text!r} is not a valid address (name@example.com or Name <name@example.com>)"
        )
    if len(match[1] or match[2]) > 254:
        raise InvalidRequest(f"{what}: {text!r} is not a valid address: too long")


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
    local, at, domain = addr.rpartition("@")
    if at and len(local) <= 64 and len(addr) <= 254 and _DOT_ATOM.match(local):
        valid_domain = _validated_domain(domain)
        if valid_domain is not None:
            return f"{local}@{valid_domain}"
    # Imported here: email-validator costs ~25 ms to import, and `import dispatcher` must stay
    # light for web apps that import it at boot.
    from email_validator import EmailNotValidError, validate_email

    try:
        # No SMTPUTF8 local parts: the stdlib cannot write them into headers, and many relays
        # refuse them; better a clear error at enqueue than a dead request later.
        valid = validate_email(addr, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise InvalidRequest(f"{what}: {addr!r} is not a valid address: {exc}") from None
    return str(valid.normalized)


@functools.lru_cache(maxsize=4096)
def _validated_domain(domain: str) -> str | None:
    """A domain checked (IDNA, length, labels) and normalised by email-validator, once;
    None when it is invalid (the full check then says why).

    Domains repeat far more than addresses do, and the domain check is most of
    email-validator's cost; a plain ASCII local part needs only the dot-atom pattern.
    """
    from email_validator import EmailNotValidError, validate_email

    try:
        return str(validate_email(f"x@{domain}", check_deliverability=False).domain)
    except EmailNotValidError:
        return None
