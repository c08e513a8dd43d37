"""API bearer tokens: the ``api.tokens_file`` and the constant-time check.

The file holds one ``name token`` pair a line; blank lines and ``#`` comments
are ignored. The name says who is calling (``pos-2``, ``tablet-flower``, ``cli``)
and becomes the ``source`` of the events that caller posts, so a POS cannot
claim to be another one.

A token never reaches a log line, an exception message or a ``repr``: errors
name the line number and the caller's name only. Only SHA-256 digests are
compared, and always all of them, so neither the length of a token nor which
one matched shows in the time a check takes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import stat
import string
from dataclasses import dataclass, field

from agent.errors import AgentError, ConfigError, ConfigIssue

log = logging.getLogger(__name__)

# A name is used as the event source and in logs: keep it to a safe alphabet.
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Printable ASCII without spaces: what fits in an Authorization header as-is.
TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")
# A token must carry at least 128 bits, judged from its alphabet: 32 hex digits, 22
# base64 characters, 20 of any printable ASCII (``openssl rand -hex 24``: 192 bits).
MIN_TOKEN_BITS = 128
HEX_CHARS = frozenset("0123456789abcdefABCDEF")
BASE64_CHARS = frozenset(string.ascii_letters + string.digits + "+/-_=")
# A random token of those lengths has 8 distinct characters or more with odds better
# than 1 in a million; fewer means a made-up one ("aaaa...", "abab...").
MIN_DISTINCT_CHARS = 8
# Names the CLI looks for, in order, to call the local daemon (``edge-agent status``).
LOCAL_NAMES = ("cli", "local", "admin")


def token_weakness(token: str) -> str | None:
    """Why ``token`` carries less than ``MIN_TOKEN_BITS`` bits, or None when it does not."""
    chars = set(token)
    if chars <= HEX_CHARS:
        alphabet, bits_per_char = "hex digits", 4.0
    elif chars <= BASE64_CHARS:
        alphabet, bits_per_char = "base64 characters", 6.0
    else:
        alphabet, bits_per_char = "printable ASCII characters", math.log2(94)
    bits = len(token.rstrip("=")) * bits_per_char
    if bits < MIN_TOKEN_BITS:
        need = math.ceil(MIN_TOKEN_BITS / bits_per_char)
        return (f"{len(token)} {alphabet} carry about {bits:.0f} bits; at least "
                f"{MIN_TOKEN_BITS} are needed ({need} {alphabet} or more)")
    if len(chars) < MIN_DISTINCT_CHARS:
        return (f"only {len(chars)} distinct characters; a random token has many more")
    for period in range(1, len(token) // 2 + 1):
        if len(token) % period == 0 and token == token[:period] * (len(token) // period):
            return f"it repeats a {period}-character pattern"
    return None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: bytes
    # Kept only so the CLI on the same box can call the API (local_token());
    # excluded from repr so it cannot leak through a log of this object.
    token: str = field(repr=False)


class Tokens:
    """The callers allowed on the API, each a ``name`` with a secret token."""

    def __init__(self, pairs: dict[str, str] | None = None, *, source: str = "<memory>") -> None:
        self.source = source
        self._entries: list[_Entry] = []
        for name, token in (pairs or {}).items():
            self._add(name, token)

    def _add(self, name: str, token: str) -> None:
        self._entries.append(_Entry(name, _digest(token), token))

    @classmethod
    def load(cls, path: str) -> Tokens:
        """Read ``path``; raise :class:`ConfigError` listing every bad line (by number)."""
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
                mode = os.fstat(fh.fileno()).st_mode
        except FileNotFoundError:
            raise ConfigError(path, [ConfigIssue("", f"tokens file not found: {path} "
                                                     "(api.tokens_file)")]) from None
        except PermissionError:
            raise ConfigError(path, [ConfigIssue("", f"permission denied reading {path}")]) \
                from None
        except UnicodeDecodeError:
            raise ConfigError(path, [ConfigIssue("", "not UTF-8 text")]) from None
        except OSError as exc:
            raise ConfigError(path, [ConfigIssue("", f"cannot read {path}: "
                                                     f"{exc.strerror or exc}")]) from None
        tokens = cls.parse(text, source=path)
        # Group read is the documented install (root:edge-agent 0640: the
        # service user reads it through its group); others never.
        if mode & (stat.S_IWGRP | stat.S_IRWXO):
            log.warning("tokens file %s is readable by others or writable by its group; "
                        "chmod 0640 (owner root, group edge-agent) or 0600", path)
        if not tokens.names:
            log.warning("tokens file %s lists no tokens: every API call but /healthz gets 401",
                        path)
        return tokens

    @classmethod
    def parse(cls, text: str, *, source: str = "<text>") -> Tokens:
        """Parse the file's text; problems name the line, never the token on it."""
        tokens = cls(source=source)
        issues: list[ConfigIssue] = []
        names: dict[str, int] = {}
        digests: dict[bytes, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"line {number}"
            parts = line.split()
            if len(parts) != 2:
                issues.append(ConfigIssue(where, f"expected 'name token' (two fields separated "
                                                 f"by a space), found {len(parts)} field"
                                                 f"{'' if len(parts) == 1 else 's'}"))
                continue
            name, token = parts
            if not NAME_RE.match(name):
                issues.append(ConfigIssue(where, "the name must be 1-64 letters, digits, "
                                                 "'_', '.' or '-'"))
                continue
            if not TOKEN_RE.match(token):
                issues.append(ConfigIssue(where, f"the token of {name!r} must be printable "
                                                 "ASCII"))
                continue
            weak = token_weakness(token)
            if weak is not None:
                issues.append(ConfigIssue(where, f"the token of {name!r} is too weak: {weak} "
                                                 "(make one with 'openssl rand -hex 24')"))
                continue
            if name in names:
                issues.append(ConfigIssue(where, f"name {name!r} already used on line "
                                                 f"{names[name]}"))
                continue
            digest = _digest(token)
            if digest in digests:
                issues.append(ConfigIssue(where, f"the token of {name!r} is the same as the one "
                                                 f"on line {digests[digest]}; give each caller "
                                                 "its own"))
                continue
            names[name] = number
            digests[digest] = number
            tokens._add(name, token)
        if issues:
            raise ConfigError(source, issues)
        return tokens

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self._entries]

    def check(self, token: str) -> str | None:
        """The caller's name when ``token`` is known, else None; constant time.

        Every entry is compared, with no early exit, and digests of equal length
        are compared, so the time taken says nothing about the token.
        """
        candidate = _digest(token)
        found: str | None = None
        for entry in self._entries:
            if hmac.compare_digest(candidate, entry.digest):
                found = entry.name
        return found

    def fingerprint(self, name: str) -> str | None:
        """A fingerprint of the token now named ``name`` (None if none): what a session keeps.

        HMAC-SHA256 keyed by the token's digest over a fixed label: it changes when
        the token does, and tells nothing of the token (unlike its plain digest, it
        is not what the token check compares).
        """
        for entry in self._entries:
            if entry.name == name:
                return hmac.new(entry.digest, b"edge-agent session v1",
                                hashlib.sha256).hexdigest()[:32]
        return None

    def local_token(self) -> str:
        """A token for tools on the box itself (``edge-agent status``).

        The entry named ``cli`` (else ``local``, ``admin``), else the first one.
        """
        by_name = {entry.name: entry for entry in self._entries}
        for name in LOCAL_NAMES:
            if name in by_name:
                return by_name[name].token
        if self._entries:
            return self._entries[0].token
        raise AgentError(f"{self.source}: no API token to call the daemon with; add a line "
                         "'cli <token>' to api.tokens_file")

    def __repr__(self) -> str:
        return f"Tokens({self.source!r}, names={self.names!r})"
