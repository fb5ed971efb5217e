"""Benchmark: this project's CLIP against the reference MNIST-CLIP recipe, on one machine.

python -m tools.benchmark

Measures, for the default training, the fast setting (`--image-widths 8,16,32,64 --epochs 2 --batch-size 256
--lr 7e-3`) and, for MNIST, the previous default (its recipe before the five-stage widths, as flags), several
seeded runs each, taken in turn seed by seed on the same machine: the time to reach 98%, 99% and 99.5% zero-shot
accuracy on the validation split, the final test accuracy, image retrieval by cosine over the full test split
(precision@5, mAP and the share of test images that any top-5 list finds), training and inference throughput,
where the training time goes (the steps alone, validation, the rest) and the FLOP/s a step achieves against the
CPU's peak (tools/flops.py), the default's time as a share of the previous default's, and for MNIST the accuracy
on scikit-learn's digits converted as users' pictures (pictures.py). Then it trains the reference recipe
(owenliang/mnist-clip: a 6k-parameter encoder, embedding size 8, raw dot-product logits, ten images of distinct
digits per step, Adam 1e-3) for the default run's median training time, built from this project's data pipeline
and loss so that only the recipe differs. Writes benchmark.json and benchmark.md in --output-dir, from which
docs/results.md and the README's results table are taken.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_checkpoint, load_model
from clip import clip_loss
from dataset import Split, Splits, load_splits, normalize
from embeddings import embed_images, zero_shot_accuracy
from metrics import image_retrieval
from pictures import load_user_style_digits, score_user_style
from recipes import FOUR_STAGES
from tools import flops, runs
from utils import PRECISIONS, pick_device, positive_int, resolve_precision

# The validation accuracies whose time to reach each recipe reports, per data set.
LEVELS = {"mnist": (0.98, 0.99, 0.995), "fashion": (0.90, 0.93, 0.945)}


def as_flags(settings: dict) -> list[str]:
    """train.py's flags for `settings`: {"image_widths": (16, 32)} -> ["--image-widths", "16,32"]."""
    flags = []
    for name, value in settings.items():
        flags += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return flags


# The recipes a run of the benchmark trains: the default, the fast setting, and for MNIST the default before
# this one, so that the two are timed side by side on the same machine.
SETTINGS = {
    "default": [],
    "fast": ["--image-widths", "8,16,32,64", "--epochs", "2", "--batch-size", "256", "--lr", "7e-3"],
    "previous-default": as_flags(FOUR_STAGES),
}
MATMUL_SIZE = 2048  # of the matrix product that measures what the machine's arithmetic reaches


# The reference recipe -----------------------------------------------------------------


class ReferenceBlock(nn.Module):
    """owenliang/mnist-clip's residual block: strided 3x3 convolutions and a 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ReferenceCLIP(nn.Module):
    """The reference model: 1->16->4->1 channels (28->14->7->4 pixels), embedding size 8
    with LayerNorm, no temperature and no L2 normalisation: logits are raw dot products.
    6,036 parameters.
    It offers the methods of clip.CLIP that evaluation uses."""

    def __init__(self, embed_dim: int = 8):
        super().__init__()
        self.image_encoder = nn.Sequential(
            ReferenceBlock(1, 16),
            ReferenceBlock(16, 4),
            ReferenceBlock(4, 1),
            nn.Flatten(),
            nn.Linear(16, embed_dim),
            nn.LayerNorm(embed_dim),
        )
        self.text_encoder = nn.Sequential(
            nn.Embedding(10, 16),
            nn.Linear(16, 64),
            nn.ReLU(),
            nn.Linear(64, 16),
            nn.ReLU(),
            nn.Linear(16, embed_dim),
            nn.LayerNorm(embed_dim),
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(tokens).float()

    def encode_classes(self) -> torch.Tensor:
        """Its ten captions' embeddings, as CLIP.encode_classes gives them, unnormalised: its logits use them so."""
        return self.encode_text(torch.arange(10, device=self.text_encoder[0].weight.device))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images) @ self.encode_text(tokens).T


