"""Write a headroom report from a headroom stage that has not finished (a run still going, or interrupted).

    python docs/results/headroom_partial.py eval_headroom100 docs/results/headroom100

reads ``<run dir>/stages/headroom.json`` and writes ``<prefix>.md``, ``<prefix>.json``, ``<prefix>_curves.png`` and
``<prefix>_identification.png`` with the rows finished so far (the report names those still in progress). Running
`personamux evaluate` again with the same config continues the stage; its own report replaces this one at the end.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from peft_personamux.evaluation.headroom_report import write_headroom_outputs
from peft_personamux.files import read_json


def main(run_dir: str, prefix: str) -> None:
    stage = read_json(Path(run_dir) / "stages" / "headroom.json")
    if not stage:
        raise SystemExit(f"{run_dir}/stages/headroom.json does not exist or is empty: no headroom stage has started.")
    target = Path(prefix)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = f"python docs/results/headroom_partial.py {run_dir} {prefix}"
        write_headroom_outputs(stage, tmp, command)
        for name, suffix in (
            ("headroom.md", ".md"),
            ("headroom.json", ".json"),
            ("headroom_curves.png", "_curves.png"),
            ("identification.png", "_identification.png"),
        ):
            destination = target.parent / (target.name + suffix)
            if (Path(tmp) / name).is_file():
                shutil.copy(Path(tmp) / name, destination)
            else:  # not written this time (no fitted row yet): an older file would belie the report
                destination.unlink(missing_ok=True)
    print(f"Wrote {target}.md")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
