"""
GSM8K (Cobbe et al., 2021): grade-school maths word problems whose references end in
`#### <answer>`. The final answer after `####` is compared as a number (commas, `$`, units
and trailing zeros do not matter), following LLM-JEPA (Huang et al., 2025); a "flexible"
variant takes the prediction's last number.
"""

import re
from decimal import Decimal, InvalidOperation


NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d*)?|\.\d+)")


def normalize_number(text: str | None) -> str | None:
    """The first number in `text` in a canonical form: "$1,000.50 dollars" -> "1000.5",
    "18.00" -> "18", "-3" -> "-3"; None when there is no number."""
    if text is None:
        return None
    match = NUMBER.search(text.replace("$", "").replace("\u2212", "-"))  # also the Unicode minus
    if not match:
        return None
    try:
        value = Decimal(match.group().replace(",", "").rstrip("."))
    except InvalidOperation:
        return None
    value = value.normalize()
    return format(value if value != 0 else Decimal(0), "f")  # "f": never 1E+2; -0 -> 0


def gsm8k_final(text: str) -> str | None:
    """What follows the last `####` (GSM8K's answer marker), up to the end of that line."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().split("\n", 1)[0]


def gsm8k_gold(reference: str) -> str:
    """A GSM8K reference's final answer, normalised: the number after `####`, or the whole
    reference when it is a bare number. Anything else is refused (ValueError): the first
    number of a worked solution is an intermediate value, and scoring against it is wrong."""
    final = gsm8k_final(reference)
    if final is None and not NUMBER.fullmatch(reference.strip()):
        raise ValueError(f"the GSM8K reference {reference[:60]!r} has no '#### answer' and is not a bare "
                         "number; end each reference with '#### <number>'")
    gold = normalize_number(reference if final is None else final)
    if gold is None:
        raise ValueError(f"the GSM8K reference's final answer {final!r} (after ####) is not a number")
    return gold


def gsm8k_correct(prediction: str, reference: str, flexible=False) -> bool:
    """Equal final answers, compared as numbers. strict (LLM-JEPA's protocol): the prediction
    must give its answer after ####. flexible: else its last number counts."""
    gold = gsm8k_gold(reference)
    final = gsm8k_final(prediction)
    if final is None and flexible:
        numbers = NUMBER.findall(prediction)
        final = numbers[-1] if numbers else None
    return normalize_number(final) == gold
