"""Mirror rules: prefix matching, ordered fallback, merging, the template function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudlets.errors import ConfigurationError
from cloudlets.mirrors import Candidate, MirrorRule, MirrorRules

ORIGIN = "http://mirrors.cloudlets.com/"
LOCAL = "http://mirror.local/cloudlets/"


def urls(candidates: list[Candidate]) -> list[str]:
    return [c.url for c in candidates]


def test_rewrite_tries_mirrors_in_order_then_origin() -> None:
    rules = MirrorRules([{"prefix": ORIGIN, "mirrors": [LOCAL, "https://backup.example/c/"]}])
    out = rules.rewrite(ORIGIN + "debian/bookworm.tar.gz")
    assert urls(out) == [LOCAL + "debian/bookworm.tar.gz",
                         "https://backup.example/c/debian/bookworm.tar.gz",
                         ORIGIN + "debian/bookworm.tar.gz"]
    assert out[0].rule_dict() == {"prefix": ORIGIN, "mirror": LOCAL, "source": "renderer"}
    assert out[-1].is_origin and out[-1].rule_dict() is None


def test_no_match_is_the_origin_only() -> None:
    rules = MirrorRules([{"prefix": ORIGIN, "mirrors": [LOCAL]}])
    assert urls(rules.rewrite("https://other.example/x.tar")) == ["https://other.example/x.tar"]
    assert urls(MirrorRules().rewrite("https://a/x")) == ["https://a/x"]


@pytest.mark.parametrize("url", ["http://mirrors.cloudlets.com.evil.org/x",
                                 "http://mirrors.cloudlets.comx/x",
                                 "https://mirrors.cloudlets.com/x"])
def test_prefix_matches_only_at_a_boundary(url: str) -> None:
    rules = MirrorRules([{"prefix": "http://mirrors.cloudlets.com", "mirrors": [LOCAL]}])
    assert urls(rules.rewrite(url)) == [url]


def test_prefix_without_slash_and_case_of_host() -> None:
    rules = MirrorRules([{"prefix": "http://mirrors.cloudlets.com", "mirrors": ["http://m"]}])
    assert rules.mirror("HTTP://Mirrors.Cloudlets.com/Deb/x") == "http://m/Deb/x"
    rules = MirrorRules([{"prefix": ORIGIN, "mirrors": ["http://m/c"]}])
    assert rules.mirror(ORIGIN + "x") == "http://m/c/x"


def test_origin_credentials_are_not_sent_to_mirrors() -> None:
    rules = MirrorRules([{"prefix": ORIGIN, "mirrors": [LOCAL]}])
    out = rules.rewrite("http://bob:secret@mirrors.cloudlets.com/x.tar")
    assert out[0].url == LOCAL + "x.tar"
    assert out[-1].url == "http://bob:secret@mirrors.cloudlets.com/x.tar"


def test_every_matching_rule_contributes_and_duplicates_go() -> None:
    rules = MirrorRules([
        MirrorRule(ORIGIN + "debian/", ("http://deb.local/",), "renderer"),
        MirrorRule(ORIGIN, (LOCAL, "http://deb.local/../"), "config"),
        MirrorRule(ORIGIN, (LOCAL,), "config"),
    ])
    out = rules.rewrite(ORIGIN + "debian/x.tar")
    assert urls(out) == ["http://deb.local/x.tar", LOCAL + "debian/x.tar",
                         "http://deb.local/../debian/x.tar", ORIGIN + "debian/x.tar"]
    assert [c.rule.source if c.rule else None for c in out] == \
        ["renderer", "config", "config", None]


def test_for_render_merges_renderer_then_config() -> None:
    renderer = MirrorRules([{"prefix": ORIGIN, "mirrors": ["http://renderer/"]}])
    merged = MirrorRules.for_render(renderer, [{"prefix": ORIGIN, "mirrors": [LOCAL]},
                                               {"prefix": ORIGIN,
                                                "mirrors": ["http://renderer/"]}])
    assert [r.mirrors for r in merged.rules] == [("http://renderer/",), (LOCAL,)]
    assert [r.source for r in merged.rules] == ["renderer", "config"]
    assert urls(merged.rewrite(ORIGIN + "a")) == ["http://renderer/a", LOCAL + "a",
                                                  ORIGIN + "a"]
    assert len(MirrorRules.for_render(None, [])) == 0 and not MirrorRules.for_render(None, [])


def test_template_function_is_a_plain_callable() -> None:
    mirror = MirrorRules([{"prefix": ORIGIN, "mirrors": [LOCAL]}]).template_function()
    assert mirror(ORIGIN + "debian") == LOCAL + "debian"
    assert mirror("http://deb.debian.org/debian") == "http://deb.debian.org/debian"


def test_to_list_round_trips() -> None:
    rules = MirrorRules.from_config([{"prefix": ORIGIN, "mirrors": [LOCAL]}])
    assert rules.to_list() == [{"prefix": ORIGIN, "mirrors": [LOCAL], "source": "config"}]
    assert MirrorRules.from_config(rules.to_list()).to_list() == rules.to_list()


@pytest.mark.parametrize("item", [{"prefix": ORIGIN}, {"mirrors": [LOCAL]},
                                  {"prefix": "not a url", "mirrors": [LOCAL]},
                                  {"prefix": ORIGIN, "mirrors": []},
                                  {"prefix": ORIGIN, "mirrors": ["/local/path"]}])
def test_malformed_rules(item: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="mirror rule"):
        MirrorRules.from_config([item])


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/%", max_size=40))
def test_rewrite_keeps_the_rest_of_the_url(rest: str) -> None:
    rules = MirrorRules([{"prefix": ORIGIN, "mirrors": [LOCAL]}])
    out = rules.rewrite(ORIGIN + rest)
    assert out[0].url == LOCAL + rest and out[-1].url == ORIGIN + rest


def test_a_render_compiles_its_mirror_rules_once(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudlets.mirrors import MirrorRule
    from cloudlets.renderer import Renderer
    from tests.test_catalog import make_cloudlet

    rule = {"prefix": "https://mirrors.cloudlets.com/", "mirrors": ["https://m.example/"]}
    renderer = Renderer(cache_dir=tmp_path, mirrors=[rule], ex_allow_file_urls=True)
    compiled: list[str] = []
    original = MirrorRule.from_dict.__func__  # type: ignore[attr-defined]

    def counting(cls: type, data: Any, source: str = "config") -> MirrorRule:
        compiled.append(data["prefix"])
        return original(cls, data, source)  # type: ignore[no-any-return]

    monkeypatch.setattr(MirrorRule, "from_dict", classmethod(counting))
    job = renderer.prepare(make_cloudlet(tmp_path / "src"), str(tmp_path / "o") + "/",
                           "local", "tar", {"mirrors": [{"prefix": "https://x/",
                                                         "mirrors": ["https://y/"]}]})
    # The renderer's rule was compiled when the renderer was made; the render
    # compiles only the request's, once, and the job carries both.
    assert compiled == ["https://x/"]
    assert [r.prefix for r in job.mirrors.rules] == ["https://mirrors.cloudlets.com/",
                                                    "https://x/"]
    assert [r.source for r in job.mirrors.rules] == ["renderer", "config"]
