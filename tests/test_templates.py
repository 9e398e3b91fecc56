"""Sandboxed template rendering: context, includes from the image only,
injection payloads, bombs, errors with file and line, the dotcloud syntax."""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlets.config import resolve_config
from cloudlets.errors import TemplateError
from cloudlets.manifest import Manifest
from cloudlets.rootfs import RootTree
from cloudlets.templates import (
    TemplateLimits,
    render_template,
    render_templates,
    template_context,
)
from tests.test_rootfs import D, L, M, read

CONTEXT: dict[str, Any] = {
    "args": {"hostname": "web-1", "motd": "hello", "ports": [80, 443]},
    "hostname": "web-1",
    "ip": {"interfaces": [{"name": "eth0", "address": "10.0.0.5", "prefix": 24}]},
    "dns": {"nameservers": ["10.0.0.1", "10.0.0.2"], "search": ["example.net"]},
    "ssh_authorized_keys": ["ssh-ed25519 AAAA test@example"],
    "image": {"name": "tiny", "version": "1.0", "digest": "ab" * 32},
    "mirror": lambda url: url.replace("http://mirrors.cloudlets.com", "http://mirror.local"),
}
FAST = TemplateLimits(timeout=5.0)  # ordinary renders: far from it even at load 10


@pytest.fixture
def tree_of() -> Iterator[Any]:
    """Build a tree holding ``/etc/t`` (the template) and other files."""
    trees: list[RootTree] = []

    def build(template: str | bytes, files: dict[str, str] | None = None) -> RootTree:
        members = [M("etc/t", template.encode() if isinstance(template, str) else template)]
        for name, content in (files or {}).items():
            members.append(M(name, content.encode()))
        tree = read(members)
        trees.append(tree)
        return tree

    yield build
    for tree in trees:
        tree.close()


def render(tree: RootTree, limits: TemplateLimits = FAST, syntax: str = "jinja2") -> str:
    return render_template(tree, "/etc/t", CONTEXT, syntax=syntax, limits=limits).decode()


# -- rendering ------------------------------------------------------------------


def test_context_variables(tree_of: Any) -> None:
    tree = tree_of(
        "{{ hostname }} {{ args.motd }} {{ ip.interfaces[0].address }}/"
        "{{ ip.interfaces[0].prefix }}\n"
        "{% for ns in dns.nameservers %}nameserver {{ ns }}\n{% endfor %}"
        "search {{ dns.search|join(' ') }}\n{{ ssh_authorized_keys[0] }}\n"
        "{{ image.name }}-{{ image.version }} {{ image.digest[:4] }}\n"
        "{{ mirror('http://mirrors.cloudlets.com/debian') }}\n")
    assert render(tree) == (
        "web-1 hello 10.0.0.5/24\nnameserver 10.0.0.1\nnameserver 10.0.0.2\n"
        "search example.net\nssh-ed25519 AAAA test@example\ntiny-1.0 abab\n"
        "http://mirror.local/debian\n")


def test_no_autoescape_and_trailing_newline_kept(tree_of: Any) -> None:
    assert render(tree_of("<a href=\"{{ '&' }}\">\n\n")) == "<a href=\"&\">\n\n"


def test_render_templates_with_manifest_and_config(tmp_path: Path) -> None:
    manifest = Manifest({"name": "tiny", "version": "2.0",
                         "args": {"hostname": {"type": "string", "default": "tiny-host"}},
                         "templates": ["/etc/hostname", "/etc/motd"]})
    config = resolve_config(manifest, request={"args": {"hostname": "db-7"}})
    members = [M("etc/hostname", b"{{ args.hostname }}\n", mode=0o600, uid=0, gid=4),
               M("etc/motd", b"{{ image.name }} {{ image.version }} via "
                             b"{{ mirror('http://a/b') }}\n")]
    with read(members) as tree:
        rendered = render_templates(tree, manifest, config, mirror=lambda u: u + "?m")
        assert rendered == {"/etc/hostname": b"db-7\n", "/etc/motd": b"tiny 2.0 via http://a/b?m\n"}
        out = tree.write_tar(tmp_path / "t.tar", replacements=rendered)
    with tarfile.open(out) as archive:
        info = archive.getmember("./etc/hostname")
        assert (info.mode, info.uid, info.gid) == (0o600, 0, 4)  # mode and owner kept


