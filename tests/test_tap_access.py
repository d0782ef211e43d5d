"""
Unit tests for the gateway's access options in :mod:`taskoffload.tap`:
``--token-file`` and ``--allowed-origin``, parsed and wired into the gateway.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from taskoffload import tap
from taskoffload.service import GatewayService
from tests._trial_bridge import pytest_module


def parse(*args: str) -> tap.Options:
    """Options parsed from ``args``, as twistd would."""
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def gateway_of(options: tap.Options) -> GatewayService:
    """The gateway service ``makeService`` wires for ``options``."""
    [gateway] = [s for s in tap.makeService(options) if isinstance(s, GatewayService)]
    return gateway


def test_open_by_default() -> None:
    """Without the options, no token is read and the gateway is open to any origin."""
    options = parse()
    assert options["token"] is None
    assert options["allowed-origin"] == []
    access = gateway_of(parse("--count=1")).access
    assert not access.token_required
    assert access.origin_allowed("https://anywhere.example")


def test_token_file_read_and_stripped(tmp_path: Path) -> None:
    """--token-file's content, without surrounding whitespace, is the token the gateway wants."""
    path = tmp_path / "token"
    path.write_text("  s3cret-token \n\n")
    options = parse("--count=1", "--token-file", str(path))
    assert options["token"] == "s3cret-token"
    access = gateway_of(options).access
    assert access.presents_token(b"Bearer s3cret-token", [])
    assert not access.presents_token(None, [])


def test_token_file_role_gateway(tmp_path: Path) -> None:
    """--token-file is accepted with --role=gateway too."""
    path = tmp_path / "token"
    path.write_text("t0ken")
    options = parse("--role=gateway", "--token-file", str(path))
    assert gateway_of(options).access.token_required


def test_token_file_missing(tmp_path: Path) -> None:
    """A --token-file that cannot be read is refused, naming the file."""
    path = tmp_path / "absent"
    with pytest.raises(usage.UsageError, match=r"--token-file .*absent.*cannot read it"):
        parse("--token-file", str(path))


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_token_file_empty(tmp_path: Path, content: str) -> None:
    """An empty (or all-whitespace) --token-file is refused, saying how to make a token."""
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(usage.UsageError, match=r"is empty: put the token in it.*token_urlsafe"):
        parse("--token-file", str(path))


def test_token_with_inner_whitespace(tmp_path: Path) -> None:
    """A token file holding two words is refused: a bearer token is one."""
    path = tmp_path / "token"
    path.write_text("two words\n")
    with pytest.raises(usage.UsageError, match="the token is one word"):
        parse("--token-file", str(path))


def test_allowed_origin_repeatable() -> None:
    """--allowed-origin may be given more than once; only those origins are allowed."""
    options = parse(
        "--count=1",
        "--allowed-origin",
        "https://app.example",
        "--allowed-origin=http://localhost:8080",
    )
    assert options["allowed-origin"] == ["https://app.example", "http://localhost:8080"]
    access = gateway_of(options).access
    assert access.origin_allowed("https://app.example")
    assert access.origin_allowed("http://localhost:8080")
    assert not access.origin_allowed("https://evil.example")


def test_allowed_origin_must_be_an_origin() -> None:
    """An --allowed-origin without a scheme is refused with an example."""
    with pytest.raises(usage.UsageError, match="expected an origin such as https://"):
        parse("--allowed-origin", "app.example")


@pytest.mark.parametrize("args", [["--token-file=/x"], ["--allowed-origin=https://a.example"]])
def test_access_options_not_for_workers(args: list[str]) -> None:
    """The worker role refuses the gateway's access options."""
    with pytest.raises(usage.UsageError, match="are for the gateway"):
        parse("--role=worker", *args)


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
