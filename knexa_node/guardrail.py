"""The teacher's outgoing filter: nothing leaves the node that leaks secrets, PII or private data.

Every answer of a knowledge package passes :meth:`Guardrail.check` before it is signed and sent
(SPEC "Our decisions"). Two kinds of checks, each yielding a reason string:

* Regex detectors for secrets and PII: ``aws_key``, ``github_token``, ``slack_token``,
  ``service_token`` (Google ``AIza...``, Stripe ``sk_live_...``), ``jwt``, ``bearer_token``,
  ``private_key`` (PEM/OpenSSH/PGP blocks), ``generic_secret`` (a literal assigned to a
  secret-looking name: ``api_key = "..."`` with a long mixed high-entropy value, or a password
  literal), ``url_credentials`` (``scheme://user:pass@host``), ``email``, ``ipv4``, ``ipv6``,
  ``phone``.
* ``verbatim_overlap``: the share of the answer's token n-grams that also occur in the node's own
  private training texts. Tokens are identifiers, numbers and single punctuation marks (case
  folded). An n-gram is "found" when it occurs verbatim, or when it lies inside a longer window
  (1.5 x ngram tokens) that occurs with its identifiers renamed by first occurrence
  (``v0, v1, ...``; keywords, builtins and attribute names kept), so renaming a variable in a
  copied solution does not hide it. Answers shorter than ``ngram`` tokens cannot be judged and
  pass (``return a + b`` is everyone's code). Measured on HumanEval (half private, 5 splits):
  every flagged non-private canonical solution was a near-duplicate (difflib ratio >= 0.7) of a
  private one, e.g. the shared ``digits_sum`` helper of /108 and /145; no other was flagged.

What ordinary code must keep (tested against every canonical HumanEval solution): URLs, ``http``
in strings, hex constants, numbers, version strings (``1.2.3``, ``0.1.2.3``, ``1.2.3.4.5``; a
four-part version that is also a routable address, such as ``1.2.3.4``, *is* blocked: we accept
that rare false positive), slices (``s[1::2]``), matrix products (``a@b.T``).

Documented decisions:
* IPv4: loopback (127/8), "this network" (0/8, incl. 0.0.0.0), netmask-like (``255.*``),
  link-local, multicast, reserved (240/4) and the RFC 5737 documentation ranges pass; private ranges (10/8,
  172.16/12, 192.168/16) are *blocked*, since an organisation's internal addresses are exactly
  what must not leak. Dotted runs of more than four numbers are versions, not addresses.
* IPv6: only global unicast (2000::/3 minus 2001:db8::/32), unique-local (fc00::/7) and
  link-local (fe80::/10) addresses with at least three non-empty groups; that rules out slices.
* E-mail: reserved documentation domains (``example.com/.org/.net``, ``*.example``, ``*.test``,
  ``*.invalid``, ``*.localhost``) pass; so does ``x@self.w`` (matrix product, not an address).
* Phone: 10 to 15 digits in phone layout with ``-`` or ``.`` separators, a ``(area)`` part or a
  leading ``+country``; bare digit runs never match.

Reports count reasons, never the blocked text (the log would otherwise become the leak).
"""

from __future__ import annotations

import builtins
import ipaddress
import keyword
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from .backend import Answer, GuardrailReport

__all__ = ["REASONS", "Guardrail"]

logger = logging.getLogger(__name__)

