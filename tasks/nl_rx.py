"""
NL-RX-SYNTH / TURK (Locascio et al., 2016): English descriptions to regular expressions.
Scored by exact match, as LLM-JEPA (Huang et al., 2025) reports it (tasks/common.py), plus an
equivalence score on a canonical form of the regex (sound, not complete: see
`regex_canonical`).
"""

import re


# NL-RX regexes use brics-automaton syntax (Locascio et al. evaluate with a brics DFA check):
# `&` is intersection and `~` complement, neither of which Python's `re` knows. A complete
# DFA-equivalence check would need the meaning of `\b`, which brics does not define as a word
# boundary and NL-RX's Java evaluator does not document; any choice would be ours, not theirs.
# So we compare canonical forms instead, using only laws that hold whatever `\b` means:
# grouping, associativity, commutativity and idempotence of | and &, (X*)* = X*, and
# X*X* = X*. Equal canonical forms imply equal languages (sound); some equal languages
# keep different forms (incomplete), so the score is a lower bound on DFA equivalence.
REGEX_TOKEN = re.compile(r"\\.|\[[^\]]*\]|\{\d*,?\d*\}|.", re.S)


def regex_canonical(regex: str):
    """Parse an NL-RX regex (brics precedence: | < & < concatenation < postfix < ~) into a
    canonical tree of tuples. Raises ValueError on malformed input."""
    tokens = REGEX_TOKEN.findall(regex)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def nary(op, parts):  # flatten, dedupe, sort: | and & are associative, commutative, idempotent
        flat = set()
        for p in parts:
            flat.update(p[1] if p[0] == op else (p,))
        return next(iter(flat)) if len(flat) == 1 else (op, tuple(sorted(flat, key=repr)))

    def union():
        parts = [inter()]
        while peek() == "|":
            take()
            parts.append(inter())
        return nary("|", parts)

    def inter():
        parts = [concat()]
        while peek() == "&":
            take()
            parts.append(concat())
        return nary("&", parts)

    def concat():
        parts = []
        while peek() not in (None, "|", "&", ")"):
            node = repeat()
            parts += node[1] if node[0] == "cat" else [node]
        merged = []
        for node in parts:  # X*X* = X*
            if not (merged and node == merged[-1] and node[0] == "rep" and node[2:] == (0, None)):
                merged.append(node)
        if not merged:
            return ("empty",)  # "()" or an empty alternative: the empty string
        return merged[0] if len(merged) == 1 else ("cat", tuple(merged))

    def repeat():
        node = complement()
        while peek() is not None and (peek() in "*+?" or peek().startswith("{")):
            lo, hi = bounds(take())
            if node[0] == "rep" and node[3] is None and hi is None and {node[2], lo} <= {0, 1}:
                node = ("rep", node[1], node[2] * lo, None)  # (X*)+ = (X+)* = X*, (X+)+ = X+
            else:
                node = ("rep", node, lo, hi)
        return node

    def complement():
        if peek() == "~":
            take()
            return ("not", complement())
        return atom()

    def atom():
        tok = take() if peek() is not None else None
        if tok == "(":
            node = union()
            if peek() != ")":
                raise ValueError(f"regex {regex!r}: unbalanced parenthesis")
            take()
            return node
        if tok is None or tok in ")|&*+?" or tok.startswith("{"):
            raise ValueError(f"regex {regex!r}: unexpected {tok or 'end'}")
        if tok.startswith("[") and len(tok) > 2:
            chars = char_class(tok[1:-1])
            return ("lit", chars) if len(chars) == 1 else ("class", chars)
        return ("any",) if tok == "." else ("lit", tok)

    def bounds(tok):
        if tok in "*+?":
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[tok]
        lo, comma, hi = tok[1:-1].partition(",")
        if not lo.isdigit():
            raise ValueError(f"regex {regex!r}: bad repetition {tok}")
        return int(lo), (int(hi) if hi else None) if comma else int(lo)

    def char_class(body):
        if body.startswith("^"):
            raise ValueError(f"regex {regex!r}: negated classes are not NL-RX syntax")
        chars, i = set(), 0
        while i < len(body):
            if i + 2 < len(body) and body[i + 1] == "-":
                chars.update(map(chr, range(ord(body[i]), ord(body[i + 2]) + 1)))
                i += 3
            else:
                chars.add(body[i])
                i += 1
        return "".join(sorted(chars))

    tree = union()
    if pos != len(tokens):
        raise ValueError(f"regex {regex!r}: unexpected {tokens[pos]!r} at token {pos}")
    return tree


def regex_equivalent(prediction: str, reference: str) -> bool:
    try:
        return regex_canonical(prediction.strip()) == regex_canonical(reference.strip())
    except ValueError:
        return False  # an unparsable prediction is wrong
