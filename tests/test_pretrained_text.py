"""A pretrained text tower from a Hugging Face folder (hf_text.py): a tiny BERT that each test writes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import settings  # noqa: E402
import train  # noqa: E402
from checkpoint import load_checkpoint, load_model  # noqa: E402
from distributed import ONE_PROCESS  # noqa: E402
from hf_text import PretrainedError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "handwritten", "digit", "the", "number", "photo", "of"]
WORDS += [*"0123456789", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TINY = ["--dataset", "digits", "--image-widths", "8,16", "--embed-dim", "16", "--captions", "templates"]


@pytest.fixture
def bert_folder(tmp_path: Path) -> Path:
    """A BERT of two blocks, 16 wide, with dropout, saved as Hugging Face saves one."""
    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    config = transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    return transformers.AutoModel.from_pretrained(folder, add_pooling_layer=False).state_dict()


def tower_weights(state_dict: dict) -> dict[str, torch.Tensor]:
    prefix = "text_encoder.model."
    return {name[len(prefix) :]: value for name, value in state_dict.items() if name.startswith(prefix)}


def test_a_locked_tower_keeps_the_folders_weights_and_its_checkpoint_runs_without_the_folder(
    bert_folder: Path, tmp_path: Path
):
    runs = tmp_path / "runs"
    train.main([*TINY, "--text-pretrained", str(bert_folder), "--lock-text", "--dry-run", "--runs-dir", str(runs)])
    last = load_checkpoint(next(runs.glob("*/last.pt")))
    expected = folder_weights(bert_folder)
    for weights in (last["training_model"], last["model"]):  # what the optimizer stepped, and its average
        assert tower_weights(weights).keys() == expected.keys()
        assert all(torch.equal(tower_weights(weights)[name], value) for name, value in expected.items())

    # An independent reading of the same captions: the folder's BERT, mean-pooled, through the run's projection.
    captions = ["a handwritten seven", "the number 3 of a photo"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_folder)
    encoded = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = transformers.AutoModel.from_pretrained(bert_folder).eval()(**encoded).last_hidden_state
        mask = encoded["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        weight, bias = last["model"]["text_encoder.projection.weight"], last["model"]["text_encoder.projection.bias"]
        independent = torch.nn.functional.normalize(pooled @ weight.T + bias, dim=-1)

    for path in bert_folder.iterdir():
        path.unlink()
    bert_folder.rmdir()
    model, _ = load_model(next(runs.glob("*/best.pt")))  # rebuilt from the checkpoint alone
    with torch.no_grad():
        read = model.encode_text(model.tokenize(captions))
    assert torch.allclose(read, independent, atol=1e-5)


def test_a_locked_tower_stays_in_eval_mode_and_out_of_the_optimizer_but_for_its_unlocked_blocks(bert_folder: Path):
    args = settings.parse_args([*TINY, "--text-pretrained", str(bert_folder), "--lock-text"])
    args.lock_text_unlocked_layers = 1
    task = train.TASKS["digits"](args)
    state, _ = train.new_run(args, train.model_config(args, task), 10, train.distributed.ONE_PROCESS)
    tower = state.training_model.text_encoder
    state.training_model.train()
    assert not tower.model.embeddings.training and not tower.model.encoder.layer[0].training  # no dropout
    assert tower.model.encoder.layer[1].training and tower.projection.training
    optimized = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in tower.model.embeddings.parameters())
    assert not any(id(p) in optimized for p in tower.model.encoder.layer[0].parameters())
    assert all(id(p) in optimized for p in tower.model.encoder.layer[1].parameters())


@pytest.mark.parametrize(
    "remove, message",
    [
        ("config.json", "has no config.json: give a Hugging Face model folder"),
        ("model.safetensors", "has no weights (model.safetensors or pytorch_model.bin)"),
        ("tokenizer.json vocab.txt", "has no tokenizer (tokenizer.json or vocab.txt)"),
    ],
)
def test_a_folder_that_lacks_a_part_is_named_in_one_line_and_no_run_is_written(
    bert_folder: Path, tmp_path: Path, remove: str, message: str
):
    for name in remove.split():
        (bert_folder / name).unlink()
    runs = tmp_path / "runs"
    with pytest.raises(PretrainedError) as stopped:
        train.main([*TINY, "--text-pretrained", str(bert_folder), "--dry-run", "--runs-dir", str(runs)])
    assert message in str(stopped.value) and "\n" not in str(stopped.value)
    assert not runs.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lock-text"], "--lock-text locks a pretrained text tower: add --text-pretrained FOLDER"),
        (["--text-encoder", "pretrained"], "give it with --text-pretrained FOLDER"),
        (["--text-pooling", "cls"], "--text-pooling pools a pretrained text tower"),
    ],
)
def test_settings_for_a_pretrained_tower_without_one_are_refused_with_usage(argv: list[str], message: str, capsys):
    with pytest.raises(SystemExit):
        settings.parse_args([*TINY, "--text-encoder", "transformer", *argv])
    assert message in capsys.readouterr().err


def test_without_transformers_the_error_is_one_line_naming_the_install(bert_folder: Path, tmp_path: Path):
    argv = [*TINY, "--text-pretrained", str(bert_folder), "--dry-run", "--runs-dir", str(tmp_path)]
    # train.py run as a user runs it, where `import transformers` fails.
    script = f"import sys, runpy; sys.modules['transformers'] = None; sys.argv = ['train.py', *{argv!r}]; "
    script += "runpy.run_path('train.py', run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert (
        done.stderr == "error: a pretrained text tower needs transformers: pip install -r requirements-pretrained.txt\n"
    )


def test_a_locked_towers_caption_features_computed_once_are_what_it_reads_at_each_step(bert_folder: Path):
    args = settings.parse_args([*TINY, "--text-pretrained", str(bert_folder), "--lock-text"])
    state, _ = train.new_run(args, train.model_config(args, train.TASKS["digits"](args)), 10, ONE_PROCESS)
    model = state.training_model.train()
    tokens = model.tokenize(["a handwritten seven", "the number 3", "zero"])
    once = model.encode_text(model.text_encoder.pooled_features(tokens))
    assert torch.allclose(once, model.encode_text(tokens), atol=1e-6)
