"""List prices: the dated table shipped as data, a user's price file, and LiteLLM's price map.

Every amount is a :class:`~decimal.Decimal`, parsed from the JSON text itself (never through a
float). Token prices are USD per 1M tokens; tool prices are USD per request.

How one call is priced (:func:`list_cost`), with the disjoint token counts of
:class:`~byok_hookspecs.Usage`:

- ``input_tokens`` at ``input``; ``cached_input_tokens`` at ``cached_input`` (else ``input``);
  ``cache_write_tokens`` at ``cache_write`` (else ``input``); ``cache_write_1h_tokens`` at
  ``cache_write_1h`` (no fallback: Anthropic bills them at twice the input price);
  ``output_tokens`` at ``output``;
  ``reasoning_tokens`` at ``reasoning`` where the provider prices them apart, else at ``output``
  (OpenAI, Anthropic, Google and Mistral all bill hidden reasoning as output);
- ``tool_requests`` at ``per_request``; each of ``tool_uses`` (a model's server-side tools:
  Anthropic ``web_search``/``web_fetch``, Gemini ``google_search``, OpenAI ``web_search``) at the
  ``per_request`` of the table's ``tools`` entry ``provider/tool``;
- when the prompt (input + cached input + cache writes) exceeds ``long_context.threshold``, the
  long-context prices apply to the whole call (Anthropic's and Google's rule);
- a cost the provider reported itself (Exa's ``costDollars``) is used instead of the table.

A part of the call the table has no price for does not make the whole call unpriceable:
:func:`price_call` prices what it can and names the rest in ``unpriced``.

Price files (``BYOK_PRICE_FILE``) come in two shapes, told apart by their content:

- this package's own (``byok_plugin/data/prices.json``): ``{"version", "models": {"provider/model":
  {"input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning", "per_request",
  "long_context"}}, "tools": {"provider/tool": {"per_request", "as_of", "source", "note"}}}``;
- LiteLLM's ``model_prices_and_context_window.json``: ``{"model": {"litellm_provider",
  "input_cost_per_token", "cache_read_input_token_cost", "cache_creation_input_token_cost",
  "output_cost_per_token", "output_cost_per_reasoning_token", "*_above_200k_tokens",
  "cache_creation_input_token_cost_above_1hr", ...}}``.

Entries of the user's file replace whole entries of the shipped table; the version recorded in the
ledger then names both (``2026-12-04+<file version or content hash>``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from byok_hookspecs import Usage

from byok_plugin.billing.catalog import MAX_PROVIDER_LENGTH
from byok_plugin.core.json_file import JsonFileError, printable_text, read_json_file

__all__ = [
    "LITELLM_PROVIDERS",
    "MILLION",
    "CallCost",
    "MissingRate",
    "Price",
    "PriceError",
    "PriceTable",
    "TokenRates",
    "list_cost",
    "load_price_file",
    "parse_litellm_prices",
    "parse_price_table",
    "price_call",
    "prices_for",
    "shipped_prices",
]

MILLION = Decimal(1_000_000)
SHIPPED = "prices.json"

#: LiteLLM's ``litellm_provider`` -> this package's provider name
LITELLM_PROVIDERS: Mapping[str, str] = MappingProxyType(
    {
        "openai": "openai",
        "text-completion-openai": "openai",
        "anthropic": "anthropic",
        "gemini": "google",
        "mistral": "mistral",
        "exa_ai": "exa",
    }
)
#: LiteLLM search entries whose name differs from the tool's name here
_LITELLM_TOOL_NAMES: Mapping[str, str] = MappingProxyType({"exa_ai/search": "exa-search"})
#: LiteLLM entries of these modes are priced per token or per query; others (images, audio,
#: embeddings, OCR) use units this package does not bill
_LITELLM_MODES = frozenset({"chat", "completion", "responses", "search"})
_RATE_FIELDS = (
    "input",
    "cached_input",
    "cache_write",
    "cache_write_1h",
    "output",
    "reasoning",
    "input_audio",
    "output_audio",
)
_ENTRY_FIELDS = frozenset(
    {
        *_RATE_FIELDS,
        "per_request",
        "reported_cost",
        "long_context",
        "as_of",
        "source",
        "note",
        "litellm_key",
        "litellm_difference",
    }
)


#: no list price is higher (USD per 1M tokens, or per request), in either file format (a LiteLLM
#: price per token is checked once converted to per 1M tokens); with the providers' token counts
#: and the charge multiplier bounded too, amounts stay within the ledger's NUMERIC(30, 12) and
#: Decimal's default precision
_MAX_PRICE = Decimal(1_000_000)
#: the longest ``version`` a price file may declare: the ledger records the shipped table's and
#: the file's joined (``2026-12-04+<version>``) in a VARCHAR(200), with every charge
MAX_VERSION_LENGTH = 64
#: the longest model (or tool) name of a price entry (the provider's: the catalog's
#: :data:`~byok_plugin.billing.catalog.MAX_PROVIDER_LENGTH`): what the ledger's columns hold (a
#: longer name could never match a recorded call)
MAX_MODEL_LENGTH = 200


class PriceError(ValueError):
    """A price file is malformed; the message names the file and the JSON path."""


@dataclass(frozen=True, slots=True)
class TokenRates:
    """USD per 1M tokens for each kind of token; ``None`` where the provider has no such price."""

    input: Decimal | None = None
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    output: Decimal | None = None
    reasoning: Decimal | None = None
    cache_write_1h: Decimal | None = None
    input_audio: Decimal | None = None
    output_audio: Decimal | None = None

    def billed(self) -> tuple[Decimal | None, ...]:
        """The price each kind of token is billed at, in :data:`_ITEMS` order: cached input and
        cache writes at the input price where they have none, reasoning at the output price;
        1-hour cache writes and audio tokens only at their own price."""
        return (
            self.input,
            self.cached_input if self.cached_input is not None else self.input,
            self.cache_write if self.cache_write is not None else self.input,
            self.cache_write_1h,
            self.output,
            self.reasoning if self.reasoning is not None else self.output,
            self.input_audio,
            self.output_audio,
        )


#: the charge's token items: one per rate field, in the order of :meth:`TokenRates.billed`
_ITEMS = _RATE_FIELDS


@dataclass(frozen=True, slots=True)
class Price:
    """One model's or tool's list price.

    :param rates: the token prices (USD per 1M tokens).
    :param per_request: USD per tool request (an Exa search).
    :param long_context_threshold: above this many prompt tokens, ``long_context`` applies.
    :param reported_cost: the provider reports each call's cost; prefer it to the table.
    """

    provider: str
    model: str
    rates: TokenRates = field(default_factory=TokenRates)
    per_request: Decimal | None = None
    long_context_threshold: int | None = None
    long_context: TokenRates | None = None
    reported_cost: bool = False
    as_of: str | None = None
    source: str | None = None

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.model}"

    def rates_for(self, prompt_tokens: int) -> TokenRates:
        """The rates that apply to a call with this many prompt tokens."""
        if (
            self.long_context is not None
            and self.long_context_threshold is not None
            and prompt_tokens > self.long_context_threshold
        ):
            return self.long_context
        return self.rates


@dataclass(frozen=True)
class PriceTable:
    """Prices by ``(provider, model)``, with the version the ledger records."""

    version: str
    entries: Mapping[tuple[str, str], Price]
    currency: str = "USD"
    source: str = "<prices>"
    #: the per-request prices of the providers' own tools, by ``(provider, tool)``
    tools: Mapping[tuple[str, str], Price] = field(default_factory=lambda: MappingProxyType({}))

    def price(self, provider: str, model: str) -> Price | None:
        return self.entries.get((provider, model))

    def tool(self, provider: str, tool: str) -> Price | None:
        """The per-request price of ``provider``'s own tool ``tool`` (``web_search``), if any."""
        return self.tools.get((provider, tool))

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def overlaid(self, other: PriceTable) -> PriceTable:
        """This table with ``other``'s entries replacing its own, whole entry by whole entry."""
        if other.currency != self.currency:
            raise PriceError(
                f"prices {other.source}: currency {other.currency} differs from {self.currency}"
            )
        merged = dict(self.entries)
        merged.update(other.entries)
        tools = dict(self.tools)
        tools.update(other.tools)
        return PriceTable(
            version=f"{self.version}+{other.version}",
            entries=MappingProxyType(merged),
            currency=self.currency,
            source=f"{self.source}+{other.source}",
            tools=MappingProxyType(tools),
        )


