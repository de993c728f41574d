"""eval.md: the metrics of the base and tuned models side by side with their deltas, forgetting (general-text
perplexity before and after tuning), and example outputs where the two models answer differently.

Rendered from eval.json's content and outputs.jsonl's rows only, so the report never says anything the
machine-readable files do not.
"""

from __future__ import annotations

import re

# Shown with 2 decimals; the 0-1 scores with 3.
_WIDE_SCALE = ("perplexity", "bleu")


def render(summary: dict, rows: list[dict], max_examples: int) -> str:
    models = summary["models"]
    roles = [role for role in ("base", "tuned") if role in models]
    lines = [f"# Evaluation: {models['tuned']['spec']}" + (f" vs {models['base']['spec']}" if "base" in models else ""),
             "", _setting_line(summary), ""]
    lines += _metrics_section(models, roles)
    lines += _forgetting_section(summary, models)
    lines += _examples_section(rows, "base" in models, max_examples)
    return "\n".join(lines).rstrip() + "\n"


def _setting_line(summary: dict) -> str:
    data, s = summary["data"], summary["settings"]
    where = data["eval_path"] or f"{data['path']} (held out: data.eval_fraction={data['eval_fraction']})"
    general = summary["general"]
    return (f"Eval data: `{where}` ({data['format']}, {data['examples']} examples, {data['eval_tokens']} scored tokens, "
            f"{data['prompts']} prompts). General text: "
            + (f"`{general['path']}` ({general['documents']} documents, {general['tokens']} tokens)" if general
               else "none (eval.general=null)")
            + f". Greedy decoding, up to {s['max_new_tokens']} new tokens, {s['precision']}, {s['workers']} worker(s).")


def _metrics_section(models: dict, roles: list[str]) -> list[str]:
    names = ["perplexity"] + list(models["tuned"]["metrics"])
    compare = len(roles) == 2
    lines = ["## Metrics", "", "Perplexity is on the eval split's answer tokens (as training's eval_ppl); the other "
             "rows score the greedy answers against the references (BLEU on 0-100, the rest on 0-1).", "",
             "| metric | " + " | ".join(roles) + (" | delta |" if compare else " |"),
             "|---|" + "---:|" * (len(roles) + compare)]
    for name in names:
        values = [_value(models[role], name) for role in roles]
        row = f"| {name} | " + " | ".join(_fmt(name, v) for v in values)
        if compare:
            row += f" | {_delta(name, values[0], values[1])}"
        lines.append(row + " |")
    return lines + [""]


def _value(entry: dict, name: str) -> float | None:
    return entry["perplexity"] if name == "perplexity" else entry["metrics"].get(name)


def _forgetting_section(summary: dict, models: dict) -> list[str]:
    lines = ["## Forgetting", ""]
    forgetting = summary["forgetting"]
    if summary["general"] is None:
        return lines + ["Not measured: eval.general=null.", ""]
    if forgetting is None:
        after = models["tuned"]["general_perplexity"]
        return lines + [f"No baseline to compare with; the model's perplexity on the general text is {after:.2f}.", ""]
    before, after, ratio = (forgetting[k] for k in ("general_perplexity_before", "general_perplexity_after", "ratio"))
    change = "rose" if ratio > 1 else "fell" if ratio < 1 else "stayed"
    return lines + ["Perplexity on general text the tuning never saw, before (base) and after (tuned):", "",
                    "| | before | after | after / before |", "|---|---:|---:|---:|",
                    f"| general perplexity | {before:.2f} | {after:.2f} | {ratio:.3f} |", "",
                    f"General-text perplexity {change} by {abs(ratio - 1):.1%} with tuning"
                    + (" (higher means more forgetting)." if ratio != 1 else "."), ""]


def _examples_section(rows: list[dict], compare: bool, max_examples: int) -> list[str]:
    if not rows:
        return ["## Examples", "", "No answers were generated (eval.metrics=[]).", ""]
    if compare:
        lines = ["## Examples where base and tuned differ", ""]
        chosen = [row for row in rows if row["base"].strip() != row["tuned"].strip()]
        lines.append(f"{len(chosen)} of {len(rows)} answers differ" + (f"; the first {min(len(chosen), max_examples)}:"
                                                                       if chosen else "."))
    else:
        lines = ["## Examples the model gets wrong", ""]
        chosen = [row for row in rows if row["tuned"].strip() != row["reference"].strip()]
        lines.append(f"No baseline; {len(chosen)} of {len(rows)} answers are not exact matches"
                     + (f"; the first {min(len(chosen), max_examples)}:" if chosen else "."))
    lines.append("")
    for row in chosen[:max_examples]:
        lines += [f"### Example {row['index'] + 1}", ""]
        fields = [("prompt", _last_user_turn(row["prompt"])), ("reference", row["reference"])]
        fields += [(role, row[role]) for role in (("base", "tuned") if compare else ("tuned",))]
        for label, text in fields:
            lines += [f"**{label}**", "", *_fenced(text), ""]
    return lines


def _last_user_turn(prompt: list[dict]) -> str:
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def _fenced(text: str) -> list[str]:
    # A fence longer than any run of backticks in the text, so an answer cannot close it early.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if name in _WIDE_SCALE else f"{value:.3f}"


def _delta(name: str, base: float | None, tuned: float | None) -> str:
    if base is None or tuned is None:
        return "n/a"
    diff = tuned - base
    return f"{diff:+.2f}" if name in _WIDE_SCALE else f"{diff:+.3f}"
