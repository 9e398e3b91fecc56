"""Mirror rewriting: try a provider's local mirror before the origin.

A :class:`MirrorRule` maps a URL prefix (``http://mirrors.cloudlets.com/``) to
an ordered list of mirror prefixes (``http://mirror.local/cloudlets/``).
:class:`MirrorRules` holds an ordered list of rules; :meth:`MirrorRules.rewrite`
turns one URL into the ordered list of :class:`Candidate` URLs to try: the
mirrors of every matching rule, in rule order, then the origin itself.

Rules come from two places, merged by :meth:`MirrorRules.for_render`: the
rules set on the Renderer first, then the render config's ``mirrors``
(provider presets, possibly the request). Every matching rule contributes
its mirrors, so both are tried before the origin.

Credentials in the origin URL (``https://user:secret@host/...``) are never
carried over to a mirror. A mirror's own credentials go to the fetcher
alone: what a render records (:meth:`Candidate.rule_dict`) is redacted, and
what templates see (:meth:`MirrorRules.template_function`) has none.

The mirrors a provider set (on the Renderer, or in its presets) are allowed
by the URL policy whatever their address; a mirror a request sets is
policed like any URL. Rules keep where they came from in
:attr:`MirrorRule.source`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cloudlets.errors import ConfigurationError
from cloudlets.urls import is_url, redact, redact_text, strip_credentials

__all__ = ["Candidate", "MirrorRule", "MirrorRules"]


def _normalise(url: str) -> str:
    """Lower-case the scheme and host, drop any user info."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1].lower()
    return urlunsplit((parts.scheme.lower(), host, parts.path, parts.query, parts.fragment))


def _boundary_ok(url: str, prefix: str) -> bool:
    """A prefix matches only at a path boundary: ``http://a.com`` must not
    match ``http://a.com.evil.org/``."""
    if prefix.endswith("/") or len(url) == len(prefix):
        return True
    return url[len(prefix)] in "/?#"