@pytest.mark.parametrize("syntax", ["jinja2", "dotcloud"])
def test_each_source_is_read_once(tree_of: Any, monkeypatch: pytest.MonkeyPatch,
                                  syntax: str) -> None:
    """A re-render reads a template's source from the cached base with a
    debugfs run: once per template, whatever the syntax."""
    tree = tree_of("{{ hostname }}\n" if syntax == "jinja2" else "<%= hostname %>\n")
    reads: list[str] = []
    real = tree.read_bytes

    def counted(path: str, limit: int | None = None) -> bytes:
        reads.append(path)
        return real(path, limit)

    monkeypatch.setattr(tree, "read_bytes", counted)
    limits = TemplateLimits(timeout=5.0, isolate=False)  # counted in this process
    assert render(tree, limits, syntax) == "web-1\n"
    assert reads == ["/etc/t"]


def test_template_context_has_exactly_the_documented_names() -> None:
    manifest = Manifest({"name": "tiny"})
    config = resolve_config(manifest, request={"hostname": "h"})
    context = template_context(manifest, config)
    assert sorted(context) == ["args", "dns", "hostname", "image", "ip", "mirror",
                               "ssh_authorized_keys"]
    assert context["mirror"]("http://x/") == "http://x/"
    assert context["image"] == {"name": "tiny", "version": None, "digest": manifest.digest}


# -- includes come from the image only --------------------------------------------


def test_includes_resolve_inside_the_tree(tree_of: Any) -> None:
    tree = tree_of("{% include 'part.conf' %}|{% include '/usr/share/base.conf' %}|"
                   "{% from 'macros.j2' import greet %}{{ greet('x') }}",
                   {"etc/part.conf": "relative {{ hostname }}",
                    "usr/share/base.conf": "absolute",
                    "etc/macros.j2": "{% macro greet(n) %}hi {{ n }}{% endmacro %}"})
    assert render(tree) == "relative web-1|absolute|hi x"


def test_includes_follow_symlinks_inside_the_image() -> None:
    members = [M("etc/t", b"{% include '/etc/alt/conf' %}"), L("etc/alt", "/opt/real"),
               M("opt/real/conf", b"from the image")]
    with read(members) as tree:
        assert render(tree) == "from the image"


@pytest.mark.parametrize("name", ["/etc/passwd", "../../../../etc/passwd", "/proc/self/environ",
                                  "/etc/hostname", "dir"])
def test_includes_never_reach_the_host(tree_of: Any, name: str) -> None:
    assert Path("/etc/passwd").exists()  # the host has it; the image does not
    tree = tree_of(f"a\n{{% include '{name}' %}}", {"etc/dir/x": "x"})
    with pytest.raises(TemplateError, match="not a regular file in the image") as caught:
        render(tree)
    assert (caught.value.path, caught.value.line) == ("/etc/t", 2)


def test_error_inside_an_include_names_the_included_file(tree_of: Any) -> None:
    tree = tree_of("line 1\n{% include 'inc' %}", {"etc/inc": "ok\nok\n{{ missing }}"})
    with pytest.raises(TemplateError, match="'missing' is undefined") as caught:
        render(tree)
    assert (caught.value.path, caught.value.line) == ("/etc/inc", 3)


# -- errors name the file and the line --------------------------------------------


def test_syntax_error_has_file_and_line(tree_of: Any) -> None:
    with pytest.raises(TemplateError, match="syntax error") as caught:
        render(tree_of("one\ntwo\n{% if %}\n"))
    assert (caught.value.path, caught.value.line) == ("/etc/t", 3)
    assert str(caught.value).startswith("template /etc/t, line 3: ")