_PATTERNS: dict[str, tuple[re.Pattern[str], ...]] = {
    "aws_key": (
        re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b"),
        re.compile(r"(?i)aws.{0,24}?(?:secret|key).{0,24}?[=:]\s*[\"']?[A-Za-z0-9/+]{40}\b"),
    ),
    "github_token": (
        re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b"),
        re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b"),
    ),
    "slack_token": (
        re.compile(r"\bxox[abposre]-[A-Za-z0-9-]{10,}"),
        re.compile(r"hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+"),
    ),
    "service_token": (
        re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
        re.compile(r"\b[sr]k_live_[0-9A-Za-z]{16,}\b"),
    ),
    "jwt": (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),),
    "private_key": (
        re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
        re.compile(r"PuTTY-User-Key-File-\d"),
    ),
    "url_credentials": (
        re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]{1,20}://[^\s/:@'\"{}<>]+:[^\s/@'\"{}<>]+@[\w.-]+"),
    ),
}
_BEARER = re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/-]{20,}=*)")
_SECRET_ASSIGN = re.compile(
    r"""(?ix)
    (?P<name>(?<![a-z0-9_])(?:[a-z_][a-z0-9_]{0,40}?)?
        (?:api[_-]?key|apikey|secret|token|passw(?:or)?d|passwd|pwd|access[_-]?key|auth[_-]?key
          |credentials?|private[_-]?key|signing[_-]?key|session[_-]?key)
        [a-z0-9_]{0,40})
    ["']?\]?\s*(?::=|=>|=|:)\s*[bru]?
    (?P<q>["'])(?P<value>[^"'\s]{6,400})(?P=q)
    """
)
_PASSWORD_NAME = re.compile(r"(?i)passw(?:or)?d|passwd|pwd")
_PLACEHOLDERS = frozenset(
    {"password", "changeme", "secret", "example", "xxxxxx", "your_password", "placeholder",
     "redacted", "none", "null", "undefined", "********", "<password>", "dummy", "testtest"}
)  # fmt: skip
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24})\b")
_DOC_DOMAINS = ("example.com", "example.org", "example.net")
_DOC_TLDS = ("example", "test", "invalid", "localhost", "local")
_IPV4 = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w]|\.\d)")
_IPV4_DOC = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)
_IPV6 = re.compile(r"(?<![\w:.])((?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4})(?![\w:])")
_IPV6_BLOCKED = tuple(ipaddress.ip_network(n) for n in ("2000::/3", "fc00::/7", "fe80::/10"))
_IPV6_DOC = ipaddress.ip_network("2001:db8::/32")
_PHONE = re.compile(
    r"""(?x)(?<![\w.+-])
    (?:\+\d{1,3}(?:[\s.-]?\(\d{1,4}\))?[\s.-]?\d{1,4}(?:[\s.-]\d{2,4}){1,4}  # +country ...
      |\+\d{10,15}                                                       # E.164
      |\(\d{2,4}\)\s?\d{3,4}[\s.-]\d{3,4}                                  # (area) 555-0100
      |\d{2,4}([.-])\d{3,4}\1\d{3,4}                                       # 555-123-4567
    )(?![\w.-]?\d)"""
)
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\sA-Za-z0-9_]")
_KEEP = frozenset(w.lower() for w in (*keyword.kwlist, *dir(builtins), "self", "cls"))

#: Every reason check() can return, in the order it reports them.
REASONS: tuple[str, ...] = (
    *_PATTERNS, "bearer_token", "generic_secret", "email", "ipv4", "ipv6", "phone",
    "verbatim_overlap",
)  # fmt: skip


class Guardrail:
    """Per-node outgoing filter, built once over the node's private training texts."""

    def __init__(
        self, private_texts: Sequence[str], *, ngram: int = 10, overlap_threshold: float = 0.6
    ) -> None:
        """Index the private corpus.

        Args:
            private_texts: everything the node trains on privately (prompts and solutions).
            ngram: shingle length in tokens; shorter answers are not overlap-checked.
            overlap_threshold: block when this share of the answer's n-grams is private, in (0, 1].
        """
        if ngram < 2:
            raise ValueError(f"ngram must be >= 2, got {ngram}")
        if not 0.0 < overlap_threshold <= 1.0:
            raise ValueError(f"overlap_threshold must be in (0, 1], got {overlap_threshold}")
        self.ngram = ngram
        #: Renamed windows are looser (only the identifier structure survives), so they need a
        #: longer context to be as specific: 1.5 x ngram keeps HumanEval false positives at zero.
        self.renamed_ngram = ngram + ngram // 2
        self.overlap_threshold = overlap_threshold
        self._exact: set[int] = set()
        self._renamed: set[int] = set()
        for text in private_texts:
            exact, renamed = self._shingles(text)
            self._exact.update(exact)
            self._renamed.update(renamed)

    def check(self, text: str) -> list[str]:
        """Reasons to block ``text`` (subset of REASONS, in that order); empty means clean."""
        found = set(_regex_reasons(text))
        if self.overlap(text) >= self.overlap_threshold:
            found.add("verbatim_overlap")
        return [r for r in REASONS if r in found]

    def overlap(self, text: str) -> float:
        """Share of the text's ``ngram``-grams found in the private corpus, in [0, 1].

        An n-gram counts as found when it occurs verbatim, or when it lies inside a longer
        ``renamed_ngram`` window that occurs up to consistent identifier renaming.
        """
        exact, renamed = self._shingles(text)
        if not exact:
            return 0.0
        hit = [e in self._exact for e in exact]
        span = self.renamed_ngram - self.ngram + 1
        for j, r in enumerate(renamed):
            if r in self._renamed:
                hit[j : j + span] = [True] * span
        return sum(hit) / len(hit)

    def filter(self, answers: Sequence[Answer]) -> tuple[list[Answer], GuardrailReport]:
        """Keep clean answers; count blocked ones and their reasons (never their text)."""
        kept: list[Answer] = []
        reasons: Counter[str] = Counter()
        for answer in answers:
            why = self.check(answer.text)
            if why:
                reasons.update(why)
            else:
                kept.append(answer)
        report = GuardrailReport(kept=len(kept), blocked=len(answers) - len(kept),
                                 reasons=dict(sorted(reasons.items())))  # fmt: skip
        if report.blocked:
            logger.warning("guardrail blocked %d of %d answers: %s",
                           report.blocked, len(answers), report.reasons)  # fmt: skip
        return kept, report

    def _shingles(self, text: str) -> tuple[list[int], list[int]]:
        """Hashes of the exact ``ngram`` windows and of the renamed ``renamed_ngram`` windows."""
        tokens = [t.lower() for t in _TOKEN.findall(text)]
        n, m = self.ngram, self.renamed_ngram
        exact = [hash(tuple(tokens[i : i + n])) for i in range(len(tokens) - n + 1)]
        renamed = [hash(_rename(tokens[i : i + m])) for i in range(len(tokens) - m + 1)]
        return exact, renamed


