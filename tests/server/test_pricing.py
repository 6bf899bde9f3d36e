"""Tests for till.server.pricing against the real, bundled genai-prices data (no mocks)."""

from __future__ import annotations

import dataclasses
import itertools
import socket
import threading
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any, cast

import genai_prices
import pytest
from genai_prices.data import providers as bundled_providers
from genai_prices.data_snapshot import DataSnapshot, set_custom_snapshot

from till.server.pricing import PROVIDER_IDS, Pricer, Rates, Usage, default_pricer

MICROCENTS_PER_USD = 100_000_000
NANOCENTS_PER_USD = 100_000_000_000

KNOWN_MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4o-2024-08-06"),
    ("anthropic", "claude-sonnet-4-5"),
    ("anthropic", "claude-3-5-haiku-20241022"),
    ("google", "gemini-2.5-flash"),
    ("google", "gemini-2.0-flash"),
    ("google", "models/gemini-2.0-flash"),
    ("google", "gemini-2.5-pro"),
]
TIERED_MODELS = [("google", "gemini-2.5-pro"), ("anthropic", "claude-sonnet-4-5")]


def gp_usd(provider: str, model: str, usage: Usage) -> Decimal:
    """What genai-prices itself says, in USD (our Usage maps 1:1 onto genai-prices' Usage)."""
    gp_usage = genai_prices.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )
    model_ref = model.removeprefix("models/")
    return genai_prices.calc_price(
        gp_usage, model_ref, provider_id=PROVIDER_IDS[provider]
    ).total_price


def ceil_int(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def gp_microcents(provider: str, model: str, usage: Usage) -> int:
    return ceil_int(gp_usd(provider, model, usage) * MICROCENTS_PER_USD)


@pytest.fixture
def pricer() -> Pricer:
    return Pricer()


# ---------------------------------------------------------------------------- Usage / Rates


def test_usage_defaults_and_total() -> None:
    assert Usage().total_tokens == 0
    assert Usage(input_tokens=10, output_tokens=5, cache_read_tokens=3).total_tokens == 15
    with pytest.raises(dataclasses.FrozenInstanceError):
        Usage().input_tokens = 1  # type: ignore[misc]


def test_hold_rounds_up_and_ignores_negatives() -> None:
    rates = Rates(input_nanocents_per_token=1, output_nanocents_per_token=3)
    assert rates.hold_microcents(0, 0) == 0
    assert rates.hold_microcents(1, 0) == 1  # 1 n¢ -> 1 µ¢
    assert rates.hold_microcents(1000, 0) == 1
    assert rates.hold_microcents(1001, 0) == 2
    assert rates.hold_microcents(0, 334) == 2  # 1002 n¢
    assert rates.hold_microcents(-5, -7) == 0
    assert Rates(0, 0, request_nanocents=1500).hold_microcents(0, 0) == 2
    assert isinstance(rates.hold_microcents(10**30, 10**30), int)


# ---------------------------------------------------------------------------- known models


@pytest.mark.parametrize(("provider", "model"), KNOWN_MODELS)
def test_known_models_have_rates_and_costs(pricer: Pricer, provider: str, model: str) -> None:
    rates = pricer.rates(provider, model)
    assert rates is not None
    assert rates.input_nanocents_per_token > 0
    assert rates.output_nanocents_per_token > rates.input_nanocents_per_token // 100
    usage = Usage(input_tokens=12_345, output_tokens=678, cache_read_tokens=1_000)
    cost = pricer.cost_microcents(provider, model, usage)
    assert isinstance(cost, int)
    assert cost > 0
    assert cost == gp_microcents(provider, model, usage)
    assert rates.hold_microcents(usage.input_tokens, usage.output_tokens) >= cost


def test_gpt4o_million_input_matches_genai_prices(pricer: Pricer) -> None:
    usage = Usage(input_tokens=1_000_000)
    direct = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1_000_000, output_tokens=0), "gpt-4o", provider_id="openai"
    )
    assert isinstance(direct.total_price, Decimal)
    expected = direct.total_price * MICROCENTS_PER_USD
    assert expected == expected.to_integral_value()  # whole micro-cents, no rounding involved
    assert pricer.cost_microcents("openai", "gpt-4o", usage) == int(expected)
    assert default_pricer.cost_microcents("openai", "gpt-4o", usage) == int(expected)


