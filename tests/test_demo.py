"""arm_int4.demo's recommendation: which measured row to deploy, and why (the demo itself runs in
.ci/run beside the tests: `arm-int4 demo --quick`)."""

from pathlib import Path

from arm_int4.demo import DemoRow, recommend

MIB = 2**20


def _rows(*specs):
    """(label, MiB, ppl, x86 fallback) → DemoRows; the first is the BF16 baseline."""
    return [
        DemoRow(label, Path(f"/m/{i}"), int(mib * MIB), 0, 0.0, ppl, x86_fallback=x86)
        for i, (label, mib, ppl, x86) in enumerate(specs)
    ]


def test_the_smallest_model_within_budget_is_recommended():
    rows = _rows(
        ("BF16", 270, 20.0, False), ("cw", 160, 40.0, True), ("g32", 170, 25.0, True), ("budget", 200, 21.5, True)
    )
    text = recommend(rows, 10)
    assert text.startswith("deploy: budget (/m/3): 200 MiB (0.74× BF16), perplexity 21.50 (+7.5% over BF16 20.00)")
    assert "the smallest INT4 model within 10% of BF16's perplexity" in text
    assert "cw +100.0% at 160 MiB; g32 +25.0% at 170 MiB" in text and "x86 reference fallback" in text
    # two within budget: the smaller wins
    rows.append(DemoRow("budget-b", Path("/m/4"), 190 * MIB, 0, 0.0, 21.9))
    assert recommend(rows, 10).startswith("deploy: budget-b (/m/4)")


def test_when_none_is_within_budget_the_most_accurate_is_named_as_such():
    rows = _rows(("BF16", 270, 20.0, False), ("cw", 160, 40.0, False), ("g32", 170, 25.0, False))
    text = recommend(rows, 10)
    assert text.startswith("deploy: g32 (/m/2)") and "no INT4 model here is within 10%" in text
    assert "fallback" not in text
    assert recommend(_rows(("BF16", 270, None, False)), 10) == "deploy: no recommendation (perplexity was not measured)"
