"""Fast ``vit fit|validate|test|predict --help``: LightningCLI's help text, kept once it has been rendered.

Rendering that help means importing torch and Lightning and building every parser (10-20 s on a 2-core CPU),
though the text only changes when the installed packages, vitkit's source or the base config change. The first
``vit VERB --help`` renders it live (at a fixed width of ``WIDTH`` columns) and stores it under
``$VIT_CACHE_DIR/help/<key>/VERB.txt`` (default cache: ``~/.cache/vitkit``); later calls print the stored text
without importing torch. The key digests every installed distribution's name and version, the bytes of every
``vit/**/*.py`` and the base config, and that config's path, so a changed environment or an edited checkout
renders afresh: a stored text is never shown for another setup. Only a bare ``vit VERB --help`` is cached; with
other arguments (``--config X --help`` shows X's values) the help is always rendered live. This module imports
nothing heavy.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

VERBS = ("fit", "validate", "test", "predict")
HELP_FLAGS = ("-h", "--help")
WIDTH = 100  # columns of the rendered help, whatever the terminal: one text per key
PACKAGE = Path(__file__).resolve().parent
BASE_CONFIG = PACKAGE.parent / "configs" / "base" / "trainer.yaml"  # vit.lightning_cli.BASE_CONFIG, without torch


def help_verb(argv: list[str]) -> str | None:
    """The verb when ``argv`` asks for nothing but a LightningCLI verb's help, else None."""
    if len(argv) == 2 and argv[0] in VERBS and argv[1] in HELP_FLAGS:
        return argv[0]
    return None


def cached_help(verb: str) -> str | None:
    """The stored help of ``verb`` for this environment and checkout, or None when it must be rendered."""
    try:
        return (_folder() / f"{verb}.txt").read_text()
    except OSError:
        return None


def store_help(verb: str, text: str) -> None:
    """Keep ``text`` as the help of ``verb`` for this environment and checkout (best effort: a cache)."""
    folder = _folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{verb}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / f"{verb}.txt")  # readers see the whole text or none
    except OSError:
        pass


def environment_key() -> str:
    """Digest of what the help text depends on: installed distributions, vitkit's source, the base config."""
    h = hashlib.sha256()
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"])
    h.update("\n".join(dists).encode())
    h.update(str(BASE_CONFIG).encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(path.relative_to(PACKAGE).as_posix().encode())
        h.update(path.read_bytes())
    h.update(BASE_CONFIG.read_bytes() if BASE_CONFIG.is_file() else b"")
    h.update(str(WIDTH).encode())
    return h.hexdigest()[:24]


def _folder() -> Path:
    root = Path(os.environ.get("VIT_CACHE_DIR") or Path.home() / ".cache" / "vitkit").expanduser()
    return root / "help" / environment_key()