def train_reference(splits: Splits, device: torch.device, seconds: float, seed: int, eval_every: float = 10.0) -> dict:
    """Train the reference recipe for `seconds` of training time (evaluations not counted)."""
    torch.manual_seed(seed)
    model = ReferenceCLIP().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = splits.train.images, splits.train.labels
    # Ten images with distinct digits per step: one random index into each digit's images.
    by_digit = [torch.nonzero(labels == digit).flatten() for digit in range(10)]
    counts = torch.tensor([len(indices) for indices in by_digit], device=device)
    starts = torch.cumsum(counts, 0) - counts
    flat = torch.cat(by_digit)
    tokens, distinct = torch.arange(10, device=device), torch.eye(10, dtype=torch.bool, device=device)
    generator = torch.Generator(device).manual_seed(seed)

    curve, trained, steps = [], 0.0, 0
    while trained < seconds:
        model.train()
        start = time.perf_counter()
        while time.perf_counter() - start < min(eval_every, seconds - trained):
            pick = flat[starts + (torch.rand(10, device=device, generator=generator) * counts).long()]
            loss = clip_loss(model(normalize(images[pick]), tokens), distinct)  # distinct digits: CLIP's own loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        trained += time.perf_counter() - start
        curve.append(
            {"seconds": trained, "val_accuracy": zero_shot_accuracy(model, splits.val.images, splits.val.labels)}
        )
    return {"model": model, "curve": curve, "steps": steps, "train_seconds": trained}


# Measurements ---------------------------------------------------------------------------


def time_to(curve: list[dict], level: float) -> float | None:
    """Seconds of training until the validation accuracy first reached `level`."""
    return next((point["seconds"] for point in curve if point["val_accuracy"] >= level), None)


def encode_seconds(model: nn.Module, images: torch.Tensor, precision: str, repeats: int = 5) -> float:
    """Median time to embed all `images`, after a warm-up."""
    embed_images(model, images[:1000], precision)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        embed_images(model, images, precision)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(model: nn.Module, test, precision: str) -> dict:
    """Test accuracy, and image retrieval over the full test split: top-5 precision, mAP and the share of images found.
    A model that averages each image with its mirror image is also scored seeing each image once, as it was before."""
    features = embed_images(model, test.images, precision)
    retrieval = image_retrieval(features, test.labels.to(features.device), ks=(5,))
    scores = {
        "test_accuracy": zero_shot_accuracy(model, test.images, test.labels, precision),
        "precision@5": retrieval["precision@5"],
        "mAP": retrieval["mAP"],
        "top5_coverage": retrieval["hubness"]["coverage"],
    }
    if model.config.image_mirror_average:
        model.config.image_mirror_average = False
        scores["test_accuracy_one_view"] = zero_shot_accuracy(model, test.images, test.labels, precision)
        model.config.image_mirror_average = True
    return scores


def run_project(
    setting: str, seed: int, args: argparse.Namespace, runs_dir: Path, test, precision: str, users: Split | None
) -> dict:
    """Train the project's recipe `setting` in `precision` (fp32 or bf16, as resolved for this machine) and measure it,
    and on `users` (people's own handwriting, as pictures.score_user_style scores it) where given."""
    argv = [
        *SETTINGS[setting],
        "--seed",
        str(seed),
        "--dataset",
        args.dataset,
        "--data-dir",
        args.data_dir,
        "--precision",
        precision,
    ]
    result = runs.train(argv, runs_dir, f"{setting}-{seed}")
    return {"seed": seed, **measure(runs_dir / f"{setting}-{seed}", result, test, precision, users)}


def measure(run_dir: Path, result: dict, test, precision: str, users: Split | None) -> dict:
    """What a finished run in `run_dir` reached, `result` being its results.json: its curve, its speed, and
    its best.pt's scores on `test` (and on `users`, people's own handwriting, where given)."""
    model, state = load_model(run_dir / "best.pt", test.images.device)
    trained_steps = load_checkpoint(run_dir / "last.pt")["step"]  # best.pt's history stops at the best epoch
    run = {
        "train_seconds": result["train_seconds"],
        "curve": [{"seconds": h["seconds"], "val_accuracy": h["val_accuracy"]} for h in state["history"]],
        "train_images_per_second": trained_steps * int(state["args"]["batch_size"]) / result["train_seconds"],
        "encode_test_seconds": encode_seconds(model, test.images, precision),
        **evaluate(model, test, precision),
    }
    if users is not None:
        run["user_style_accuracy"] = score_user_style(model, users, precision)["accuracy"]
    return run | where_time_goes(model, state, trained_steps, result["train_seconds"], test, precision)