def _rename(window: list[str]) -> tuple[str, ...]:
    """Alpha-rename identifiers by first occurrence inside one window (keywords, builtins and
    attribute names kept), so a consistently renamed variable maps to the same key."""
    names: dict[str, str] = {}
    out = []
    for i, tok in enumerate(window):
        if (tok[0].isalpha() or tok[0] == "_") and tok not in _KEEP and (i == 0 or window[i - 1] != "."):
            tok = names.setdefault(tok, f"\x00v{len(names)}")
        out.append(tok)
    return tuple(out)


def _regex_reasons(text: str) -> Iterable[str]:
    for reason, patterns in _PATTERNS.items():
        if any(p.search(text) for p in patterns):
            yield reason
    if any(_looks_random(m.group(1)) for m in _BEARER.finditer(text)):
        yield "bearer_token"
    if any(_secret_literal(m.group("name"), m.group("value")) for m in _SECRET_ASSIGN.finditer(text)):
        yield "generic_secret"
    if any(_real_email(m.group(1)) for m in _EMAIL.finditer(text)):
        yield "email"
    if any(_real_ipv4(m.group(1)) for m in _IPV4.finditer(text)):
        yield "ipv4"
    if any(_real_ipv6(m.group(1)) for m in _IPV6.finditer(text)):
        yield "ipv6"
    if any(10 <= sum(c.isdigit() for c in m.group(0)) <= 15 for m in _PHONE.finditer(text)):
        yield "phone"


def _entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def _looks_random(value: str) -> bool:
    """Key-like: long, letters and digits mixed, high per-character entropy (not a word)."""
    return (
        len(value) >= 16
        and any(c.isdigit() for c in value)
        and any(c.isalpha() for c in value)
        and _entropy(value) >= 3.0
    )


def _secret_literal(name: str, value: str) -> bool:
    if _PASSWORD_NAME.search(name):
        low = value.lower()
        return len(set(value)) > 2 and low not in _PLACEHOLDERS and not low.startswith(("<", "$", "{", "%"))
    return _looks_random(value)


def _real_email(domain: str) -> bool:
    d = domain.lower()
    if d.startswith(("self.", "cls.")):
        return False
    return not (d in _DOC_DOMAINS or d.endswith(tuple("." + x for x in _DOC_DOMAINS))
                or d.rsplit(".", 1)[-1] in _DOC_TLDS)  # fmt: skip


def _real_ipv4(s: str) -> bool:
    try:
        ip = ipaddress.IPv4Address(s)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved:
        return False
    if s.startswith(("0.", "255.")) or any(ip in net for net in _IPV4_DOC):
        return False
    return ip.is_private or ip.is_global


def _real_ipv6(s: str) -> bool:
    if sum(1 for g in s.split(":") if g) < 3:
        return False
    try:
        ip = ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return ip not in _IPV6_DOC and any(ip in net for net in _IPV6_BLOCKED)
