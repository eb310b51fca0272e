"""One self-contained HTML page for an evaluation: the table, the plot, and every answer token by token.

Each token is coloured by the model that wrote it, and hovering shows the head's P(expert) there (a title
attribute, so it works with no script). Nothing is fetched from elsewhere: styles are inline and the plot
is embedded as a base64 PNG, so the page can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from collm.atomic import write_text

# One colour per source: 0 = base, k = expert k.
SOURCE_COLOURS = ("#dbeafe", "#fed7aa", "#bbf7d0", "#f5d0fe", "#fef08a")
SOURCE_NAMES = ("base", "expert 1", "expert 2", "expert 3", "expert 4")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #111; }
table.summary { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
table.summary th { background: #f3f4f6; }
.example { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; margin: 0.8em 0; }
.prompt { color: #374151; margin-bottom: 0.4em; }
.answer { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em; line-height: 1.6; }
.tok { border-radius: 2px; }
.mark { font-weight: bold; font-size: 1.2em; margin-right: 0.4em; }
.right { color: #15803d; } .wrong { color: #b91c1c; }
.legend span { padding: 2px 8px; margin-right: 8px; border-radius: 3px; }
.meta { color: #6b7280; font-size: 0.85em; }
"""


def render_html(results: dict, png: str | Path | bytes | None = None, system: str = "Co-LLM",
                title: str = "Co-LLM evaluation") -> str:
    """The page for `results` (from `collm.evaluation.evaluate.evaluate`); examples are those of `system`.

    `png`: the calibration plot (a path or the bytes), embedded when given. Falls back to the first system
    with examples when `system` has none.
    """
    shown = _pick_system(results, system)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{_e(title)}</h1>",
             f"<p class='meta'>{results.get('rows', 0)} problems; threshold {results.get('threshold')}</p>",
             system_table(results, ("accuracy", "ci", "defer", "calls", "speed"), html=True)]
    if png is not None:
        data = png if isinstance(png, bytes) else Path(png).read_bytes()
        parts.append(f"<h2>Accuracy against deferral rate</h2><img alt='accuracy against deferral rate' "
                     f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>")
    if shown is not None:
        parts.append(f"<h2>Answers: {_e(shown['name'])}</h2>{_legend(shown)}")
        parts += [example_html(i, example) for i, example in enumerate(shown["examples"])]
    parts.append("</body></html>")
    return "\n".join(parts)


# The columns a results table can show: header, and the cell of a system that was run.
COLUMNS = {
    "accuracy": ("Accuracy", lambda s: f"{s['accuracy']:.3f} ({s['correct']}/{s['total']})"),
    "ci": ("95% CI", lambda s: f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]"),
    "defer": ("Deferral rate", lambda s: f"{s['defer_rate']:.3f}"),
    "share": ("Deferred in numbers", lambda s: "–" if s.get("share_in_numbers") is None
              else f"{s['share_in_numbers']:.1%}"),
    "values": ("Expert tokens in fact values", lambda s: "–" if s.get("share_in_values") is None
               else f"{s['share_in_values']:.1%}"),
    "calls": ("Expert calls", lambda s: f"{s['expert_calls']}"),
    "speed": ("Tokens/s", lambda s: f"{s['tokens_per_s']:.1f}" if s.get("tokens_per_s") else "–"),
}


def system_table(results: dict, columns: tuple[str, ...], *, html: bool = False, footnotes: bool = False) -> str:
    """The one renderer of a results table (Markdown, or HTML with ``html``): a row per system with the named
    COLUMNS; a system that was not run shows "–" and its note. Notes go in a last column, or with ``footnotes``
    after the table, numbered (long notes do not fit a terminal's table)."""
    header = ["System", *(COLUMNS[c][0] for c in columns)] + ([] if footnotes else ["Note"])
    rows, notes = [], []
    for s in results["systems"]:
        name, note = s["name"], s.get("note") or ""
        if footnotes and note:
            notes.append(note)
            name += f" ({len(notes)})"
        cells = [name, *("–" if s.get("accuracy") is None else COLUMNS[c][1](s) for c in columns)]
        rows.append(cells if footnotes else [*cells, note])
    if html:
        cell = lambda tag, v: f"<{tag}>{_e(str(v))}</{tag}>"  # noqa: E731
        return ("<table class='summary'><tr>" + "".join(cell("th", h) for h in header) + "</tr>"
                + "".join("<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows) + "</table>")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if footnotes:
        return "\n".join(lines + [""] + [f"({n}) {note}  " for n, note in enumerate(notes, 1)])
    return "\n".join(lines) + "\n"


def example_html(index: int, example: dict) -> str:
    """One problem: mark, prompt, gold answer, and the answer's tokens coloured by source."""
    mark = "<span class='mark right'>✓</span>" if example["correct"] else "<span class='mark wrong'>✗</span>"
    tokens = "".join(_token(t, s, p) for t, s, p in zip(example["tokens"], example["sources"],
                                                         example["defer_probs"]))
    return (f"<div class='example' id='ex{index}'><div class='prompt'>{mark}<b>#{index + 1}</b> "
            f"{_e(example['prompt'])}</div><div class='meta'>gold answer: {_e(example['answer'])}</div>"
            f"<div class='answer'>{tokens}</div></div>")


def write_html(path: str | Path, results: dict, png: str | Path | bytes | None = None, **kwargs) -> None:
    """Write `render_html(results, png, ...)` to `path` atomically."""
    page = render_html(results, png, **kwargs)
    write_text(path, page)


def _token(text: str, source: int, defer_prob: float) -> str:
    colour = SOURCE_COLOURS[source % len(SOURCE_COLOURS)]
    who = SOURCE_NAMES[source] if source < len(SOURCE_NAMES) else f"expert {source}"
    return (f"<span class='tok' style='background:{colour}' title='{who}; P(expert)={defer_prob:.3f}'>"
            f"{_e(text)}</span>")


def _legend(system: dict) -> str:
    used = sorted({s for example in system["examples"] for s in example["sources"]} | {0, 1})
    items = "".join(f"<span style='background:{SOURCE_COLOURS[s % len(SOURCE_COLOURS)]}'>"
                    f"{SOURCE_NAMES[s] if s < len(SOURCE_NAMES) else f'expert {s}'}</span>" for s in used)
    return f"<p class='legend'>Written by: {items} (hover a token for P(expert))</p>"


def _pick_system(results: dict, name: str) -> dict | None:
    with_examples = [s for s in results["systems"] if s.get("examples")]
    return next((s for s in with_examples if s["name"] == name), with_examples[0] if with_examples else None)


def _e(text) -> str:
    return html.escape(str(text), quote=True)