@pytest.mark.parametrize(("provider", "model"), KNOWN_MODELS)
@pytest.mark.parametrize(
    "usage",
    [
        Usage(),
        Usage(1, 0),
        Usage(0, 1),
        Usage(1_000_000, 1_000_000),
        Usage(50_000, 2_000, 40_000, 0),
        Usage(50_000, 2_000, 0, 40_000),
        Usage(250_000, 9_999, 100_000, 50_000),
    ],
)
def test_cost_equals_genai_prices_rounded_up(
    pricer: Pricer, provider: str, model: str, usage: Usage
) -> None:
    assert pricer.cost_microcents(provider, model, usage) == gp_microcents(provider, model, usage)


def test_rounding_up(pricer: Pricer) -> None:
    # One cached gpt-4o-mini token costs a fraction of a micro-cent.
    usage = Usage(input_tokens=1, cache_read_tokens=1)
    exact = gp_usd("openai", "gpt-4o-mini", usage) * MICROCENTS_PER_USD
    assert exact != exact.to_integral_value()
    cost = pricer.cost_microcents("openai", "gpt-4o-mini", usage)
    assert cost == ceil_int(exact)
    assert cost is not None and cost > exact > cost - 1
    # A single plain token of any priced model is never free.
    assert (pricer.cost_microcents("google", "gemini-2.0-flash", Usage(input_tokens=1)) or 0) >= 1


def test_rates_match_genai_prices_marginal_prices(pricer: Pricer) -> None:
    rates = pricer.rates("openai", "gpt-4o")
    assert rates is not None
    per_input = gp_usd("openai", "gpt-4o", Usage(input_tokens=1)) * NANOCENTS_PER_USD
    per_output = gp_usd("openai", "gpt-4o", Usage(output_tokens=1)) * NANOCENTS_PER_USD
    assert rates.input_nanocents_per_token == ceil_int(per_input)
    assert rates.output_nanocents_per_token == ceil_int(per_output)
    assert rates.request_nanocents == 0


def test_rates_use_highest_tier_and_dearest_input(pricer: Pricer) -> None:
    # claude-sonnet-4-5: dearest input token is a cache write above the 200k tier.
    n = 200_001
    rates = pricer.rates("anthropic", "claude-sonnet-4-5")
    assert rates is not None
    top_write = gp_usd("anthropic", "claude-sonnet-4-5", Usage(n, 0, 0, n)) / n
    top_output = gp_usd("anthropic", "claude-sonnet-4-5", Usage(n, 1)) - gp_usd(
        "anthropic", "claude-sonnet-4-5", Usage(n, 0)
    )
    assert rates.input_nanocents_per_token == ceil_int(top_write * NANOCENTS_PER_USD)
    assert rates.output_nanocents_per_token == ceil_int(top_output * NANOCENTS_PER_USD)
    base_output = gp_usd("anthropic", "claude-sonnet-4-5", Usage(10, 1)) - gp_usd(
        "anthropic", "claude-sonnet-4-5", Usage(10, 0)
    )
    assert top_output > base_output  # the model really is tiered


def test_tier_cliff_applies_above_threshold(pricer: Pricer) -> None:
    below = pricer.cost_microcents("google", "gemini-2.5-pro", Usage(200_000, 1_000))
    above = pricer.cost_microcents("google", "gemini-2.5-pro", Usage(200_001, 1_000))
    assert below is not None and above is not None
    assert above > below * 1.5
    assert above == gp_microcents("google", "gemini-2.5-pro", Usage(200_001, 1_000))


def test_rates_are_cached(pricer: Pricer) -> None:
    first = pricer.rates("openai", "gpt-4o")
    assert first is not None
    assert pricer.rates("openai", "gpt-4o") is first