def test_undefined_is_an_error_not_an_empty_string(tree_of: Any) -> None:
    with pytest.raises(TemplateError, match="'hostnme' is undefined") as caught:
        render(tree_of("ok\n{{ hostnme }}\n"))
    assert caught.value.line == 2
    with pytest.raises(TemplateError, match="undefined"):
        render(tree_of("{{ args.nope }}"))


def test_runtime_error_has_line(tree_of: Any) -> None:
    with pytest.raises(TemplateError, match="ZeroDivisionError") as caught:
        render(tree_of("\n\n\n{{ 1 // 0 }}"))
    assert caught.value.line == 4


def test_binary_template_is_an_error() -> None:
    with read([M("etc/t", b"\x7fELF\x00\x01")]) as tree, \
            pytest.raises(TemplateError, match="binary file"):
        render(tree)
    with read([M("etc/t", b"ok\n\xff\xfe")]) as tree, \
            pytest.raises(TemplateError, match="not UTF-8") as caught:
        render(tree)
    assert caught.value.line == 2


@pytest.mark.parametrize(("members", "words"), [
    ([M("etc/other", b"")], "not in the root filesystem"),
    ([L("etc/t", "/etc/other"), M("etc/other", b"x")], "it is a symlink"),
    ([D("etc/t")], "it is a dir"),
    ([M("etc/t", type=tarfile.FIFOTYPE)], "it is a fifo"),
])
def test_listed_template_must_be_a_regular_file(members: list[M], words: str) -> None:
    with read(members) as tree, pytest.raises(TemplateError, match=words) as caught:
        render(tree)
    assert caught.value.path == "/etc/t"


def test_large_template_source_is_refused(tree_of: Any) -> None:
    with pytest.raises(TemplateError, match="max_source_bytes"):
        render(tree_of("x" * 2000), TemplateLimits(max_source_bytes=1000))


# -- injection payloads -----------------------------------------------------------

SSTI = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__()[40]('/etc/passwd').read() }}",
    "{{ [].__class__.__base__.__subclasses__() }}",
    "{{ mirror.__globals__['__builtins__']['__import__']('os').popen('id').read() }}",
    "{{ mirror.__globals__.os.system('id') }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('id').read() }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('id') }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ namespace.__init__.__globals__.os }}",
    "{{ range.__globals__ }}",
    "{{ request.application.__globals__ }}",
    "{{ config.__class__.__init__.__globals__['os'] }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '{0.__globals__}'.format(mirror) }}",
    "{{ '{x.__class__}'.format_map({'x': ''}) }}",
    "{{ ''|attr('__class__') }}",
    "{{ (''|attr('\\x5f\\x5fclass\\x5f\\x5f')) }}",
    "{{ args.__class__ }}",
    "{{ args.update({'hostname': 'x'}) }}{{ args.hostname }}",
    "{{ dns.nameservers.append('6.6.6.6') }}",
    "{% set x = args.pop('hostname') %}",
    "{{ ''.__class__.__mro__[1].__subclasses__()|map(attribute='__name__')|list }}",
    "{{ ''.translate({}) }}",
]


@pytest.mark.parametrize("payload", SSTI)
def test_ssti_payloads_are_blocked(tree_of: Any, payload: str) -> None:
    with pytest.raises(TemplateError) as caught:
        render(tree_of(payload))
    message = str(caught.value)
    assert caught.value.path == "/etc/t"
    assert "blocked by the sandbox" in message or "undefined" in message, message
    assert "uid=" not in message and "root:" not in message


def test_removed_globals_are_gone(tree_of: Any) -> None:
    for name in ("cycler", "joiner", "lipsum"):
        with pytest.raises(TemplateError, match=f"'{name}' is undefined"):
            render(tree_of(f"{{{{ {name} }}}}"))


def test_safe_format_still_works(tree_of: Any) -> None:
    assert render(tree_of("{{ '{}:{}'.format(hostname, 22) }} {{ '%s-%d'|format('a', 1) }}")) \
        == "web-1:22 a-1"


# -- bombs fail fast ------------------------------------------------------------------

