"""``vit VERB --help`` for the LightningCLI verbs: rendered live once per setup, then served without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vit import help_cache

ROOT = Path(__file__).resolve().parents[1]
# main(['fit', '--help']) in a fresh interpreter; reports on stderr whether torch and Lightning were imported
SHOW_HELP = ("import sys; from vit.cli import main; code = main(sys.argv[1:]); "
             "print('imported:', 'torch' in sys.modules, 'lightning' in sys.modules, file=sys.stderr); "
             "sys.exit(code)")


def _help(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, VIT_CACHE_DIR=str(cache), COLUMNS="57")  # the text must not follow the terminal
    return subprocess.run([sys.executable, "-c", SHOW_HELP, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


@pytest.mark.slow
def test_verb_help_is_rendered_once_then_served_without_torch(tmp_path: Path) -> None:
    first = _help(["fit", "--help"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "--trainer.default_root_dir" in first.stdout and "--ckpt_path" in first.stdout
    assert "imported: True True" in first.stderr  # rendered by LightningCLI
    widths = [len(line) for line in first.stdout.splitlines()]
    assert max(w for w in widths if w <= help_cache.WIDTH) > 80  # wrapped at WIDTH, not at the 57 of $COLUMNS

    again = _help(["fit", "--help"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert "imported: False False" in again.stderr, "the stored help still imported torch or Lightning"

    other = _help(["test", "--help"], tmp_path)  # each verb has its own text
    assert other.returncode == 0 and other.stdout != first.stdout
    assert "imported: True True" in other.stderr


def test_only_a_bare_verb_help_is_cached() -> None:
    assert help_cache.help_verb(["fit", "--help"]) == "fit"
    assert help_cache.help_verb(["predict", "-h"]) == "predict"
    assert help_cache.help_verb(["fit", "--config", "x.yaml", "--help"]) is None  # shows x.yaml's values: live
    assert help_cache.help_verb(["export", "--help"]) is None  # not a LightningCLI verb: its own quick help
    assert help_cache.help_verb(["fit"]) is None


def test_a_changed_setup_is_not_served_a_stored_help(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path))
    help_cache.store_help("fit", "stored help\n")
    assert help_cache.cached_help("fit") == "stored help\n"
    assert help_cache.cached_help("validate") is None

    source = tmp_path / "pkg" / "vit"
    source.mkdir(parents=True)
    (source / "cli.py").write_text("x = 1\n")
    monkeypatch.setattr(help_cache, "PACKAGE", source)
    stored = help_cache.environment_key()
    help_cache.store_help("fit", "stored help\n")
    (source / "cli.py").write_text("x = 2\n")  # an edited checkout
    assert help_cache.environment_key() != stored
    assert help_cache.cached_help("fit") is None

    (source / "cli.py").write_text("x = 1\n")
    assert help_cache.cached_help("fit") == "stored help\n"
    monkeypatch.setattr(help_cache.metadata, "distributions", lambda: [])  # another environment
    assert help_cache.environment_key() != stored
    assert help_cache.cached_help("fit") is None
