"""Benchmark for collections of captioned photos (train.py --dataset photos), on one machine.

python -m tools.benchmark_photos

Real pictures with known captions are exported as files
(tools/export_photos.py) and read back through the file pipeline (photo_files.py):
1. MNIST's 10,000 test images as PNG, each with 5 attribute captions, in Flickr8k's layout.
   Startup: the first load decodes and caches them; then the median of `--repeats` loads from the cache.
2. ResNet18 and the transformer trained on them (`--epochs`), best.pt chosen by validation RSum:
   test recall@1/5/10 both ways, ranks, RSum. The same model then scores the same test photos and
   captions held in memory (photo_files.collection_from_tensors): PNG is lossless, so the two match.
   Its --evaluate figures (a few captions' nearest photos, the t-SNE) are kept beside the report.
3. Fashion-MNIST's test images as JPEG with class-name captions, in the JSON layout, a small ResNet
   trained on them (`--fashion-epochs`), and scored on the decoded JPEGs and on the original pixels in
   memory: what JPEG compression changes.
Writes benchmark.json and benchmark.md in --output-dir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from checkpoint import load_model
from embeddings import retrieval_scores
from metrics import rsum_line
from photo_files import collection_from_tensors, load_collection
from tools import export_photos, runs
from utils import pick_device, positive_int, resolve_precision

IMAGE_SIZE = 28  # the exported pictures' own size: nothing is resized


def startup_seconds(folder: Path, cache_dir: Path, repeats: int) -> dict:
    """Seconds to load the collection: the first time (decoding and caching), then from the cache."""
    start = time.perf_counter()
    load_collection(folder, IMAGE_SIZE, cache_dir)
    first = time.perf_counter() - start
    cached = []
    for _ in range(repeats):
        start = time.perf_counter()
        collection = load_collection(folder, IMAGE_SIZE, cache_dir)
        cached.append(time.perf_counter() - start)
        assert collection.cache_hit
    return {
        "first_load_seconds": first,
        "cached_load_seconds": cached,
        "cached_load_median_seconds": statistics.median(cached),
    }


def train_and_compare(
    exported: export_photos.Exported, options: list[str], cache_dir: Path, runs_dir: Path, name: str, precision: str
) -> dict:
    """Train on the exported files, then score best.pt on the test split read from the files and on the
    same pictures and captions in memory, in the precision training scored it in."""
    argv = [
        "--dataset",
        "photos",
        "--data-dir",
        str(exported.folder),
        "--cache-dir",
        str(cache_dir),
        "--image-size",
        str(IMAGE_SIZE),
    ]
    result = runs.train([*argv, *options], runs_dir, name)
    model, state = load_model(runs_dir / name / "best.pt")
    in_memory = collection_from_tensors(
        exported.images[:, None].expand(-1, 3, -1, -1).contiguous(), exported.captions, exported.files
    )
    # The command as a reader would type it: the exported folders were temporary.
    shown = [*argv[:3], f"EXPORTED/{exported.folder.name}", "--cache-dir", "CACHE", *argv[6:], *options]
    return {
        "command": " ".join(["python train.py", *shown]),
        "train_seconds": result["train_seconds"],
        "best_epoch": state["epoch"],
        "test_from_files": result["test_retrieval"],
        "test_in_memory": retrieval_scores(model, in_memory.test, precision),
    }


def markdown(report: dict) -> str:
    m, startup = report["machine"], report["startup"]
    lines = [
        f"Machine: {m['cpu']} ({', '.join(m['cpu_vector_units'])}), {m['cores']} cores, GPU: {m['gpu'] or 'none'}, "
        f"torch {m['torch']}.",
        f"Precision: {m['precision']}.",
        f"Command: `{report['command']}`",
        "",
        f"Startup, {startup['images']:,} PNG photos at {IMAGE_SIZE} px: first load (decode and cache) "
        f"{startup['first_load_seconds']:.1f} s; "
        f"from the cache {startup['cached_load_median_seconds']:.2f} s (median of "
        f"{len(startup['cached_load_seconds'])}).",
        "",
        "| collection | settings | best epoch (by validation RSum) | training time | test, read from files | test, "
        "same pictures in memory |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in report["runs"].items():
        lines.append(
            f"| {name} | `{run['command'].split('--image-size 28 ')[-1]}` | {run['best_epoch']} | "
            f"{run['train_seconds']:.0f} s "
            f"| {rsum_line(run['test_from_files'])} | {rsum_line(run['test_in_memory'])} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", default="data", help="folder that holds (or receives) MNIST and Fashion-MNIST")
    p.add_argument("--epochs", type=positive_int, default=15, help="epochs of ResNet18 on the MNIST export")
    p.add_argument(
        "--fashion-epochs", type=positive_int, default=10, help="epochs of the small ResNet on the Fashion-MNIST export"
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="loads from the cache to take the median of")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("docs/benchmark/captions"),
        help="where benchmark.json and benchmark.md go",
    )
    args = p.parse_args(argv)
    precision, why = resolve_precision("auto", pick_device("auto"))
    report = {
        "command": " ".join(["python -m tools.benchmark_photos", *(sys.argv[1:] if argv is None else argv)]),
        "machine": runs.machine(why),
    }
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        mnist = export_photos.export("mnist", "flickr8k", work / "mnist-flickr8k", args.data_dir)
        fashion = export_photos.export("fashion", "json", work / "fashion-json", args.data_dir)
        report["startup"] = {"images": len(mnist.files), **startup_seconds(mnist.folder, work / "cache", args.repeats)}
        resnet18 = ["--image-encoder", "resnet18", "--text-encoder", "transformer", "--no-flip", "--crop-area", "1"]
        report["runs"] = {
            "MNIST test, PNG, 5 attribute captions each (Flickr8k layout)": train_and_compare(
                mnist, [*resnet18, "--epochs", str(args.epochs)], work / "cache", work / "runs", "mnist", precision
            ),
            "Fashion-MNIST test, JPEG, 5 class-name captions each (JSON layout)": train_and_compare(
                fashion, ["--epochs", str(args.fashion_epochs)], work / "cache", work / "runs", "fashion", precision
            ),
        }
        checkpoint = work / "runs" / "mnist" / "best.pt"
        evaluate = ["--checkpoint", str(checkpoint), "--evaluate", "--output-dir", str(work / "evaluation")]
        runs.run_script("inference.py", evaluate)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        for figure in ("text_retrieval", "tsne"):
            shutil.copy(work / "evaluation" / "evaluation" / f"{figure}.png", args.output_dir / f"mnist_{figure}.png")
    (args.output_dir / "benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    (args.output_dir / "benchmark.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