BOMBS = [
    ("{{ 'x' * 10**10 }}", "would produce"),
    ("{{ 'x' * 1000 * 1000 * 1000 }}", "would produce"),
    ("{{ [0] * 10**9 }}", "would produce"),
    ("{{ 2 ** (10**9) }}", "bits"),
    ("{{ (10**4000) * (10**4000) * (10**4000) }}", "bits"),
    ("{% for i in range(10**9) %}x{% endfor %}", "range()"),
    ("{{ range(10**9)|list|length }}", "range()"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output exceeds"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", "'~'"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}", "'+'"),
    ("{{ 'x'.ljust(10**10) }}", "str.ljust()"),
    ("{{ 'x'.center(10**10) }}", "str.center()"),
    ("{{ '1'.zfill(10**10) }}", "str.zfill()"),
    ("{{ ('\\t' * 1000).expandtabs(10**7) }}", "str.expandtabs()"),
    ("{{ ('a' * 100000).replace('', 'x' * 1000) }}", "str.replace()"),
    ("{{ ('x' * 4000).join(['a'] * 4000) }}", "str.join()"),
    ("{{ '{:>10000000000}'.format(1) }}", "format width"),
    ("{{ '{:{}}'.format(1, 10**10) }}", "nested"),
    ("{{ '%10000000000s' % 'x' }}", "% format width"),
    ("{{ '%*s' % (10**10, 'x') }}", "'*' widths"),
    ("{{ '%10000000000s'|format('x') }}", "% format width"),
    ("{{ 'x'|center(10**10) }}", "center filter"),
    ("{{ 'a\\nb'|indent(10**10) }}", "indent filter"),
    ("{{ ('a ' * 100000)|wordwrap(1, wrapstring='x' * 1000) }}", "wordwrap filter"),
    ("{{ [1]|batch(10**10, 'x')|list }}", "batch filter count"),
    ("{{ [1]|slice(10**10)|list }}", "slice filter count"),
    ("{{ (['x' * 100000] * 1000)|join }}", "join filter"),
    ("{{ (['x'] * 1000) | join('y' * 100000) }}", "join filter"),
    ("{{ ([['x'] * 100000] * 1000)|sum(start=[]) }}", "sum filter"),
    ("{{ {'a': [1, 2]}|tojson(indent=10**9) }}", "tojson filter"),
    ("{{ ('{:>10000000000}'|attr('format'))(1) }}", "format width"),
    ("{{ ['x']|map('center', 10**10)|list }}", "center filter"),
    ("{{ ('x'|attr('rjust'))(10**10) }}", "str.rjust()"),
    ("{{ '%.10000000000f' % 1.5 }}", "% format width"),
    ("{% set l = ['x' * 4000] * 4000 %}{{ l }}", "printing a value"),
    ("{% set l = ['x' * 4000] * 4000 %}{{ l|string }}", "string filter's input"),
    ("{% set l = ['x' * 4000] * 4000 %}{{ l|upper }}", "upper filter's input"),
    ("{% set l = ['x' * 4000] * 4000 %}{{ '' ~ l }}", "'~'"),
    ("{% set l = ['x' * 4000] * 4000 %}{{ '%s' % (l,) }}", "% formatting"),
    ("{% set l = ['x' * 4000] * 4000 %}{{ '{}'.format(l) }}", "str.format"),
]


@pytest.mark.parametrize(("payload", "words"), BOMBS, ids=[b[0][:40] for b in BOMBS])
def test_bombs_fail_fast_with_a_clear_error(tree_of: Any, payload: str, words: str) -> None:
    started = time.perf_counter()
    with pytest.raises(TemplateError) as caught:
        render(tree_of(payload), TemplateLimits(timeout=20.0))
    assert words in str(caught.value)
    assert time.perf_counter() - started < 3, "the limit must trip before the work is done"
    assert caught.value.path == "/etc/t"