# ---------------------------------------------------------------------------- caching semantics


@pytest.mark.parametrize(
    ("provider", "model"), [("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5")]
)
def test_cache_read_is_cheaper(pricer: Pricer, provider: str, model: str) -> None:
    uncached = pricer.cost_microcents(provider, model, Usage(input_tokens=1_000_000))
    cached = pricer.cost_microcents(
        provider, model, Usage(input_tokens=1_000_000, cache_read_tokens=1_000_000)
    )
    half = pricer.cost_microcents(
        provider, model, Usage(input_tokens=1_000_000, cache_read_tokens=500_000)
    )
    assert uncached is not None and cached is not None and half is not None
    assert cached < half < uncached
    assert cached == gp_microcents(provider, model, Usage(1_000_000, 0, 1_000_000))


def test_anthropic_cache_write_is_priced_as_cache_write(pricer: Pricer) -> None:
    model = "claude-sonnet-4-5"
    plain = pricer.cost_microcents("anthropic", model, Usage(input_tokens=100_000))
    written = pricer.cost_microcents(
        "anthropic", model, Usage(input_tokens=100_000, cache_write_tokens=100_000)
    )
    assert plain is not None and written is not None
    assert written > plain  # 5-minute cache writes cost 1.25x input
    assert written == gp_microcents("anthropic", model, Usage(100_000, 0, 0, 100_000))
    mixed = Usage(input_tokens=100_000, cache_read_tokens=30_000, cache_write_tokens=20_000)
    assert pricer.cost_microcents("anthropic", model, mixed) == gp_microcents(
        "anthropic", model, mixed
    )


def test_openai_cache_write_is_ordinary_input(pricer: Pricer) -> None:
    plain = pricer.cost_microcents("openai", "gpt-4o", Usage(input_tokens=100_000))
    written = pricer.cost_microcents(
        "openai", "gpt-4o", Usage(input_tokens=100_000, cache_write_tokens=100_000)
    )
    assert plain is not None and plain == written


# ---------------------------------------------------------------------------- holds bound costs


def _combos(threshold: int) -> list[Usage]:
    inputs = [0, 1, 999, 50_000, threshold, threshold + 1, 2 * threshold + 17, 1_000_003]
    outputs = [0, 1, 8_192, 65_537]
    usages = []
    for total_in, out in itertools.product(inputs, outputs):
        for read_frac, write_frac in [(0, 0), (1, 0), (0, 1), (0.5, 0.25), (0.1, 0.9)]:
            read = int(total_in * read_frac)
            write = min(int(total_in * write_frac), total_in - read)
            usages.append(Usage(total_in, out, read, write))
    return usages


@pytest.mark.parametrize(("provider", "model"), [*KNOWN_MODELS, *TIERED_MODELS])
def test_hold_bounds_actual_cost(pricer: Pricer, provider: str, model: str) -> None:
    rates = pricer.rates(provider, model)
    assert rates is not None
    for usage in _combos(200_000):
        cost = pricer.cost_microcents(provider, model, usage)
        assert cost is not None
        assert rates.hold_microcents(usage.input_tokens, usage.output_tokens) >= cost, usage


def test_hold_bounds_cost_for_every_priced_model() -> None:
    pricer = Pricer()
    usages = _combos(200_000)[::7]
    priced = 0
    for provider, gp_id in PROVIDER_IDS.items():
        gp_provider = next(p for p in bundled_providers if p.id == gp_id)
        for model_info in gp_provider.models:
            rates = pricer.rates(provider, model_info.id)
            if rates is None:
                assert pricer.cost_microcents(provider, model_info.id, Usage(1, 1)) is None
                continue
            priced += 1
            for usage in usages:
                cost = pricer.cost_microcents(provider, model_info.id, usage)
                assert cost is not None, (provider, model_info.id)
                hold = rates.hold_microcents(usage.input_tokens, usage.output_tokens)
                assert hold >= cost, (provider, model_info.id, usage)
    assert priced > 100