def where_time_goes(model: nn.Module, state: dict, steps: int, train_seconds: float, test, precision: str) -> dict:
    """The arithmetic of the run's steps and the FLOP/s it achieved, and its training time split three ways: its
    steps timed alone on one batch in memory, its validations (each epoch scores --val-size images; timed here on as
    many test images), and the rest: data, augmentation, the weights' average, Python, checkpoints."""
    batch = int(state["args"]["batch_size"])
    images, labels = test.images[:batch], test.labels[:batch]
    step_flops = flops.step_flops(model, images, labels, precision)
    val_size = int(state["args"]["val_size"])
    start = time.perf_counter()
    zero_shot_accuracy(model, test.images[:val_size], test.labels[:val_size], precision)
    one_validation = time.perf_counter() - start
    steps_alone = steps * flops.step_seconds(model, images, labels, precision)
    validation = int(state["args"]["epochs"]) * one_validation
    return {
        "step_gflop": step_flops / 1e9,
        "achieved_gflops": step_flops * steps / train_seconds / 1e9,
        "steps_alone_seconds": steps_alone,
        "validation_seconds": validation,
        "other_seconds": train_seconds - steps_alone - validation,
    }


def summarise(runs: list[dict], levels: tuple[float, ...]) -> dict:
    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    times = {f"{level:.1%}": [time_to(run["curve"], level) for run in runs] for level in levels}
    return {
        "runs": len(runs),
        "test_accuracy_mean": statistics.mean(run["test_accuracy"] for run in runs),
        "test_accuracy_min": min(run["test_accuracy"] for run in runs),
        "precision@5_mean": statistics.mean(run["precision@5"] for run in runs),
        "mAP_mean": statistics.mean(run["mAP"] for run in runs),
        "top5_coverage_mean": statistics.mean(run["top5_coverage"] for run in runs),
        "median_train_seconds": median("train_seconds"),
        "median_seconds_to": {level: statistics.median(t) if None not in t else None for level, t in times.items()},
        "median_train_images_per_second": median("train_images_per_second"),
        "median_encode_test_seconds": median("encode_test_seconds"),
        "user_style_accuracy_mean": statistics.mean(run["user_style_accuracy"] for run in runs)
        if "user_style_accuracy" in runs[0]
        else None,
        "test_accuracy_one_view_mean": statistics.mean(run["test_accuracy_one_view"] for run in runs)
        if "test_accuracy_one_view" in runs[0]
        else None,
        # Where the time goes (tools/flops.py): the project's runs only.
        **{
            f"median_{key}": median(key) if key in runs[0] else None
            for key in ("step_gflop", "achieved_gflops", "steps_alone_seconds", "validation_seconds", "other_seconds")
        },
    }


def seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f} s"


def shared_sentence(c: dict) -> str:
    if c["shared_level"] is None:
        return "The reference does not reach 80% validation accuracy in every run, so there is no shared level to time."
    ratio = c["reference_seconds_to_shared"] / c["project_seconds_to_shared"]
    return (
        f"To {c['shared_level']:.0%} validation accuracy, the highest level both reach in every run, this project "
        "takes "
        f"{seconds(c['project_seconds_to_shared'])} and the reference {seconds(c['reference_seconds_to_shared'])} "
        f"({ratio:.1f}x)."
    )