@pytest.mark.parametrize("payload", [
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 3000 %}{% set t %}{% for a in s %}{% for b in s %}{% for c in s %}"
    "{% endfor %}{% endfor %}{% endfor %}{% endset %}",
    "{% macro f(n) %}{% for i in range(100000) %}{{ f(n) if false }}{% endfor %}{% endmacro %}"
    "{% for i in range(100000) %}{{ f(1) }}{% endfor %}",
])
def test_cpu_bombs_hit_the_time_limit(tree_of: Any, payload: str) -> None:
    started = time.perf_counter()
    with pytest.raises(TemplateError, match=r"longer than 0\.5 s") as caught:
        render(tree_of(payload), TemplateLimits(timeout=0.5, max_iterations=10**12))
    assert time.perf_counter() - started < 3
    assert caught.value.line == 1


def test_watchdog_leaves_no_pending_interrupt(tree_of: Any) -> None:
    tree = tree_of("{{ hostname }}")
    outcomes = set()
    for _ in range(50):
        try:
            outcomes.add(render(tree, TemplateLimits(timeout=0.001)))
        except TemplateError as exc:
            assert "longer than" in str(exc)
            outcomes.add("timeout")
    # a timer firing late must not interrupt the code that runs after a render
    deadline = time.perf_counter() + 0.2
    while time.perf_counter() < deadline:
        sum(range(1000))
    assert outcomes <= {"web-1", "timeout"}
    assert render(tree) == "web-1"


def test_recursion_is_an_error(tree_of: Any) -> None:
    tree = tree_of("{% include 't' %}")
    with pytest.raises(TemplateError, match=r"recursion too deep"):
        render(tree, TemplateLimits(timeout=20))


# -- dotcloud syntax ----------------------------------------------------------------


def test_dotcloud_substitution(tree_of: Any) -> None:
    tree = tree_of("<%= args.hostname %>\nns <%=dns.nameservers.1%> {{ not jinja }} {% x %}\n"
                   "<%= image.name -%>\nnext\n<% ruby code is left alone %>\n")
    assert render(tree, syntax="dotcloud") == (
        "web-1\nns 10.0.0.2 {{ not jinja }} {% x %}\ntinynext\n<% ruby code is left alone %>\n")


def test_dotcloud_sample_hostname_template() -> None:
    # the dotCloud sample's /etc/hostname, rendered with its applied config
    manifest = Manifest({"name": "debian-5.0", "template_syntax": "dotcloud",
                         "args": {"hostname": {"type": "string", "default": "debian-host"}},
                         "templates": ["/etc/hostname"]})
    config = resolve_config(manifest, request={"args": {"hostname": "foo"}})
    with read([M("etc/hostname", b"<%= args.hostname %>\n")]) as tree:
        assert render_templates(tree, manifest, config) == {"/etc/hostname": b"foo\n"}


@pytest.mark.parametrize(("template", "words", "line"), [
    ("a\n<%= args.__class__ %>", "blocked by the sandbox", 2),
    ("<%= hostname.__class__.__mro__ %>", "blocked by the sandbox", 1),
    ("\n\n<%= 1 + 1 %>", "only dotted names", 3),
    ("<%= args['hostname'] %>", "only dotted names", 1),
    ("<%= mirror('x') %>", "only dotted names", 1),
    ("<%= nope %>", "'nope' is undefined", 1),
    ("<%= args.nope %>", "'args' has no 'nope'", 1),
    ("<%= dns.nameservers.9 %>", "has no '9'", 1),
    ("<%= dns %>", "is a dict, not a string", 1),
    ("<%= mirror %>", "not a string", 1),
    ("ok\nok\n<%= args.hostname", "without its closing", 3),
])
def test_dotcloud_errors(tree_of: Any, template: str, words: str, line: int) -> None:
    with pytest.raises(TemplateError, match=words) as caught:
        render(tree_of(template), syntax="dotcloud")
    assert (caught.value.path, caught.value.line) == ("/etc/t", line)


def test_unknown_syntax_is_an_error(tree_of: Any) -> None:
    with pytest.raises(TemplateError, match="unknown template syntax"):
        render(tree_of("x"), syntax="mustache")