# ---------------------------------------------------------------------------- odd input


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "no-such-model-xyz"),
        ("openai", ""),
        ("openai", "   "),
        ("openai", "models/"),
        ("openai", "gpt-4o" * 1_000),
        ("anthropic", "gpt-4o-but-not-really-\x00"),
        ("azure", "gpt-4o"),
        ("", "gpt-4o"),
        ("openai", "tts-1"),  # priced per character, not per token
        ("openai", "whisper-1"),  # priced per audio hour
    ],
)
def test_unknown_gives_none(pricer: Pricer, provider: str, model: str) -> None:
    assert pricer.rates(provider, model) is None
    assert pricer.cost_microcents(provider, model, Usage(10, 10)) is None


def test_wrong_types_do_not_raise(pricer: Pricer) -> None:
    for provider, model in [(None, "gpt-4o"), ("openai", None), (["x"], "gpt-4o"), ("openai", 42)]:
        assert pricer.rates(cast(Any, provider), cast(Any, model)) is None
        assert pricer.cost_microcents(cast(Any, provider), cast(Any, model), Usage(1, 1)) is None
    assert pricer.cost_microcents("openai", "gpt-4o", cast(Any, None)) is None


def test_models_prefix_is_stripped(pricer: Pricer) -> None:
    usage = Usage(input_tokens=123_456, output_tokens=7_890, cache_read_tokens=100_000)
    for model in ["gemini-2.0-flash", "gemini-2.5-flash", "gemini-2.5-pro"]:
        plain = pricer.cost_microcents("google", model, usage)
        assert plain is not None
        assert pricer.cost_microcents("google", f"models/{model}", usage) == plain
        assert pricer.rates("google", f"models/{model}") == pricer.rates("google", model)


def test_provider_and_model_names_are_case_insensitive(pricer: Pricer) -> None:
    usage = Usage(1_000, 1_000)
    expected = pricer.cost_microcents("openai", "gpt-4o", usage)
    assert pricer.cost_microcents("OpenAI", "GPT-4o", usage) == expected


def test_zero_and_negative_tokens(pricer: Pricer) -> None:
    assert pricer.cost_microcents("openai", "gpt-4o", Usage()) == 0
    negative = Usage(input_tokens=-5, output_tokens=-1, cache_read_tokens=-3, cache_write_tokens=-2)
    assert pricer.cost_microcents("openai", "gpt-4o", negative) == 0
    assert pricer.cost_microcents("openai", "gpt-4o", Usage(1_000, -10)) == (
        pricer.cost_microcents("openai", "gpt-4o", Usage(1_000, 0))
    )


def test_cache_tokens_exceeding_input_are_treated_as_input(pricer: Pricer) -> None:
    bad = Usage(input_tokens=10, output_tokens=0, cache_read_tokens=600, cache_write_tokens=400)
    fixed = Usage(
        input_tokens=1_000, output_tokens=0, cache_read_tokens=600, cache_write_tokens=400
    )
    cost = pricer.cost_microcents("anthropic", "claude-sonnet-4-5", bad)
    assert cost is not None
    assert cost == pricer.cost_microcents("anthropic", "claude-sonnet-4-5", fixed)


def test_huge_numbers(pricer: Pricer) -> None:
    huge = Usage(input_tokens=10**30, output_tokens=10**30)
    rates = pricer.rates("openai", "gpt-4o")
    assert rates is not None
    cost = pricer.cost_microcents("openai", "gpt-4o", huge)
    assert isinstance(cost, int)
    assert cost == rates.hold_microcents(10**30, 10**30)  # untiered, no cache: exact
    enormous = Usage(input_tokens=10**100, output_tokens=10**100, cache_read_tokens=10**99)
    assert isinstance(pricer.cost_microcents("google", "gemini-2.5-pro", enormous), int)


def test_cache_is_bounded() -> None:
    pricer = Pricer(max_entries=16)
    for i in range(100):
        assert pricer.rates("openai", f"unknown-model-{i}") is None
        assert pricer.rates("openai", "gpt-4o") is not None
    assert len(pricer._entries) <= 16
    pricer.clear()
    assert len(pricer._entries) == 0


