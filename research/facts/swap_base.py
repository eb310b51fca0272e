"""A run with another base and everything else kept: the head, its threshold and the expert of ``--run``.

    python research/facts/swap_base.py --run runs/facts/collm --base runs/facts/tuned-update/base_adapter \
        --out runs/facts/collm-update

The knowledge update: the base is tuned again on the new documents; the head and the expert stay as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from collm.pair import CoLLM, read_run_config
from collm.run import spec_in


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--base", required=True, help="the new base's model spec (an adapter folder)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.out.exists() and any(a.out.iterdir()):
        raise SystemExit(f"--out {a.out} is not empty: give a new folder")
    config = read_run_config(a.run)
    experts = [spec_in(a.run, spec) for spec in config["experts"]]
    pair = CoLLM.load(a.base, experts, str(a.run / "head.safetensors"), threshold=config["threshold"],
                      dtype=config.get("dtype", "float32"))
    pair.save_pretrained(a.out, trained_from=str(a.run), note=f"the head and threshold of {a.run}, base {a.base}")
    print(f"{a.out}: base {a.base}, head and threshold {config['threshold']} of {a.run}")


if __name__ == "__main__":
    main()