def markdown(report: dict) -> str:
    m = report["machine"]
    limits = " ".join(f"{name}={value}" for name, value in m["isa_limits"].items())
    held = f", torch held below them by {limits}" if limits else ""
    rows = [
        "| recipe | runs | test accuracy (mean, min) | retrieval precision@5, mAP | images in any top-5 | training "
        f"time (median) | to {' / '.join(next(iter(report['summary'].values()))['median_seconds_to'])} val (median) "
        "| train img/s | encode 10k test images | users' digits (mean) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in report["summary"].items():
        to = " / ".join(seconds(t) for t in s["median_seconds_to"].values())
        users = "–" if s["user_style_accuracy_mean"] is None else f"{s['user_style_accuracy_mean']:.1%}"
        rows.append(
            f"| {name} | {s['runs']} | {s['test_accuracy_mean']:.2%}, {s['test_accuracy_min']:.2%} | "
            f"{s['precision@5_mean']:.4f}, {s['mAP_mean']:.4f} | {s['top5_coverage_mean']:.1%} "
            f"| {s['median_train_seconds']:.0f} s | {to} | {s['median_train_images_per_second']:,.0f} | "
            f"{s['median_encode_test_seconds']:.2f} s | {users} |"
        )
    lines = [
        f"Machine: {m['cpu']} ({', '.join(m['cpu_vector_units'])}{held}), {m['cores']} cores ({m['torch_threads']} "
        "torch threads), "
        f"GPU: {m['gpu'] or 'none'}, torch {m['torch']}.",
        f"Precision: {m['precision']}.",
        f"Command: `{report['command']}`",
        "",
        *rows,
        "",
        "Retrieval ranks by cosine, as `inference.py` does; the reference's by the dot product, as its logits do "
        "(its embeddings are not normalised).",
        *(
            f"{name}: each image is embedded as the mean of it and its mirror image; seeing each image once, the "
            "same models reach "
            f"{s['test_accuracy_one_view_mean']:.2%} test accuracy (mean)."
            for name, s in report["summary"].items()
            if s["test_accuracy_one_view_mean"] is not None
        ),
    ]
    lines += time_lines(report)
    if "previous-default" in report["summary"] and "default" in report["summary"]:
        lines.append(speed_up_sentence(report["summary"]))
    if "comparison" in report:
        c = report["comparison"]
        lines.append(
            f"At equal training time ({c['budget_seconds']:.0f} s) the reference recipe reaches "
            f"{c['reference_accuracy_at_budget']:.2%} "
            f"test accuracy, this project {c['project_accuracy']:.2%}."
        )
        lines.append(shared_sentence(c))
    return "\n".join([*lines, ""])


def speed_up_sentence(summary: dict) -> str:
    """How the default's training time and accuracy compare with the recipe before it, timed side by side."""
    new, old = summary["default"], summary["previous-default"]
    ratio = new["median_train_seconds"] / old["median_train_seconds"]
    return (
        f"The default trains in {ratio:.0%} of the previous default's time ({new['median_train_seconds']:.0f} s "
        f"against {old['median_train_seconds']:.0f} s, medians of the same machine's runs), to "
        f"{new['test_accuracy_mean']:.2%} test accuracy against {old['test_accuracy_mean']:.2%} (means)."
    )


def time_lines(report: dict) -> list[str]:
    """Where each recipe's training time goes, and how much of the CPU's arithmetic its steps use."""
    peak = report["peak"]
    nominal = peak["nominal"]
    lines = [
        "",
        f"The machine's limit in {peak['precision']}: a {peak['matmul_size']}² matrix product reaches "
        f"{peak['matmul_gflops']:,.0f} GFLOP/s"
        + (f"; the nominal peak is {nominal['flops'] / 1e9:,.0f} GFLOP/s ({nominal['formula']})." if nominal else "."),
    ]
    for name, s in report["summary"].items():
        if s["median_step_gflop"] is None:
            continue
        achieved = s["median_achieved_gflops"]
        share = f", {achieved * 1e9 / nominal['flops']:.0%} of the nominal peak" if nominal else ""
        of_matmul = achieved / peak["matmul_gflops"]
        lines.append(
            f"{name}: a step is {s['median_step_gflop']:.1f} GFLOP (forward and backward); over its whole training "
            f"time the run achieves {achieved:,.0f} GFLOP/s, {of_matmul:.0%} of the matrix product's"
            f"{share}. Of its {s['median_train_seconds']:.0f} s: the steps alone (one batch in memory) "
            f"{s['median_steps_alone_seconds']:.0f} s, validation {s['median_validation_seconds']:.0f} s, the rest "
            f"(data, augmentation, the weights' average, Python, checkpoints) {s['median_other_seconds']:.0f} s."
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", choices=tuple(LEVELS), default="mnist", help="the data set to train and test on")
    p.add_argument("--data-dir", default="data", help="folder that holds (or receives) the data set")
    p.add_argument("--runs", type=positive_int, default=3, help="seeded runs of each recipe")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to train")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="as train.py's --precision")
    p.add_argument("--output-dir", type=Path, default=Path("docs"), help="where benchmark.json and benchmark.md go")
    p.add_argument(
        "--recipes",
        nargs="+",
        choices=(*SETTINGS, "reference"),
        help="what to measure (reference needs default; previous-default: MNIST's) [default: all that apply]",
    )
    args = p.parse_args(argv)
    if args.recipes is None:
        args.recipes = [
            name for name in (*SETTINGS, "reference") if args.dataset == "mnist" or name != "previous-default"
        ]
    if "previous-default" in args.recipes and args.dataset != "mnist":
        p.error(f"--recipes previous-default is MNIST's recipe before this one: {args.dataset}'s has not changed")
    if "reference" in args.recipes and "default" not in args.recipes:
        p.error("--recipes reference trains for the default recipe's time: measure default too")
    device = pick_device(args.device)
    precision, why = resolve_precision(args.precision, device)
    print(why)
    splits = load_splits(args.dataset, args.data_dir, val_size=5000)
    test = splits.test.to(device)
    users = (
        load_user_style_digits() if args.dataset == "mnist" else None
    )  # converted once, scored after every MNIST run

    # Seed by seed, each recipe in turn: a machine that runs faster for a while then speeds all of them alike.
    results: dict[str, list[dict]] = {setting: [] for setting in SETTINGS if setting in args.recipes}
    with tempfile.TemporaryDirectory() as runs_dir:
        for seed in range(args.runs):
            for setting, runs_of_setting in results.items():
                runs_of_setting.append(run_project(setting, seed, args, Path(runs_dir), test, precision, users))
    machine = runs.machine(why)
    report = {
        "command": " ".join(["python -m tools.benchmark", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine,
        "peak": {
            "precision": precision,
            "nominal": flops.nominal_peak(precision, machine["cpu_vector_units"], machine["cores"])
            if device.type == "cpu"
            else None,
            "matmul_size": MATMUL_SIZE,
            "matmul_gflops": flops.matmul_peak(precision, device, MATMUL_SIZE) / 1e9,
        },
    }
    if "reference" in args.recipes:
        results["reference"] = measure_reference(
            splits, test, device, args.runs, statistics.median(run["train_seconds"] for run in results["default"])
        )
    report["summary"] = {name: summarise(runs, LEVELS[args.dataset]) for name, runs in results.items()}
    if "reference" in results:
        report["comparison"] = compare(results, report["summary"])
    report["runs"] = results
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    (args.output_dir / "benchmark.md").write_text(markdown(report))
    print(markdown(report))
    return report


def measure_reference(splits: Splits, test, device: torch.device, runs: int, budget: float) -> list[dict]:
    """The reference recipe, trained for the default recipe's median time `budget`, `runs` seeds."""
    device_splits = Splits(splits.train.to(device), splits.val.to(device), test)
    results = []
    for seed in range(runs):
        print(f"reference recipe, seed {seed}: training for {budget:.0f} s")
        reference = train_reference(device_splits, device, budget, seed)
        results.append(
            {
                "seed": seed,
                "train_seconds": reference["train_seconds"],
                "train_images_per_second": 10 * reference["steps"] / reference["train_seconds"],
                "curve": reference["curve"],
                "encode_test_seconds": encode_seconds(reference["model"], test.images, "fp32"),
                # Its embeddings are not normalised: it ranks by their dot product alone, as its logits do.
                **evaluate(reference["model"], test, "fp32"),
            }
        )
    return results


def compare(results: dict[str, list[dict]], summary: dict) -> dict:
    """The default against the reference: accuracy at equal time, and the time to the highest level both reach."""
    curves = {name: [run["curve"] for run in results[name]] for name in ("default", "reference")}
    reached = [
        lv
        for lv in (0.8, 0.85, 0.9, 0.95, 0.98)
        if all(time_to(c, lv) is not None for cs in curves.values() for c in cs)
    ]
    shared = max(reached, default=None)
    seconds_to_shared = {
        name: statistics.median(time_to(c, shared) for c in cs) if shared else None for name, cs in curves.items()
    }
    return {
        "budget_seconds": statistics.median(run["train_seconds"] for run in results["default"]),
        "project_accuracy": summary["default"]["test_accuracy_mean"],
        "reference_accuracy_at_budget": summary["reference"]["test_accuracy_mean"],
        "shared_level": shared,
        "project_seconds_to_shared": seconds_to_shared["default"],
        "reference_seconds_to_shared": seconds_to_shared["reference"],
    }


if __name__ == "__main__":
    main()
