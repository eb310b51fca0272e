"""`collm demo`: answer a few shipped held-out problems three ways, then print the shipped results."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from collm.demo.shipped import ASSETS, PAIRS, verify
from collm.errors import CollmError


@dataclass
class DemoConfig:
    """What `collm demo` shows."""

    count: int = 3
    """Held-out problems to answer, from 1 to the number shipped (3)."""
    max_new_tokens: int = 256
    """Most new tokens per answer."""
    device: str = "cpu"
    """Torch device."""
    threshold: float | None = None
    """Co-LLM's threshold in [0, 1]. Default: the shipped run's calibrated one."""
    pair: str = "smollm2"
    """smollm2 (embedded) or qwen (Qwen2.5-Coder 0.5B + 1.5B; needs scripts/install.sh --qwen)."""
    lookahead: int = 1
    """Co-LLM drafts past deferrals, up to this many tokens per expert check (1: no drafting)."""
    rewind: float = 0.0
    """Co-LLM's expert re-writes a base token it gives a probability below this (0: off)."""

    def __post_init__(self):
        if self.pair not in PAIRS:
            raise CollmError(f"--pair must be one of {', '.join(PAIRS)}, got {self.pair!r}")


def run(console, folder: Path = ASSETS, count: int = 3, max_new_tokens: int = 256, device: str = "cpu",
        threshold: float | None = None, lookahead: int = 1, rewind: float = 0.0) -> None:
    """Load the shipped run, answer `count` of its problems three ways, print the shipped results table.

    Co-LLM runs at ``threshold`` (default: the run's calibrated one). Where that threshold never defers
    (calibration found no threshold better than the base alone), it also runs at 0.5, so the colors show
    where the head would hand tokens to the expert."""
    from rich.markdown import Markdown

    from collm.backends.models import check_device
    from collm.core.request import make_request
    from collm.data.answer import extract_answer
    from collm.decoding.provenance import colored, legend
    from collm.pair import CoLLM

    # Every setting is checked before the model loads and decodes (~20 s), not after.
    make_request(max_new_tokens=max_new_tokens, threshold=threshold, lookahead=lookahead, rewind=rewind)
    check_device(device)
    verify(folder)
    shipped = json.loads((folder / "problems.json").read_text(encoding="utf-8"))
    available = len(shipped["problems"])
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= available:
        raise CollmError(f"--count must be between 1 and {available} (the held-out problems shipped), got {count}")
    problems = shipped["problems"][:count]
    described = "SmolLM2-135M-Instruct + two adapters" if folder == ASSETS else folder.name
    with console.status(f"loading the shipped run ({described})"):
        # checks every file against the manifest again; the Qwen run decodes in bfloat16 (2x faster on CPU)
        pair = CoLLM.from_pretrained(folder, device=device, dtype=None if folder == ASSETS else "bfloat16")
    prompts = [p["prompt"] for p in problems]
    threshold = pair.threshold if threshold is None else threshold
    systems = [("base alone", "base", None), ("expert alone", "expert", None),
               (f"Co-LLM (η = {threshold:g})", "collm", threshold)]
    if threshold >= 1:
        systems.append(("Co-LLM at η = 0.5, uncalibrated (where the head defers)", "collm", 0.5))
    outputs = {}
    for label, mode, eta in systems:
        with console.status(f"{label}: answering {len(prompts)} problems"):
            drafting = dict(lookahead=lookahead, rewind=rewind) if mode == "collm" else {}
            outputs[label] = pair.generate(prompts, max_new_tokens=max_new_tokens, mode=mode, threshold=eta,
                                           **drafting)
    console.print(legend(["math expert (SmolLM2-135M + LoRA on calculations)"] if folder == ASSETS
                         else list(pair.info["experts"])))
    console.print(f"[dim]Problems: {shipped.get('chosen', 'shipped with the run')}; none was in any training "
                  "data.[/dim]")
    for i, problem in enumerate(problems):
        console.rule(f"problem {i + 1} (gold answer {problem['answer']})")
        console.print(f"[dim]> {problem['prompt']}[/dim]")
        for label, out in outputs.items():
            answer = extract_answer(out.texts[i])
            mark = "[green]right[/green]" if answer == problem["answer"] else "[red]wrong[/red]"
            console.print(f"\n[bold]{label}[/bold] (answer {answer}, {mark}):")
            console.print(colored(pair.tokenizer, out.token_ids[i], out.sources[i]))
    console.rule()
    for label, mode, eta in systems[2:]:
        stats = outputs[label].stats
        extra = f", {stats['drafts_cut']} drafts cut" if lookahead > 1 else ""
        extra += f", {stats['rewritten']} base tokens re-written" if rewind else ""
        console.print(f"{label}: deferral rate {stats['defer_rate']:.1%}, {stats['expert_calls']} expert calls{extra}")
    console.print(Markdown((folder / "results.md").read_text().split("### Example")[0]))
