"""Text metrics for generation-based evaluation: each scores a list of predictions against references.

Every metric is a number for the whole set (a mean over examples unless said otherwise):
- exact_match: prediction == reference after stripping surrounding whitespace (what training has logged
  as eval_exact_match from the start).
- accuracy: exact match after normalisation, so an answer that is right but formatted differently (case,
  punctuation, spacing, articles; pretty-printed instead of compact JSON) counts: the normalised token
  sequences (see `tokens`) are equal.
- token_precision / token_recall / token_f1: SQuAD's bag-of-tokens overlap per example, on `tokens`;
  an empty side scores 1 if both are empty, else 0 (SQuAD's rule).
- bleu: sacrebleu's corpus BLEU (0-100, its default 13a tokenizer), one reference per prediction: a
  corpus statistic, not a mean of sentence scores.
- rouge1 / rouge2 / rougeL: rouge-score's F-measure per example, with Porter stemming (use_stemmer=True,
  as the original ROUGE-1.5.5 `-m` and most summarisation papers report it); rougeL is the sentence-level
  LCS variant (no newline splitting).
- json_valid: the prediction parses as a JSON object or array (a bare number or string is not structured
  output).
- json_field_accuracy: the reference is a JSON object; the share of its keys whose values the prediction
  (parsed as a JSON object; anything else scores 0) has equal.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Callable, Iterable

from ftcluster.errors import ConfigError

# Each family computes its metrics together (one ROUGE pass gives all three variants).
FAMILIES = {
    "exact_match": ("exact_match",),
    "accuracy": ("accuracy",),
    "token": ("token_precision", "token_recall", "token_f1"),
    "bleu": ("bleu",),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "json": ("json_valid", "json_field_accuracy"),
}
METRICS = tuple(name for names in FAMILIES.values() for name in names)
_FAMILY_OF = {name: family for family, names in FAMILIES.items() for name in names}
ROUGE_USES_STEMMER = True

_PUNCTUATION = re.compile(r"[^\w\s]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation (lower case, articles dropped, whitespace collapsed), except that
    punctuation becomes a space instead of vanishing: compact JSON such as {"name":"Irene"} still splits
    into the tokens name, irene rather than fusing into one."""
    return _ARTICLES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).split()


def token_overlap(prediction: str, reference: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of one prediction's tokens against its reference's, as bags."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        same = float(pred == ref)
        return same, same, same
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(pred), common / len(ref)
    return precision, recall, 2 * precision * recall / (precision + recall)


def json_object(text: str) -> dict | None:
    """`text` parsed as a JSON object, or None when it is anything else."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def field_share(parsed: dict, expected: dict) -> float:
    """The share of `expected`'s keys whose values `parsed` has equal."""
    return sum(key in parsed and parsed[key] == value for key, value in expected.items()) / max(1, len(expected))


def compute(names: Iterable[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """The metrics `names` (from METRICS) of `predictions` against `references`, in the order asked."""
    names = list(names)
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references, at least one: got {len(predictions)} and "
                         f"{len(references)}")
    results: dict[str, float] = {}
    for family in dict.fromkeys(_FAMILY_OF[name] for name in names):
        results.update(_SCORERS[family](predictions, references))
    return {name: results[name] for name in names}


def check_names(names: Iterable[str], key: str) -> None:
    unknown = [name for name in names if name not in _FAMILY_OF]
    if unknown:
        raise ConfigError(key, f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")


def check_references(names: Iterable[str], references: list[str], key: str, where: str) -> None:
    """json_field_accuracy compares fields, so every reference must be a JSON object: checked before any
    model is loaded, naming the first that is not."""
    if "json_field_accuracy" not in names:
        return
    for index, reference in enumerate(references):
        if json_object(reference.strip()) is None:
            shown = reference if len(reference) <= 60 else reference[:60] + "..."
            raise ConfigError(key, f"json_field_accuracy needs references that are JSON objects, but eval example "
                                   f"{index + 1} of {where} has the reference {shown!r}; drop json_field_accuracy "
                                   f"from {key} for this data")


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def _exact(predictions: list[str], references: list[str]) -> dict:
    return {"exact_match": _mean(exact_match(p, r) for p, r in zip(predictions, references))}


def _accuracy(predictions: list[str], references: list[str]) -> dict:
    return {"accuracy": _mean(tokens(p) == tokens(r) for p, r in zip(predictions, references))}


def _token(predictions: list[str], references: list[str]) -> dict:
    scores = [token_overlap(p, r) for p, r in zip(predictions, references)]
    return {"token_precision": _mean(s[0] for s in scores), "token_recall": _mean(s[1] for s in scores),
            "token_f1": _mean(s[2] for s in scores)}


def _bleu(predictions: list[str], references: list[str]) -> dict:
    import sacrebleu  # not at the top: ftcluster.config imports this module, and this would double its import time

    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}


def _rouge(predictions: list[str], references: list[str]) -> dict:
    from rouge_score import rouge_scorer  # not at the top: it imports nltk (~2 s), for ROUGE only

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=ROUGE_USES_STEMMER)
    # score(target, prediction): the reference comes first.
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {name: _mean(s[name].fmeasure for s in scores) for name in ("rouge1", "rouge2", "rougeL")}


def _json(predictions: list[str], references: list[str]) -> dict:
    parsed = [_structured(p) for p in predictions]
    expected = [json_object(r.strip()) for r in references]
    return {"json_valid": _mean(value is not None for value in parsed),
            "json_field_accuracy": _mean(field_share(value, want) if isinstance(value, dict) and want is not None
                                         else 0.0 for value, want in zip(parsed, expected))}


def _structured(text: str) -> dict | list | None:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


_SCORERS: dict[str, Callable[[list[str], list[str]], dict]] = {
    "exact_match": _exact, "accuracy": _accuracy, "token": _token, "bleu": _bleu, "rouge": _rouge, "json": _json,
}
