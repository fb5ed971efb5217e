"""Benchmark of pretrained and locked towers on Tux Paint's drawings, a captioned collection this project did not make.

python -m tools.benchmark_tuxpaint --minilm FOLDER --lite0 FILE

1. Tux Paint's stamps (tools/tuxpaint.py) as a collection with English captions and one with Simplified Chinese
   ones (a stamp without a Chinese description keeps its English one), both split 80/10/10 by picture with the
   same seeded split. Each row of ROWS is trained on each with every --seeds, best.pt chosen by validation RSum,
   and scored on the test split: recall@1/5/10 both ways, RSum, and zero-shot classification by topic (the
   stamp's top folder: animals, food, vehicles, ...), each topic embedded as the mean of TOPIC_PROMPTS' captions
   in the collection's language. The time is train.py's training time, of the first seed's run (whose locked
   towers compute their features) and of the later ones (which read them from the cache). The rows of
   --first-seed-rows (ResNet18 from scratch, and the towers with their last blocks unlocked, which run the whole
   image tower at every step: 8 and 11 minutes a run on 2 CPU cores) are trained with the first seed only.
2. The digits (scikit-learn's, with --captions templates) read by the character transformer and by MiniLM,
   locked: zero-shot accuracy with the captions' own templates and with held-out ones ("this is a 7 drawn by
   hand", "图中是一个七"), in each language (inference.py --evaluate).
Writes benchmark.json and benchmark.md in --output-dir.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from checkpoint import load_model
from embeddings import embed_images
from metrics import zero_shot_classification
from photo_files import load_collection
from tools import runs, tuxpaint
from utils import pick_device, positive_int, resolve_precision

LANGUAGES = {"en": "English", "zh_CN": "Chinese"}

# What each row adds to `train.py --dataset photos`: the photos recipe's small ResNet (64 px) and character
# transformer from scratch, ResNet18 from scratch, then the pretrained towers: MiniLM ({minilm}) and
# EfficientNet-Lite0 ({lite0}), locked (LiT) or with their last blocks unlocked.
MINILM = ["--text-pretrained", "{minilm}", "--lock-text"]
LITE0 = ["--image-encoder", "efficientnet_lite0", "--pretrained-weights", "{lite0}", "--lock-image"]
ROWS = {
    "from scratch: small ResNet, character transformer": [],
    "from scratch: ResNet18, character transformer": ["--image-encoder", "resnet18"],
    "pretrained text only: MiniLM locked, small ResNet": MINILM,
    "pretrained image only: EfficientNet-Lite0 locked, character transformer": LITE0,
    "both locked: EfficientNet-Lite0, MiniLM": [*LITE0, *MINILM],
    "both, last blocks unlocked: Lite0's last stage, MiniLM's last 2 blocks": [
        *LITE0,
        *MINILM,
        "--lock-image-unlocked-groups",
        "1",
        "--lock-text-unlocked-layers",
        "2",
    ],
}

# Zero-shot by topic: a topic's embedding is the mean of its captions', as CLIP's prompt ensembles; the Chinese
# captions are those a student would write, not translations word for word.
TOPIC_NAMES = {
    "animals": ("an animal", "动物"),
    "cartoon": ("a cartoon character", "卡通人物"),
    "clothes": ("clothes", "衣服"),
    "food": ("food", "食物"),
    "hobbies": ("a hobby", "爱好"),
    "household": ("a household object", "家居用品"),
    "medical": ("a medical object", "医疗用品"),
    "military": ("a military thing", "军事"),
    "naturalforces": ("a force of nature", "自然现象"),
    "people": ("a person", "人物"),
    "plants": ("a plant", "植物"),
    "seasonal": ("a holiday", "节日"),
    "space": ("outer space", "太空"),
    "sports": ("a sport", "体育运动"),
    "symbols": ("a symbol", "符号"),
    "town": ("a building in town", "城镇建筑"),
    "vehicles": ("a vehicle", "交通工具"),
}
TOPIC_PROMPTS = {
    "en": ("{}", "a drawing of {}", "a picture of {}"),
    "zh_CN": ("{}", "一幅{}的画", "一张{}的图片"),
}

DIGIT_RUNS = {
    "character transformer": ["--text-encoder", "transformer"],
    "MiniLM, locked": MINILM,
}
DIGIT_ACCURACIES = ("trained templates", "held-out templates, en", "held-out templates, zh")


def epochs(args: argparse.Namespace) -> list[str]:
    return ["--epochs", str(args.epochs)] if args.epochs else []


def topic_captions(topic: str, language: str) -> list[str]:
    name = TOPIC_NAMES[topic][0 if language == "en" else 1]
    return [template.format(name) for template in TOPIC_PROMPTS[language]]


@torch.inference_mode()
def topic_accuracy(checkpoint: Path, captions_file: Path, cache_dir: Path, language: str, precision: str) -> float:
    """Share of the test split's pictures whose nearest topic, by the topics' captions, is their own."""
    model, _ = load_model(checkpoint)
    test = load_collection(captions_file, model.config.image_size, cache_dir).test
    topic_of = {entry["image_path"]: entry["topic"] for entry in json.loads(captions_file.read_text())}
    topics = sorted({topic_of[file] for file in test.files})
    classes = model.encode_classes(tuple(tuple(topic_captions(topic, language)) for topic in topics))
    labels = torch.tensor([topics.index(topic_of[file]) for file in test.files])
    images = embed_images(model, test.images, precision)
    return zero_shot_classification(images, classes, labels.to(images.device))["top1_accuracy"]


def train_row(row: str, captions_file: Path, language: str, work: Path, args, precision: str) -> list[dict]:
    """The row trained with each seed on one language's collection, each run's test scores and time."""
    options = [part.format(minilm=args.minilm, lite0=args.lite0) for part in ROWS[row]] + epochs(args)
    number = list(ROWS).index(row) + 1
    results = []
    for seed in args.seeds[:1] if number in args.first_seed_rows else args.seeds:
        name = f"{number}-{language}-{seed}"
        argv = ["--dataset", "photos", "--data-dir", str(captions_file), "--cache-dir", str(work / "cache")]
        result = runs.train([*argv, *options, "--seed", str(seed)], work / "runs", name)
        test = result["test_retrieval"]
        results.append(
            {
                "seed": seed,
                "train_seconds": result["train_seconds"],
                **{key: test[key] for key in ("rsum", "image_to_text", "text_to_image")},
                "topic_accuracy": topic_accuracy(
                    work / "runs" / name / "best.pt", captions_file, work / "cache", language, precision
                ),
            }
        )
    return results


def digit_row(name: str, work: Path, args) -> list[dict]:
    options = [part.format(minilm=args.minilm, lite0=args.lite0) for part in DIGIT_RUNS[name]] + epochs(args)
    results = []
    for seed in args.seeds:
        run = f"digits-{list(DIGIT_RUNS).index(name)}-{seed}"
        result = runs.train(
            ["--dataset", "digits", "--captions", "templates", *options, "--seed", str(seed)], work / "runs", run
        )
        output = work / "evaluation" / run
        runs.run_script(
            "inference.py",
            ["--checkpoint", str(work / "runs" / run / "best.pt"), "--evaluate", "--output-dir", str(output)],
        )
        accuracies = json.loads((output / "metrics.json").read_text())["zero_shot_by_templates"]
        results.append(
            {
                "seed": seed,
                "train_seconds": result["train_seconds"],
                **{kind: accuracies[kind] for kind in DIGIT_ACCURACIES},
            }
        )
    return results


def mean_spread(values: list[float], scale: float = 1.0) -> str:
    """'mean ± sample standard deviation' of the seeds' values."""
    values = [value * scale for value in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def recall_cells(runs_of_row: list[dict]) -> list[str]:
    return [
        mean_spread([run[way][f"recall@{k}"] for run in runs_of_row], 100)
        for way in ("image_to_text", "text_to_image")
        for k in (1, 5, 10)
    ]


def shown(options: list[str]) -> str:
    """A row's options as the report's command names the pretrained files."""
    return " ".join(options).format(minilm="$MINILM", lite0="$LITE0")


def markdown(report: dict) -> str:
    m = report["machine"]
    seeds = len(report["seeds"])
    lines = [
        f"Machine: {m['cpu']} ({', '.join(m['cpu_vector_units'])}), {m['cores']} cores, GPU: {m['gpu'] or 'none'}, "
        f"torch {m['torch']}, {report['precision']}.",
        f"Command: `{report['command']}`",
        "",
        f"Tux Paint's stamps, test split ({report['test_pictures']} pictures, one caption each): mean ± standard "
        f"deviation over {seeds} seeds (train.py's `--seed` {', '.join(map(str, report['seeds']))}), best.pt chosen by "
        f"validation RSum. Chance: RSum {report['chance_rsum']:.1f}, topic accuracy {report['chance_topic']:.1f}% "
        f"(the largest topic). Time: train.py's training time of the first seed, then the median of the others.",
        "",
        "| captions | towers | i→t R@1 | R@5 | R@10 | t→i R@1 | R@5 | R@10 | RSum | topic zero-shot % | time, first / "
        "later (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for language, rows in report["tuxpaint"].items():
        for row, runs_of_row in rows.items():
            times = [run["train_seconds"] for run in runs_of_row]
            later = f"{statistics.median(times[1:]):.0f}" if len(times) > 1 else "–"
            seeds_note = "" if len(runs_of_row) > 1 else " (first seed only)"
            lines.append(
                f"| {LANGUAGES[language]} | {row}{seeds_note} | {' | '.join(recall_cells(runs_of_row))} | "
                f"**{mean_spread([run['rsum'] for run in runs_of_row])}** | "
                f"{mean_spread([run['topic_accuracy'] for run in runs_of_row], 100)} | {times[0]:.0f} / {later} |"
            )
    lines += [
        "",
        "The rows' settings, added to `python train.py --dataset photos --data-dir TUXPAINT/captions.json`:",
        "",
        *[f"- {row}: `{shown(options) or '(none)'}`" for row, options in ROWS.items()],
        "",
        "Digits (`python train.py --dataset digits --captions templates`), zero-shot test accuracy (%) by the "
        f"captions' templates, mean ± standard deviation over {seeds} seeds:",
        "",
        "| text tower | " + " | ".join(DIGIT_ACCURACIES) + " | time (s) |",
        "| --- | " + " | ".join("---" for _ in DIGIT_ACCURACIES) + " | --- |",
    ]
    for name, runs_of_row in report["digits"].items():
        cells = [mean_spread([run[kind] for run in runs_of_row], 100) for kind in DIGIT_ACCURACIES]
        time = statistics.median(run["train_seconds"] for run in runs_of_row)
        lines.append(f"| {name} (`{shown(DIGIT_RUNS[name])}`) | {' | '.join(cells)} | {time:.0f} |")
    return "\n".join([*lines, ""])


def chance(captions_file: Path, cache_dir: Path) -> tuple[int, float, float]:
    """The test split's size, RSum of a random ranking (R@K = K/N both ways) and the largest topic's share (%)."""
    test = load_collection(captions_file, 64, cache_dir).test
    topic_of = {entry["image_path"]: entry["topic"] for entry in json.loads(captions_file.read_text())}
    counts = [sum(topic_of[file] == topic for file in test.files) for topic in set(topic_of.values())]
    return len(test), 2 * sum(min(k / len(test), 1.0) for k in (1, 5, 10)) * 100, 100 * max(counts) / len(test)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--minilm", type=Path, required=True, help="all-MiniLM-L6-v2's Hugging Face folder")
    p.add_argument("--lite0", type=Path, required=True, help="EfficientNet-Lite0's ImageNet weights (.pth)")
    p.add_argument("--stamps-dir", type=Path, default=tuxpaint.STAMPS_DIR, help="Tux Paint's stamps folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the training seeds of every row")
    p.add_argument("--languages", nargs="+", choices=list(LANGUAGES), default=list(LANGUAGES))
    p.add_argument("--rows", type=positive_int, nargs="+", help="only these rows of ROWS, counted from 1")
    p.add_argument(
        "--first-seed-rows", type=positive_int, nargs="*", default=[2, 6], help="rows trained with the first seed only"
    )
    p.add_argument("--epochs", type=positive_int, help="every run's epochs, for a quick try (default: the recipes')")
    p.add_argument("--output-dir", type=Path, default=Path("docs/benchmark/tuxpaint"), help="where the report goes")
    args = p.parse_args(argv)
    precision, why = resolve_precision("auto", pick_device("auto"))
    rows = [row for index, row in enumerate(ROWS, start=1) if not args.rows or index in args.rows]
    # The command as a reader would type it, with the towers' places as README's "Pretrained towers" names them.
    typed = " ".join(sys.argv[1:] if argv is None else argv)
    typed = typed.replace(str(args.minilm), "$MINILM").replace(str(args.lite0), "$LITE0")
    report = {
        "command": f"python -m tools.benchmark_tuxpaint {typed}",
        "machine": runs.machine(why),
        "precision": precision,
        "seeds": args.seeds,
        "tuxpaint": {},
    }
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for language in args.languages:
            try:
                built = tuxpaint.build(args.stamps_dir, work / language, [language])
            except tuxpaint.StampsError as error:  # the stamps are not installed, or not where --stamps-dir says
                raise SystemExit(f"error: {error}") from None
            print(tuxpaint.summary(built))
            captions_file = built.output / tuxpaint.CAPTIONS_FILE
            report["test_pictures"], report["chance_rsum"], report["chance_topic"] = chance(
                captions_file, work / "cache"
            )
            report["tuxpaint"][language] = {
                row: train_row(row, captions_file, language, work, args, precision) for row in rows
            }
        report["digits"] = {name: digit_row(name, work, args) for name in DIGIT_RUNS}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "benchmark.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    (args.output_dir / "benchmark.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