# ---------------------------------------------------------------------------- data source


def test_uses_bundled_data_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("pricing must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    pricer = Pricer()
    for provider, model in KNOWN_MODELS:
        assert pricer.cost_microcents(provider, model, Usage(1_000, 1_000)) is not None
    assert not any(t.name.startswith("genai_prices") for t in threading.enumerate())


def test_ignores_genai_prices_global_snapshot() -> None:
    # An UpdatePrices task elsewhere in the process swaps genai-prices' global snapshot; Till's
    # prices must stay on the bundled data.
    expected = Pricer().cost_microcents("openai", "gpt-4o", Usage(1_000, 1_000))
    set_custom_snapshot(DataSnapshot(providers=[], from_auto_update=True))
    try:
        assert Pricer().cost_microcents("openai", "gpt-4o", Usage(1_000, 1_000)) == expected
    finally:
        set_custom_snapshot(None)


def test_time_of_day_priced_models_are_bounded() -> None:
    # No OpenAI/Anthropic/Google model has time-of-day prices today; DeepSeek's off-peak prices
    # exercise that path, served here under the "openai" id.
    deepseek = next(p for p in bundled_providers if p.id == "deepseek")
    pricer = Pricer(providers=[dataclasses.replace(deepseek, id="openai")])
    model_info = deepseek.find_model("deepseek-chat")
    assert model_info is not None and isinstance(model_info.prices, list)
    rates = pricer.rates("openai", "deepseek-chat")
    assert rates is not None
    for usage in _combos(200_000)[::5]:
        cost = pricer.cost_microcents("openai", "deepseek-chat", usage)
        assert cost is not None
        assert rates.hold_microcents(usage.input_tokens, usage.output_tokens) >= cost
    usage = Usage(1_000_000, 1_000_000, 200_000)
    gp_usage = genai_prices.Usage(
        input_tokens=1_000_000, output_tokens=1_000_000, cache_read_tokens=200_000
    )
    now = datetime.now(UTC)
    direct = model_info.calc_price(gp_usage, deepseek, genai_request_timestamp=now).total_price
    cost = pricer.cost_microcents("openai", "deepseek-chat", usage)
    # A price boundary could pass between the two calls; then the other price applies.
    prices = {
        ceil_int(c.prices.calc_price(gp_usage)["total_price"] * MICROCENTS_PER_USD)
        for c in model_info.prices
    }
    assert cost in prices
    assert ceil_int(direct * MICROCENTS_PER_USD) in prices


def test_every_priced_model_takes_the_integer_path_and_it_agrees() -> None:
    """Each model genai-prices prices by tokens (not by time of day) is costed in integers,
    and that figure is the Decimal path's (rounded up to a micro-cent) on varied usages,
    tier thresholds included."""
    import random
    from decimal import localcontext

    from till.server.pricing import _DECIMAL_CTX, _fast_cost

    pricer = Pricer()
    rng = random.Random(6)
    checked = 0
    for provider in bundled_providers:
        if provider.id not in PROVIDER_IDS.values():
            continue
        for model in provider.models:
            entry = pricer._entry(provider.id, model.id)
            if entry.rates is None or entry.slow is not None:
                continue
            assert entry.exact is not None, model.id
            for _ in range(60):
                total = rng.choice([0, 1, 999, 128_000, 200_000, 200_001, 10**7])
                total += rng.randint(0, 5)
                cache_read = rng.randint(0, total)
                cache_write = rng.randint(0, total - cache_read)
                usage = Usage(total, rng.randint(0, 10**6), cache_read, cache_write)
                with localcontext(_DECIMAL_CTX):
                    usd = _fast_cost(entry, usage)
                want = int((usd * MICROCENTS_PER_USD).to_integral_value(rounding=ROUND_CEILING))
                assert entry.exact.microcents(usage) == want, (model.id, usage)
            checked += 1
    assert checked > 50