def _key(item: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """What identifies a rule in config form."""
    mirrors = item.get("mirrors")
    return (str(item.get("prefix")),
            tuple(str(m) for m in mirrors) if isinstance(mirrors, (list, tuple)) else ())


@dataclass(frozen=True)
class MirrorRule:
    """URLs starting with ``prefix`` may be fetched from each of ``mirrors``,
    in order, by replacing the prefix.

    :ivar prefix: the origin prefix, e.g. ``http://mirrors.cloudlets.com/``.
    :ivar mirrors: the mirror prefixes, tried in order.
    :ivar source: where the rule came from, recorded with the result:
        ``"renderer"`` (set in code or on the Renderer), ``"presets"`` (the
        provider's presets) or ``"config"`` (a render request).
    """

    prefix: str
    mirrors: tuple[str, ...]
    source: str = "renderer"

    def __repr__(self) -> str:
        return (f"MirrorRule(prefix={redact(self.prefix)!r}, "
                f"mirrors={tuple(redact(m) for m in self.mirrors)!r}, source={self.source!r})")

    def __post_init__(self) -> None:
        object.__setattr__(self, "mirrors", tuple(self.mirrors))
        for value in (self.prefix, *self.mirrors):
            if not isinstance(value, str) or not is_url(value):
                raise ConfigurationError(
                    f"mirror rule {redact(str(self.prefix))!r}: {redact(str(value))!r} "
                    "is not a URL prefix (scheme://host/path)")
        if not self.mirrors:
            raise ConfigurationError(f"mirror rule {redact(self.prefix)!r} lists no mirror")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> MirrorRule:
        """Build a rule from the config form ``{"prefix": ..., "mirrors": [...]}``.

        :raises ConfigurationError: when a key is missing or not a URL.
        """
        try:
            return cls(str(data["prefix"]), tuple(data["mirrors"]), source)
        except KeyError as exc:
            raise ConfigurationError(f"mirror rule {redact_text(repr(dict(data)))} lacks "
                                     f"{exc.args[0]!r}") from None

    def to_dict(self) -> dict[str, Any]:
        """:returns: the config form, with ``source``."""
        return {"prefix": self.prefix, "mirrors": list(self.mirrors), "source": self.source}

    def matches(self, url: str) -> bool:
        """:returns: whether ``url`` starts with this rule's prefix."""
        norm, prefix = _normalise(url), _normalise(self.prefix)
        return norm.startswith(prefix) and _boundary_ok(norm, prefix)

    def apply(self, url: str) -> list[str]:
        """:returns: ``url`` rewritten onto each mirror, in order (empty when
        the rule does not match)."""
        if not self.matches(url):
            return []
        rest = _normalise(url)[len(_normalise(self.prefix)):]
        out = []
        for mirror in self.mirrors:
            if self.prefix.endswith("/") and not mirror.endswith("/"):
                mirror += "/"
            out.append(mirror + rest)
        return out


@dataclass(frozen=True)
class Candidate:
    """One URL to try, and the rule that produced it.

    :ivar url: the URL to fetch (may hold credentials: redact before showing).
    :ivar rule: the rule used, or ``None`` for the origin.
    :ivar mirror: the mirror prefix used, or ``None`` for the origin.
    """

    url: str
    rule: MirrorRule | None = None
    mirror: str | None = None

    @property
    def is_origin(self) -> bool:
        return self.rule is None

    def rule_dict(self) -> dict[str, Any] | None:
        """:returns: what to record in a render result, the cache and the
        catalog: ``{"prefix", "mirror", "source"}`` with credentials
        redacted, or ``None`` for the origin."""
        if self.rule is None:
            return None
        return {"prefix": redact(self.rule.prefix), "mirror": redact(self.mirror),
                "source": self.rule.source}


class MirrorRules:
    """An ordered list of :class:`MirrorRule`.

    :param rules: rules, or their config form ``{"prefix", "mirrors"}``.
    :param provider_rules: the provider's presets' rules, in config form:
        when one comes back in a render config (:meth:`for_render`), its
        source is ``"presets"``, not ``"config"``.
    """

    def __init__(self, rules: Iterable[MirrorRule | Mapping[str, Any]] = (), *,
                 provider_rules: Iterable[Mapping[str, Any]] = ()) -> None:
        self._rules: tuple[MirrorRule, ...] = tuple(
            r if isinstance(r, MirrorRule) else MirrorRule.from_dict(r, source="renderer")
            for r in rules)
        self.provider_rules = frozenset(_key(r) for r in provider_rules)

    @classmethod
    def from_config(cls, items: Iterable[Mapping[str, Any]], source: str = "config") \
            -> MirrorRules:
        """Build rules from a render config's ``mirrors`` list
        (:attr:`cloudlets.config.RenderConfig.mirrors`).

        :param items: ``[{"prefix": ..., "mirrors": [...]}, ...]``.
        :param source: recorded on each rule.
        :raises ConfigurationError: when an item is malformed.
        """
        return cls(MirrorRule.from_dict(item, source) for item in items)

    def _from_render_config(self, items: Iterable[Mapping[str, Any]]) -> MirrorRules:
        """The rules of a render config, those of the provider's presets
        (:attr:`provider_rules`) marked as such."""
        return MirrorRules(MirrorRule.from_dict(
            item, "presets" if _key(item) in self.provider_rules else "config")
            for item in items)

    @classmethod
    def for_render(cls, renderer_rules: MirrorRules | None,
                   config_mirrors: Iterable[Mapping[str, Any]] = ()) -> MirrorRules:
        """Merge the rules of one render: the Renderer's own rules first, then
        the config's (provider presets, request). A rule present in both (the
        Renderer may already have merged its rules into the config) is kept once.

        :param renderer_rules: rules set on the Renderer, or ``None``.
        :param config_mirrors: ``RenderConfig.mirrors``.
        """
        base = renderer_rules if renderer_rules is not None else cls()
        known = {(rule.prefix, rule.mirrors) for rule in base.rules}
        # The Renderer's own rules are usually in the config too (it merges
        # them into the presets): compile only the others.
        return base.merge(base._from_render_config(
            item for item in config_mirrors
            if (item.get("prefix"), tuple(item.get("mirrors", ()))) not in known))

    @property
    def rules(self) -> tuple[MirrorRule, ...]:
        return self._rules

    def merge(self, other: MirrorRules) -> MirrorRules:
        """:returns: ``self``'s rules followed by ``other``'s (an identical
        rule is kept once)."""
        seen: set[tuple[str, tuple[str, ...]]] = set()
        merged = []
        for rule in (*self._rules, *other.rules):
            key = (rule.prefix, rule.mirrors)
            if key not in seen:
                seen.add(key)
                merged.append(rule)
        return MirrorRules(merged)

    def rewrite(self, url: str) -> list[Candidate]:
        """:returns: the URLs to try, in order: the mirrors of every matching
        rule, then the origin ``url`` last. A URL reachable through two rules
        appears once."""
        out: list[Candidate] = []
        seen = {url}
        for rule in self._rules:
            for mirror, candidate in zip(rule.mirrors, rule.apply(url), strict=False):
                if candidate not in seen:
                    seen.add(candidate)
                    out.append(Candidate(candidate, rule, mirror))
        out.append(Candidate(url))
        return out

    def mirror(self, url: str) -> str:
        """:returns: the first mirror rewrite of ``url``, or ``url`` itself
        when no rule matches."""
        return self.rewrite(url)[0].url

    def template_function(self) -> Callable[[str], str]:
        """:returns: a plain ``mirror(url) -> str`` function for templates, so
        files inside the image (package sources) can point at the mirror.
        What it returns has no credentials (:func:`~cloudlets.urls.strip_credentials`):
        the image is the tenant's, the mirror's password the provider's."""
        rules = MirrorRules(self._rules)

        def mirror(url: str) -> str:
            """Rewrite ``url`` onto its first mirror, or return it unchanged,
            without credentials."""
            return strip_credentials(rules.mirror(str(url)))

        return mirror

    def to_list(self) -> list[dict[str, Any]]:
        """:returns: every rule in its dict form."""
        return [r.to_dict() for r in self._rules]

    def __len__(self) -> int:
        return len(self._rules)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def __repr__(self) -> str:
        return f"<MirrorRules {[redact(r.prefix) for r in self._rules]}>"
