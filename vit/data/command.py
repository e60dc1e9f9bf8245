"""``vit data optimize SRC --out DIR``: an ImageFolder tree (or the built-in digits) into litdata shards.

Prints a progress bar on stderr and a summary on stdout (images and bytes per split, classes, every file left out
with its reason). Exit status 0; or 2 with one ``vit data: error: ...`` line naming the file or folder at fault.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from vit.data.optimize import DIGITS, OptimizeSummary, optimize_folder

PROG = "vit data"
MAX_LISTED = 20  # skipped files named in the summary; all of them are in DIR/vitkit.json


class UsageError(ValueError):
    """A command-line mistake; reported as one line like any other error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The ``vit data`` options."""
    parser = _Parser(prog=PROG, description="Prepare data sets for streaming.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    opt = verbs.add_parser(
        "optimize", help="write an ImageFolder tree as litdata shards",
        description="Write SRC/train + SRC/val (or one SRC/<class> tree split by --val-split, or the built-in "
                    f"'{DIGITS}') as litdata shards under DIR/train and DIR/val, image bytes stored as they are.",
        epilog="Then: vit fit --config RECIPE --data.class_path vit.data.StreamingDataModule "
               "--data.init_args.input_dir DIR",
    )
    opt.add_argument("src", metavar="SRC", help=f"an ImageFolder tree, or '{DIGITS}'")
    opt.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder for the shards")
    opt.add_argument("--num-workers", type=int, default=1, metavar="N", help="worker processes (default 1)")
    opt.add_argument("--val-split", type=float, default=0.0, metavar="F",
                     help="hold out this fraction of each class for val (a tree without a val folder)")
    opt.add_argument("--seed", type=int, default=0, help="seeds --val-split and the order samples are written in")
    opt.add_argument("--chunk-bytes", default="64MB", help="litdata chunk size (default 64MB)")
    opt.add_argument("--no-verify", dest="verify", action="store_false",
                     help="store every file without decoding it first (faster; unreadable images then meet "
                          "the data module's on_bad_image policy in training)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``vit data ARGS``; returns the exit status."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        with _ProgressBar() as bar:
            summary = optimize_folder(args.src, args.out, num_workers=args.num_workers, val_split=args.val_split,
                                      seed=args.seed, verify=args.verify, chunk_bytes=args.chunk_bytes,
                                      progress=bar.update)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


def format_summary(s: OptimizeSummary) -> str:
    """The lines ``vit data optimize`` prints when it is done."""
    lines = [f"wrote {sum(s.images.values()):,} images in {len(s.classes)} classes from {s.source} to {s.out}"]
    for split in s.images:
        lines.append(f"  {split}: {s.images[split]:,} images, {_size(s.image_bytes[split])} of image files "
                     f"(stored as they are), {_size(s.shard_bytes[split])} of shards in {s.out}/{split}")
    shown = ", ".join(s.classes[:10]) + (f", ... ({len(s.classes) - 10} more)" if len(s.classes) > 10 else "")
    lines.append(f"  classes: {shown}")
    lines.append(f"  skipped: {len(s.skipped)} file(s)" + (":" if s.skipped else ""))
    lines += [f"    {path}: {reason}" for path, reason in s.skipped[:MAX_LISTED]]
    if len(s.skipped) > MAX_LISTED:
        lines.append(f"    ... {len(s.skipped) - MAX_LISTED} more, all listed in {s.out}/vitkit.json")
    return "\n".join(lines)


class _ProgressBar:
    """A rich progress bar of files done on stderr, shown from the first update until the block ends."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True))
        self.task: Any = None

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task("files", total=total)
            self.bar.start()
        self.bar.update(self.task, completed=done)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