def _fail(source: str, path: str, message: str) -> PriceError:
    # the path holds the file's own keys: written so that the message stays one printable line
    return PriceError(f"prices {source}: {printable_text(path)}: {message}")


def _shown(text: str, longest: int = 40) -> str:
    """``text`` quoted for a message: printable, and cut after ``longest`` characters."""
    cut = text if len(text) <= longest else text[:longest] + "..."
    return f"'{printable_text(cut)}'"


def _decimal(source: str, path: str, value: Any, per_token: bool = False) -> Decimal:
    """A price: a finite number from 0 to :data:`_MAX_PRICE`; with ``per_token`` (LiteLLM's
    USD per token), the price per 1M tokens it is, held to the same bound."""
    if isinstance(value, bool) or value is None:
        raise _fail(source, path, f"must be a number, not {value!r}")
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        raise _fail(source, path, f"must be a number, not {value!r}") from None
    if not number.is_finite() or number < 0:
        raise _fail(source, path, f"must be a finite number >= 0, not {value!r}")
    if per_token and number > _MAX_PRICE / MILLION:
        raise _fail(
            source,
            path,
            f"must be at most {_MAX_PRICE / MILLION} (USD per token: {_MAX_PRICE} per 1M "
            f"tokens), not {value!r}",
        )
    if number > _MAX_PRICE:
        raise _fail(source, path, f"must be at most {_MAX_PRICE} (USD), not {value!r}")
    return number


