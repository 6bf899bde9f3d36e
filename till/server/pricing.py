"""Token pricing for metered requests, backed by the bundled genai-prices data.

Money is integer micro-cents (1 cent = 1_000_000 µ¢); per-token rates are integer nano-cents
(1 µ¢ = 1_000 n¢). Nothing here returns a float, and nothing raises on odd input: an unknown
provider or model (or anything genai-prices cannot price by tokens) gives ``None``.

Prices come only from the data bundled with the installed genai-prices package. The Pricer
reads ``genai_prices.data.providers`` directly rather than genai-prices' global snapshot, so it
never fetches anything and an ``UpdatePrices`` task started elsewhere in the process cannot
change what Till charges. This module never starts ``UpdatePrices``.

Hot path: ``genai_prices.calc_price`` takes 50-90 µs a call, mostly re-validating the model's
price table. So each (provider, model) is resolved once per UTC day (prices can have start
dates) to the genai-prices ``ModelPrice`` in force, and costs are then computed from it with
genai-prices' own functions: ``compute_leaf_values`` splits the usage into the priced parts
and ``calc_unit_price`` prices each part, picking the tier. At resolve time the result is
checked against genai-prices' full ``ModelPrice.calc_price`` on probe usages; if they ever
disagree, the model is treated as unknown and a warning is logged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import MAX_EMAX, MIN_EMIN, ROUND_CEILING, Context, Decimal, localcontext
from fractions import Fraction

from genai_prices.data import providers as _bundled_providers
from genai_prices.data_units import unit_data
from genai_prices.decompose import compute_leaf_values
from genai_prices.types import (
    ModelInfo,
    ModelPrice,
    Provider,
    TieredPrices,
    TimeOfDateConstraint,
    calc_unit_price,
)
from genai_prices.types import Usage as _GPUsage
from genai_prices.units import UnitDef, UnitRegistry

__all__ = ["PROVIDER_IDS", "Pricer", "Rates", "Usage", "default_pricer"]

logger = logging.getLogger(__name__)

# Till provider name -> genai-prices provider id. genai-prices' "google" provider covers the
# Gemini API and Vertex AI (and falls back to its "anthropic" prices for Claude on Vertex).
PROVIDER_IDS: Mapping[str, str] = {"openai": "openai", "anthropic": "anthropic", "google": "google"}

MICROCENTS_PER_USD = 100 * 1_000_000
NANOCENTS_PER_USD = MICROCENTS_PER_USD * 1_000
_MAX_MODEL_NAME = 256
_MAX_ENTRIES = 4096
_SECONDS_PER_DAY = 86_400

# Wide enough that token counts up to ~10**40 are priced exactly; never traps on overflow.
_DECIMAL_CTX = Context(prec=80, rounding=ROUND_CEILING, Emax=MAX_EMAX, Emin=MIN_EMIN)
_USD_TO_MICROCENTS = Decimal(MICROCENTS_PER_USD)
_USD_TO_NANOCENTS = Decimal(NANOCENTS_PER_USD)

# The genai-prices usage keys our Usage can make non-zero, by direction. Priced units other
# than these (audio, image, 1h cache writes, web searches, ...) always get a count of 0 from
# our Usage, so they cost nothing and are left out.
_INPUT_KEYS = ("input_tokens", "cache_read_tokens", "cache_write_tokens")
_OUTPUT_KEYS = ("output_tokens",)
_REQUESTS_KEY = "requests"  # genai-prices counts one request per call

# genai-prices' unit definitions (usage key -> per, dimensions, price key), built from the same
# bundled data genai-prices builds its own registry from.
_UNITS: Mapping[str, UnitDef] = UnitRegistry(unit_data).units


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens used by one request.

    Mapping to genai-prices: identical field names and the same convention. genai-prices'
    ``input_tokens`` is also the TOTAL input including cache reads and cache writes (its README:
    "Cache tokens are partitions of the total"), and it prices the uncached remainder
    ``input - cache_read - cache_write`` at the input rate. So each field maps 1:1 and
    ``cache_read_tokens + cache_write_tokens`` must not exceed ``input_tokens`` (if it does,
    input is raised to that sum before pricing). Cache writes are priced at genai-prices'
    ``cache_write_mtok`` (Anthropic's 5-minute write rate); for models without a cache-write
    price (OpenAI, Gemini) they are ordinary input. ``output_tokens`` includes reasoning tokens.
    """

    input_tokens: int = 0  # ALL input tokens, including cache reads and cache writes
    output_tokens: int = 0  # all output tokens, including reasoning/thinking tokens
    cache_read_tokens: int = 0  # subset of input_tokens
    cache_write_tokens: int = 0  # subset of input_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Rates:
    """Worst-case marginal prices used to size a hold before a request is sent.

    Every rate is the highest the model can charge for that token (highest tier, and on the
    input side the dearest of plain input, cache read and cache write), rounded up, so
    ``hold_microcents(i, o)`` is never below ``cost_microcents`` for any usage with ``i`` input
    and ``o`` output tokens.
    """

    input_nanocents_per_token: int  # ceil, highest tier
    output_nanocents_per_token: int  # ceil, highest tier
    request_nanocents: int = 0  # fixed per-request fee, if the model has one (ceil)

    def hold_microcents(self, input_tokens: int, output_tokens: int) -> int:
        """Worst-case cost in micro-cents of a request of this size (rounded up)."""
        nanocents = (
            max(input_tokens, 0) * self.input_nanocents_per_token
            + max(output_tokens, 0) * self.output_nanocents_per_token
            + self.request_nanocents
        )
        return -(-nanocents // 1_000)


_Price = Decimal | TieredPrices


@dataclass(frozen=True, slots=True)
class _Entry:
    """A resolved (provider, model); ``rates is None`` means no known price."""

    day: int
    rates: Rates | None = None
    usage_keys: frozenset[str] = frozenset()
    units: Mapping[str, UnitDef] | None = None
    terms: tuple[tuple[str, int, _Price], ...] = ()  # (usage key, per, price)
    request_price: tuple[int, _Price] | None = None  # (per, price)
    # Set for the rare model whose price varies by time of day: cost is then computed with
    # genai-prices' full calculation on every call.
    slow: tuple[ModelInfo, Provider] | None = None
    # The same prices as integers: cost without Decimal (see _Exact).
    exact: _Exact | None = None


_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


@dataclass(frozen=True, slots=True)
class _Exact:
    """An entry's cost in integer arithmetic: what ``_fast_cost`` computes, in micro-cents.

    Each priced unit's count (genai-prices' leaf value: plain input is input less cache reads
    and writes) is a fixed integer combination of our Usage's fields, ``leaves``. Each price,
    in micro-cents per token, is a fraction with one common denominator: ``base`` and ``tiers``
    hold the numerators (the tier picked as genai-prices' ``calc_unit_price`` picks it, by total
    input tokens). So cost = ceil(sum(count x numerator) / denominator), exact, and a price
    costs a third of the time it took in Decimal. Checked against it when the entry is resolved.
    """

    leaves: tuple[tuple[int, int, int, int], ...]  # per term: coefficients of _FIELDS
    base: tuple[int, ...]  # per term
    tiers: tuple[tuple[tuple[int, int], ...], ...]  # per term: (start, numerator), as listed
    request: int  # numerator of the per-request fee (count 1)
    denominator: int

    def microcents(self, usage: Usage) -> int | None:
        """None when a count would be negative (genai-prices refuses such usage)."""
        i, o = usage.input_tokens, usage.output_tokens
        cr, cw = usage.cache_read_tokens, usage.cache_write_tokens
        total = self.request
        for (a, b, c, d), base, tiers in zip(self.leaves, self.base, self.tiers, strict=True):
            count = a * i + b * o + c * cr + d * cw
            if count < 0:
                return None
            price = base
            for start, numerator in reversed(tiers):
                if i > start:
                    price = numerator
                    break
            total += count * price
        return -(-total // self.denominator)


class Pricer:
    """Prices LLM usage with genai-prices. Thread-safe enough: the cache is a plain dict."""

    def __init__(
        self, providers: Sequence[Provider] | None = None, *, max_entries: int = _MAX_ENTRIES
    ) -> None:
        """``providers`` defaults to the data bundled with genai-prices (never fetched)."""
        self._providers: list[Provider] = list(
            _bundled_providers if providers is None else providers
        )
        self._by_id: dict[str, Provider] = {}
        for provider in self._providers:
            self._by_id.setdefault(provider.id, provider)
        self._max_entries = max_entries
        self._entries: dict[tuple[str, str], _Entry] = {}

    # ------------------------------------------------------------------ public

    def rates(self, provider: str, model: str) -> Rates | None:
        """Worst-case per-token rates for sizing holds; ``None`` if the price is unknown."""
        return self._entry(provider, model).rates

    def cost_microcents(self, provider: str, model: str, usage: Usage) -> int | None:
        """Exact cost of ``usage`` in micro-cents, rounded up; ``None`` if the price is unknown."""
        entry = self._entry(provider, model)
        if entry.rates is None:
            return None
        try:
            usage = _normalized(usage)
            with localcontext(_DECIMAL_CTX):
                if entry.slow is not None:
                    model_info, gp_provider = entry.slow
                    usd = model_info.calc_price(
                        _to_genai_usage(usage),
                        gp_provider,
                        genai_request_timestamp=datetime.now(UTC),
                    ).total_price
                else:
                    if entry.exact is not None:
                        cost = entry.exact.microcents(usage)
                        if cost is not None:
                            return cost
                    usd = _fast_cost(entry, usage)
                return int((usd * _USD_TO_MICROCENTS).to_integral_value(rounding=ROUND_CEILING))
        except Exception:
            logger.exception("pricing failed for %r %r %r", provider, model, usage)
            return None

    def clear(self) -> None:
        """Drop all cached lookups."""
        self._entries.clear()

    # ----------------------------------------------------------------- private

    def _entry(self, provider: str, model: str) -> _Entry:
        day = int(time.time()) // _SECONDS_PER_DAY
        key = (provider, model)
        try:
            entry = self._entries.get(key)
        except TypeError:  # unhashable garbage
            return _Entry(day)
        if entry is not None and entry.day == day:
            return entry
        try:
            entry = self._resolve(provider, model)
        except Exception:
            logger.exception("pricing lookup failed for %r %r", provider, model)
            entry = _Entry(day)
        if isinstance(model, str) and len(model) <= _MAX_MODEL_NAME:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = entry
        return entry

    def _resolve(self, provider: str, model: str) -> _Entry:
        timestamp = time.time()
        day = int(timestamp) // _SECONDS_PER_DAY
        unknown = _Entry(day)
        if not isinstance(provider, str) or not isinstance(model, str):
            return unknown
        provider_id = PROVIDER_IDS.get(provider.strip().lower())
        gp_provider = self._by_id.get(provider_id) if provider_id is not None else None
        name = model.strip()
        if name[:7].lower() == "models/":
            name = name[7:].strip()
        if gp_provider is None or not name or len(name) > _MAX_MODEL_NAME:
            return unknown
        model_info = gp_provider.find_model(name, all_providers=self._providers)
        if model_info is None:
            return unknown

        if _varies_by_time_of_day(model_info):
            return _time_of_day_entry(day, model_info, gp_provider)

        now = datetime.fromtimestamp(timestamp, UTC)
        model_price = model_info.get_prices(now)
        reachable = _reachable_prices(model_price)
        rates = _rates(reachable)
        if rates is None:
            return unknown
        entry = _build_entry(day, rates, reachable)
        if not _agrees_with_genai_prices(entry, model_price):
            logger.warning(
                "genai-prices disagrees with Till's fast pricing path for %s/%s; "
                "treating the model as unpriced",
                gp_provider.id,
                model_info.id,
            )
            return unknown
        return _with_exact(entry)


default_pricer = Pricer()


# ---------------------------------------------------------------------- helpers


def _reachable_prices(model_price: ModelPrice) -> dict[str, tuple[UnitDef, _Price]]:
    """The priced units that our Usage can give a non-zero count, by usage key."""
    found: dict[str, tuple[UnitDef, _Price]] = {}
    for usage_key in (*_INPUT_KEYS, *_OUTPUT_KEYS, _REQUESTS_KEY):
        unit = _UNITS.get(usage_key)
        if unit is None:
            continue
        price = getattr(model_price, unit.price_key, None)
        if isinstance(price, Decimal | TieredPrices):
            found[usage_key] = (unit, price)
    return found


def _max_price(price: _Price) -> Decimal:
    if isinstance(price, TieredPrices):
        return max([price.base, *(tier.price for tier in price.tiers)])
    return price


def _nanocents(price: _Price, per: int) -> int:
    with localcontext(_DECIMAL_CTX):
        value = _max_price(price) * _USD_TO_NANOCENTS / per
        return int(value.to_integral_value(rounding=ROUND_CEILING))


def _rates(reachable: Mapping[str, tuple[UnitDef, _Price]]) -> Rates | None:
    """Worst-case rates, or None unless the model has a plain input-token price."""
    if "input_tokens" not in reachable:
        return None  # audio-hour / character priced, or no prices at all
    input_rate = max(
        _nanocents(price, unit.per)
        for key, (unit, price) in reachable.items()
        if key in _INPUT_KEYS
    )
    output_rate = max(
        (
            _nanocents(price, unit.per)
            for key, (unit, price) in reachable.items()
            if key in _OUTPUT_KEYS
        ),
        default=0,
    )
    request = reachable.get(_REQUESTS_KEY)
    request_rate = _nanocents(request[1], request[0].per) if request is not None else 0
    return Rates(input_rate, output_rate, request_rate)


def _build_entry(day: int, rates: Rates, reachable: Mapping[str, tuple[UnitDef, _Price]]) -> _Entry:
    token_keys = [key for key in reachable if key != _REQUESTS_KEY]
    request = reachable.get(_REQUESTS_KEY)
    return _Entry(
        day,
        rates,
        usage_keys=frozenset(token_keys),
        units={key: reachable[key][0] for key in token_keys},
        terms=tuple((key, reachable[key][0].per, reachable[key][1]) for key in token_keys),
        request_price=(request[0].per, request[1]) if request is not None else None,
    )


def _with_exact(entry: _Entry) -> _Entry:
    """The entry with its integer path, if that gives _fast_cost's figure on every probe."""
    try:
        exact = _exact(entry)
        with localcontext(_DECIMAL_CTX):
            for probe in _probe_usages(entry):
                usd = _fast_cost(entry, probe)
                want = int((usd * _USD_TO_MICROCENTS).to_integral_value(rounding=ROUND_CEILING))
                if exact.microcents(probe) != want:
                    logger.warning("the integer pricing path disagrees: Decimal path kept")
                    return entry
    except Exception as exc:  # a shape _exact does not take (a tiered per-request fee)
        logger.warning("no integer pricing path (%s): Decimal path kept", exc)
        return entry
    return replace(entry, exact=exact)


def _exact(entry: _Entry) -> _Exact:
    assert entry.units is not None
    keys = set(entry.usage_keys)
    # Leaf values are linear in the usage: read each field's coefficient off genai-prices' own
    # decomposition, one field raised by one over a usage where every leaf is positive.
    big = 10**9
    origin = Usage(4 * big, big, big, big)
    at_origin = compute_leaf_values(keys, origin, entry.units)
    rows: dict[str, list[int]] = {key: [] for key, _, _ in entry.terms}
    for field in _FIELDS:
        moved = replace(origin, **{field: getattr(origin, field) + 1})
        after = compute_leaf_values(keys, moved, entry.units)
        for key in rows:
            rows[key].append(int(Decimal(after[key]) - Decimal(at_origin[key])))
    # Micro-cents per token of every price, over one common denominator.
    prices: list[Fraction] = []
    for _, per, price in entry.terms:
        for value in _all_prices(price):
            prices.append(Fraction(value) * MICROCENTS_PER_USD / per)
    if entry.request_price is not None:
        per, price = entry.request_price
        if isinstance(price, TieredPrices):
            raise ValueError("a tiered per-request fee")
        prices.append(Fraction(price) * MICROCENTS_PER_USD / per)
    denominator = math.lcm(*(p.denominator for p in prices)) if prices else 1

    def numerator(value: Decimal, per: int) -> int:
        scaled = Fraction(value) * MICROCENTS_PER_USD / per * denominator
        assert scaled.denominator == 1
        return int(scaled)

    base: list[int] = []
    tiers: list[tuple[tuple[int, int], ...]] = []
    for _, per, price in entry.terms:
        if isinstance(price, TieredPrices):
            base.append(numerator(price.base, per))
            tiers.append(tuple((t.start, numerator(t.price, per)) for t in price.tiers))
        else:
            base.append(numerator(price, per))
            tiers.append(())
    request = 0
    if entry.request_price is not None:
        per, price = entry.request_price
        assert isinstance(price, Decimal)
        request = numerator(price, per)
    coefficients = tuple((r[0], r[1], r[2], r[3]) for r in (rows[key] for key, _, _ in entry.terms))
    return _Exact(coefficients, tuple(base), tuple(tiers), request, denominator)


def _all_prices(price: _Price) -> list[Decimal]:
    if isinstance(price, TieredPrices):
        return [price.base, *(tier.price for tier in price.tiers)]
    return [price]


def _fast_cost(entry: _Entry, usage: Usage) -> Decimal:
    """USD cost, computed as genai-prices' ``ModelPrice.calc_price`` does. Needs _DECIMAL_CTX."""
    assert entry.units is not None
    counts = compute_leaf_values(set(entry.usage_keys), usage, entry.units)
    total = Decimal(0)
    for usage_key, per, price in entry.terms:
        total += calc_unit_price(price, counts[usage_key], usage.input_tokens, per)
    if entry.request_price is not None:
        per, price = entry.request_price
        total += calc_unit_price(price, 1, usage.input_tokens, per)
    return total


def _normalized(usage: Usage) -> Usage:
    i, o = usage.input_tokens, usage.output_tokens
    cr, cw = usage.cache_read_tokens, usage.cache_write_tokens
    if i >= 0 and o >= 0 and cr >= 0 and cw >= 0 and cr + cw <= i:
        return usage
    cr, cw, o = max(cr, 0), max(cw, 0), max(o, 0)
    return Usage(max(i, cr + cw), o, cr, cw)


def _to_genai_usage(usage: Usage) -> _GPUsage:
    return _GPUsage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )


def _varies_by_time_of_day(model_info: ModelInfo) -> bool:
    return isinstance(model_info.prices, list) and any(
        isinstance(c.constraint, TimeOfDateConstraint) for c in model_info.prices
    )


def _time_of_day_entry(day: int, model_info: ModelInfo, provider: Provider) -> _Entry:
    """Rates bound every price the model can have; each call is priced in full."""
    if not isinstance(model_info.prices, list):
        return _Entry(day)
    known: list[Rates] = []
    for conditional in model_info.prices:
        rates = _rates(_reachable_prices(conditional.prices))
        if rates is None:
            return _Entry(day)
        known.append(rates)
    if not known:
        return _Entry(day)
    bound = Rates(
        max(r.input_nanocents_per_token for r in known),
        max(r.output_nanocents_per_token for r in known),
        max(r.request_nanocents for r in known),
    )
    return _Entry(day, bound, slow=(model_info, provider))


def _probe_usages(entry: _Entry) -> list[Usage]:
    threshold = 0
    for _, _, price in entry.terms:
        if isinstance(price, TieredPrices):
            threshold = max([threshold, *(tier.start for tier in price.tiers)])
    big = threshold + 123_457
    return [
        Usage(),
        Usage(1_000, 100),
        Usage(10_007, 2_003, 3_001, 1_009),
        Usage(big, 40_009, big // 3, big // 5),
    ]


def _agrees_with_genai_prices(entry: _Entry, model_price: ModelPrice) -> bool:
    """Check the fast path against genai-prices' full calculation."""
    try:
        with localcontext(_DECIMAL_CTX):
            for probe in _probe_usages(entry):
                expected = model_price.calc_price(_to_genai_usage(probe))["total_price"]
                if _fast_cost(entry, probe) != expected:
                    return False
    except Exception:
        logger.exception("genai-prices probe failed")
        return False
    return True
