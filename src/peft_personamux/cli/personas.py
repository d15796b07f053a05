"""``personamux personas``: list persona files with size, codebook fingerprint and norm, or verify them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..files import ADAPTER_WEIGHTS_NAME
from ..persona_files import codebook_fingerprint, list_persona_files, verify_persona_files
from .common import Command, codebook_dir


@dataclass
class PersonasArguments:
    codebook: str | None = field(default=None, metadata={"help": "Codebook folder. Default: the shipped one."})
    persona_dir: str | None = field(default=None, metadata={"help": "Another folder whose personas/ to list too."})
    json: bool = field(default=False, metadata={"help": "Print JSON lines instead of a table."})
    verify: str | None = field(
        default=None,
        metadata={
            "help": "Check every persona file under VERIFY/personas/ (content digest, shape, values, and the codebook "
            "of VERIFY's adapter, else of --codebook when given); one line each, exit status 1 if any fails."
        },
    )


def fingerprint_of_folder(codebook: Path) -> str | None:
    """The codebook fingerprint of the adapter file in ``codebook`` (None without one W and one b in it)."""
    from safetensors.torch import load_file

    path = codebook / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    w = [v for k, v in tensors.items() if "personamux_codebook" in k]
    b = [v for k, v in tensors.items() if "personamux_bias" in k]
    return codebook_fingerprint(w[0], b[0]) if len(w) == 1 and len(b) == 1 else None


def verify(args: PersonasArguments) -> int:
    directory = Path(args.verify)
    fingerprint = fingerprint_of_folder(directory)
    if fingerprint is None and args.codebook:
        fingerprint = fingerprint_of_folder(codebook_dir(args.codebook))
    results = verify_persona_files(directory, fingerprint)
    failed = 0
    for name, problem in results.items():
        ok = problem is None or problem.startswith("no digest")
        failed += not ok
        if args.json:
            print(json.dumps({"name": name, "ok": ok, "problem": problem}))
        else:
            print(
                f"{'OK' if problem is None else 'UNCHECKED' if ok else 'FAILED':<9} {name}"
                + (f": {problem}" if problem else "")
            )
    if not args.json:
        print(f"{len(results)} persona files in {directory / 'personas'}, {failed} failed.")
    return 1 if failed else 0


def personas(args: PersonasArguments) -> int:
    """List persona files with their size, codebook fingerprint and mixture norm (or --verify them)."""
    from safetensors import safe_open

    if args.verify:
        return verify(args)
    codebook = codebook_dir(args.codebook)
    current = fingerprint_of_folder(codebook)
    files = {**list_persona_files(codebook), **(list_persona_files(args.persona_dir) if args.persona_dir else {})}
    records = []
    for name, path in files.items():
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            norm = float(f.get_tensor("mixture").float().norm())
        fingerprint = meta.get("codebook_fingerprint")
        records.append(
            {
                "name": name,
                "bytes": os.path.getsize(path),
                "fingerprint": fingerprint,
                "matches_codebook": fingerprint == current,
                "norm": round(norm, 4),
                "path": path,
            }
        )
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    print(f"Codebook {codebook} (fingerprint {current}): {len(records)} personas")
    print(f"{'name':<44} {'bytes':>6} {'fingerprint':<17} {'norm':>8}")
    for r in records:
        mark = "" if r["matches_codebook"] else "  (other codebook)"
        print(f"{r['name']:<44} {r['bytes']:>6} {r['fingerprint'] or '-':<17} {r['norm']:>8.3f}{mark}")
    return 0


COMMAND = Command("personas", personas, (PersonasArguments,))