def _text(source: str, path: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _fail(source, path, f"must be a string, not {value!r}")
    return value


def _rates(source: str, path: str, entry: Mapping[str, Any]) -> TokenRates:
    values = {
        name: _decimal(source, f"{path}.{name}", entry[name])
        for name in _RATE_FIELDS
        if entry.get(name) is not None
    }
    return TokenRates(**values)


def _parse_entry(source: str, key: str, entry: Any) -> Price:
    path = f"models.{key}"
    if not isinstance(entry, Mapping):
        raise _fail(source, path, "must be an object")
    provider, sep, model = key.partition("/")
    if not sep or not provider or not model:
        raise _fail(source, path, "the key must be 'provider/model', e.g. 'openai/gpt-4o'")
    _check_name(source, path, provider, model)
    unknown = set(entry) - _ENTRY_FIELDS
    if unknown:
        raise _fail(source, path, f"unknown fields {sorted(unknown)}")
    rates = _rates(source, path, entry)
    per_request = (
        _decimal(source, f"{path}.per_request", entry["per_request"])
        if entry.get("per_request") is not None
        else None
    )
    if rates == TokenRates() and per_request is None:
        raise _fail(source, path, "has no price: give input/output per 1M tokens or per_request")
    threshold = None
    long_rates = None
    if entry.get("long_context") is not None:
        long_entry = entry["long_context"]
        lpath = f"{path}.long_context"
        if not isinstance(long_entry, Mapping):
            raise _fail(source, lpath, "must be an object")
        threshold = long_entry.get("threshold")
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold <= 0:
            raise _fail(
                source, f"{lpath}.threshold", f"must be a positive integer, not {threshold!r}"
            )
        unknown = set(long_entry) - {"threshold", *_RATE_FIELDS}
        if unknown:
            raise _fail(source, lpath, f"unknown fields {sorted(unknown)}")
        long_rates = _rates(source, lpath, long_entry)
    reported = entry.get("reported_cost", False)
    if not isinstance(reported, bool):
        raise _fail(source, f"{path}.reported_cost", f"must be true or false, not {reported!r}")
    return Price(
        provider=provider,
        model=model,
        rates=rates,
        per_request=per_request,
        long_context_threshold=threshold,
        long_context=long_rates,
        reported_cost=reported,
        as_of=_text(source, f"{path}.as_of", entry.get("as_of")),
        source=_text(source, f"{path}.source", entry.get("source")),
    )


def _check_name(source: str, path: str, provider: str, model: str) -> None:
    """A price entry's provider and model (or tool) name: printable, and no longer than the
    ledger's columns."""
    for what, name, longest in (
        ("provider", provider, MAX_PROVIDER_LENGTH),
        ("name", model, MAX_MODEL_LENGTH),
    ):
        if not name.isprintable():
            raise _fail(source, path, f"the {what} {_shown(name)} holds a control character")
        if len(name) > longest:
            raise _fail(
                source, path, f"the {what} is longer than {longest} characters: {_shown(name)}"
            )


def _check_version(source: str, declared: Any) -> None:
    """The ``version`` a price file declares: a non-empty line of printable characters, at most
    :data:`MAX_VERSION_LENGTH` of them (it is recorded with every charge)."""
    if declared is None:
        return
    if not isinstance(declared, str) or not declared.strip():
        raise _fail(source, "version", f"must be a non-empty string, not {declared!r}")
    if not declared.isprintable():
        raise _fail(
            source,
            "version",
            f"must not hold control characters (it is recorded with every charge), "
            f"not {_shown(declared)}",
        )
    if len(declared) > MAX_VERSION_LENGTH:
        raise _fail(
            source,
            "version",
            f"must be at most {MAX_VERSION_LENGTH} characters (it is recorded with every "
            f"charge), not {len(declared)}: {_shown(declared)}",
        )


def parse_price_table(
    data: Any, source: str = "<prices>", version: str | None = None
) -> PriceTable:
    """Validate a price document in this package's format."""
    if not isinstance(data, Mapping):
        raise _fail(source, "$", "the document must be a JSON object")
    models = data.get("models")
    if not isinstance(models, Mapping):
        raise _fail(source, "models", "must be an object of 'provider/model' -> price")
    currency = data.get("currency", "USD")
    if currency != "USD":
        raise _fail(source, "currency", f"only USD is supported, not {currency!r}")
    entries: dict[tuple[str, str], Price] = {}
    for key, entry in models.items():
        price = _parse_entry(source, key, entry)
        entries[(price.provider, price.model)] = price
    tools = _parse_tools(source, data.get("tools", {}))
    unknown = set(data) - {"version", "currency", "description", "models", "tools"}
    if unknown:
        raise _fail(source, "$", f"unknown fields {sorted(unknown)}")
    declared = data.get("version")
    _check_version(source, declared)
    return PriceTable(
        version=declared or version or "unversioned",
        entries=MappingProxyType(entries),
        currency=currency,
        source=source,
        tools=MappingProxyType(tools),
    )


_TOOL_FIELDS = frozenset({"per_request", "as_of", "source", "note"})


def _parse_tools(source: str, raw: Any) -> dict[tuple[str, str], Price]:
    """The ``tools`` object: ``"provider/tool" -> {"per_request", "as_of", "source", "note"}``."""
    if not isinstance(raw, Mapping):
        raise _fail(source, "tools", "must be an object of 'provider/tool' -> price")
    tools: dict[tuple[str, str], Price] = {}
    for key, entry in raw.items():
        path = f"tools.{key}"
        provider, sep, name = str(key).partition("/")
        if not sep or not provider or not name:
            raise _fail(
                source, path, "the key must be 'provider/tool', e.g. 'anthropic/web_search'"
            )
        _check_name(source, path, provider, name)
        if not isinstance(entry, Mapping):
            raise _fail(source, path, "must be an object")
        unknown = set(entry) - _TOOL_FIELDS
        if unknown:
            raise _fail(source, path, f"unknown fields {sorted(unknown)}")
        if entry.get("per_request") is None:
            raise _fail(source, f"{path}.per_request", "is required (USD per request)")
        tools[(provider, name)] = Price(
            provider=provider,
            model=name,
            per_request=_decimal(source, f"{path}.per_request", entry["per_request"]),
            as_of=_text(source, f"{path}.as_of", entry.get("as_of")),
            source=_text(source, f"{path}.source", entry.get("source")),
        )
    return tools


def _per_million(source: str, path: str, value: Any) -> Decimal:
    number = (_decimal(source, path, value, per_token=True) * MILLION).normalize()
    # normalize() writes 10 as 1E+1; keep whole numbers whole
    exponent = number.as_tuple().exponent
    return number.quantize(Decimal(1)) if isinstance(exponent, int) and exponent > 0 else number


def _litellm_name(key: str, litellm_provider: str) -> tuple[str, str]:
    provider = LITELLM_PROVIDERS.get(litellm_provider, litellm_provider)
    if key in _LITELLM_TOOL_NAMES:
        return provider, _LITELLM_TOOL_NAMES[key]
    prefix = f"{litellm_provider}/"
    model = key[len(prefix) :] if key.startswith(prefix) else key
    return provider, model


_LITELLM_FIELDS = {
    "input": "input_cost_per_token",
    "cached_input": "cache_read_input_token_cost",
    "cache_write": "cache_creation_input_token_cost",
    "cache_write_1h": "cache_creation_input_token_cost_above_1hr",
    "output": "output_cost_per_token",
    "reasoning": "output_cost_per_reasoning_token",
    "input_audio": "input_cost_per_audio_token",
    "output_audio": "output_cost_per_audio_token",
}
_ABOVE = re.compile(r"^(?P<base>.+)_above_(?P<n>\d+)k_tokens$")
#: the provider's own web-search tool a model entry's ``search_context_cost_per_query`` prices
_LITELLM_SEARCH_TOOLS: Mapping[str, str] = MappingProxyType(
    {"anthropic": "web_search", "google": "google_search", "openai": "web_search"}
)
#: the context size whose price is taken (LiteLLM's default when a request names none)
_LITELLM_SEARCH_SIZE = "search_context_size_medium"


def _litellm_entry(source: str, key: str, entry: Mapping[str, Any]) -> Price | None:
    mode = entry.get("mode", "chat")
    litellm_provider = entry.get("litellm_provider")
    if not isinstance(mode, str) or mode not in _LITELLM_MODES:
        return None
    if not isinstance(litellm_provider, str):
        return None
    provider, model = _litellm_name(key, litellm_provider)
    path = key
    _check_name(source, path, provider, model)
    if mode == "search":
        per_query = entry.get("input_cost_per_query")
        if per_query is None and isinstance(entry.get("tiered_pricing"), list):
            search_tiers = [
                t
                for t in entry["tiered_pricing"]
                if isinstance(t, Mapping) and _tier_start(t.get("max_results_range")) is not None
            ]
            # the tier that covers the fewest results is what a default search costs
            search_tiers.sort(key=lambda t: _tier_start(t.get("max_results_range")) or 0)
            per_query = search_tiers[0].get("input_cost_per_query") if search_tiers else None
        if per_query is None:
            return None
        return Price(
            provider=provider,
            model=model,
            per_request=_decimal(source, f"{path}.input_cost_per_query", per_query),
            reported_cost=provider == "exa",
            source=f"litellm:{key}",
        )
    values = {
        name: _per_million(source, f"{path}.{field_name}", entry[field_name])
        for name, field_name in _LITELLM_FIELDS.items()
        if entry.get(field_name) is not None
    }
    if "input" not in values and "output" not in values:
        return None
    # LiteLLM prices reasoning apart only to restate the output price; keep "reasoning" only
    # where it really differs
    if values.get("reasoning") is not None and values["reasoning"] == values.get("output"):
        del values["reasoning"]
    tiers: dict[int, dict[str, Decimal]] = {}
    for candidate, value in entry.items():
        match = _ABOVE.match(candidate)
        if not match or value is None:
            continue
        for name, field_name in _LITELLM_FIELDS.items():
            if match["base"] == field_name:
                tiers.setdefault(int(match["n"]) * 1000, {})[name] = _per_million(
                    source, f"{path}.{candidate}", value
                )
    # one long-context tier is modelled: the first threshold above which prices change
    threshold = min(tiers) if tiers else None
    long_values = tiers.get(threshold, {}) if threshold is not None else {}
    long_rates = None
    if threshold is not None:
        # fields without a long-context price keep their normal price above the threshold
        long_rates = TokenRates(**{**values, **long_values})
    return Price(
        provider=provider,
        model=model,
        rates=TokenRates(**values),
        long_context_threshold=threshold,
        long_context=long_rates,
        source=f"litellm:{key}",
    )


def _tier_start(results_range: Any) -> Decimal | int | None:
    """The first number of a tier's ``max_results_range`` (``[1, 25]``); None if it has none."""
    if results_range is None:
        return 0
    if isinstance(results_range, list) and results_range:
        first = results_range[0]
        if isinstance(first, int | Decimal) and not isinstance(first, bool):
            return first
    return None


def parse_litellm_prices(
    data: Any, source: str = "<litellm>", version: str | None = None
) -> PriceTable:
    """Read LiteLLM's ``model_prices_and_context_window.json`` (or an excerpt of it).

    Entries for providers this package names differently are renamed (``gemini/gemini-2.5-pro``
    -> ``google/gemini-2.5-pro``, ``exa_ai/search`` -> ``exa/exa-search``); other providers keep
    LiteLLM's name. Images, audio, embeddings and the ``sample_spec`` entry are skipped.

    The providers' web-search tools (Anthropic ``web_search``, Gemini ``google_search``, OpenAI
    ``web_search``) are priced per query from the models' ``search_context_cost_per_query``
    (its ``search_context_size_medium``), where every model of the provider that has one agrees;
    where they differ (OpenAI's search-preview models) no tool price is imported and the
    shipped table's stays.
    """
    if not isinstance(data, Mapping):
        raise _fail(source, "$", "the document must be a JSON object")
    entries: dict[tuple[str, str], Price] = {}
    searches: dict[tuple[str, str], dict[Decimal, str]] = {}
    for key, entry in data.items():
        if key == "sample_spec" or not isinstance(entry, Mapping):
            continue
        price = _litellm_entry(source, key, entry)
        if price is None:
            continue
        search = _litellm_search(source, key, entry, price.provider)
        if search is not None:
            searches.setdefault((price.provider, search[0]), {}).setdefault(search[1], key)
        # the provider-prefixed entry of a provider wins over a bare one of the same name
        existing = entries.get((price.provider, price.model))
        if existing is not None and "/" not in key:
            continue
        entries[(price.provider, price.model)] = price
    # a tool is priced per provider here: imported where every model of the provider agrees
    tools = {
        (provider, tool): Price(
            provider=provider, model=tool, per_request=amount, source=f"litellm:{key}"
        )
        for (provider, tool), amounts in searches.items()
        if len(amounts) == 1
        for amount, key in amounts.items()
    }
    return PriceTable(
        version=version or "litellm",
        entries=MappingProxyType(entries),
        source=source,
        tools=MappingProxyType(tools),
    )


def _litellm_search(
    source: str, key: str, entry: Mapping[str, Any], provider: str
) -> tuple[str, Decimal] | None:
    """The provider's web-search tool and its price per query from a model entry's
    ``search_context_cost_per_query`` (``{"search_context_size_medium": 0.01, ...}``, USD)."""
    tool = _LITELLM_SEARCH_TOOLS.get(provider)
    costs = entry.get("search_context_cost_per_query")
    if tool is None or not isinstance(costs, Mapping) or costs.get(_LITELLM_SEARCH_SIZE) is None:
        return None
    path = f"{key}.search_context_cost_per_query.{_LITELLM_SEARCH_SIZE}"
    return tool, _decimal(source, path, costs[_LITELLM_SEARCH_SIZE])


def _is_litellm(data: Any) -> bool:
    if not isinstance(data, Mapping) or "models" in data:
        return False
    return "sample_spec" in data or any(
        isinstance(v, Mapping) and "litellm_provider" in v for v in data.values()
    )


def load_price_file(path: Path) -> PriceTable:
    """Read a price file of either shape; its version defaults to a hash of its content.

    :raises PriceError: one line naming the file and, for a fault in the document, its JSON
        path (see :func:`byok_plugin.core.json_file.read_json_file` for what a file must be).
    """
    try:
        raw, data = read_json_file(path, "prices", parse_float=Decimal)
    except JsonFileError as exc:
        raise PriceError(str(exc)) from None
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()[:12]
    if _is_litellm(data):
        return parse_litellm_prices(data, source=str(path), version=f"litellm@{digest}")
    return parse_price_table(data, source=str(path), version=digest)


def shipped_prices() -> PriceTable:
    """The dated table shipped in the package."""
    text = resources.files("byok_plugin").joinpath("data", SHIPPED).read_text(encoding="utf-8")
    data = json.loads(text, parse_float=Decimal)
    return parse_price_table(data, source=f"byok_plugin/data/{SHIPPED}")


def prices_for(settings: Any) -> PriceTable:
    """The shipped table, overlaid with the user's price file (``BYOK_PRICE_FILE``) if any."""
    table = shipped_prices()
    price_file = getattr(settings, "price_file", None)
    if price_file is not None:
        table = table.overlaid(load_price_file(Path(price_file)))
    return table


class MissingRate(PriceError):
    """The call used a kind of token (or a tool request) its price entry has no price for."""


@dataclass(frozen=True, slots=True)
class CallCost:
    """A call's cost at list price: the total of what could be priced, its ``(item, amount)``
    breakdown, and the parts that had no price (``cache_write_1h``, ``tool:web_fetch``)."""

    total: Decimal
    breakdown: tuple[tuple[str, Decimal], ...]
    unpriced: tuple[str, ...] = ()


def price_call(
    price: Price, usage: Usage, tools: Mapping[tuple[str, str], Price] | None = None
) -> CallCost:
    """Price what can be priced of one call; name what cannot in ``unpriced``.

    :param tools: the table's tool prices (:attr:`PriceTable.tools`), for ``usage.tool_uses``.
    """
    if usage.reported_cost is not None and price.reported_cost:
        return CallCost(usage.reported_cost, (("reported_cost", usage.reported_cost),))
    prompt = (
        usage.input_tokens
        + usage.cached_input_tokens
        + usage.cache_write_tokens
        + usage.cache_write_1h_tokens
    )
    rates = price.rates_for(prompt)
    breakdown: list[tuple[str, Decimal]] = []
    unpriced: list[str] = []
    total = Decimal(0)
    counts = (
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.cache_write_1h_tokens,
        usage.output_tokens,
        usage.reasoning_tokens,
        usage.input_audio_tokens,
        usage.output_audio_tokens,
    )
    for item, tokens, rate in zip(_ITEMS, counts, rates.billed(), strict=True):
        if tokens == 0:
            continue
        if rate is None:
            unpriced.append(item)
            continue
        amount = rate * tokens / MILLION
        breakdown.append((item, amount))
        total += amount
    if usage.tool_requests:
        if price.per_request is None:
            unpriced.append("requests")
        else:
            amount = price.per_request * usage.tool_requests
            breakdown.append(("requests", amount))
            total += amount
    for name, count in usage.tool_uses:
        tool = (tools or {}).get((price.provider, name))
        if tool is None or tool.per_request is None:
            unpriced.append(f"tool:{name}")
            continue
        amount = tool.per_request * count
        breakdown.append((f"tool:{name}", amount))
        total += amount
    return CallCost(total, tuple(breakdown), tuple(unpriced))


def list_cost(price: Price, usage: Usage) -> tuple[Decimal, tuple[tuple[str, Decimal], ...]]:
    """The call's cost at list price, exact, and its ``(item, amount)`` breakdown.

    :raises MissingRate: the usage has tokens of a kind the entry does not price.
    """
    cost = price_call(price, usage)
    if cost.unpriced:
        raise MissingRate(f"{price.key} has no price for {', '.join(cost.unpriced)} of the call")
    return cost.total, cost.breakdown
