"""``BYOK_PRICE_FILE`` and ``BYOK_CATALOG_FILE`` are read and checked once, as the host starts:
whatever is wrong with them gives one line naming the file and the JSON path, never a traceback,
and never after a provider call. A hypothesis test feeds the loaders arbitrary JSON documents."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byok_plugin.billing.catalog import CatalogError, load_catalog
from byok_plugin.billing.pricing import PriceError, load_price_file
from byok_plugin.cli import main
from byok_plugin.cli.demo import PLATFORM_WORKSPACE, DemoStack
from byok_plugin.core.json_file import MAX_BYTES, MAX_DEPTH
from byok_plugin.host.emulator import EmulatorServer

ROOT = Path(__file__).resolve().parents[1]
TRIAGE = str(ROOT / "sample_workflows" / "support-ticket-triage.json")

PRICE_MODEL = '{"models": {"openai/gpt-4o-mini": {"input": %s, "output": 1}}}'
#: name -> (file text, or None for a special path; what the one-line error must say)
BAD_FILES: dict[str, tuple[str | None, str]] = {
    "not-json": ("prices: cheap", "not valid JSON (line 1, column 1"),
    "array": ("[1, 2]", "$: the document must be a JSON object"),
    "nan": (PRICE_MODEL % "NaN", "models.openai/gpt-4o-mini.input: NaN is not a number"),
    "infinity": (PRICE_MODEL % "Infinity", ".input: Infinity is not a number"),
    "negative": (PRICE_MODEL % "-0.5", ".input: must be a finite number >= 0"),
    "huge": (PRICE_MODEL % "1e999999", ".input: must be at most 1000000"),
    "deep": ("[" * 50_000 + "]" * 50_000, f"nested deeper than {MAX_DEPTH} levels"),
    "deep-object": (
        '{"models": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}",
        f"models.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a: nested deeper than {MAX_DEPTH}",
    ),
    "not-utf8": ('{"version": "\udcff"}', "not UTF-8 text at byte"),
    "directory": (None, "is a directory"),
    "dev-zero": (None, "is not a regular file"),
    "fifo": (None, "is not a regular file"),
    "missing": (None, "cannot be read (No such file or directory)"),
    "too-large": (None, f"is larger than {MAX_BYTES // (1024 * 1024)} MB"),
}


def bad_file(tmp_path: Path, name: str) -> Path:
    text, _ = BAD_FILES[name]
    path = tmp_path / f"{name}.json"
    if text is not None:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
    elif name == "directory":
        path.mkdir()
    elif name == "dev-zero":
        return Path("/dev/zero")
    elif name == "fifo":
        os.mkfifo(path)
    elif name == "too-large":
        path.write_bytes(b" " * (MAX_BYTES + 1))
    return path


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_bad_file_is_one_line_naming_the_file_and_the_path(tmp_path: Path, name: str) -> None:
    path = bad_file(tmp_path, name)
    expected = BAD_FILES[name][1]
    with pytest.raises(PriceError) as price:
        load_price_file(path)
    with pytest.raises(CatalogError) as catalog:
        load_catalog(path)
    for error, what in ((price.value, "prices"), (catalog.value, "catalog")):
        message = str(error)
        assert message.startswith(f"{what} {path}: "), message
        assert "\n" not in message
        if name not in ("negative", "huge") or what == "prices":  # the catalog has no prices
            assert expected in message, message


def test_a_price_file_with_an_object_where_text_belongs_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"openai/m": {"input": 1, "output": 1, "as_of": {}}}}))
    with pytest.raises(PriceError, match=r"models\.openai/m\.as_of: must be a string"):
        load_price_file(path)
    path.write_text(
        json.dumps(
            {
                "sample_spec": {},
                "exa_ai/search": {
                    "litellm_provider": "exa_ai",
                    "mode": "search",
                    "tiered_pricing": [
                        {"max_results_range": "many", "input_cost_per_query": 1},
                        {"max_results_range": [1, 25], "input_cost_per_query": 0.005},
                    ],
                },
                "odd": {"litellm_provider": "openai", "mode": ["chat"], "input_cost_per_token": 1},
            }
        )
    )
    table = load_price_file(path)  # the odd entries are skipped, the valid tier is read
    exa = table.price("exa", "exa-search")
    assert exa is not None
    assert str(exa.per_request) == "0.005"


# --- at start-up, before any provider call ---------------------------------------------------------


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator)
    yield built
    built.close()


@pytest.mark.parametrize("variable", ["BYOK_PRICE_FILE", "BYOK_CATALOG_FILE"])
@pytest.mark.parametrize("name", ["nan", "negative", "dev-zero", "deep", "missing"])
def test_byok_run_stops_with_one_line_before_any_provider_call(
    stack: DemoStack, emulator: EmulatorServer, tmp_path: Path, variable: str, name: str
) -> None:
    path = bad_file(tmp_path, name)
    env = {**stack.environ, variable: str(path)}
    result = CliRunner().invoke(
        main,
        ["run", TRIAGE, "--workspace", PLATFORM_WORKSPACE, "--input", "ticket=Invoice wrong"],
        env=env,
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1, result.output
    assert str(path) in errors[0]
    assert emulator.calls() == []


# --- arbitrary documents -------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "models",
                    "tools",
                    "providers",
                    "version",
                    "openai/gpt-4o",
                    "anthropic/web_search",
                    "input",
                    "output",
                    "per_request",
                    "long_context",
                    "threshold",
                    "litellm_provider",
                    "mode",
                    "input_cost_per_token",
                    "tiered_pricing",
                    "max_results_range",
                    "provider",
                    "kind",
                    "hosted",
                    "aliases",
                    "sample_spec",
                    "gpt-4o",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=json_values)
def test_any_json_document_is_a_table_or_one_clear_error(tmp_path: Path, document) -> None:
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(document))
    for load, error in ((load_price_file, PriceError), (load_catalog, CatalogError)):
        message = None
        try:
            load(path)
        except error as exc:
            message = str(exc)
        if message is not None:
            assert "\n" not in message
            assert message.startswith(("prices ", "catalog "))
