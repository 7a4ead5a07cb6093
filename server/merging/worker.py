"""The merge itself, in a process of its own (`server.merging.build` runs it): base weights plus
one LoRA delta, folded together by PEFT and saved in full precision.

A process of its own because the merge holds the whole base in fp32 (a 7B model: 28 GB) and may
take minutes: the gateway must not grow by that or block on it, and a merge past its time is
ended by killing its process group. Its only report is its exit code and, on failure, one line
`merge failed: <reason>` on stderr, with the paths it was given replaced by their roles.

Nothing here unpickles: the base is read with `use_safetensors=True`, and PEFT reads the adapter
from a private dir holding only its config and safetensors file (PEFT would otherwise fall back
to `adapter_model.bin`, a pickle). The Hub is switched off before transformers is imported, so a
missing file fails the merge instead of being fetched from somewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from adapters.merged_store import MANIFEST_VERSION, MERGED_MANIFEST
from adapters.types import CONFIG_FILE, WEIGHTS_FILE

SCHEME = "none"  # full precision: the merged weights as PEFT computes them, in fp32
# The base's small files an engine needs beside the weights (tokenizer, chat template,
# generation defaults), copied when present. An allowlist: the base dir may hold other things
# (loragate-manifest.json, a GGUF, pickles) that are not part of this model.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
MAX_REASON_CHARS = 600


class _Refused(Exception):
    """A failure whose message is already the operator's reason."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Refused(message)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m server.merging.worker", description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="the base model's HF dir")
    parser.add_argument("--adapter", type=Path, required=True, help="the adapter's dir")
    parser.add_argument("--out", type=Path, required=True, help="an absent or empty dir")
    parser.add_argument("--adapter-digest", required=True)
    parser.add_argument("--base-revision", required=True)
    return parser.parse_args(argv)


def _sha256(path: Path) -> str:
    """The file's sha256, once its bytes are on disk: the dir is renamed into place next."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        os.fsync(f.fileno())
    return digest


def _private_adapter(adapter: Path, into: Path) -> Path:
    """A dir holding only the adapter's config and safetensors weights, for PEFT to read."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter / name).is_file():
            raise _Refused(f"the adapter has no {name}")
        os.symlink((adapter / name).resolve(), into / name)
    return into


def merge(args: argparse.Namespace) -> None:
    base: Path = args.base
    out: Path = args.out
    if not (base / "config.json").is_file():
        raise _Refused("the base has no config.json")
    if out.exists() and any(out.iterdir()):
        raise _Refused("the output dir is not empty")
    out.mkdir(exist_ok=True)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(base), dtype=torch.float32, use_safetensors=True, local_files_only=True,
        trust_remote_code=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="loragate-adapter-") as tmp:
        adapter_dir = _private_adapter(args.adapter, Path(tmp))
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        merged = peft_model.merge_and_unload()
    merged.config.dtype = torch.float32
    merged.save_pretrained(str(out), safe_serialization=True)
    # After save_pretrained: the base's own generation_config.json replaces the one it wrote.
    for name in COPIED_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    names = sorted(entry.name for entry in out.iterdir())
    if any(not (out / name).is_file() or name == MERGED_MANIFEST for name in names):
        raise _Refused("saving the merged model wrote something other than plain files")
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "adapter_digest": args.adapter_digest,
        "base_revision": args.base_revision,
        "scheme": SCHEME,
        "files": {name: _sha256(out / name) for name in names},
    }
    # Last: a dir with a manifest is a whole one.
    (out / MERGED_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _sha256(out / MERGED_MANIFEST)  # for its fsync


def _reason(exc: BaseException, argv: list[str]) -> str:
    """One line, free of the paths given (they name the store's layout), of bounded length."""
    reason = str(exc) if isinstance(exc, _Refused) else f"{type(exc).__name__}: {exc}"
    for flag, role in (("--base", "<base>"), ("--adapter", "<adapter>"), ("--out", "<out>")):
        if flag in argv[:-1]:
            path = argv[argv.index(flag) + 1]
            if path:
                reason = reason.replace(str(Path(path).resolve()), role).replace(path, role)
    reason = " ".join(reason.split())
    return reason[:MAX_REASON_CHARS] or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    # Before transformers or huggingface_hub are imported: both read these once.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # its warnings would crowd out our line
    given = sys.argv[1:] if argv is None else argv
    try:
        merge(_parse(given))
    except (Exception, KeyboardInterrupt) as exc:
        print(f"merge failed: {_reason(exc, given)}", file=sys.stderr, flush=True)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
