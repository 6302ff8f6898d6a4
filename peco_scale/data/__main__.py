"""Command line: ``python -m peco_scale.data <command>``.

Commands:
    demo --out DIR [--images_per_class N] [--seed S] [--min_size A] [--max_size B] [--overwrite]
        Write (or reuse) the offline demo ImageFolder tree at DIR/train.
    dense-demo --out DIR [--train_images N] [--val_images N] [--unlabelled_images N] [--seed S]
               [--min_size A] [--max_size B] [--style plain|cluttered]
        Write (or reuse) the dense demo: ADE20K-layout label maps and COCO instances of drawn shapes
        (and N more scenes without labels in DIR/unlabelled, an ImageFolder tree for stage 2).
    scan DIR
        Count images and classes of an ImageFolder tree without decoding anything.
    convert --to ffcv --data DIR --out FILE.beton [--max_resolution N] [--mode jpg|raw] [--quality Q]
            [--workers N] [--chunk_size N] [--overwrite]
        Write an FFCV .beton (unreadable images skipped and counted; written atomically; an
        up-to-date output is reused; a killed conversion resumes from its finished chunks in
        FILE.beton.parts/). DALI reads the folder itself: nothing to convert.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .demo import demo_is_current, make_demo_dataset
from .dense_demo import STYLES
from .folder import scan_image_folder
from .spec import DataError


def _cmd_demo(args: argparse.Namespace) -> None:
    kw = dict(images_per_class=args.images_per_class, seed=args.seed,
              min_size=args.min_size, max_size=args.max_size)
    reused = not args.overwrite and demo_is_current(args.out, **kw)
    t0 = time.perf_counter()
    m = make_demo_dataset(args.out, overwrite=args.overwrite, **kw)
    how = "up to date" if reused else f"generated in {time.perf_counter() - t0:.1f}s"
    print(f"demo dataset {how}: {m['total_images']} images ({m['total_bytes'] / 1e6:.1f} MB) in "
          f"{len(m['classes'])} classes [{', '.join(m['classes'])}] at {args.out}/train (seed {m['seed']})")


def _cmd_dense_demo(args: argparse.Namespace) -> None:
    from .dense_demo import make_dense_demo

    m = make_dense_demo(args.out, train_images=args.train_images, val_images=args.val_images, seed=args.seed,
                        min_size=args.min_size, max_size=args.max_size, unlabelled_images=args.unlabelled_images,
                        style=args.style)
    c = m["counts"]
    print(f"dense demo at {args.out}: {c['training']['images']} training / {c['validation']['images']} validation "
          f"scenes, {c['training']['instances']} / {c['validation']['instances']} instances; segmentation classes "
          f"{', '.join(m['seg_classes'])} (images/, annotations/), COCO categories {', '.join(m['categories'])} "
          f"(annotations/instances_*.json)")
    if "unlabelled" in c:
        print(f"{c['unlabelled']['images']} unlabelled scenes for stage 2: --data.path {Path(args.out) / 'unlabelled'}")


def _cmd_scan(args: argparse.Namespace) -> None:
    samples, classes, n_ignored = scan_image_folder(args.root)
    print(f"{len(samples)} images in {len(classes)} classes under {args.root}"
          f" ({n_ignored} non-image files ignored)")


def _cmd_convert(args: argparse.Namespace) -> None:
    if args.to == "dali":
        print("dali reads the ImageFolder tree directly (--data.backend dali --data PATH): nothing to convert")
        return
    import json
    from pathlib import Path

    try:
        from .ffcv_backend import _listing_digest, write_beton
    except ImportError as exc:
        raise DataError(str(exc)) from None
    if args.chunk_size < 1:
        raise DataError(f"--chunk_size {args.chunk_size} must be >= 1, e.g. 1024")
    out, side = Path(args.out), Path(str(args.out) + ".json")
    samples, _, _ = scan_image_folder(args.data)
    if out.is_file() and side.is_file():
        meta = json.loads(side.read_text())
        same = (meta.get("max_resolution") == args.max_resolution and meta.get("mode") == args.mode
                and meta.get("jpeg_quality", args.quality) == args.quality
                and meta.get("listing") == _listing_digest(samples))
        if same and not args.overwrite:
            print(f"{out} is up to date ({meta.get('count')} images, {meta.get('skipped', 0)} skipped); "
                  f"--overwrite to rewrite")
            return
    t0 = time.perf_counter()
    res = write_beton(args.data, out, max_resolution=args.max_resolution, jpeg_quality=args.quality, mode=args.mode,
                      workers=args.workers, chunk_size=args.chunk_size, resume=not args.overwrite)
    resumed = (f" (resumed: {res['reused_chunks']} of {res['chunks']} chunks were already encoded)"
               if res["reused_chunks"] else "")
    print(f"wrote {out}: {res['written']} images in {len(res['classes'])} classes, {res['skipped']} unreadable "
          f"skipped, {res.get('ignored', 0)} non-image files ignored, in {time.perf_counter() - t0:.1f}s{resumed}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peco_scale.data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="write the offline demo ImageFolder dataset")
    d.add_argument("--out", required=True, help="output root; images go to OUT/train/<class>/")
    d.add_argument("--images_per_class", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--min_size", type=int, default=64, help="smallest image side (pixels)")
    d.add_argument("--max_size", type=int, default=256, help="largest image side (pixels)")
    d.add_argument("--overwrite", action="store_true", help="regenerate even if up to date")
    d.set_defaults(func=_cmd_demo)
    dd = sub.add_parser("dense-demo", help="write the offline segmentation / detection demo (ADE20K + COCO layout)")
    dd.add_argument("--out", required=True, help="output root: OUT/images, OUT/annotations")
    dd.add_argument("--train_images", type=int, default=200)
    dd.add_argument("--val_images", type=int, default=50)
    dd.add_argument("--unlabelled_images", type=int, default=0,
                    help="scenes without labels for stage 2, in OUT/unlabelled (an ImageFolder tree)")
    dd.add_argument("--seed", type=int, default=0)
    dd.add_argument("--min_size", type=int, default=96, help="smallest scene side (pixels)")
    dd.add_argument("--max_size", type=int, default=192, help="largest scene side (pixels)")
    dd.add_argument("--style", default="plain", choices=STYLES,
                    help="cluttered: textured background, unlabelled blobs and strokes, flat or striped fills")
    dd.set_defaults(func=_cmd_dense_demo)
    s = sub.add_parser("scan", help="count images/classes in an ImageFolder tree")
    s.add_argument("root")
    s.set_defaults(func=_cmd_scan)
    c = sub.add_parser("convert", help="convert an ImageFolder tree for the ffcv backend")
    c.add_argument("--to", choices=("ffcv", "dali"), required=True)
    c.add_argument("--data", required=True, help="ImageFolder root")
    c.add_argument("--out", help="output .beton (ffcv)")
    c.add_argument("--max_resolution", type=int, default=512, help="longest stored side (>= the training size)")
    c.add_argument("--mode", choices=("jpg", "raw"), default="jpg")
    c.add_argument("--quality", type=int, default=90, help="JPEG quality")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--chunk_size", type=int, default=1024, help="images per resumable chunk")
    c.add_argument("--overwrite", action="store_true", help="rewrite, discarding an up-to-date output or a partial run")
    c.set_defaults(func=_cmd_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "to", None) == "ffcv" and not args.out:
        print("error: convert --to ffcv needs --out FILE.beton", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
