"""The knowledge update, measured on the test questions that use a changed fact (facts.sh stage 8).

    python research/facts/update_report.py --before runs/facts/eval-test-tuned-qa \
        --after runs/facts/eval-update --updated runs/facts/data-update/test.jsonl \
        --out runs/facts/update.md

The same questions before and after: the original test set's rows are matched by prompt to the updated set's
rows marked ``changed`` (the question text is the same; the answer moved with the changed fact). For each system
in both evaluations: its accuracy on those questions before the update (against the old answers), the same old
answers graded against the new answers (stale knowledge: what the update must fix), and after the update
(against the new answers), with 95% Wilson intervals; and after / before, the target's ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from collm.atomic import write_text
from collm.data.answer import extract_answer
from collm.evaluation.evaluate import wilson_interval


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="qwen_eval's --out on the original test set")
    p.add_argument("--after", type=Path, required=True, help="qwen_eval's --out (--changed-only) after the update")
    p.add_argument("--updated", type=Path, required=True, help="the updated set's test.jsonl")
    p.add_argument("--out", type=Path, help="write the table here (markdown)")
    a = p.parse_args()
    before, after = systems(a.before), systems(a.after)
    new_answer = {row["prompt"]: row["answer"] for row in map(json.loads, a.updated.read_text().splitlines())
                  if row.get("changed")}
    lines = [f"Test questions that use a changed fact: {len(new_answer)}.", "",
             "| system | before the update | before, graded by the new answers | after the update | after / before |",
             "| --- | --- | --- | --- | --- |"]
    later = {s["name"]: s for s in after}
    for system in before:
        if system["name"] not in later or not system.get("examples"):
            continue
        rows = [e for e in system["examples"] if e["prompt"] in new_answer]
        if len(rows) != len(new_answer):
            raise SystemExit(f"{system['name']}: {len(rows)} of the {len(new_answer)} changed questions are in "
                             f"{a.before}: evaluate the whole test set before the update")
        old = sum(e["correct"] for e in rows)
        stale = sum(extract_answer(e["text"]) == new_answer[e["prompt"]] for e in rows)
        now = [e for e in later[system["name"]]["examples"] if e["prompt"] in new_answer]
        fresh = sum(e["correct"] for e in now)
        ratio = f"{fresh / len(now) / (old / len(rows)):.2f}" if old and now else "n/a"
        lines.append(f"| {system['name']} | {_cell(old, len(rows))} | {_cell(stale, len(rows))} | "
                     f"{_cell(fresh, len(now))} | {ratio} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.out:
        write_text(a.out, table)


def systems(folder: Path) -> list[dict]:
    """Every system qwen_eval decoded into ``folder`` (its system-*.json files, one per system, as each
    finished), in name order."""
    found = [json.loads(path.read_text()) for path in sorted(folder.glob("system-*.json"))]
    if not found:
        raise SystemExit(f"{folder} holds no system-*.json: run qwen_eval.py with --out {folder} first")
    return found


def _cell(correct: int, total: int) -> str:
    if not total:
        return "n/a"
    low, high = wilson_interval(correct, total)
    return f"{correct}/{total} = {correct / total:.1%} [{low:.1%}, {high:.1%}]"


if __name__ == "__main__":
    main()
