"""Secrets out of what is printed or logged: credentials inside URIs.

A URI may carry a user:password (`s3://KEY:SECRET@bucket/t`, `https://user:pw@host/v1`) or credentials in its
query string (pre-signed URLs: X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token; `?token=`, `?key=`,
`?sig=`...). `redact` replaces each of them with `***` in any text (an error message, a doctor row, an MLflow
parameter, a report file) and leaves everything else as written, so the message still names the place.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from fact_ray.errors import ConfigError

MASK = "***"

# scheme://userinfo@ : everything between "//" and the last "@" before the path.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^/\s@?#]*)@")
_SECRET_PARAMS = ("x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
                  "x-goog-credential", "signature", "sig", "token", "access_token", "id_token", "refresh_token",
                  "key", "api_key", "apikey", "api-key", "password", "passwd", "pwd", "secret", "client_secret",
                  "awsaccesskeyid", "se", "sv", "code")
_QUERY = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&;#\s'\"]*)")


def redact(text: str) -> str:
    """`text` with every URI credential replaced by ***."""
    if not text or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)

    def query(m: re.Match) -> str:
        if m["name"].lower() in _SECRET_PARAMS and m["value"]:
            return f"{m['sep']}{m['name']}={MASK}"
        return m.group(0)

    return _QUERY.sub(query, text)


def redact_any(value: object) -> object:
    """redact() through the strings of a JSON-like value (dicts, lists)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_any(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_any(v) for v in value]
    return value


def check_url(url: str, what: str, schemes: tuple[str, ...] = ("http", "https")) -> None:
    """One ConfigError line for a URL that cannot be used: another scheme, no host, a port that is not one."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range or not a number
    except ValueError as e:
        raise ConfigError(f"{what} {redact(url)!r} is not a valid URL ({e})") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(f"{what} {redact(url)!r} is not a valid {' or '.join(schemes)} URL")
